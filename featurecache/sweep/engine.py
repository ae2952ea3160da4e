"""Where stage two's fits run: the features they read, one fit as a task, and the engines.

:class:`SweepData` holds the labels of every split and the features that fit in memory
(``max_memory``); features beyond it stay in the HDF5 file and are read by rows or in
chunks by the task that needs them. A :class:`Task` fits a group of heads on some rows of
train and predicts on the evaluation rows; its result carries, per head, the seconds,
the probabilities and the head's files (:func:`featurecache.heads.dump_head`): the
fitted estimators never leave the worker.

Two engines run tasks: ``local`` (joblib worker threads, the BLAS, OpenMP and torch
pools capped so that the workers together use the cores, torch heads one after another
in one lane) and ``dask`` (joblib's Dask backend on a ``dask.distributed`` scheduler,
with the in-memory features scattered to every worker once).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import joblib
import numpy as np

from .. import store
from ..errors import HeadError, UsageError
from ..heads import dump_head, fit_linear_grid, head_type, make_estimator, thread_limit, threads_per_job
from ..heads.chunked import RowChunks, fit_chunked

SCHEDULER_ENV = "FC_DASK_SCHEDULER"
CONNECT_TIMEOUT = 30  # seconds to reach a Dask scheduler
BACKENDS = ("local", "dask")
PREDICT_ROWS = 8192  # rows predicted at once


# --------------------------------------------------------------------------- the features


class SweepData:
    """Labels of every split, and features (feature set ``features``): in memory where they fit, else
    read from ``path``.

    With augmented views (``views``: for each view row, the train row it is a view of), ``train``
    is the training images followed by their views: rows ``n_train`` and up are views, which heads
    learn from and no evaluation reads.
    """

    def __init__(self, path, labels: dict, n_features: int, features: dict, chunk_rows: int, row_cap: int,
                 feature_set: str = "penultimate", views: np.ndarray | None = None):
        self.path, self.labels, self.n_features = str(path), labels, n_features
        self.features = features  # split -> array, or None: read from the file
        self.chunk_rows, self.row_cap = chunk_rows, row_cap  # rows of one chunk; rows a head may hold
        self.feature_set, self.views = feature_set, views
        self.n_train = len(labels["train"]) - (0 if views is None else len(views))

    @property
    def per_image(self) -> float:
        """Training rows per training image: 1, or 1 plus its views."""
        return len(self.labels["train"]) / max(1, self.n_train)

    def with_views(self, rows: np.ndarray) -> np.ndarray:
        """Training rows ``rows`` and the rows of their views (none without views)."""
        if self.views is None:
            return rows
        return np.concatenate([rows, self.n_train + np.flatnonzero(np.isin(self.views, rows))])

    def rows(self, split: str, rows=None) -> np.ndarray:
        """Features of ``rows`` of ``split`` (None: all), from memory or from the file."""
        X = self.features.get(split)
        if X is not None:
            return X if rows is None else X[rows]
        if split == "train" and self.views is not None:
            return self._train_rows(np.arange(len(self.labels["train"])) if rows is None else np.asarray(rows))
        return store.read_rows(self.path, split, rows, block=self.chunk_rows, features=self.feature_set)

    def _train_rows(self, rows: np.ndarray) -> np.ndarray:
        """Rows of train and of its views, read from the file, in the order asked."""
        out = np.empty((len(rows), self.n_features), dtype=np.float32)
        images = rows < self.n_train
        for part, split, offset in ((images, "train", 0), (~images, store.VIEWS, self.n_train)):
            if part.any():
                out[part] = store.read_rows(self.path, split, rows[part] - offset, block=self.chunk_rows,
                                            features=self.feature_set)
        return out

    def chunks(self, split: str, rows: np.ndarray) -> RowChunks:
        rows = np.sort(rows)
        return RowChunks(lambda r: self.rows(split, r), rows, self.labels[split][rows], self.n_features,
                         self.chunk_rows)

    def predict_proba(self, model, split: str, rows, n_classes: int) -> np.ndarray:
        """Probabilities with one column per class of the cache, predicted :data:`PREDICT_ROWS` rows at a time."""
        rows = np.arange(len(self.labels[split])) if rows is None else np.asarray(rows)
        out = np.zeros((len(rows), n_classes))
        columns = np.asarray(model.classes_, dtype=np.int64)
        for start in range(0, len(rows), PREDICT_ROWS):
            part = rows[start:start + PREDICT_ROWS]
            out[start:start + len(part), columns] = model.predict_proba(self.rows(split, part))
        return out


# --------------------------------------------------------------------------- tasks


@dataclass(eq=False)
class Task:
    """One fit: a group of heads on ``fit_rows`` of train (None: all of it), predicted on ``evals``."""

    fitter: str  # a key of FITTERS
    configs: tuple
    fit_rows: np.ndarray | None
    evals: dict  # name -> (split, rows or None)
    keep: bool  # return the heads' files (not for CV folds)
    key: str  # what the fit's result is stored under (for a rerun after a kill)
    label: str = ""  # what progress shows

    @property
    def torch(self) -> bool:
        return head_type(self.configs[0].name).kind == "torch"


def _fit_single(configs, data: SweepData, rows, seed, device):
    X, y = data.rows("train", rows), data.labels["train"] if rows is None else data.labels["train"][rows]
    return [make_estimator(cfg, random_state=seed, device=device).fit(X, y) for cfg in configs]


def _fit_linear_batch(configs, data: SweepData, rows, seed, device):
    X, y = data.rows("train", rows), data.labels["train"] if rows is None else data.labels["train"][rows]
    return fit_linear_grid(X, y, configs, random_state=seed, device=device)


def _fit_warm_path(configs, data: SweepData, rows, seed, device):
    """Fit along the path, each head starting from the previous head's solution."""
    X, y = data.rows("train", rows), data.labels["train"] if rows is None else data.labels["train"][rows]
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


def _fit_chunked(configs, data: SweepData, rows, seed, device):
    rows = np.arange(len(data.labels["train"])) if rows is None else rows
    return [fit_chunked(cfg, data.chunks("train", rows), random_state=seed, device=device) for cfg in configs]


FITTERS = {"single": _fit_single, "linear-batch": _fit_linear_batch, "warm-path": _fit_warm_path,
           "chunked": _fit_chunked}
FIT_ERRORS = (ValueError, ArithmeticError, np.linalg.LinAlgError, RuntimeError, MemoryError, HeadError)


def _reason(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _head_result(model, cfg, task: Task, data: SweepData, n_classes: int, seconds: float) -> dict:
    """Seconds (its share of the fit and its own predictions), probabilities on the evaluation rows and
    (for kept fits) the files of one fitted head."""
    start = time.perf_counter()
    try:
        probas = {name: data.predict_proba(model, split, rows, n_classes)
                  for name, (split, rows) in task.evals.items()}
        files, record = dump_head(model, cfg) if task.keep else (None, None)
    except FIT_ERRORS as exc:
        return {"seconds": seconds + time.perf_counter() - start, "error": _reason(exc)}
    return {"seconds": seconds + time.perf_counter() - start, "probas": probas, "files": files, "record": record}


def run_task(task: Task, data: SweepData, n_classes: int, seed: int, device, threads: int | None = None) -> list:
    """Fit one task's group; a list with one result per head (see :func:`_head_result`).

    A head that cannot be fitted on these data (more PCA components than rows, more
    neighbours than samples, ...) does not stop the sweep: its result holds the error.
    """
    with thread_limit(threads) if threads else contextlib.nullcontext():
        start = time.perf_counter()
        try:
            models = FITTERS[task.fitter](task.configs, data, task.fit_rows, seed, device)
        except FIT_ERRORS as exc:
            seconds = (time.perf_counter() - start) / len(task.configs)
            return [{"seconds": seconds, "error": _reason(exc)} for _ in task.configs]
        seconds = (time.perf_counter() - start) / len(task.configs)
        return [_head_result(model, cfg, task, data, n_classes, seconds) for model, cfg in zip(models, task.configs)]


def _run_lane(lane: list[Task], fit: Callable[[Task], list], threads: int, started, finished):
    """Fit the tasks of ``lane`` one after another (``fit``: :func:`run_task` bound to the data)."""
    with thread_limit(threads):  # this worker thread's OpenMP pools too
        for task in lane:
            started(task)
            finished(task, fit(task))


# --------------------------------------------------------------------------- engines


def lanes(tasks: list[Task]) -> list[list[Task]]:
    """Torch heads in one lane, in order: they draw from torch's process-wide generator
    (initialization, dropout), so running two at once would make them depend on timing.
    Every other fit is a lane of its own; the costly ones (by their registered cost) go first."""
    torch_lane = [t for t in tasks if t.torch]
    others = sorted((t for t in tasks if not t.torch), key=lambda t: -head_type(t.configs[0].name).cost)
    return ([torch_lane] if torch_lane else []) + [[t] for t in others]


@dataclass
class LocalEngine:
    """Worker threads of this process: ``jobs`` of them (default: the usable cores)."""

    jobs: int | None = None

    @property
    def cores(self) -> int:
        from ..runtime import usable_cores

        return self.jobs or usable_cores()

    def run(self, tasks: list[Task], data: SweepData, n_classes: int, seed: int, device, on_result, started):
        """Run ``tasks``; call ``on_result(task, result)`` as each one finishes (one call at a time)."""
        task_lanes = lanes(tasks)
        n_jobs = max(1, min(self.cores, len(task_lanes)))
        threads = threads_per_job(n_jobs)
        lock = threading.Lock()

        def finished(task, result):
            with lock:
                on_result(task, result)

        fit = functools.partial(run_task, data=data, n_classes=n_classes, seed=seed, device=device)
        calls = (joblib.delayed(_run_lane)(lane, fit, threads, started, finished) for lane in task_lanes)
        with thread_limit(threads):  # the BLAS pools and torch are process-wide: cap them for all workers
            joblib.Parallel(n_jobs=n_jobs, prefer="threads")(calls)

    def close(self) -> None:
        pass


class DaskEngine:
    """joblib's Dask backend on the ``dask.distributed`` scheduler at ``address``; one thread per fit."""

    def __init__(self, address: str):
        try:
            from distributed import Client
        except ImportError:
            raise UsageError("the dask backend needs dask.distributed: pip install 'featurecache[dask]'") from None
        try:
            self.client = Client(address, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise UsageError(f"cannot reach the Dask scheduler at {address}: {_reason(exc)}") from None

    @property
    def cores(self) -> int:
        return max(1, sum(self.client.ncores().values()))

    def run(self, tasks: list[Task], data: SweepData, n_classes: int, seed: int, device, on_result, started):
        calls = [joblib.delayed(run_task)(task, data, n_classes, seed, device, 1) for task in tasks]
        with joblib.parallel_config(backend="dask", scatter=[data], wait_for_workers_timeout=60):
            results = joblib.Parallel(n_jobs=-1, return_as="generator")(calls)
            for task, result in zip(tasks, results):
                on_result(task, result)

    def close(self) -> None:
        self.client.close()


def open_engine(backend: str, scheduler: str | None, jobs: int | None):
    """The engine a sweep runs on: ``local`` threads, or a ``dask`` scheduler (``scheduler`` or $FC_DASK_SCHEDULER)."""
    if backend not in BACKENDS:
        raise UsageError(f"unknown backend {backend!r}: use {' or '.join(BACKENDS)}")
    if backend == "local":
        return LocalEngine(jobs)
    address = scheduler or os.environ.get(SCHEDULER_ENV)
    if not address:
        raise UsageError(f"the dask backend needs the scheduler's address: --scheduler ADDRESS or ${SCHEDULER_ENV}")
    return DaskEngine(address)
