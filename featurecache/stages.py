"""The public functions and the ``fc`` commands that wrap them, listed once.

``featurecache/__init__.py`` exports these functions, :mod:`featurecache.pipeline` runs
the stages among them, and ``tests/test_api_cli_names.py`` pairs each command with its
function, all from :data:`FUNCTIONS`. This module imports nothing heavy, so that
``import featurecache`` and ``fc --help`` stay fast.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Function:
    """A public function: ``featurecache.<name>``, defined in ``module``, wrapped by ``fc <command>``."""

    name: str
    module: str
    command: str | None  # None: a function of the API with no command of its own

    @property
    def target(self) -> str:
        """``"module:function"``."""
        return f"{self.module}:{self.name}"

    def load(self):
        """The function itself (imports its module, and with it torch and friends)."""
        return getattr(importlib.import_module(self.module), self.name)


FUNCTIONS: tuple[Function, ...] = (
    Function("extract", "featurecache.extraction.stage", "extract"),
    Function("load_features", "featurecache.store", None),
    Function("export", "featurecache.extraction.export", "export"),
    Function("fit_head", "featurecache.sweep.stage", "fit-head"),
    Function("curve", "featurecache.sweep.curve", "curve"),
    Function("audit", "featurecache.auditing.stage", "audit"),
    Function("finetune", "featurecache.finetuning.trainer", "finetune"),
    Function("predict", "featurecache.finetuning.prediction", "predict"),
    Function("report", "featurecache.reporting.pages", "report"),
    Function("list_runs", "featurecache.reporting.listing", "runs"),
    Function("run", "featurecache.pipeline.run", "run"),
)
# No module or package is named like a function here (extract, finetune, report, ...): importing
# ``featurecache.extract`` as a module would replace the function ``featurecache.extract``.

BY_NAME: dict[str, Function] = {f.name: f for f in FUNCTIONS}
BY_COMMAND: dict[str, Function] = {f.command: f for f in FUNCTIONS if f.command}


def takes(options: type) -> Callable[[Callable], Callable]:
    """Give a stage's public function the parameters of its options dataclass, declared once.

    ``@takes(ExtractOptions) def extract(options)`` is called as ``extract(data, backbone=...)``
    with exactly the dataclass's fields as parameters (their defaults and types included, so
    ``help()``, :mod:`inspect`, the pipeline files' type checks and the CLI's pairing test see
    them); the body receives the one frozen options object and hands it down. A new option of
    a stage is then one field, not a slot in every helper's parameter list.
    """
    hints = typing.get_type_hints(options)
    signature = inspect.Signature([
        inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hints[f.name],
                          default=inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default)
        for f in dataclasses.fields(options)
    ])

    def wrap(body: Callable) -> Callable:
        @functools.wraps(body)
        def stage(*args, **kwargs):
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise TypeError(f"{body.__name__}(): {exc}") from None
            return body(options(**bound.arguments))

        stage.__signature__ = signature.replace(return_annotation=typing.get_type_hints(body).get("return",
                                                                                               signature.empty))
        stage.options = options
        return stage

    return wrap
