"""How many labels are enough: the learning curve of a run's selected head (``fc curve RUN``).

:func:`curve` refits the run's best entry (or ``head``) on 1, 2, 4, 8, ... labelled images
per class, then on all of them, and scores every fit on the run's own selection rows:

- **The selection rows.** ``val`` when the run selected on it; for ``holdout`` the same
  stratified holdout of train the sweep drew from the run's seed
  (:func:`featurecache.sweep.halving.holdout_split`), the sizes drawn from the rest; for
  ``cv`` the same stratified folds (the run's seed and ``cv``): each size is drawn from each
  fold's training rows and scored on its left-out rows, and the accuracy is over every train
  row, predicted out of fold, as the run's ``cv`` score is. Images a run's ``--exclude`` left
  out stay out, and the views of ``--augment-views`` join their images (never a scored row).
  No fit ever learns from a row it is scored on.
- **The sizes.** ``k`` images per class for k = 1, 2, 4, ... below the largest class, then
  all of them; a class with fewer than k images gives all it has. The powers of two stop where
  all the images are fewer than 1.5 times theirs, so that the last step is a real one. A size's subsamples are
  stratified and seeded: seed ``s`` shuffles each class once, and every size takes the first
  ``k`` of each class, so the subsamples of one seed are nested and the sizes compare on the
  same images. ``all`` is one subsample, and the run has fitted it already: with val or holdout
  selection its saved entry is predicted again on the selection rows (no refit; the point is the
  run's own selection score), with cv it is refitted on each fold's training rows with the run's
  seed, as the sweep did (so is an entry the sweep fitted on a sample only, or saved as a pickle).
- **The seeds and the budget.** Each size below ``all`` is fitted on ``seeds`` subsamples
  (seed ``s`` also seeds the head: ``random_state`` is the run's seed plus ``s``). With a
  ``budget`` (seconds of the whole call, reading the features included), the seconds of the
  sizes still to come are estimated before each size from the size before (:class:`Clock`:
  seconds ~ images ** growth, the head types' registered growth). A size whose seeds cost no
  more than an equal share of what is left keeps them all; otherwise, while the estimates exceed
  90% of what is left, the largest sizes lose seeds first, down to one: so the small sizes,
  whose subsamples vary most, keep theirs (the first two always do: the first size's seconds
  are mostly start-up, and are not a guide). A size between the first two and the last whose one fit
  would take longer than what is left is skipped, with the reason in its row (:func:`_over_budget`); the
  first two and all the images are always fitted, so a budget too small for them is exceeded. The default, 55 s, keeps
  ``fc curve`` within a minute with Python's start-up on Fashion-MNIST's 20,000 images.
- **Threads.** Every fit runs on one thread, the fits of a size side by side on the usable
  cores; torch heads one after another in one lane, as in a sweep (they draw from torch's
  process-wide generator). On a busy machine a fit spread over several threads waits on the
  slowest: an MLP on 5,120 rows took 6.4 s on one thread, 55 s on two, on two shared cores.
- **The score.** A size's accuracy is the mean over its seeds; its 95% interval is a bootstrap
  over the selection images of that mean (:func:`featurecache.metrics.mean_interval`: with one
  seed, exactly :func:`featurecache.metrics.proportion_interval`); ``accuracies`` lists each
  seed's. The slope is that of the last two sizes, in points per doubling of the labels:
  ``(accuracy_b - accuracy_a) / log2(images_b / images_a)``, its interval from a bootstrap of
  the per-image difference over the same images: with one seed each,
  :func:`featurecache.metrics.paired_difference` (as the leaderboard's gaps), else
  :func:`featurecache.metrics.mean_interval` of the difference of the shares.
- **An ensemble.** For the ``ensemble`` entry each member is refitted on the same rows and
  their probabilities mixed with the saved weights, each after its saved temperature
  (:func:`featurecache.heads.mixture.mix`). A member that cannot be fitted on a size (an RBF
  SVM's 5 calibration folds on 2 images per class, 15 neighbours among 10 images) is left out
  of that size's mixture, the others' weights renormalized, and the size says so; a single
  head that cannot be fitted leaves its size without a score, with the reason.

The result is saved as ``curve.json`` in the run folder, keyed by its inputs (the run's
``run.json``, the head, seeds, budget, the code): the same call again reads it.
``fc report RUN`` draws it, with the sentence on the slope.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import joblib
import numpy as np

from .. import __version__, store
from ..errors import RunError, UsageError
from ..files import sha256_file, write_json
from ..heads import HeadConfig, head_type, make_estimator, thread_limit
from ..heads.mixture import mix
from ..metrics import class_probabilities, mean_interval, paired_difference
from ..progress import Progress
from ..runtime import usable_cores
from ..stages import takes
from . import halving as scaling
from .engine import FIT_ERRORS
from .exclusion import read_exclusion
from .leaderboard import ENSEMBLE
from .runs import RUN_FILE, RUN_FORMAT, Run, head_meta, load_head, load_run

CURVE_FILE = "curve.json"
DEFAULT_SEEDS = 3
DEFAULT_BUDGET = 55.0  # seconds of a call: with Python's start-up, fc curve stays within a minute
PLAN_SHARE = 0.9  # of the seconds left that the estimates may fill: two timed sizes are a rough guide
LAST_STEP = 1.5  # all the images are at least this many times those of the largest power of two


# --------------------------------------------------------------------------- options and result


@dataclass(frozen=True)
class CurveOptions:
    """Every option of :func:`curve`: the run and its head, how many subsamples, the time it may take."""

    run: str
    head: str = "best"
    seeds: int = DEFAULT_SEEDS
    budget: float | None = DEFAULT_BUDGET
    device: str = "auto"
    cache_dir: str | None = None
    progress: bool = False


@dataclass
class CurveResult:
    """A learning curve: one point per size (``per_class`` None: all the images), the slope of the last
    two and the sentence that says it."""

    run_dir: str
    head: str
    members: list  # the ensemble's members (head, weight, temperature); [] for a single head
    selection_split: str
    scored: int  # selection images each point is scored on
    seeds: int
    budget: float | None
    points: list
    slope: dict | None  # {"points", "ci", "from", "to"}: accuracy points per doubling of the labels
    sentence: str
    seconds: float
    reused: bool = False
    run_sha256: str = ""  # of the run.json the curve was measured on
    key: str = field(default="", repr=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "key"}


# --------------------------------------------------------------------------- where it learns and is scored


@dataclass
class _Fold:
    pool: np.ndarray  # train images a fit may learn from, sorted
    scored: np.ndarray  # rows of the scored split


@dataclass
class _Setup:
    """The features, the folds and the members of one curve."""

    split: str  # the split the scored rows are of: val or train
    folds: list
    X: np.ndarray  # train, then its views
    y: np.ndarray
    X_scored: np.ndarray
    y_scored: np.ndarray
    n_train: int
    views: np.ndarray | None  # the train row each view row is a view of
    members: list  # {"head", "config", "weight", "temperature"}
    n_classes: int
    seed: int
    saved: object = None  # the run's own fitted entry, which is the point of all the images (None: refitted)

    def rows(self, images: np.ndarray) -> np.ndarray:
        """Training rows of ``images``: the images and their views."""
        if self.views is None:
            return images
        return np.concatenate([images, self.n_train + np.flatnonzero(np.isin(self.views, images))])


def _excluded(run: Run) -> tuple[np.ndarray, dict]:
    """The train rows the run left out, and the rows of other splits left out of its scores."""
    record = run.meta.get("exclude")
    if not record:
        return np.zeros(0, dtype=np.int64), {}
    path = Path(record["file"])
    if not path.is_file() or sha256_file(path) != record["sha256"]:
        raise RunError(f"run {run.path.name} left out the images {path} listed, and that file is gone or has "
                       "changed: the curve cannot leave out the same images; run fc fit-head --exclude again")
    exclusion = read_exclusion(path, Path(run.meta["cache"]), store.info(run.meta["cache"])["splits"])
    return exclusion.train, exclusion.scores


def _folds(run: Run, y: np.ndarray, split: str, n_scored: int) -> list[_Fold]:
    """The run's selection: val (all train learns), its holdout of train, or its cv folds."""
    from sklearn.model_selection import StratifiedKFold

    left_out, scores = _excluded(run)
    selection, seed = run.meta["selection_split"], run.meta["seed"]
    if selection == "holdout":
        pool, held = scaling.holdout_split(y, seed)
        return [_Fold(np.setdiff1d(pool, left_out), np.setdiff1d(held, left_out))]
    pool = np.setdiff1d(np.arange(len(y)), left_out)
    if selection == "cv":
        folds = StratifiedKFold(n_splits=run.meta["cv"], shuffle=True, random_state=seed)
        return [_Fold(np.sort(pool[fit]), pool[out]) for fit, out in folds.split(np.zeros(len(pool)), y[pool])]
    return [_Fold(pool, np.setdiff1d(np.arange(n_scored), scores.get(split, [])))]


def _members(run: Run, entry: dict) -> list[dict]:
    """What is refitted: the head itself, or each member of the ensemble with its weight and temperature."""
    if entry.get("kind") != ENSEMBLE:
        return [{"head": entry["head"], "config": HeadConfig.from_dict(entry), "weight": 1.0, "temperature": 1.0}]
    return [{"head": m["head"], "config": HeadConfig.from_dict(head_meta(run, m["head"])),
             "weight": float(m["weight"]), "temperature": float(m.get("temperature", 1.0))} for m in entry["members"]]


def _setup(run: Run, entry: dict) -> _Setup:
    cache, features = run.meta["cache"], run.meta.get("features", "penultimate")
    split = "val" if run.meta["selection_split"] == "val" else "train"
    X, y = store.read_rows(cache, "train", features=features), store.load_labels(cache, "train")
    n_train, views = len(y), None
    if run.meta.get("views"):
        views = store.view_sources(cache)
        X = np.vstack([X, store.read_rows(cache, store.VIEWS, features=features)])
        y = np.concatenate([y, store.load_labels(cache, store.VIEWS)])
    X_scored, y_scored = (X, y) if split == "train" else \
        (store.read_rows(cache, split, features=features), store.load_labels(cache, split))
    folds = _folds(run, y[:n_train], split, len(y_scored))
    return _Setup(split, folds, X, y, X_scored, y_scored, n_train, views, _members(run, entry),
                  len(run.meta["classes"]), int(run.meta["seed"]), _saved(run, entry))


def _saved(run: Run, entry: dict):
    """The run's fitted entry when it learnt from every image a curve's largest size has: selected on val or
    its holdout (not by cv folds), fitted on all its rows (not a sample), saved without a pickle."""
    if run.meta["selection_split"] == "cv" or run.format != RUN_FORMAT or entry.get("status", "fitted") != "fitted":
        return None
    return load_head(run.path, entry["head"])[0]


# --------------------------------------------------------------------------- sizes and subsamples


def sizes(class_counts) -> list[int | None]:
    """Images per class: 1, 2, 4, ... then None (all of them). A power of two stops the list below the
    largest class, or when all the images are fewer than :data:`LAST_STEP` times its images: so the last
    step, which gives the slope, spans between 1.5 and 3 times the images, never a handful of them."""
    counts = np.asarray(class_counts, dtype=np.int64)
    out, k = [], 1
    while k < counts.max() and counts.sum() >= LAST_STEP * np.minimum(counts, k).sum():
        out.append(k)
        k *= 2
    return [*out, None]


def subsample(pool: np.ndarray, y: np.ndarray, k: int | None, seed: tuple) -> np.ndarray:
    """``k`` images of each class of ``pool`` (all of a class that has fewer; None: all of ``pool``),
    sorted. ``seed`` shuffles each class once: the samples of one seed are nested as ``k`` grows."""
    if k is None:
        return np.sort(pool)
    rng = np.random.default_rng(list(seed))
    return np.sort(np.concatenate([rng.permutation(pool[y[pool] == c])[:k] for c in np.unique(y[pool])]))


def _image_count(setup: _Setup, k: int | None) -> int:
    """Training images of a fit of size ``k`` (with cv folds: their mean, rounded)."""
    counts = []
    for fold in setup.folds:
        per_class = np.bincount(setup.y[fold.pool])
        counts.append(int(per_class.sum() if k is None else np.minimum(per_class, k).sum()))
    return round(float(np.mean(counts)))


# --------------------------------------------------------------------------- fits


def _reason(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())


def _fit(setup: _Setup, task: tuple, device):
    """One fit: member ``m`` on the ``k``-per-class subsample of fold ``f`` drawn with ``seed``; its
    probabilities on the fold's scored rows, or why it could not be fitted."""
    k, seed, f, m = task
    fold, member = setup.folds[f], setup.members[m]
    rows = setup.rows(subsample(fold.pool, setup.y, k, (setup.seed, f, seed)))
    try:
        model = make_estimator(member["config"], random_state=setup.seed + seed, device=device)
        model.fit(setup.X[rows], setup.y[rows])
        return class_probabilities(model, setup.X_scored[fold.scored], setup.n_classes)
    except FIT_ERRORS as exc:
        return _reason(exc)


def _fit_all(setup: _Setup, tasks: list, device) -> dict:
    """``task -> probabilities or reason`` of every fit of a size, in worker threads of one BLAS, OpenMP and
    torch thread each (on a busy machine a fit spread over several threads waits on the slowest of them).
    Torch heads fit one after another in one lane, as in a sweep: they draw from torch's process-wide
    generator, so that two at once would make them depend on timing; the others each in a lane of their own."""
    torch_lane = [t for t in tasks if head_type(setup.members[t[3]]["config"].name).kind == "torch"]
    lanes = ([torch_lane] if torch_lane else []) + [[t] for t in tasks if t not in torch_lane]

    def run_lane(lane):
        with thread_limit(1):
            return [(task, _fit(setup, task, device)) for task in lane]

    with thread_limit(1):
        done = joblib.Parallel(n_jobs=max(1, min(usable_cores(), len(lanes))), prefer="threads")(
            joblib.delayed(run_lane)(lane) for lane in lanes)
    return dict(pair for lane in done for pair in lane)


def _mixed(setup: _Setup, probas: list, left_out: dict) -> np.ndarray | None:
    """The mixture of the members that could be fitted (``probas``: one per member, or the reason it could
    not), their weights renormalized; None when none could. Records the others in ``left_out``."""
    kept = [(p, member) for p, member in zip(probas, setup.members) if not isinstance(p, str)]
    left_out.update({member["head"]: p for p, member in zip(probas, setup.members) if isinstance(p, str)})
    if not kept:
        return None
    total = sum(member["weight"] for _, member in kept)
    return mix([p for p, _ in kept], [m["weight"] / total for _, m in kept], [m["temperature"] for _, m in kept])


def _hits(setup: _Setup, k: int | None, seeds: int, device) -> tuple[list, dict, list]:
    """Per seed that could be fitted: whether each scored image (over every fold) is right; the members
    left out of a mixture; why the other seeds could not be fitted."""
    if k is None and setup.saved is not None:  # the run's own fit on all of them: predicted, not refitted
        fold = setup.folds[0]
        proba = class_probabilities(setup.saved, setup.X_scored[fold.scored], setup.n_classes)
        return [proba.argmax(axis=1) == setup.y_scored[fold.scored]], {}, []
    tasks = [(k, s, f, m) for s in range(seeds) for f in range(len(setup.folds)) for m in range(len(setup.members))]
    fitted = _fit_all(setup, tasks, device)
    hits, left_out, errors = [], {}, []
    for s in range(seeds):
        per_fold = []
        for f, fold in enumerate(setup.folds):
            proba = _mixed(setup, [fitted[(k, s, f, m)] for m in range(len(setup.members))], left_out)
            if proba is None:
                errors.append("; ".join(f"{head}: {why}" for head, why in left_out.items()))
                break
            per_fold.append(proba.argmax(axis=1) == setup.y_scored[fold.scored])
        else:
            hits.append(np.concatenate(per_fold))
    return hits, left_out, errors


def _point(setup: _Setup, k: int | None, seeds: int, device) -> tuple[dict, np.ndarray | None]:
    """One size: its point (without seconds) and the share of its seeds that got each scored image right."""
    point = {"per_class": k, "images": _image_count(setup, k), "seeds": seeds}
    hits, left_out, errors = _hits(setup, k, seeds, device)
    if left_out and hits:
        point["left_out"] = left_out
    if not hits:
        point.update(accuracy=None, ci=None, accuracies=[], error=errors[0])
        return point, None
    share = np.mean(hits, axis=0)
    point.update(accuracy=float(share.mean()), ci=mean_interval(share), accuracies=[float(h.mean()) for h in hits])
    if errors:
        point["error"] = f"{len(errors)} of {seeds} seeds not fitted: {errors[0]}"
    return point, share


# --------------------------------------------------------------------------- the budget


@dataclass
class Clock:
    """Seconds of one seed of a size of ``images`` training images, from the latest size timed:
    ``seconds * (images / timed images) ** growth``. Counting its fixed cost (starting a fit, predicting)
    as rows too, it overestimates the large sizes from the small ones, never underestimates them:
    each size is planned again from the one before, nearer to it."""

    growth: float = 1.0
    timed: list = field(default_factory=list)  # (images, seconds of one seed) of each size timed

    def estimate(self, images: int) -> float | None:
        """Seconds of one seed of a size of ``images``; None before any size is timed."""
        if not self.timed:
            return None
        timed_images, seconds = self.timed[-1]
        return seconds * (max(1, images) / max(1, timed_images)) ** self.growth


def seeds_now(images: list, seeds: int, left: float | None, clock: Clock, last_free: bool = False) -> int:
    """Seeds for the first of the sizes still to come (``images``: training images of each; the last is all
    of them, fitted once, and costs nothing with ``last_free``: the run's own fit). A size whose seeds cost
    no more than an equal share of the ``left`` seconds keeps them all; otherwise, while the ``clock``'s
    estimate of every fit to come exceeds ``left``, the largest sizes lose seeds first, down to one."""
    counts = [seeds] * (len(images) - 1) + [1]
    cost = [clock.estimate(n) for n in images]
    if left is None or cost[0] is None or counts[0] * cost[0] <= left / len(images):
        return counts[0]
    if last_free:
        cost[-1] = 0.0
    j = len(counts) - 2
    while j >= 0 and float(np.dot(cost, counts)) > left:
        if counts[j] > 1:
            counts[j] -= 1
        else:
            j -= 1
    return counts[0]


def _over_budget(clock: Clock, images: list, i: int, left: float | None, last: bool) -> str | None:
    """Why size ``i`` is skipped: one seed of it would take longer than the ``left`` seconds (never the first
    two sizes, which give the curve its start, nor the last, all the images); None to fit it."""
    estimate = clock.estimate(images[i])
    if left is None or last or i < 2 or estimate is None or estimate <= left:
        return None
    return f"skipped: one seed would take about {estimate:.0f} s, more than the {max(0.0, left):.0f} s left of --budget"


def _measure(setup: _Setup, options: CurveOptions, budget: float | None, bar: Progress,
             started: float) -> tuple[list, list]:
    """Every size's point and per-image shares, the seeds of each planned within the budget (of the call
    that began at ``started``)."""
    ks = sizes(np.bincount(setup.y[setup.folds[0].pool]))
    images = [_image_count(setup, k) for k in ks]
    clock = Clock(max(head_type(m["config"].name).growth for m in setup.members))
    points, shares = [], []
    for i, k in enumerate(ks):
        left = None if budget is None else PLAN_SHARE * (budget - (time.perf_counter() - started))
        skipped = _over_budget(clock, images, i, left, k is None)
        if skipped is not None:
            points.append({"per_class": k, "images": images[i], "seeds": 0, "accuracy": None, "ci": None,
                           "accuracies": [], "error": skipped, "seconds": 0.0})
            shares.append(None)
            bar.update()
            continue
        seeds = seeds_now(images[i:], options.seeds, left, clock, setup.saved is not None)
        bar.set_current(f"{'all' if k is None else k} per class, {seeds} seed{'s' if seeds > 1 else ''}")
        begun = time.perf_counter()
        point, share = _point(setup, k, seeds, options.device)
        point["seconds"] = round(time.perf_counter() - begun, 3)
        if k is not None and i > 0:  # the first size's seconds are mostly start-up: not a guide
            clock.timed.append((images[i], point["seconds"] / seeds))
        points.append(point)
        shares.append(share)
        bar.update()
    return points, shares


# --------------------------------------------------------------------------- the slope


def slope(points: list[dict], shares: list) -> dict | None:
    """Accuracy points per doubling of the labels between the last two scored sizes, with its interval."""
    scored = [(p, s) for p, s in zip(points, shares) if s is not None]
    if len(scored) < 2:
        return None
    (a, share_a), (b, share_b) = scored[-2:]
    doublings = math.log2(b["images"] / a["images"]) if b["images"] > a["images"] else 0.0
    if doublings <= 0:
        return None
    if np.isin(share_a, (0, 1)).all() and np.isin(share_b, (0, 1)).all():  # one seed each: right or wrong
        low, high = paired_difference(share_b == 1, share_a == 1)["ci"]
    else:
        low, high = mean_interval(share_b - share_a)
    scale = 100.0 / doublings
    return {"points": (b["accuracy"] - a["accuracy"]) * scale, "ci": [low * scale, high * scale],
            "from": a["images"], "to": b["images"]}


def slope_sentence(found: dict | None) -> str:
    """``doubling the labels would add about 1.2 points (...)``: the slope in words."""
    if found is None:
        return "fewer than two sizes could be scored: the curve has no slope"
    low, high = found["ci"]
    gain = "" if low > 0 else "; the interval includes no gain"
    return (f"doubling the labels would add about {_tenths(found['points'])} points (95% interval {_tenths(low)} "
            f"to {_tenths(high)}{gain}), from the last two sizes ({found['from']:,} and {found['to']:,} images)")


def _tenths(value: float) -> str:
    """``1.2``; ``0.0`` for a small negative number too (never ``-0.0``)."""
    return f"{round(value, 1) + 0.0:.1f}"


# --------------------------------------------------------------------------- saved curves


def _key(run_dir: Path, head: str, options: CurveOptions, budget: float | None) -> str:
    return store.cache_key({"run": sha256_file(run_dir / RUN_FILE), "head": head, "seeds": options.seeds,
                            "budget": budget, "code": sha256_file(__file__), "version": __version__})


def saved_curve(run_dir: str | Path) -> dict | None:
    """The ``curve.json`` of a run folder, when there is one that belongs to its present ``run.json``."""
    run_dir = Path(run_dir)
    with contextlib.suppress(OSError, ValueError):
        saved = json.loads((run_dir / CURVE_FILE).read_text())
        if isinstance(saved, dict) and saved.get("run_sha256") == sha256_file(run_dir / RUN_FILE):
            return saved
    return None


def _reused(run_dir: Path, key: str) -> CurveResult | None:
    saved = saved_curve(run_dir)
    if saved is None or saved.get("key") != key:
        return None
    with contextlib.suppress(TypeError):
        return CurveResult(**{**saved, "run_dir": str(run_dir), "reused": True})
    return None


def _check(options: CurveOptions) -> float | None:
    from ..runtime import resolve_device

    seeds = options.seeds
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise UsageError(f"seeds must be a positive integer, got {seeds!r}")
    resolve_device(options.device)
    return scaling.check_budget(options.budget)


@takes(CurveOptions)
def curve(options: CurveOptions) -> CurveResult:
    """The learning curve of a run's selected head: its selection accuracy on 1, 2, 4, ... images per class.

    ``run`` is a run directory, run id or unique prefix; ``head`` the entry refitted (``best``, the
    default: the run's selected entry, which may be the ``ensemble``; or a spec or slug). Each size
    below all the images is fitted on ``seeds`` stratified subsamples; ``budget`` seconds (None or 0:
    no bound) take seeds from the largest sizes first when the fits to come would exceed it. The
    points (images, mean accuracy and its 95% interval, seconds) are scored on the run's selection
    rows, never learnt from (see :mod:`featurecache.sweep.curve` for val, holdout and cv, and for
    ensembles). The result is saved as ``curve.json`` in the run folder; the same call reads it again.
    """
    started = time.perf_counter()
    budget = _check(options)
    run = load_run(options.run, options.cache_dir)
    entry = head_meta(run, options.head)
    key = _key(run.path, entry["head"], options, budget)
    reused = _reused(run.path, key)
    if reused is not None:
        return reused
    setup = _setup(run, entry)
    with Progress(len(sizes(np.bincount(setup.y[setup.folds[0].pool]))), "curve", unit="sizes",
                  enabled=options.progress) as bar, bar.heartbeat():
        points, shares = _measure(setup, options, budget, bar, started)
    found = slope(points, shares)
    members = [{k: m[k] for k in ("head", "weight", "temperature")} for m in setup.members] \
        if entry.get("kind") == ENSEMBLE else []
    result = CurveResult(str(run.path), entry["head"], members, run.meta["selection_split"],
                         sum(len(f.scored) for f in setup.folds), options.seeds, budget, points, found,
                         slope_sentence(found), round(time.perf_counter() - started, 3),
                         run_sha256=sha256_file(run.path / RUN_FILE), key=key)
    write_json(run.path / CURVE_FILE, {**result.to_dict(), "key": key})
    return result
