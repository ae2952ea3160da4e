"""Stage two: fit a grid of heads on one feature cache, rank them, keep every one.

The grid comes from ``--head`` specs (``logreg:C=0.01,0.1;pre=standardize``), from a
TOML sweep file, or from :data:`featurecache.heads.DEFAULT_SWEEP`. Heads are selected
on ``val`` when the cache has it, otherwise by stratified k-fold cross-validation on
``train`` (the ``cv`` split of the metrics); final metrics are on ``test`` when it
exists. Every leaderboard entry names the split it was selected on, so a number used
to choose a head is never shown as a held-out score.

The grid and sweep files are parsed in :mod:`featurecache.heads.grids`.

The fitted heads, the leaderboard and the provenance are saved as a run directory
(:mod:`featurecache.sweep.runs`, no pickles); heads are ranked as :mod:`featurecache.sweep.leaderboard` says.

Heads fit in joblib worker threads (the numeric kernels of numpy, scikit-learn and
torch release the GIL, and threads start at once and share the features), with the
BLAS, OpenMP and torch pools capped so that ``jobs`` workers together use the cores.
All ``linear`` heads train in one batched pass (:func:`featurecache.heads.fit_linear_grid`);
heads along their registered warm path start from their neighbour's solution.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import files, store
from ..errors import FeatureCacheWarning, HeadError, UsageError
from ..heads import HEADS, HeadConfig, head_type
from ..heads.chunked import can_learn_from_chunks
from ..heads.grids import build_grid
from ..metrics import classification_metrics, paired_difference
from ..names import AUTO
from ..progress import LOG_EVERY, Progress
from ..stages import takes
from . import engine
from . import halving as scaling
from .engine import Task
from .exclusion import Exclusion, read_exclusion
from .leaderboard import make_entry, rank
from .postpass import post_options, post_pass
from .runs import RUN_FILE, RUN_FORMAT, RUNS, load_fits, load_run, run_problem, save_fit, write_run

PROGRESS_EVERY = LOG_EVERY  # seconds between two progress lines in a log


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
        key = (cfg.name, cfg.pre, cfg.class_weight, cfg.cols, json.dumps(rest, sort_keys=True, default=str))
        paths.setdefault(key, []).append(cfg)
    for members in paths.values():
        htype = head_type(members[0].name)
        members.sort(key=lambda c: c.params.get(htype.warm_path, htype.defaults[htype.warm_path]))
        groups.append(("warm-path" if len(members) > 1 else "single", tuple(members)))
    return groups


# --------------------------------------------------------------------------- the plan


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


@dataclass
class _Plan:
    """What one sweep fits, on which cache, how it selects, and where its run goes."""

    cache: Path
    meta: dict  # store.info of the cache
    configs: list[HeadConfig]
    selection: str  # "val", "cv" or "holdout"
    final: str
    cv: int | None  # folds, when selecting by cross-validation
    seed: int
    class_weight: str | None
    run_dir: Path
    post: dict = field(default_factory=dict)  # --seeds and --calibrate, as featurecache.sweep.postpass checked them
    budget: float | None = None
    halving: bool = True
    memory: int = 0  # bytes of features a sweep may hold
    max_memory: str | int | None = None  # as given (None: a share of the memory available)
    rungs: list = field(default_factory=list)  # rows and heads of each rung, for run.json
    features: str = "penultimate"  # the feature set heads learn from (store.FEATURE_SETS or a layer)
    views: int = 0  # augmented views of the training images heads also learn from (0: none)
    exclusion: Exclusion | None = None  # rows left out (--exclude)

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    @property
    def large(self) -> bool:
        """More training rows than :data:`scaling.LARGE_ROWS`: rungs, a holdout, the budget."""
        return self.meta["splits"]["train"]["n"] > scaling.LARGE_ROWS

    @property
    def dim(self) -> int:
        return store.feature_dim(self.meta, self.features)

    def bytes(self, split: str) -> int:
        return (self.meta["splits"][split]["n"] + (self.views if split == "train" else 0)) * self.dim * 4


def _run_id(plan: _Plan) -> str:
    fields = {"cache_key": plan.meta["key"], "heads": sorted(c.spec for c in plan.configs), "seed": plan.seed,
              "cv": plan.cv, "class_weight": plan.class_weight, "format": RUN_FORMAT, **plan.post}
    if plan.features != "penultimate":  # left out by default, so that earlier runs keep their address
        fields["features"] = plan.features
    if plan.views:
        fields["views"] = plan.views
    if plan.exclusion is not None:  # only when used, so that other runs keep their address
        fields["exclude"] = plan.exclusion.address
    if plan.large or plan.views:  # these change what is fitted only on many rows (or views)
        fields.update(budget=plan.budget, halving=plan.halving)
        if plan.budget is not None:  # how the budget is shared and who moves on: from the second policy on
            fields["policy"] = scaling.BUDGET_POLICY
        if plan.bytes("train") > plan.memory:  # as given, so that the same command finds its unfinished run
            fields["max_memory"] = plan.max_memory
    payload = json.dumps(fields, sort_keys=True)
    return f"{plan.cache.stem}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def _selection(meta: dict) -> str:
    if "val" in meta["splits"]:
        return "val"
    return "holdout" if meta["splits"]["train"]["n"] > scaling.LARGE_ROWS else "cv"


def _feature_set(meta: dict, features: str) -> str:
    """``features`` checked against what the cache holds; ``auto`` is ``concat`` when it stores layers,
    else ``penultimate``."""
    sets = store.feature_sets(meta)
    if features == AUTO:
        return "concat" if meta["layers"] else "penultimate"
    if features in sets:
        return features
    hint = "" if meta["layers"] else " (extract with --layers NAME,... to store more layers)"
    raise HeadError(f"{Path(meta['path']).name} has no features {features!r}: it has {', '.join(sets)}{hint}")


def _auto_grid(meta: dict, features: str, configs: list[HeadConfig]) -> list[HeadConfig]:
    """The grid of ``features``: with ``auto`` on a cache that stores layers, every head twice, on the
    concatenation and on the penultimate features alone (``cols``: its columns, the first of the row);
    else ``configs`` as they are."""
    if features != AUTO or not meta["layers"]:
        return configs
    main = (0, store.feature_dim(meta, "penultimate"))
    return [*configs, *(dataclasses.replace(c, cols=main) for c in configs if c.cols is None)]


def _entry_features(meta: dict, features: str, entry: dict, cols: dict) -> str:
    """The feature set a leaderboard entry learnt from: the run's ``features``, or the part of the row its
    columns select (``cols``: each head's ``HeadConfig.cols``); an ensemble: its members' sets, joined by ``+``."""
    names = ("penultimate", *meta.get("layers", {}))
    edges = np.cumsum([0, *(store.feature_dim(meta, name) for name in names)])
    parts = {(int(a), int(b)): name for name, a, b in zip(names, edges[:-1], edges[1:])}
    found = set()
    for spec in [m["head"] for m in entry["members"]] if entry.get("members") else [entry["head"]]:
        span = cols.get(spec)
        found.add(features if span is None else parts.get(span, f"cols {span[0]}:{span[1]}"))
    return "+".join(sorted(found))


def _views(meta: dict, views: bool | None) -> int:
    """The view rows heads learn from: all the cache has unless ``views`` is False; True needs some."""
    if views and not meta["views"]["n"]:
        raise HeadError(f"{Path(meta['path']).name} has no augmented views: extract with --augment-views K")
    return 0 if views is False else meta["views"]["n"]


def _plan(options: SweepOptions, post: dict) -> _Plan:
    """Check the inputs and decide the grid, the selection and the run directory (``post``: what
    ``--seeds`` and ``--calibrate`` add to the run's address)."""
    from ..runtime import resolve_device

    path = store.resolve(options.cache, options.cache_dir).resolve()
    meta = store.info(path)
    configs = _auto_grid(meta, options.features, build_grid(options.head, options.sweep_file, options.class_weight))
    resolve_device(options.device)
    jobs = options.jobs
    if jobs is not None and (not isinstance(jobs, int) or jobs < 1):
        raise HeadError(f"jobs must be a positive integer, got {jobs!r}")
    if "train" not in meta["splits"]:
        raise HeadError(f"{path.name} has no train split (it has {', '.join(meta['splits'])})")
    selection = _selection(meta)
    if post.get("seeds", 1) > 1 and meta["splits"]["train"]["n"] > scaling.LARGE_ROWS:
        raise UsageError(f"seeds > 1 refits every head on all training rows: it is for caches of up to "
                         f"{scaling.LARGE_ROWS:,} training rows, and {path.name} has {meta['splits']['train']['n']:,}")
    final = "test" if "test" in meta["splits"] else selection
    plan = _Plan(path, meta, configs, selection, final, options.cv if selection == "cv" else None, options.seed,
                 options.class_weight, path, post, scaling.check_budget(options.budget), bool(options.halving),
                 scaling.memory_cap(options.max_memory), options.max_memory,
                 features=_feature_set(meta, options.features), views=_views(meta, options.views),
                 exclusion=None if options.exclude is None else read_exclusion(options.exclude, path, meta["splits"]))
    plan.run_dir = path.parent / RUNS / _run_id(plan)
    return plan


def _reused(plan: _Plan, started: float) -> SweepResult | None:
    """The saved result of the same inputs, or None; None too for a damaged one, which is fitted again."""
    if not (plan.run_dir / RUN_FILE).is_file():
        return None
    problem = run_problem(plan.run_dir)
    if problem is not None:
        warnings.warn(FeatureCacheWarning(f"run {plan.run_dir.name} is damaged ({problem}); fitting it again"),
                      stacklevel=2)
        return None
    run = load_run(plan.run_dir)
    return SweepResult(str(plan.run_dir), run.best, run.leaderboard, run.meta["selection_split"],
                       run.meta["final_split"], True, time.perf_counter() - started, run.meta.get("failed", []))


# --------------------------------------------------------------------------- the rows


def _in_memory(plan: _Plan) -> dict:
    """``split -> features`` of the splits that fit in ``plan.memory`` together (smallest first), else None."""
    held, used = {}, 0
    for split in sorted(plan.splits, key=plan.bytes):
        fits = used + plan.bytes(split) <= plan.memory
        held[split] = _read_split(plan, split) if fits else None
        used += plan.bytes(split) if fits else 0
    return held


def _read_split(plan: _Plan, split: str) -> np.ndarray:
    """All rows of ``split`` (train: followed by its views, when heads learn from them)."""
    X = store.read_rows(plan.cache, split, features=plan.features)
    if split == "train" and plan.views:
        X = np.vstack([X, store.read_rows(plan.cache, store.VIEWS, features=plan.features)])
    return X


def _read_data(plan: _Plan) -> engine.SweepData:
    """Labels of every split and the features that fit in memory, checked for what fitting and selection need."""
    labels = {s: store.load_labels(plan.cache, s) for s in plan.splits}
    _check_split("train", labels["train"], plan.classes, "fitting a head")
    if plan.selection == "val":
        _check_split("val", labels["val"], plan.classes, "selecting a head")
    views = store.view_sources(plan.cache) if plan.views else None
    if views is not None:
        labels["train"] = np.concatenate([labels["train"], store.load_labels(plan.cache, store.VIEWS)])
    row_bytes = 4 * plan.dim
    chunk_rows = int(min(65536, max(256, plan.memory // (8 * row_bytes))))
    row_cap = max(scaling.FIRST_RUNG_ROWS, plan.memory // (scaling.WORKING_COPIES * row_bytes))
    return engine.SweepData(plan.cache, labels, plan.dim, _in_memory(plan), chunk_rows, row_cap, plan.features, views)


@dataclass
class _Rows:
    """Which training rows the heads learn from and where they are scored."""

    pool: np.ndarray  # train rows heads may learn from (all of train, or train less the holdout)
    order: np.ndarray  # the pool in a stratified order: every prefix is a stratified sample
    evals: dict  # name -> (split, rows or None): selection, final and other splits, a sample of train
    folds: list  # (fit rows, out-of-fold rows) when selecting by cross-validation
    everything: bool  # the pool is all of train
    data: engine.SweepData  # for the views of training rows

    def labels(self, data: engine.SweepData) -> dict:
        """The labels of every evaluation (``cv``: all of train, predicted out of fold)."""
        out = {name: data.labels[split] if rows is None else data.labels[split][rows]
               for name, (split, rows) in self.evals.items()}
        return out | ({"cv": data.labels["train"][self.pool]} if self.folds else {})

    def sample(self, n: int) -> np.ndarray | None:
        """The first ``n`` rows of the stratified order with their views, sorted; None for all of train."""
        return None if n >= len(self.order) and self.everything else np.sort(self.data.with_views(self.order[:n]))

    def seen(self, fit_rows: np.ndarray | None) -> tuple[int, int]:
        """``(images, rows)`` a fit on ``fit_rows`` learns from: training images, and those with their views."""
        if fit_rows is None:
            return len(self.pool), len(self.data.labels["train"])
        return int((fit_rows < self.data.n_train).sum()), len(fit_rows)


def _rows(plan: _Plan, data: engine.SweepData) -> _Rows:
    """The pool, its stratified order, the evaluation rows and the folds. On many rows, train
    metrics come from the first rung's rows, which every head learnt from."""
    y = data.labels["train"][:data.n_train]
    left_out = plan.exclusion.train if plan.exclusion is not None else np.zeros(0, dtype=np.int64)
    if plan.selection == "holdout":
        pool, held = scaling.holdout_split(y, plan.seed)
        pool, held = np.setdiff1d(pool, left_out), np.setdiff1d(held, left_out)
        _check_split("holdout", y[held], plan.classes, "selecting a head")
    else:
        pool, held = np.setdiff1d(np.arange(len(y)), left_out), None
    if len(left_out):
        _check_split("train less --exclude", y[pool], plan.classes, "fitting a head")
    order = pool[scaling.stratified_order(y[pool], plan.seed)]
    evals = {"holdout": ("train", held)} if held is not None else {}
    evals.update({s: (s, _scored(plan, data, s)) for s in plan.splits if s != "train"})
    everything = None if data.views is None and not len(left_out) else pool  # train's images, without the views
    evals["train"] = ("train", np.sort(order[:scaling.FIRST_RUNG_ROWS]) if plan.large else everything)
    folds = _cv_folds(y[pool], plan.cv, plan.seed, plan.classes) if plan.selection == "cv" else []
    folds = [(data.with_views(pool[fit]), pool[out]) for fit, out in folds]  # views in their image's fold
    return _Rows(pool, order, evals, folds, held is None and not len(left_out), data)


def _scored(plan: _Plan, data: engine.SweepData, split: str) -> np.ndarray | None:
    """The rows of ``split`` that are scored: all (None) unless ``--exclude`` leaves some out."""
    return None if plan.exclusion is None else plan.exclusion.kept(split, len(data.labels[split]))


# --------------------------------------------------------------------------- the fits of one rung


def _key(fitter: str, configs, rows: np.ndarray | None, evals: dict, seed: int) -> str:
    digest = hashlib.sha256(b"all" if rows is None else np.ascontiguousarray(rows).tobytes())
    payload = json.dumps({"fitter": fitter, "heads": [c.spec for c in configs], "rows": digest.hexdigest(),
                          "evals": sorted(evals), "seed": seed}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _fit_rows(state: scaling.HeadState, rung: scaling.Rung, rows: _Rows, data: engine.SweepData):
    """``(fitter route, rows)`` of one head at one rung: its sample, in memory or in chunks from the file."""
    n = min(rung.rows, state.cap or rung.rows, len(rows.order))
    per_image = data.per_image
    if n * per_image > data.row_cap and data.features.get("train") is None and not can_learn_from_chunks(state.form):
        n = int(data.row_cap / per_image)
        state.status, state.reason = "subsampled", (
            f"the features of train exceed max_memory: fitted on a stratified sample of {n:,} rows")
    route = "chunked" if n * per_image > data.row_cap and data.features.get("train") is None else "memory"
    return route, rows.sample(n)


def _tasks(states: list[scaling.HeadState], rung: scaling.Rung, rows: _Rows, data, seed: int) -> list[Task]:
    """The fits of one rung: heads on the same rows grouped (batched linear heads, warm paths); with
    cross-validation, each group on every fold too."""
    by_rows: dict[tuple, list] = {}
    for state in states:
        route, fit_rows = _fit_rows(state, rung, rows, data)
        by_rows.setdefault((route, -1 if fit_rows is None else len(fit_rows)), [fit_rows, []])[1].append(state.form)
    tasks = []
    for (route, _), (fit_rows, configs) in by_rows.items():
        groups = [("chunked", (c,)) for c in configs] if route == "chunked" else _groups(configs)
        for fitter, group in groups:
            n = rows.seen(fit_rows)[1]
            tasks.append(Task(fitter, group, fit_rows, rows.evals, True,
                              _key(fitter, group, fit_rows, rows.evals, seed), f"{n:,} rows"))
            for i, (fold_rows, oof) in enumerate(rows.folds):
                evals = {"cv": ("train", oof)}
                tasks.append(Task(fitter, group, fold_rows, evals, False, _key(fitter, group, fold_rows, evals, seed),
                                  f"fold {i + 1}/{len(rows.folds)}"))
    return tasks


# --------------------------------------------------------------------------- what the fits gave


@dataclass
class _Outcome:
    """What the fits gave, per head spec (the spec fitted: a stand-in's own)."""

    seconds: dict
    probas: dict  # spec -> split -> N x C probabilities (``cv``: out of fold)
    files: dict  # spec -> (config, {file name: path}, estimator record)
    status: dict = field(default_factory=dict)  # spec -> (status, reason, rows)
    failed: dict = field(default_factory=dict)  # spec -> why it could not be fitted or saved


class _Recorder:
    """Takes each fit's result as it arrives: keeps it under the partial run and updates the heads' states."""

    def __init__(self, plan: _Plan, states: list[scaling.HeadState], rows: _Rows, progress: Progress):
        self.plan, self.rows, self.progress = plan, rows, progress
        self.by_form = {s.form.spec: s for s in states}
        self.kept = load_fits(plan.run_dir)
        self.oof: dict[str, np.ndarray] = {}
        self.errors: dict[str, str] = {}

    def start_rung(self, states: list[scaling.HeadState]) -> None:
        self.by_form = {s.form.spec: s for s in states}
        self.errors = {}

    def reuse(self, tasks: list[Task]) -> list[Task]:
        """Record the tasks a killed run finished; return the others."""
        todo = []
        for task in tasks:
            if task.key in self.kept:
                self.add(task, self.kept[task.key], saved=True)
            else:
                todo.append(task)
        return todo

    def add(self, task: Task, result: list[dict], saved: bool = False) -> None:
        if not saved:
            result = save_fit(self.plan.run_dir, task.key, [c.spec for c in task.configs], result)
        n_images, n_rows = self.rows.seen(task.fit_rows)
        for cfg, head in zip(task.configs, result):
            state = self.by_form[cfg.spec]
            state.seconds += head["seconds"]
            if "error" in head:
                self.errors.setdefault(cfg.spec, head["error"])
            elif "cv" in head["probas"]:
                oof = self.oof.setdefault(cfg.spec, np.zeros((self.rows.data.n_train, len(self.plan.classes))))
                oof[task.evals["cv"][1]] = head["probas"]["cv"]
            else:
                state.result, state.fitted, state.rows = head, cfg, n_rows
                state.cost = (n_images, head["seconds"])  # estimates are per image, as the rungs count them
        self.progress.update(len(task.configs), current=task.configs[-1].spec)

    def finish_rung(self, states: list[scaling.HeadState]) -> list[scaling.HeadState]:
        """The heads that got a result at this rung; the others failed (kept with an earlier result)."""
        ok = []
        for state in states:
            error = self.errors.get(state.form.spec)
            if error is None:
                if state.form.spec in self.oof:
                    state.result["probas"]["cv"] = self.oof[state.form.spec][self.rows.pool]
                ok.append(state)
            else:  # kept with the result of an earlier rung, if it has one
                state.status, state.reason = "failed", error
        return ok


def _rung_key(plan: _Plan, labels: dict):
    """A sort key of a head's state at a rung: accuracy on the selection rows, then log-loss, simplicity, spec."""
    y = labels[plan.selection]

    def key(state: scaling.HeadState):
        proba = state.result["probas"][plan.selection]
        accuracy = float((proba.argmax(axis=1) == y).mean())
        loss = float(-np.log(np.clip(proba[np.arange(len(y)), y], 1e-15, None)).mean())
        return (-accuracy, loss, head_type(state.form.name).simplicity, state.form.spec)

    return key


# --------------------------------------------------------------------------- the rungs


@dataclass
class _Sweep:
    """One sweep in progress: its plan, rows, engine, heads and the clock of its budget."""

    plan: _Plan
    data: engine.SweepData
    rows: _Rows
    engine: object
    rungs: list
    states: list
    recorder: _Recorder
    started: float
    device: str
    echo: bool

    def run_rung(self, rung: scaling.Rung, alive: list) -> list:
        """Fit ``alive`` heads at ``rung``; return those that got a result."""
        self.recorder.start_rung(alive)
        tasks = _tasks(alive, rung, self.rows, self.data, self.plan.seed)
        todo = self.recorder.reuse(tasks)
        step = "timing" if rung.index < 0 else f"rung {rung.index + 1}/{len(self.rungs)}"
        self.recorder.progress.set_current(f"{step}, {rung.rows:,} rows")
        self.engine.run(todo, self.data, len(self.plan.classes), self.plan.seed, self.device, self.recorder.add,
                        lambda task: self.recorder.progress.set_current(f"{task.configs[0].spec} ({task.label})"))
        return self.recorder.finish_rung(alive)

    def fit_within_budget(self, alive: list, rung_index: int) -> None:
        """Stand-ins and row caps so that the rungs still to come fit in what is left of the budget."""
        if self.plan.budget is None:
            return
        left, final = self.left(), self.rungs[-1].rows
        taken = {s.form.spec for s in self.states}
        if rung_index == len(self.rungs) - 1 and rung_index > 0:  # the heads that reach all rows are known
            lanes = scaling.lane_shares(left, self.engine.cores, alive, final)
            for state in alive:
                scaling.fit_final(state, final, lanes[id(state)], taken)
            return
        torch_heads = sum(head_type(s.form.name).kind == "torch" for s in alive)
        shares = scaling.final_shares(left, self.engine.cores, self.rungs[rung_index:], torch_heads)
        for state in alive:
            scaling.fit_within(state, final, shares[head_type(state.form.name).kind == "torch"], taken)

    def left(self) -> float | None:
        """Seconds left of the budget (None: no budget)."""
        return None if self.plan.budget is None else self.plan.budget - (time.perf_counter() - self.started)

    def prune(self, ranked: list, rung: scaling.Rung, keep: int) -> list:
        """The heads that move on from ``rung``: those predicted best on all rows, the rung's leaders, and
        the best of each family left out while the budget has room; the others are pruned, with their
        predicted score in the reason."""
        moving, pruned, predictions = scaling.survivors(ranked, keep, self.rungs[-1].rows)
        sizes = [r.rows for r in self.rungs[rung.index + 1:]]
        for state in scaling.promote(moving, pruned, self.left(), sizes, self.engine.cores):
            pruned = [s for s in pruned if s is not state]
            moving.append(state)
            why = (f"moved on after rung {rung.index + 1} as the best of its family "
                   f"({head_type(state.form.name).family}): {self.plan.selection} {state.curve[-1][1]:.4f}, "
                   f"{predictions[id(state)].describe()}; the budget has room")
            kept = [n for n in state.reason.split("; ") if n and not n.startswith("moved on ")]
            state.reason = "; ".join([*kept, why])
            if self.echo:
                print(f"fit-head:   {state.form.spec}: {why}", file=sys.stderr)
        # the next rung fits more heads than planned: the progress counts them (each rung adds its own)
        self.recorder.progress.add_total(max(0, len(moving) - keep) * (1 + len(self.rows.folds)))
        keep, rank = len(moving), {id(s): i for i, s in enumerate(ranked)}
        order = sorted(ranked, key=lambda s: (-predictions[id(s)].accuracy, rank[id(s)]))
        place = {id(s): i for i, s in enumerate(order, 1)}  # by the prediction, as survivors() orders them
        for state in pruned:
            accuracy = state.curve[-1][1]
            state.status = "pruned"
            state.reason = (f"pruned after rung {rung.index + 1} of {len(self.rungs)} ({rung.rows:,} rows): "
                            f"{self.plan.selection} {accuracy:.4f}, {predictions[id(state)].describe()}; ranked "
                            f"{place[id(state)]} of {len(ranked)} by the prediction; {keep} moved on")
        return moving

    def probe(self, alive: list) -> list:
        """Time the heads whose cost grows faster than the rows (an RBF SVM) on a small sample first, so that
        the budget can give them a stand-in before the first rung; returns those still alive."""
        probed = [s for s in alive if head_type(s.form.name).growth >= scaling.PROBE_GROWTH]
        if not probed or self.plan.budget is None or len(self.rungs) < 2:
            return alive
        rows = min(max(1, round(scaling.PROBE_ROWS / self.data.per_image)), self.rungs[0].rows)
        ok = self.run_rung(scaling.Rung(-1, rows, len(probed)), probed)
        return [s for s in alive if s not in probed or s in ok]

    def run(self) -> None:
        alive, key = self.probe(list(self.states)), _rung_key(self.plan, self.rows.labels(self.data))
        for rung in self.rungs:
            self.plan.rungs[rung.index]["heads"] = len(alive)  # the plan's count, or more when families moved on
            self.fit_within_budget(alive, rung.index)
            if rung.index == 1 and self.echo:
                _echo_estimates(self, alive)
            ranked = sorted(self.run_rung(rung, alive), key=key)
            for state in ranked:  # the learning curve: rows learnt from, selection accuracy
                state.curve.append((state.cost[0], -key(state)[0]))
            following = self.rungs[rung.index + 1] if rung.index + 1 < len(self.rungs) else None
            alive = self.prune(ranked, rung, following.keep) if following else ranked


def _features_note(plan: _Plan, rows: _Rows) -> str:
    """`` (concat, with 4,000 augmented views)``: what heads learn from, when it is not the default
    (the views of held-out images are not learnt from)."""
    views = len(rows.data.with_views(rows.pool)) - len(rows.pool)
    auto = any(c.cols is not None for c in plan.configs)
    sets = f"{plan.features} and penultimate alone" if auto else plan.features
    notes = ([sets] if plan.features != "penultimate" else []) + \
        ([f"with {views:,} augmented views"] if views else [])
    return f" ({', '.join(notes)})" if notes else ""


def _echo_plan(sweep: _Sweep) -> None:
    plan, rows = sweep.plan, sweep.rows
    budget = "no budget" if plan.budget is None else f"budget {plan.budget:.0f} s on {sweep.engine.cores} cores"
    print(f"fit-head: {len(plan.configs)} heads on {len(rows.pool):,} training rows x "
          f"{plan.dim:,} features{_features_note(plan, rows)}, selected on {plan.selection}; {budget}",
          file=sys.stderr)
    if len(sweep.rungs) > 1:
        steps = ", ".join(f"{r.keep} heads on {r.rows:,} rows" for r in sweep.rungs)
        print(f"fit-head: rungs: {steps}", file=sys.stderr)


def _echo_estimates(sweep: _Sweep, alive: list) -> None:
    """The plan after the first rung's timed fits: each head's estimate on all rows, and what it became."""
    final = sweep.rungs[-1].rows
    for state in sorted(alive, key=lambda s: -(s.estimate(final) or 0.0)):
        estimate = state.estimate(final)
        name = state.requested.spec if state.form == state.requested else f"{state.requested.spec} -> {state.form.spec}"
        what = f"estimated {estimate:,.1f} s on {final:,} rows" if estimate is not None else "not timed yet"
        print(f"fit-head:   {name}: {what}{'; ' + state.reason if state.reason else ''}", file=sys.stderr)


def _outcome(states: list[scaling.HeadState], failed: dict) -> _Outcome:
    """The results of the heads that have one, under the spec each was last fitted as."""
    outcome = _Outcome({}, {}, {}, failed=failed)
    for state in states:
        if state.result is None:
            outcome.failed[state.form.spec] = state.reason
            continue
        spec = state.fitted.spec
        files = state.result.get("files")
        if files is None:  # a head whose files could not be saved safely
            outcome.failed[spec] = state.result.get("error", "not saved")
            continue
        outcome.seconds[spec], outcome.probas[spec] = state.seconds, state.result["probas"]
        outcome.files[spec] = (state.fitted, files, state.result.get("record"))
        status = "subsampled" if state.status == "fitted" and state.cap else state.status
        outcome.status[spec] = (status, state.reason, state.rows)
    if not outcome.files:
        spec, reason = next(iter(outcome.failed.items()))
        raise HeadError(f"no head could be fitted; {spec}: {reason}")
    return outcome


def _run_sweep(plan: _Plan, data: engine.SweepData, options: SweepOptions, started: float) -> tuple[_Outcome, dict]:
    """Fit the heads rung by rung on the chosen engine; what each head gave, and the labels of every evaluation."""
    states = [scaling.HeadState(cfg, cfg) for cfg in plan.configs]
    rows = _rows(plan, data)
    rung_list = scaling.rungs(len(rows.pool), len(states), plan.halving, plan.budget, data.per_image) \
        if plan.large or plan.views else [scaling.Rung(0, len(rows.pool), len(states))]
    plan.rungs = [{"rows": r.rows, "heads": r.keep} for r in rung_list]
    probes = sum(head_type(c.name).growth >= scaling.PROBE_GROWTH for c in plan.configs) \
        if plan.budget is not None and len(rung_list) > 1 else 0
    fits = sum(r.keep for r in rung_list) * (1 + len(rows.folds)) + probes
    runner = engine.open_engine(options.backend, options.scheduler, options.jobs)
    try:
        with Progress(fits, "fit-head", unit="fits", enabled=options.progress, every=PROGRESS_EVERY) as bar, \
                bar.heartbeat():
            sweep = _Sweep(plan, data, rows, runner, rung_list, states, _Recorder(plan, states, rows, bar),
                           started, options.device, options.progress)
            if options.progress and plan.large:
                _echo_plan(sweep)
            sweep.run()
    finally:
        runner.close()
    return _outcome(states, {}), rows.labels(data)


def _rank(plan: _Plan, labels: dict, outcome: _Outcome, specs) -> list[dict]:
    """Leaderboard entries of ``specs``, best first, with metrics on every split (selection first);
    ``labels`` are those of every evaluation: splits, ``cv`` or ``holdout``."""
    order = [plan.selection, *([plan.final] if plan.final != plan.selection else []),
             *(s for s in labels if s not in (plan.selection, plan.final))]
    entries = []
    for spec in specs:
        cfg = outcome.files[spec][0]
        metrics = {s: classification_metrics(labels[s], outcome.probas[spec][s], plan.classes) for s in order}
        status, reason, rows = outcome.status[spec]
        entries.append(make_entry(cfg, metrics, plan.selection, outcome.seconds[spec], status=status, reason=reason,
                                  rows=rows))
    return rank(entries, outcome.probas, labels)


def _transfer_config(entries: list[dict], outcome: _Outcome) -> HeadConfig | None:
    """The transferable form of the selected head (its registry ``transfer``) when that head cannot become a
    layer and the sweep has not fitted the form; else None."""
    cfg = outcome.files[entries[0]["head"]][0]
    htype = head_type(cfg.name)
    form = htype.transfer(cfg) if htype.transfer is not None and not htype.transferable else None
    return None if form is None or form.spec in outcome.files else form


def _with_transfer(plan: _Plan, data: engine.SweepData, options: SweepOptions, outcome: _Outcome, labels: dict,
                   entries: list[dict], *, started: float) -> list[dict]:
    """``entries`` with the transferable form of a selected head that cannot become a layer, fitted on the same
    rows and ranked with the others, so that stage three can start from it (:func:`featurecache.sweep.runs.
    best_transferable`); its entry's ``transfer_of`` names the head and its paired difference to it. The fit
    counts against the sweep's budget (``started``: when the sweep began)."""
    form = _transfer_config(entries, outcome)
    if form is None:
        return entries
    selected = entries[0]["head"]
    try:
        extra, _ = _run_sweep(dataclasses.replace(plan, configs=[form]), data, options, started)
    except HeadError as exc:
        outcome.failed[form.spec] = str(exc)
        return entries
    for name in ("seconds", "probas", "files", "status"):
        getattr(outcome, name).update(getattr(extra, name))
    outcome.failed.update(extra.failed)
    entries = _rank(plan, labels, outcome, outcome.files)
    split = plan.selection
    right = {spec: outcome.probas[spec][split].argmax(axis=1) == labels[split] for spec in (selected, form.spec)}
    gap = paired_difference(right[selected], right[form.spec])
    entry = next(e for e in entries if e["head"] == form.spec)
    entry["transfer_of"] = {"head": selected, **gap, "tied": bool(gap["ci"][0] <= 0)}
    entry["reason"] = f"the transferable form of {selected}, which cannot become a layer: fitted for fc finetune"
    return entries


def _post_data(plan: _Plan, data: engine.SweepData, labels: dict) -> dict:
    """``name -> (features, labels)`` for :func:`featurecache.sweep.postpass.post_pass`: every split's rows
    up to 4,000 training rows, where ``seeds`` may refit heads; above, the labels of every evaluation
    (enough for ``calibrate``)."""
    if plan.large:
        return {name: (None, y) for name, y in labels.items() if name != "cv"}
    out = {}
    for s in plan.splits:
        if s != "train":
            rows = _scored(plan, data, s)
            out[s] = (data.rows(s, rows), data.labels[s] if rows is None else data.labels[s][rows])
    images = np.arange(data.n_train)
    if plan.exclusion is not None:
        images = np.setdiff1d(images, plan.exclusion.train)
    out["train"] = (data.rows("train", images), data.labels["train"][images])
    if data.views is not None:
        keep = np.flatnonzero(np.isin(data.views, images))  # the views of the images kept, renumbered
        rows = data.n_train + keep
        out[store.VIEWS] = (data.rows("train", rows), data.labels["train"][rows],
                            np.searchsorted(images, data.views[keep]))
    return out


def _run_meta(plan: _Plan, entries: list[dict], failed: dict, started: float) -> dict:
    return {
        "format": RUN_FORMAT, "run_id": plan.run_dir.name, "cache": str(plan.cache),
        "cache_key": plan.meta["key"], "classes": plan.classes, "config": plan.meta["config"],
        "selection_split": plan.selection, "final_split": plan.final, "seed": plan.seed, "cv": plan.cv,
        "class_weight": plan.class_weight, "budget": plan.budget, "halving": plan.halving, "rungs": plan.rungs,
        "features": plan.features, "feature_dim": plan.dim, "views": plan.views,
        **({"exclude": plan.exclusion.record} if plan.exclusion is not None else {}),
        "heads": [e["head"] for e in entries], "best": entries[0]["head"],
        "failed": [{"head": spec, "error": reason} for spec, reason in failed.items()],
        "seconds": round(time.perf_counter() - started, 3),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "versions": files.versions("sklearn", "torch", "numpy", "skops", "safetensors"),
    }


@dataclass(frozen=True)
class SweepOptions:
    """Every option of :func:`fit_head`, as given: the one object the stage hands down.

    What is fitted (``head``, ``sweep_file``, ``class_weight``, ``features``, ``views``, ``exclude``), how heads are
    chosen (``seed``, ``cv``, ``seeds``, ``calibrate``, ``ensemble``), how much it may cost (``budget``, ``halving``,
    ``max_memory``), where the fits run (``jobs``, ``device``, ``backend``, ``scheduler``) and where the
    cache is (``cache``, ``cache_dir``).
    """

    cache: str
    head: tuple = ()
    sweep_file: str | None = None
    jobs: int | None = None
    seed: int = 0
    class_weight: str | None = None
    cv: int = 5
    device: str = "auto"
    budget: float | None = scaling.DEFAULT_BUDGET
    halving: bool = True
    max_memory: str | None = None
    backend: str = "local"
    scheduler: str | None = None
    cache_dir: str | None = None
    seeds: int = 1
    calibrate: str | None = "temperature"
    ensemble: bool = True
    features: str = "auto"
    views: bool | None = None
    exclude: str | None = None
    progress: bool = False


@takes(SweepOptions)
def fit_head(options: SweepOptions) -> SweepResult:
    """Fit every head of the grid on ``cache``, rank them and save them in a run directory.

    ``cache`` is a cache file, its name or a unique key prefix (looked up in ``cache_dir``).
    ``head`` holds grid specs; with neither ``head`` nor ``sweep_file`` the default sweep runs.
    ``jobs`` worker threads fit heads in parallel (default: the usable cores), torch heads one
    after another. Selection is on ``val`` when the cache has it, else ``cv``-fold stratified
    cross-validation on ``train`` (above 4,000 training rows: a stratified ``holdout`` of train).
    ``class_weight="balanced"`` weights every head that supports it; ``seeds`` > 1 refits the
    heads whose fit depends on a seed and reports the spread; ``calibrate="temperature"`` (the default;
    ``"none"`` or None: off) fits one temperature per head on the selection split
    (:mod:`featurecache.sweep.postpass`); ``ensemble`` adds the ensemble of the heads tied with the most
    accurate one, scored by cross-fitting and ranked first unless significantly worse than that head
    (:mod:`featurecache.sweep.ensemble`). A selected head that cannot become a layer (an RBF SVM, knn)
    gets its transferable form fitted beside it, for stage three.
    ``features``: ``auto`` (the default: on a cache that stores layers, every head on ``concat`` and on
    ``penultimate``, chosen on the selection split like any other choice; else ``penultimate``),
    ``penultimate``, a layer stored with ``--layers``, or ``concat``; ``views``:
    whether heads also learn from the ``--augment-views`` views (None: when the cache has them),
    each kept in its image's fold and never scored. ``exclude``: a file of paths (``fc audit --list``)
    left out of training, and for val and test images out of the scores (:mod:`featurecache.sweep.exclusion`).

    Above 4,000 training rows (:mod:`featurecache.sweep.halving`): with ``halving`` every head is
    fitted on a stratified sample first and only a third, those predicted best on all rows from their
    learning curves, moves on to larger ones;
    ``budget`` seconds (None or 0: no bound) bound the sweep through stand-ins and row samples
    chosen from timed small fits. ``max_memory`` (e.g. ``"4G"``; default half the available
    memory) bounds the features held: beyond it heads learn from row chunks or a sample.
    ``backend="dask"`` runs the fits on the ``dask.distributed`` scheduler at ``scheduler``
    (or $FC_DASK_SCHEDULER). The same inputs give the same leaderboard and the saved run.
    """
    started = time.perf_counter()
    post = post_options(options.seeds, options.calibrate, options.ensemble)  # checked first; part of the address
    plan = _plan(options, post)
    reused = _reused(plan, started)
    if reused is not None:
        return reused
    data = _read_data(plan)
    outcome, labels = _run_sweep(plan, data, options, started)
    entries = _with_transfer(plan, data, options, outcome, labels, _rank(plan, labels, outcome, outcome.files),
                             started=started)
    entries = post_pass(entries, outcome.probas, _post_data(plan, data, labels), post, plan.seed, plan.cv,
                        options.device, options.progress, plan.classes)
    cols = {spec: cfg.cols for spec, (cfg, *_) in outcome.files.items()}
    for entry in entries:
        entry["features"] = _entry_features(plan.meta, plan.features, entry, cols)
    run_meta = _run_meta(plan, entries, outcome.failed, started)
    write_run(plan.run_dir, run_meta, entries, outcome.files)
    return SweepResult(str(plan.run_dir), run_meta["best"], entries, plan.selection, plan.final, False,
                       time.perf_counter() - started, run_meta["failed"])


def list_head_types() -> list[dict]:
    """The registry as rows: name, family, kind, transferable, class_weight, default parameters and the
    facts the sweep uses (simplicity rank, relative cost, warm-start path; on many rows how the cost
    grows with the rows, the prior of its learning curve, whether there is a stand-in and whether it learns
    from row chunks)."""
    return [{"name": h.name, "family": h.family, "kind": h.kind, "transferable": h.transferable,
             "class_weight": h.class_weight, "defaults": h.defaults, "description": h.description,
             "simplicity": h.simplicity, "cost": h.cost, "warm_path": h.warm_path, "growth": h.growth,
             "learning_curve": h.learning_curve, "stand_in": h.stand_in is not None, "chunked": h.chunked is not None}
            for h in HEADS.values()]
