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

Every run lives in a content-addressed directory next to its cache::

    <cache dir>/runs/<cache stem>-<12 hex>/
        run.json  leaderboard.csv  leaderboard.json  best
        heads/<slug>/head.json  model.joblib  [state_dict.pt]

``run.json`` is written last, into a temporary directory that is then renamed, so a
complete run is a lookup and an interrupted one is redone.

Heads fit in joblib worker threads (the numeric kernels of numpy, scikit-learn and
torch release the GIL, and threads start at once and share the features), with the
BLAS, OpenMP and torch pools capped so that ``jobs`` workers together use the cores.
All ``linear`` heads train in one batched pass (:func:`featurecache.heads.fit_linear_grid`);
heads along a path of :data:`WARM_PATHS` start from their neighbour's solution.
"""

from __future__ import annotations

import copy
import csv
import datetime as _dt
import hashlib
import json
import os
import platform
import shutil
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

import joblib
import numpy as np

from . import store
from .errors import HeadError, RunError, suggest
from .heads import (
    DEFAULT_SWEEP,
    HEADS,
    HeadConfig,
    fit_linear_grid,
    head_type,
    make_estimator,
    parse_grid,
    thread_limit,
    threads_per_job,
)
from .metrics import SUMMARY_KEYS, classification_metrics

RUNS = "runs"
RUN_FILE = "run.json"
CLASS_WEIGHTS = ("balanced",)

# Heads whose estimator can continue from a fit with a smaller value of one parameter:
# logistic regression along its regularization path (ascending C, from strong to weak
# regularization, as scikit-learn's own path solver goes), forests and boosting by
# adding trees. A path is fitted in order, each head starting from the previous one.
WARM_PATHS = {"logreg": "C", "random-forest": "n_estimators", "hgb": "max_iter"}

# Last tie-break of the leaderboard, after accuracy and log-loss: the simpler head first.
SIMPLICITY = {"nearest-centroid": 0, "logreg": 1, "ridge": 1, "linear-svm": 1, "linear": 1, "knn": 2,
              "svm": 3, "mlp": 3, "random-forest": 4, "hgb": 4}
UNRANKED = 5  # any other scikit-learn classifier

# Rough relative cost of one fit, a scheduling hint only: the costly heads start first.
COST = {"hgb": 3, "random-forest": 3, "svm": 2}


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


@dataclass
class Run:
    """A finished run: its directory, ``run.json`` and its leaderboard (best first)."""

    path: Path
    meta: dict
    leaderboard: list

    @property
    def best(self) -> str:
        return self.meta["best"]


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
    """Units of work: all ``linear`` heads in one batched pass, warm-start paths, single heads."""
    linear = tuple(c for c in configs if c.name == "linear")
    groups = [("linear-batch", linear)] if linear else []
    paths: dict[tuple, list[HeadConfig]] = {}
    for cfg in configs:
        if cfg.name == "linear":
            continue
        param = WARM_PATHS.get(cfg.name)
        if param is None or not isinstance(cfg.params.get(param, 0), (int, float)):
            groups.append(("single", (cfg,)))
            continue
        rest = {k: v for k, v in cfg.params.items() if k != param}
        key = (cfg.name, cfg.pre, cfg.class_weight, json.dumps(rest, sort_keys=True, default=str))
        paths.setdefault(key, []).append(cfg)
    default = {name: head_type(name).defaults.get(param) for name, param in WARM_PATHS.items()}
    for members in paths.values():
        param = WARM_PATHS[members[0].name]
        members.sort(key=lambda c: c.params.get(param, default[c.name]))
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
    Every other fit is a lane of its own; the costly ones go first."""
    torch_lane = [t for t in tasks if head_type(t.configs[0].name).kind == "torch"]
    others = [t for t in tasks if head_type(t.configs[0].name).kind != "torch"]
    others.sort(key=lambda t: -COST.get(t.configs[0].name, 1))
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


def slug(spec: str) -> str:
    """A file-system-safe name for a head spec: ``logreg:C=0.1;pre=standardize`` -> ``logreg-C=0.1-pre=standardize``."""
    text = "".join(c if c.isalnum() or c in "=.+_" else "-" for c in spec).strip("-")
    if len(text) > 120:
        text = text[:100] + "-" + hashlib.sha256(spec.encode()).hexdigest()[:12]
    return text


def _run_id(cache: Path, key: str, specs: list[str], seed: int, cv: int, class_weight) -> str:
    payload = json.dumps({"cache_key": key, "heads": sorted(specs), "seed": seed, "cv": cv,
                          "class_weight": class_weight}, sort_keys=True)
    return f"{cache.stem}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def _rank_key(entry: dict):
    metrics = entry["metrics"][entry["selection_split"]]
    name = entry["head"].partition(":")[0]
    return (-entry["selection_accuracy"], metrics["log_loss"], SIMPLICITY.get(name, UNRANKED), entry["head"])


def _versions() -> dict:
    import sklearn
    import torch

    from . import __version__

    return {"featurecache": __version__, "scikit-learn": sklearn.__version__, "torch": torch.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _entry(cfg: HeadConfig, metrics: dict, selection: str, seconds: float) -> dict:
    params = {**cfg.to_dict()["params"], "pre": cfg.pre}
    if cfg.class_weight is not None:
        params["class_weight"] = cfg.class_weight
    return {"head": cfg.spec, "params": params, "selection_split": selection,
            "selection_accuracy": metrics[selection]["accuracy"], "metrics": metrics,
            "fit_seconds": round(seconds, 4)}


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
    """
    from .runtime import resolve_device, usable_cores

    started = time.perf_counter()
    path = store.resolve(cache, cache_dir).resolve()
    meta = store.info(path)
    configs = build_grid(head, sweep_file, class_weight)
    resolve_device(device)
    if jobs is not None and (not isinstance(jobs, int) or jobs < 1):
        raise HeadError(f"jobs must be a positive integer, got {jobs!r}")
    if "train" not in meta["splits"]:
        raise HeadError(f"{path.name} has no train split (it has {', '.join(meta['splits'])})")
    classes = meta["classes"]
    splits = list(meta["splits"])
    selection = "val" if "val" in splits else "cv"
    final = "test" if "test" in splits else selection

    folds_used = cv if selection == "cv" else None
    run_dir = path.parent / RUNS / _run_id(path, meta["key"], [c.spec for c in configs], seed, folds_used, class_weight)
    if (run_dir / RUN_FILE).is_file():
        run = load_run(run_dir)
        return SweepResult(str(run_dir), run.best, run.leaderboard, run.meta["selection_split"],
                           run.meta["final_split"], True, time.perf_counter() - started, run.meta.get("failed", []))

    data = {s: store.load_features(path, s)[:2] for s in splits}
    _check_split("train", data["train"][1], classes, "fitting a head")
    if selection == "val":
        _check_split("val", data["val"][1], classes, "selecting a head")
    everything = {s: (s, None) for s in splits}
    folds = _cv_folds(data["train"][1], cv, seed, classes) if selection == "cv" else []
    tasks = []
    for fitter, group in _groups(configs):
        tasks.append(_Task(fitter, group, None, everything, True))
        tasks += [_Task(fitter, group, fit_rows, {"cv": ("train", rows)}, False) for fit_rows, rows in folds]
    lanes = _lanes(tasks)
    n_jobs = min(jobs or usable_cores(), len(lanes))
    threads = threads_per_job(n_jobs)

    seconds: dict[str, float] = {c.spec: 0.0 for c in configs}
    probas: dict[str, dict[str, np.ndarray]] = {c.spec: {} for c in configs}
    models: dict[str, object] = {}
    failed: dict[str, str] = {}  # spec -> why it could not be fitted
    n_train = len(data["train"][1])
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc=f"fitting {len(configs)} heads", unit="fit", leave=False)
    calls = (joblib.delayed(_run_lane)(lane, data, len(classes), seed, device, threads) for lane in lanes)
    with thread_limit(threads):  # the BLAS pools and torch are process-wide: cap them for all workers
        results = joblib.Parallel(n_jobs=n_jobs, prefer="threads", return_as="generator")(calls)
        for lane, lane_results in zip(lanes, results):
            for task, (task_seconds, task_probas, task_models) in zip(lane, lane_results):
                for i, cfg in enumerate(task.configs):
                    seconds[cfg.spec] += task_seconds
                    if isinstance(task_probas, str):
                        failed.setdefault(cfg.spec, task_probas)
                        continue
                    for name, proba in task_probas[i].items():
                        if name == "cv":
                            oof = probas[cfg.spec].setdefault("cv", np.zeros((n_train, len(classes))))
                            oof[task.evals["cv"][1]] = proba
                        else:
                            probas[cfg.spec][name] = proba
                    if task.keep:
                        models[cfg.spec] = task_models[i]
            if bar is not None:
                bar.update(len(lane))
    if bar is not None:
        bar.close()

    labels = {s: data[s][1] for s in splits} | {"cv": data["train"][1]}
    order = [selection, *([final] if final != selection else []),
             *(s for s in splits if s not in (selection, final))]
    if len(failed) == len(configs):
        spec, reason = next(iter(failed.items()))
        raise HeadError(f"no head could be fitted on {path.name}; {spec}: {reason}")
    entries = []
    for cfg in configs:
        if cfg.spec in failed:
            continue
        metrics = {s: classification_metrics(labels[s], probas[cfg.spec][s], classes) for s in order}
        entries.append(_entry(cfg, metrics, selection, seconds[cfg.spec]))
    entries.sort(key=_rank_key)

    run_meta = {
        "run_id": run_dir.name, "cache": str(path), "cache_key": meta["key"], "classes": classes,
        "config": meta["config"], "selection_split": selection, "final_split": final, "seed": seed,
        "cv": folds_used, "class_weight": class_weight,
        "heads": [e["head"] for e in entries], "best": entries[0]["head"],
        "failed": [{"head": spec, "error": reason} for spec, reason in failed.items()],
        "seconds": round(time.perf_counter() - started, 3),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "versions": _versions(),
    }
    by_spec = {c.spec: c for c in configs}
    _write_run(run_dir, run_meta, entries, {s: (by_spec[s], m) for s, m in models.items() if s not in failed})
    return SweepResult(str(run_dir), run_meta["best"], entries, selection, final, False,
                       time.perf_counter() - started, run_meta["failed"])


# --------------------------------------------------------------------------- the run directory


def _json_dump(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def csv_rows(leaderboard: list[dict]) -> list[dict]:
    """One flat row per head: rank, spec, selection, every summary metric per split, fit time."""
    rows = []
    for rank, entry in enumerate(leaderboard, 1):
        row = {"rank": rank, "head": entry["head"], "selection_split": entry["selection_split"],
               "selection_accuracy": entry["selection_accuracy"]}
        for split, metrics in entry["metrics"].items():
            row.update({f"{split}_{k}": metrics[k] for k in SUMMARY_KEYS if k in metrics})
        row["fit_seconds"] = entry["fit_seconds"]
        rows.append(row)
    return rows


def _write_run(run_dir: Path, meta: dict, entries: list[dict], models: dict) -> None:
    import torch

    tmp = run_dir.with_name(f".{run_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "heads").mkdir(parents=True)
    try:
        for entry in entries:
            cfg, model = models[entry["head"]]
            htype = head_type(cfg.name)
            folder = tmp / "heads" / slug(entry["head"])
            folder.mkdir()
            joblib.dump(model, folder / "model.joblib")
            head_meta = {"head": entry["head"], "name": cfg.name, "params": cfg.to_dict()["params"], "pre": cfg.pre,
                         "class_weight": cfg.class_weight, "kind": htype.kind, "transferable": htype.transferable,
                         "metrics": entry["metrics"], "selection_split": entry["selection_split"],
                         "fit_seconds": entry["fit_seconds"]}
            if htype.kind == "torch":
                estimator = model.named_steps["head"]
                torch.save(estimator.module_.state_dict(), folder / "state_dict.pt")
                head_meta["estimator"] = {"class": type(estimator).__name__,
                                          "params": estimator.get_params(deep=False),
                                          "classes": estimator.classes_.tolist(),
                                          "n_features_in": int(estimator.n_features_in_)}
            _json_dump(head_meta, folder / "head.json")
        _json_dump(entries, tmp / "leaderboard.json")
        rows = csv_rows(entries)
        columns = list(dict.fromkeys(k for row in rows for k in row))
        with open(tmp / "leaderboard.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        (tmp / "best").write_text(slug(meta["best"]) + "\n")
        _json_dump(meta, tmp / RUN_FILE)
        if run_dir.exists() and not (run_dir / RUN_FILE).exists():
            shutil.rmtree(run_dir)  # left by an interrupted run
        try:
            os.rename(tmp, run_dir)
        except OSError:
            if not (run_dir / RUN_FILE).exists():
                raise  # otherwise a concurrent identical run finished first: keep its result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_run(ref: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A run directory by path, by run id, or by a unique prefix of its id or of its hash."""
    path = Path(ref)
    if (path / RUN_FILE).is_file():
        return path
    if path.is_dir():
        raise RunError(f"{path} is not a complete run directory (no {RUN_FILE}); re-run fc fit-head")
    root = store.default_cache_dir(cache_dir) / RUNS
    runs = sorted(p for p in root.glob("*") if (p / RUN_FILE).is_file()) if root.is_dir() else []
    text = str(ref)
    matches = [p for p in runs if p.name.startswith(text) or p.name.rpartition("-")[2].startswith(text)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        hint = suggest(text, [p.name for p in runs])
        raise RunError(f"no run matches {text!r} in {root}{hint}")
    raise RunError(f"{text!r} matches {len(matches)} runs in {root}: " + ", ".join(p.name for p in matches))


def _check_cache(run_dir: Path, meta: dict) -> None:
    cache = Path(meta["cache"])
    if not cache.exists():
        raise RunError(f"run {run_dir.name} was trained on {cache}, which no longer exists; "
                       "re-run fc extract and fc fit-head")
    key = store.info(cache)["key"]
    if key != meta["cache_key"]:
        raise RunError(f"run {run_dir.name} was trained on features {meta['cache_key'][:16]} but {cache} now "
                       f"holds {key[:16]}; re-run fc fit-head")


def load_run(run: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Run:
    """A finished run (path, id or prefix), checked against the cache it was trained on."""
    run_dir = resolve_run(run, cache_dir)
    meta = json.loads((run_dir / RUN_FILE).read_text())
    _check_cache(run_dir, meta)
    leaderboard = json.loads((run_dir / "leaderboard.json").read_text())
    return Run(run_dir, meta, leaderboard)


def best_transferable(leaderboard: list[dict]) -> str | None:
    """The best-ranked head of a leaderboard that converts exactly to a torch module."""
    for entry in leaderboard:
        htype = HEADS.get(entry["head"].partition(":")[0])
        if htype is not None and htype.transferable:
            return entry["head"]
    return None


def load_head(run: str | os.PathLike, head: str = "best", cache_dir: str | os.PathLike | None = None):
    """``(fitted pipeline, head.json dict)`` of one head of a run.

    ``head`` is ``best`` (the top of the leaderboard), ``best-transferable`` (the best
    head that can become a layer of a network: linear, mlp, logreg, linear-svm, ridge),
    a spec or a slug.
    """
    loaded = load_run(run, cache_dir)
    folders = loaded.path / "heads"
    name = head
    if head == "best":
        name = (loaded.path / "best").read_text().strip()
    elif head == "best-transferable":
        name = best_transferable(loaded.leaderboard)
        if name is None:
            raise RunError(f"run {loaded.path.name} has no head that can become a layer of a network "
                           "(linear, mlp, logreg, linear-svm, ridge)")
    folder = folders / name
    if not (folder / "head.json").is_file():
        folder = folders / slug(name)
    if not (folder / "head.json").is_file():
        raise RunError(f"run {loaded.path.name} has no head {head!r}{suggest(head, loaded.meta['heads'])}")
    return joblib.load(folder / "model.joblib"), json.loads((folder / "head.json").read_text())


# --------------------------------------------------------------------------- presentation


def selection_note(selection_split: str, final_split: str, cv: int | None = None) -> str:
    """One line saying which numbers chose the head and which, if any, are held out."""
    chosen = f"{cv}-fold cross-validation on train (cv)" if selection_split == "cv" else selection_split
    if final_split != selection_split:
        return f"heads selected on {chosen}; {final_split} is held out: quote its scores"
    return (f"heads selected on {chosen}; there is no test split, so these scores chose the head "
            "and are not a held-out estimate")


def leaderboard_table(leaderboard: list[dict], final_split: str) -> tuple[list[dict], list[str]]:
    """Rows and columns of the printed leaderboard."""
    rows = []
    for rank, entry in enumerate(leaderboard, 1):
        sel = entry["selection_split"]
        m = entry["metrics"]
        row = {"#": rank, "head": entry["head"], f"{sel} acc (selection)": f"{entry['selection_accuracy']:.4f}",
               f"{sel} log_loss": f"{m[sel]['log_loss']:.4f}"}
        if final_split != sel:
            row.update({f"{final_split} acc": f"{m[final_split]['accuracy']:.4f}",
                        f"{final_split} bal_acc": f"{m[final_split]['balanced_accuracy']:.4f}",
                        f"{final_split} macro_f1": f"{m[final_split]['macro_f1']:.4f}"})
        row.update({"train acc": f"{m['train']['accuracy']:.4f}", "fit s": f"{entry['fit_seconds']:.3f}"})
        rows.append(row)
    return rows, list(rows[0]) if rows else []


def list_head_types() -> list[dict]:
    """The registry as rows: name, family, kind, transferable, class_weight and default parameters."""
    return [{"name": h.name, "family": h.family, "kind": h.kind, "transferable": h.transferable,
             "class_weight": h.class_weight, "defaults": h.defaults, "description": h.description}
            for h in HEADS.values()]
