"""The public functions and the ``fc`` commands that wrap them, listed once.

``featurecache/__init__.py`` exports these functions, :mod:`featurecache.pipeline` runs
the stages among them, and ``tests/test_api_cli_names.py`` pairs each command with its
function, all from :data:`FUNCTIONS`. This module imports nothing heavy, so that
``import featurecache`` and ``fc --help`` stay fast.
"""

from __future__ import annotations

import importlib
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
    Function("fit_head", "featurecache.sweep.stage", "fit-head"),
    Function("audit", "featurecache.auditing.stage", "audit"),
    Function("finetune", "featurecache.finetuning.trainer", "finetune"),
    Function("predict", "featurecache.finetuning.prediction", "predict"),
    Function("report", "featurecache.reporting.pages", "report"),
    Function("list_runs", "featurecache.reporting.compare", "runs"),
    Function("run", "featurecache.pipeline.run", "run"),
)
# The stage modules are named extractor, sweep, auditing, finetuning, prediction, reporting and pipeline
# so that importing them never shadows the functions of the same name in the package.

BY_NAME: dict[str, Function] = {f.name: f for f in FUNCTIONS}
BY_COMMAND: dict[str, Function] = {f.command: f for f in FUNCTIONS if f.command}
