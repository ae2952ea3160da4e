"""Pipelines: small TOML files that chain ``extract -> fit-head -> finetune -> report``.

A pipeline file has a few top-level keys and one table per stage it runs::

    data = "{cache_dir}/datasets/hymenoptera_data"    # images, a CSV manifest or torchvision:NAME
    fetch = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"  # used when data is missing

    [extract]
    backbone = "mobilenet_v2"     # a list, e.g. ["mobilenet_v2", "resnet18"], runs one branch per value
    [fit-head]
    [finetune]
    epochs = 2
    [report]

The keys of a stage table are the parameters of its Python function (the options of
its ``fc`` command, with ``_`` or ``-``), read from the function's signature, so the
file, the CLI and the API cannot drift apart. A list where the parameter takes one
value gives one branch per value (several lists: every combination). ``{cache_dir}`` in
``data`` stands for the cache directory; other relative paths start from the current
directory. ``--set KEY=VALUE`` overrides a key (``STAGE.KEY`` inside a table; the value
is read as TOML, else as a string) and ``--set STAGE=false`` skips a stage. Every stage
is content-addressed (caches, runs, fine-tuned models and reports are found by the hash
of what made them), so running an unchanged pipeline again only looks its results up.
A pipeline with a ``[report]`` stage whose branches fit heads on several caches (several
backbones, say) ends with one comparison of their runs (:mod:`featurecache.reporting.compare`).
"""

from __future__ import annotations

import inspect
import itertools
import os
import sys
import time
import tomllib
import types
import typing
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .. import store
from ..data.sources import is_source_name
from ..errors import PipelineError, suggest
from ..stages import BY_COMMAND
from .fetchers import FETCHERS, fetch_zip

# --------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    """One step of a pipeline: how the public function of its ``fc`` command is wired to the others."""

    name: str  # the table name, the same as the ``fc`` command
    input: str  # the parameter the pipeline fills in
    needs: str | None  # the stage whose output feeds ``input`` (None: the top-level ``data``)
    provides: str | None  # the key of ``result.to_dict()`` handed to the stages that need this one
    why: str  # what ``needs`` is for, for the error message

    def function(self):
        return BY_COMMAND[self.name].load()

    def parameters(self) -> dict[str, inspect.Parameter]:
        """The keys its table accepts: the function's parameters the pipeline does not fill itself."""
        fn = self.function()
        try:
            sig = inspect.signature(fn, eval_str=True)
        except (NameError, TypeError):  # an annotation that cannot be evaluated: check names only
            sig = inspect.signature(fn)
        return {n: p for n, p in sig.parameters.items() if n not in (self.input, *WIRED)}


STAGES = {
    stage.name: stage
    for stage in (
        Stage("extract", "data", None, "cache", ""),
        Stage("fit-head", "cache", "extract", "run_dir", "it fits heads on the features [extract] writes"),
        Stage("finetune", "run", "fit-head", None, "it fine-tunes the backbone with a head of a [fit-head] run"),
        Stage("report", "run", "fit-head", None, "it reports on a [fit-head] run"),
    )
}
# Parameters the pipeline passes to every stage that takes them: cache_dir from the
# top level, progress from the caller of run(), compare=False: each branch reports on
# its own run, and a pipeline of several branches ends with their comparison (_compare),
# and shard=None: the later stages need the whole cache, so a pipeline extracts every slice.
WIRED = ("cache_dir", "progress", "compare", "shard")
TOP_LEVEL = {"data": str, "cache_dir": str, "fetch": str}


def _canonical_stage(name: str) -> str:
    return name.replace("_", "-")


def _canonical_option(name: str) -> str:
    return name.replace("-", "_")


# --------------------------------------------------------------------------- types

_TOML_KINDS = {str: "str", bool: "bool", int: "int", float: "float", list: "list", dict: "dict"}
_KIND_WORDS = {"str": "a string", "bool": "true or false", "int": "an integer", "float": "a number",
               "list": "a list", "dict": "a table"}
_ANY = frozenset(_KIND_WORDS)


def _kind(value) -> str:
    return next((k for t, k in _TOML_KINDS.items() if isinstance(value, t)), type(value).__name__)


def _kinds(annotation, default=inspect.Parameter.empty) -> frozenset:
    """The TOML value kinds a parameter accepts, from its annotation (or its default)."""
    if annotation is inspect.Parameter.empty or isinstance(annotation, str):
        if default is inspect.Parameter.empty or default is None:
            return _ANY
        return _kinds(type(default))
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return frozenset().union(*(_kinds(a) for a in typing.get_args(annotation)))
    if origin is typing.Literal:
        return frozenset(_kind(a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return frozenset()
    if annotation is float:
        return frozenset({"float", "int"})
    base = origin or annotation
    for classes, kind in (((str, os.PathLike), "str"), (dict, "dict"), ((list, tuple, Sequence), "list")):
        if isinstance(base, type) and issubclass(base, classes):
            return frozenset({kind})
    kind = _TOML_KINDS.get(base)
    return frozenset({kind}) if kind else _ANY


def _expected(kinds: frozenset) -> str:
    return " or ".join(_KIND_WORDS[k] for k in _KIND_WORDS if k in kinds and not (k == "int" and "float" in kinds))


# --------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """A validated pipeline: the data, the stages in order and one option set per branch."""

    path: Path
    data: str | None
    fetch: str | None
    cache_dir: str | None
    stages: list[str]
    branches: list[dict[str, dict]] = field(default_factory=list)  # stage -> options
    labels: list[str] = field(default_factory=list)  # what distinguishes each branch


def _parse_value(text: str):
    """A ``--set`` value: a TOML value when it parses as one, else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _apply_override(doc: dict, item: str, path: Path, overridden: set) -> None:
    key, sep, text = item.partition("=")
    parts = [p.strip() for p in key.strip().split(".")]
    if not sep or not all(parts):
        raise PipelineError(f"{path}: --set {item!r}: expected KEY=VALUE, e.g. extract.backbone=resnet50 or data=/path")
    if len(parts) > 2:
        raise PipelineError(f"{path}: --set {item!r}: keys are KEY or STAGE.KEY, not {key.strip()}")
    table = doc
    if len(parts) == 2:
        name = _canonical_stage(parts[0])
        existing = next((k for k in doc if _canonical_stage(k) == name), name)
        if not isinstance(doc.get(existing, {}), dict):
            doc[existing] = {}
        table = doc.setdefault(existing, {})
        for spelling in [k for k in table if _canonical_option(k) == _canonical_option(parts[1])]:
            del table[spelling]  # batch-size overrides batch_size
    table[parts[-1]] = _parse_value(text.strip())
    overridden.add(".".join(parts))


def load(pipeline: str | os.PathLike, overrides: Iterable[str] = ()) -> Plan:
    """Read, override and check a pipeline file; raises :class:`PipelineError` naming the file and key."""
    path = Path(pipeline)
    if not path.is_file():
        raise PipelineError(f"{path}: no such pipeline file")
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: not a valid TOML file: {exc}") from None
    overridden: set[str] = set()
    for item in overrides:
        _apply_override(doc, item, path, overridden)
    return _check(doc, path, overridden)


def _where(path: Path, key: str, overridden: set) -> str:
    return f"{path}: {key}" + (" (from --set)" if key in overridden else "")


def _check(doc: dict, path: Path, overridden: set) -> Plan:
    top, tables = _split_document(doc, path, overridden)
    _check_needs(tables, path)
    data = top.get("data")
    if "extract" in tables:
        data = _check_data(path, data, top.get("fetch"), top.get("cache_dir"), overridden)
    fixed, axes = _stage_options(tables, path, overridden)
    branches, labels = _branches(fixed, axes)
    return Plan(path, data, top.get("fetch"), top.get("cache_dir"), list(fixed), branches, labels)


def _split_document(doc: dict, path: Path, overridden: set) -> tuple[dict, dict]:
    """The top-level keys and the stage tables of a pipeline file (a stage set to false left out)."""
    top, tables = {}, {}
    for key, value in doc.items():
        stage, where = _canonical_stage(key), _where(path, key, overridden)
        if stage in STAGES:
            if stage in tables:
                raise PipelineError(f"{where}: [{stage}] is given twice")
            if value is False:
                continue  # a stage switched off, e.g. --set finetune=false
            if not isinstance(value, dict):
                raise PipelineError(f"{where}: expected a table ([{stage}]) or false, got {value!r}")
            tables[stage] = value
        elif key in TOP_LEVEL:
            if not isinstance(value, TOP_LEVEL[key]):
                raise PipelineError(f"{where}: expected {_KIND_WORDS[_TOML_KINDS[TOP_LEVEL[key]]]}, got {value!r}")
            top[key] = value
        else:
            raise PipelineError(f"{where}: unknown key" + (suggest(key, [*TOP_LEVEL, *STAGES]) or
                                                          f" (expected one of: {', '.join([*TOP_LEVEL, *STAGES])})"))
    return top, tables


def _check_needs(tables: dict, path: Path) -> None:
    if not tables:
        raise PipelineError(f"{path}: no stage to run; add at least one of " + ", ".join(f"[{s}]" for s in STAGES))
    for name in tables:
        needs = STAGES[name].needs
        if needs and needs not in tables:
            raise PipelineError(f"{path}: [{name}] needs [{needs}]: {STAGES[name].why}; add a [{needs}] table")


def _stage_options(tables: dict, path: Path, overridden: set) -> tuple[dict, list]:
    """Each stage's fixed options, and the (stage, option, values) axes that make branches."""
    axes: list[tuple[str, str, list]] = []
    fixed: dict[str, dict] = {}
    for name in (s for s in STAGES if s in tables):
        fixed[name] = {}
        params = STAGES[name].parameters()
        for key, value in tables[name].items():
            option = _canonical_option(key)
            where = _where(path, f"{name}.{key}", overridden)
            if option not in params:
                raise PipelineError(f"{where}: unknown option of [{name}]"
                                    + (suggest(option, params) or f" (expected one of: {', '.join(params)})"))
            if option in fixed[name] or any(a[:2] == (name, option) for a in axes):
                raise PipelineError(f"{where}: given twice (as {option} and with - or _)")
            values = _check_value(where, params[option], value)
            if values is None:
                fixed[name][option] = value
            else:
                axes.append((name, option, values))
    return fixed, axes


def _branches(fixed: dict, axes: list) -> tuple[list[dict], list[str]]:
    """One option set per combination of the axes' values, and the label that tells it apart."""
    branches, labels = [], []
    for combo in itertools.product(*(values for _, _, values in axes)):
        options = {name: dict(opts) for name, opts in fixed.items()}
        for (name, option, _), value in zip(axes, combo):
            options[name][option] = value
        branches.append(options)
        labels.append(", ".join(f"{name}.{option}={value}" for (name, option, _), value in zip(axes, combo)))
    return branches, labels


def _check_value(where: str, param: inspect.Parameter, value) -> list | None:
    """Check ``value`` against the parameter; return the branch values when it is a list of alternatives."""
    kinds = _kinds(param.annotation, param.default)
    if isinstance(value, list) and value and ("list" not in kinds or all(isinstance(v, list) for v in value)):
        for v in value:
            if _kind(v) not in kinds:
                raise PipelineError(f"{where}: expected {_expected(kinds)} (or a list of them, one branch each), "
                                    f"got {v!r}")
        return value
    if _kind(value) not in kinds:
        plural = "" if "list" in kinds else " (or a non-empty list of them, one branch each)"
        raise PipelineError(f"{where}: expected {_expected(kinds)}{plural}, got {value!r}")
    return None


def _check_data(path: Path, data, fetch, cache_dir, overridden) -> str:
    if data is None:
        raise PipelineError(f"{path}: data: missing; expected the images to use: a folder, a CSV manifest "
                            f"or torchvision:NAME (e.g. data = \"path/to/images\")")
    data = data.replace("{cache_dir}", str(store.default_cache_dir(cache_dir)))
    if fetch is not None:
        if "://" in fetch:
            scheme = urllib.parse.urlsplit(fetch).scheme
            if scheme not in ("http", "https", "file"):
                raise PipelineError(f"{_where(path, 'fetch', overridden)}: expected an http(s):// or file:// "
                                    f"URL of a zip file, or one of {', '.join(FETCHERS)}; got {fetch!r}")
        elif fetch not in FETCHERS:
            raise PipelineError(f"{_where(path, 'fetch', overridden)}: unknown source {fetch!r}"
                                + (suggest(fetch, FETCHERS) or f" (expected a URL or one of {', '.join(FETCHERS)})"))
    if not is_source_name(data) and not Path(data).expanduser().exists() and fetch is None:
        raise PipelineError(f"{_where(path, 'data', overridden)}: {data} does not exist; expected a folder of "
                            f"images, a CSV manifest or SCHEME:... (torchvision:, webdataset:, hf:, parquet:; or add "
                            "fetch = URL to download it)")
    return data


# --------------------------------------------------------------------------- fetching data

def _fetch(data: str, fetch: str, echo) -> None:
    dest = Path(data).expanduser()
    if is_source_name(data) or dest.exists():
        return
    echo(f"fetch     {fetch} -> {dest}")
    if "://" in fetch:
        fetch_zip(fetch, dest)
    else:
        FETCHERS[fetch](dest)


# --------------------------------------------------------------------------- running


def _describe_extract(out: dict) -> str:
    splits = " ".join(f"{k}={v['n']}" for k, v in out["splits"].items())
    splits += f" train views={out['views']}" if out.get("views") else ""
    splits += f"; layers {','.join(out['layers'])}" if out.get("layers") else ""
    state = "reused" if out["reused"] else f"{out['images_per_s']:.1f} images/s"
    return f"{out['cache']} ({state}; {splits})"


def _describe_fit_head(out: dict) -> str:
    top = out["leaderboard"][0] if out.get("leaderboard") else {}
    score = f", {top['selection_split']} accuracy {top['selection_accuracy']:.4f}" if top else ""
    return f"{out['run_dir']} (best {out['best']}{score})"


def _describe_finetune(out: dict) -> str:
    return (f"{out['model']} ({out['split']} accuracy {out['head_accuracy']:.4f} with the head alone, "
            f"{out['best_accuracy']:.4f} fine-tuned)")


DESCRIBE = {"extract": _describe_extract, "fit-head": _describe_fit_head, "finetune": _describe_finetune,
            "report": str}


def _output(result):
    return result.to_dict() if hasattr(result, "to_dict") else str(result)


def run(pipeline: str | os.PathLike, set: tuple[str, ...] = (), progress: bool = True) -> dict:
    """Run the stages a pipeline file declares; ``set`` holds ``KEY=VALUE`` overrides.

    Returns ``{"pipeline", "seconds", "branches": [{"label", "options", "stages": {stage: output}}]}``,
    where each stage's output is its result's ``to_dict()`` (the report: the path of report.html),
    and ``"comparison"``: the path of comparison.html when a pipeline with a [report] stage
    fitted heads on two runs or more (several backbones, say).
    """
    started = time.perf_counter()
    plan = load(pipeline, set)

    def echo(line: str) -> None:
        if progress:
            print(line, file=sys.stderr, flush=True)

    if plan.fetch and plan.data:
        _fetch(plan.data, plan.fetch, echo)
    branches = []
    for label, options in zip(plan.labels, plan.branches):
        if label:
            echo(f"branch    {label}")
        outputs = _run_branch(plan, options, echo, bars=progress and sys.stderr.isatty())
        branches.append({"label": label, "options": options, "stages": outputs})
    result = {"pipeline": str(plan.path), "seconds": 0.0, "branches": branches}
    comparison = _compare(plan, branches, echo)
    if comparison is not None:
        result["comparison"] = comparison
    result["seconds"] = round(time.perf_counter() - started, 3)
    return result


def _compare(plan: Plan, branches: list[dict], echo) -> str | None:
    """With a [report] stage and two runs or more, one comparison of them: the path of its HTML page."""
    runs = list(dict.fromkeys(b["stages"]["fit-head"]["run_dir"] for b in branches if "fit-head" in b["stages"]))
    if "report" not in plan.stages or len(runs) < 2:
        return None
    t0 = time.perf_counter()
    path = str(STAGES["report"].function()(runs, cache_dir=plan.cache_dir, compare=True))
    echo(f"{'compare':<9} {path}  [{time.perf_counter() - t0:.1f} s]")
    return path


def _run_branch(plan: Plan, options: dict[str, dict], echo, bars: bool) -> dict:
    """Run one branch's stages in order, each fed with the output of the stage it needs."""
    outputs: dict[str, object] = {}
    for name in plan.stages:
        stage = STAGES[name]
        fn = stage.function()
        accepted = inspect.signature(fn).parameters
        kwargs = dict(options[name])
        kwargs[stage.input] = plan.data if stage.needs is None else outputs[stage.needs][STAGES[stage.needs].provides]
        wired = {"cache_dir": plan.cache_dir, "progress": bars, "compare": False, "shard": None}
        kwargs.update({key: value for key, value in wired.items() if key in accepted})
        t0 = time.perf_counter()
        outputs[name] = _output(fn(**kwargs))
        echo(f"{name:<9} {DESCRIBE[name](outputs[name])}  [{time.perf_counter() - t0:.1f} s]")
    return outputs
