"""Stage two: fit a grid of heads on one feature cache, rank them, keep every one.

The grid comes from ``--head`` specs (``logreg:C=0.01,0.1;pre=standardize``), from a
TOML sweep file, or from :data:`featurecache.heads.DEFAULT_SWEEP`. Heads are selected
on ``val`` when the cache has it, otherwise by stratified k-fold cross-validation on
``train`` (the ``cv`` split of the metrics); final metrics are on ``test`` when it
exists. Every leaderboard entry names the split it was selected on, so a number used
to choose a head is never shown as a held-out score.

A sweep file holds ``[[head]]`` tables: ``name`` picks the head, every other key is a
parameter and a list gives the values to try::

    [[head]]
    name = "logreg"
    C = [0.01, 0.1, 1, 10]
    pre = "standardize"

    [[head]]
    name = "mlp"
    hidden = [256, [512, 256]]     # a list of widths is one deeper network
    dropout = [0.0, 0.3]

The fitted heads, the leaderboard and the provenance are saved as a run directory
(:mod:`featurecache.runs`, no pickles); heads are ranked as :mod:`featurecache.leaderboard` says.

Heads fit in joblib worker threads (the numeric kernels of numpy, scikit-learn and
torch release the GIL, and threads start at once and share the features), with the
BLAS, OpenMP and torch pools capped so that ``jobs`` workers together use the cores.
All ``linear`` heads train in one batched pass (:func:`featurecache.heads.fit_linear_grid`);
heads along their registered warm path start from their neighbour's solution.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import json
import os
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

import joblib
import numpy as np

from . import files, store
from .errors import HeadError, suggest
from .heads import (
    DEFAULT_SWEEP,
    HEADS,
    HeadConfig,
    dump_head,
    fit_linear_grid,
    head_type,
    make_estimator,
    parse_grid,
    thread_limit,
    threads_per_job,
)
from .leaderboard import make_entry, rank
from .metrics import classification_metrics
from .postpass import post_options, post_pass
from .runs import RUN_FILE, RUN_FORMAT, RUNS, load_run, write_run

CLASS_WEIGHTS = ("balanced",)


# --------------------------------------------------------------------------- results


@dataclass
class SweepResult:
    run_dir: str
    best: str
    leaderboard: list
    selection_split: str
    final_split: str
    reused: bool
    seconds: float
    failed: list = field(default_factory=list)  # [{"head", "error"}] of heads that could not be fitted

    def to_dict(self) -> dict:
        return {"run_dir": self.run_dir, "best": self.best, "leaderboard": self.leaderboard, "failed": self.failed}


# --------------------------------------------------------------------------- the grid


def _toml_value(value, where: str) -> str:
    if isinstance(value, list):  # a list of widths inside a list of values: one tuple
        return "x".join(_toml_value(v, where) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    if not isinstance(value, (int, float, str)):
        raise HeadError(f"{where}: unsupported value {value!r} (use numbers, strings, true/false)")
    text = repr(value) if isinstance(value, float) else str(value)
    if any(c in text for c in ",;:=") and not text.startswith("pca:"):
        raise HeadError(f"{where}: value {value!r} may not contain , ; : or =")
    return text


def read_sweep_file(path: str | os.PathLike) -> list[str]:
    """The grid specs of a TOML sweep file (one per ``[[head]]`` table)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise HeadError(f"no sweep file at {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise HeadError(f"{path} is not valid TOML: {exc}") from None
    unknown = [k for k in data if k != "head"]
    if unknown:
        raise HeadError(f"{path}: unknown key {unknown[0]!r}{suggest(unknown[0], ['head'])}; "
                        "a sweep file holds [[head]] tables")
    tables = data.get("head", [])
    if not isinstance(tables, list) or not tables:
        raise HeadError(f"{path} declares no heads: add [[head]] tables with name = \"...\"")
    specs = []
    for i, table in enumerate(tables, 1):
        where = f"{path} head #{i}"
        table = dict(table)
        name = table.pop("name", None)
        if not isinstance(name, str) or not name:
            raise HeadError(f"{where} has no name = \"...\"")
        parts = []
        for key, values in table.items():
            values = values if isinstance(values, list) else [values]
            if not values:
                raise HeadError(f"{where}: parameter {key} has no values")
            parts.append(f"{key}=" + ",".join(_toml_value(v, where) for v in values))
        specs.append(name + (":" + ";".join(parts) if parts else ""))
    return specs


def build_grid(head=(), sweep_file=None, class_weight: str | None = None) -> list[HeadConfig]:
    """The heads to fit: ``head`` specs and the sweep file's, or the default sweep."""
    if class_weight is not None and class_weight not in CLASS_WEIGHTS:
        raise HeadError(f"unknown class_weight {class_weight!r}: use balanced, or leave it out")
    specs = [*([head] if isinstance(head, str) else head), *(read_sweep_file(sweep_file) if sweep_file else [])]
    configs = list({c.spec: c for spec in specs or DEFAULT_SWEEP for c in parse_grid(spec)}.values())
    if not configs:
        raise HeadError("the head grid is empty")
    if class_weight is not None:  # heads that cannot weight classes are fitted as they are
        configs = [replace(c, class_weight=class_weight) if c.class_weight is None and head_type(c.name).class_weight
                   else c for c in configs]
        configs = list({c.spec: c for c in configs}.values())
    return configs


def _groups(configs: list[HeadConfig]) -> list[tuple[str, tuple[HeadConfig, ...]]]:
    """Units of work: all ``linear`` heads in one batched pass, warm-start paths, single heads.

    Heads of one type with a registered ``warm_path`` that differ only in that parameter
    form a path, fitted in ascending order, each head starting from the previous one.
    """
    linear = tuple(c for c in configs if c.name == "linear")
    groups = [("linear-batch", linear)] if linear else []
    paths: dict[tuple, list[HeadConfig]] = {}
    for cfg in configs:
        if cfg.name == "linear":
            continue
        param = head_type(cfg.name).warm_path
        if param is None or not isinstance(cfg.params.get(param, 0), (int, float)):
            groups.append(("single", (cfg,)))
            continue
        rest = {k: v for k, v in cfg.params.items() if k != param}
        key = (cfg.name, cfg.pre, cfg.class_weight, json.dumps(rest, sort_keys=True, default=str))
        paths.setdefault(key, []).append(cfg)
    for members in paths.values():
        htype = head_type(members[0].name)
        members.sort(key=lambda c: c.params.get(htype.warm_path, htype.defaults[htype.warm_path]))
        groups.append(("warm-path" if len(members) > 1 else "single", tuple(members)))
    return groups


# --------------------------------------------------------------------------- fitting (runs in worker threads)


def _fit_single(configs, X, y, seed, device):
    return [make_estimator(cfg, random_state=seed, device=device).fit(X, y) for cfg in configs]


def _fit_linear_batch(configs, X, y, seed, device):
    return fit_linear_grid(X, y, configs, random_state=seed, device=device)


def _fit_warm_path(configs, X, y, seed, device):
    """Fit along the path, each head starting from the previous head's solution."""
    fitted, previous = [], None
    for cfg in configs:
        model = make_estimator(cfg, random_state=seed, device=device)
        if previous is not None:
            target = {**model.named_steps["head"].get_params(deep=False), "warm_start": True}
            model = copy.deepcopy(previous)
            model.named_steps["head"].set_params(**target)
        model.fit(X, y)
        model.named_steps["head"].set_params(warm_start=False)  # a later refit starts cold
        fitted.append(model)
        previous = model
    return fitted


FITTERS = {"single": _fit_single, "linear-batch": _fit_linear_batch, "warm-path": _fit_warm_path}


def _proba(model, X, n_classes: int) -> np.ndarray:
    """Probabilities with one column per class of the cache, also for classes the fit never saw."""
    out = np.zeros((len(X), n_classes))
    if len(X):
        out[:, np.asarray(model.classes_, dtype=np.int64)] = model.predict_proba(X)
    return out


@dataclass(eq=False)
class _Task:
    """One fit: a group of heads on all of train (``fit_rows`` None) or on one CV fold."""

    fitter: str
    configs: tuple
    fit_rows: np.ndarray | None
    evals: dict  # name -> (split, rows or None): where to predict
    keep: bool  # return the fitted models (the final fits, not the folds)


def _run_task(task: _Task, data, n_classes, seed, device):
    """Fit one group; return seconds per head, probabilities on ``task.evals`` and the models.

    A head that cannot be fitted on these data (more PCA components than rows, more
    neighbours than samples, ...) does not stop the sweep: the error comes back as a
    string in place of the probabilities and the models.
    """
    X, y = data["train"]
    if task.fit_rows is not None:
        X, y = X[task.fit_rows], y[task.fit_rows]
    start = time.perf_counter()
    try:
        models = FITTERS[task.fitter](task.configs, X, y, seed, device)
        probas = [{name: _proba(model, data[split][0] if rows is None else data[split][0][rows], n_classes)
                   for name, (split, rows) in task.evals.items()} for model in models]
    except (ValueError, ArithmeticError, np.linalg.LinAlgError, RuntimeError) as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        return (time.perf_counter() - start) / len(task.configs), reason, None
    seconds = (time.perf_counter() - start) / len(task.configs)
    return seconds, probas, models if task.keep else None


def _run_lane(lane: list[_Task], data, n_classes, seed, device, threads):
    with thread_limit(threads):  # this worker thread's OpenMP pools too
        return [_run_task(task, data, n_classes, seed, device) for task in lane]


def _lanes(tasks: list[_Task]) -> list[list[_Task]]:
    """Torch heads in one lane, in order: they draw from torch's process-wide generator
    (initialization, dropout), so running two at once would make them depend on timing.
    Every other fit is a lane of its own; the costly ones (by their registered cost) go first."""
    torch_lane = [t for t in tasks if head_type(t.configs[0].name).kind == "torch"]
    others = [t for t in tasks if head_type(t.configs[0].name).kind != "torch"]
    others.sort(key=lambda t: -head_type(t.configs[0].name).cost)
    return ([torch_lane] if torch_lane else []) + [[t] for t in others]


# --------------------------------------------------------------------------- the sweep


def _check_split(name: str, y: np.ndarray, classes: list[str], purpose: str) -> None:
    present = np.unique(y)
    if len(present) < 2:
        which = f"only one class ({classes[int(present[0])]})" if len(present) else "no rows"
        raise HeadError(f"split {name!r} has {which}: {purpose} needs at least two classes")


def _cv_folds(y: np.ndarray, cv: int, seed: int, classes: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedKFold

    if not isinstance(cv, int) or cv < 2:
        raise HeadError(f"cv must be an integer of at least 2, got {cv!r}")
    counts = np.bincount(y, minlength=len(classes))
    smallest = int(counts[counts > 0].min())
    if smallest < cv:
        name = classes[int(np.flatnonzero(counts == smallest)[0])]
        raise HeadError(f"there is no val split, and class {name!r} has only {smallest} training rows for "
                        f"{cv}-fold cross-validation: use cv={max(2, smallest)} or add a val split")
    return list(StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def _run_id(cache: Path, key: str, specs: list[str], seed: int, cv: int, class_weight, post: dict) -> str:
    payload = json.dumps({"cache_key": key, "heads": sorted(specs), "seed": seed, "cv": cv,
                          "class_weight": class_weight, "format": RUN_FORMAT, **post}, sort_keys=True)
    return f"{cache.stem}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


@dataclass
class _Plan:
    """What one sweep fits, on which cache, how it selects, and where its run goes."""

    cache: Path
    meta: dict  # store.info of the cache
    configs: list[HeadConfig]
    selection: str  # "val" or "cv"
    final: str
    cv: int | None  # folds, when selecting by cross-validation
    seed: int
    class_weight: str | None
    run_dir: Path

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])


def _plan(cache, head, sweep_file, jobs, seed, class_weight, cv, device, cache_dir, post) -> _Plan:
    """Check the inputs and decide the grid, the selection and the run directory."""
    from .runtime import resolve_device

    path = store.resolve(cache, cache_dir).resolve()
    meta = store.info(path)
    configs = build_grid(head, sweep_file, class_weight)
    resolve_device(device)
    if jobs is not None and (not isinstance(jobs, int) or jobs < 1):
        raise HeadError(f"jobs must be a positive integer, got {jobs!r}")
    if "train" not in meta["splits"]:
        raise HeadError(f"{path.name} has no train split (it has {', '.join(meta['splits'])})")
    selection = "val" if "val" in meta["splits"] else "cv"
    final = "test" if "test" in meta["splits"] else selection
    folds = cv if selection == "cv" else None
    run_id = _run_id(path, meta["key"], [c.spec for c in configs], seed, folds, class_weight, post)
    return _Plan(path, meta, configs, selection, final, folds, seed, class_weight, path.parent / RUNS / run_id)


def _reused(plan: _Plan, started: float) -> SweepResult | None:
    """The saved result of the same inputs, or None."""
    if not (plan.run_dir / RUN_FILE).is_file():
        return None
    run = load_run(plan.run_dir)
    return SweepResult(str(plan.run_dir), run.best, run.leaderboard, run.meta["selection_split"],
                       run.meta["final_split"], True, time.perf_counter() - started, run.meta.get("failed", []))


def _read_features(plan: _Plan) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``split -> (X, y)`` of every split, checked for what fitting and selection need."""
    data = {s: store.load_features(plan.cache, s)[:2] for s in plan.splits}
    _check_split("train", data["train"][1], plan.classes, "fitting a head")
    if plan.selection == "val":
        _check_split("val", data["val"][1], plan.classes, "selecting a head")
    return data


def _tasks(plan: _Plan, data: dict) -> list[_Task]:
    """Every group of heads fitted on all of train (kept), and on each CV fold when selecting by CV."""
    everything = {s: (s, None) for s in plan.splits}
    folds = _cv_folds(data["train"][1], plan.cv, plan.seed, plan.classes) if plan.selection == "cv" else []
    tasks = []
    for fitter, group in _groups(plan.configs):
        tasks.append(_Task(fitter, group, None, everything, True))
        tasks += [_Task(fitter, group, fit_rows, {"cv": ("train", rows)}, False) for fit_rows, rows in folds]
    return tasks


@dataclass
class _Outcome:
    """What the fits gave, per head spec."""

    seconds: dict
    probas: dict  # spec -> split -> N x C probabilities (``cv``: out of fold)
    models: dict  # spec -> fitted pipeline (the fit on all of train)
    failed: dict = field(default_factory=dict)  # spec -> why it could not be fitted or saved

    def add(self, task: _Task, result, n_train: int, n_classes: int) -> None:
        """Record one task's ``(seconds per head, probabilities or an error, models)``."""
        task_seconds, task_probas, task_models = result
        for i, cfg in enumerate(task.configs):
            self.seconds[cfg.spec] += task_seconds
            if isinstance(task_probas, str):
                self.failed.setdefault(cfg.spec, task_probas)
                continue
            for name, proba in task_probas[i].items():
                if name == "cv":
                    oof = self.probas[cfg.spec].setdefault("cv", np.zeros((n_train, n_classes)))
                    oof[task.evals["cv"][1]] = proba
                else:
                    self.probas[cfg.spec][name] = proba
            if task.keep:
                self.models[cfg.spec] = task_models[i]


def _run_tasks(plan: _Plan, data: dict, tasks: list[_Task], jobs, device, progress: bool) -> _Outcome:
    """Run the tasks in ``jobs`` worker threads, one lane each, and gather their outcome."""
    from tqdm import tqdm

    from .runtime import usable_cores

    lanes = _lanes(tasks)
    n_jobs = min(jobs or usable_cores(), len(lanes))
    threads = threads_per_job(n_jobs)
    n_train, n_classes = len(data["train"][1]), len(plan.classes)
    outcome = _Outcome({c.spec: 0.0 for c in plan.configs}, {c.spec: {} for c in plan.configs}, {})
    calls = (joblib.delayed(_run_lane)(lane, data, n_classes, plan.seed, device, threads) for lane in lanes)
    with (tqdm(total=len(tasks), desc=f"fitting {len(plan.configs)} heads", unit="fit", leave=False,
               disable=not progress) as bar,
          thread_limit(threads)):  # the BLAS pools and torch are process-wide: cap them for all workers
        results = joblib.Parallel(n_jobs=n_jobs, prefer="threads", return_as="generator")(calls)
        for lane, lane_results in zip(lanes, results):
            for task, result in zip(lane, lane_results):
                outcome.add(task, result, n_train, n_classes)
            bar.update(len(lane))
    return outcome


def _dump_heads(plan: _Plan, outcome: _Outcome) -> dict:
    """``spec -> (config, {file: bytes}, estimator record)`` of every fitted head; a head whose
    files could not be loaded safely joins ``outcome.failed`` instead."""
    dumped = {}
    for cfg in plan.configs:
        if cfg.spec in outcome.failed:
            continue
        try:
            dumped[cfg.spec] = (cfg, *dump_head(outcome.models[cfg.spec], cfg))
        except HeadError as exc:
            outcome.failed[cfg.spec] = str(exc)
    if not dumped:
        spec, reason = next(iter(outcome.failed.items()))
        raise HeadError(f"no head could be fitted on {plan.cache.name}; {spec}: {reason}")
    return dumped


def _rank(plan: _Plan, data: dict, outcome: _Outcome, specs) -> list[dict]:
    """Leaderboard entries of ``specs``, best first, with metrics on every split (selection first)."""
    labels = {s: data[s][1] for s in plan.splits} | {"cv": data["train"][1]}
    order = [plan.selection, *([plan.final] if plan.final != plan.selection else []),
             *(s for s in plan.splits if s not in (plan.selection, plan.final))]
    entries = []
    for cfg in plan.configs:
        if cfg.spec in specs:
            metrics = {s: classification_metrics(labels[s], outcome.probas[cfg.spec][s], plan.classes) for s in order}
            entries.append(make_entry(cfg, metrics, plan.selection, outcome.seconds[cfg.spec]))
    return rank(entries, outcome.probas, labels)


def _run_meta(plan: _Plan, entries: list[dict], failed: dict, started: float) -> dict:
    return {
        "format": RUN_FORMAT, "run_id": plan.run_dir.name, "cache": str(plan.cache),
        "cache_key": plan.meta["key"], "classes": plan.classes, "config": plan.meta["config"],
        "selection_split": plan.selection, "final_split": plan.final, "seed": plan.seed, "cv": plan.cv,
        "class_weight": plan.class_weight, "heads": [e["head"] for e in entries], "best": entries[0]["head"],
        "failed": [{"head": spec, "error": reason} for spec, reason in failed.items()],
        "seconds": round(time.perf_counter() - started, 3),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "versions": files.versions("sklearn", "torch", "numpy", "skops", "safetensors"),
    }


def fit_head(
    cache: str,
    head: tuple = (),
    sweep_file: str | None = None,
    jobs: int | None = None,
    seed: int = 0,
    class_weight: str | None = None,
    cv: int = 5,
    device: str = "auto",
    cache_dir: str | None = None,
    seeds: int = 1,
    calibrate: str | None = None,
    progress: bool = False,
) -> SweepResult:
    """Fit every head of the grid on ``cache``, rank them and save them in a run directory.

    ``cache`` is a cache file, its name or a unique key prefix (looked up in
    ``cache_dir``). ``head`` holds grid specs; with neither ``head`` nor ``sweep_file``
    the default sweep runs. ``jobs`` worker threads fit heads in parallel (default: the
    usable cores), each with its share of the BLAS, OpenMP and torch threads; torch heads
    run one after another in one of them. Selection is on ``val`` when the
    cache has it, else ``cv``-fold stratified cross-validation on ``train``.
    ``class_weight="balanced"`` weights every head that supports it. The same inputs
    and ``seed`` give the same leaderboard; rerunning them returns the saved run.
    ``seeds`` > 1 refits the heads whose fit depends on a seed with that many seeds and
    reports the spread; ``calibrate="temperature"`` fits one temperature per head on the
    selection split (:mod:`featurecache.postpass`).
    """
    started = time.perf_counter()
    post = post_options(seeds, calibrate)  # checked before any fit; part of the run's address
    plan = _plan(cache, head, sweep_file, jobs, seed, class_weight, cv, device, cache_dir, post)
    reused = _reused(plan, started)
    if reused is not None:
        return reused
    data = _read_features(plan)
    outcome = _run_tasks(plan, data, _tasks(plan, data), jobs, device, progress)
    dumped = _dump_heads(plan, outcome)
    entries = _rank(plan, data, outcome, dumped)
    entries = post_pass(entries, outcome.probas, data, post, plan.seed, plan.cv, device, progress)
    run_meta = _run_meta(plan, entries, outcome.failed, started)
    write_run(plan.run_dir, run_meta, entries, dumped)
    return SweepResult(str(plan.run_dir), run_meta["best"], entries, plan.selection, plan.final, False,
                       time.perf_counter() - started, run_meta["failed"])


def list_head_types() -> list[dict]:
    """The registry as rows: name, family, kind, transferable, class_weight, default parameters and the
    facts the sweep uses (simplicity rank, relative cost, warm-start path)."""
    return [{"name": h.name, "family": h.family, "kind": h.kind, "transferable": h.transferable,
             "class_weight": h.class_weight, "defaults": h.defaults, "description": h.description,
             "simplicity": h.simplicity, "cost": h.cost, "warm_path": h.warm_path}
            for h in HEADS.values()]
