"""Stage two on many rows: the rungs of successive halving, cost models and the budget.

Up to :data:`LARGE_ROWS` training rows a sweep fits every head on every row. Above it:

- **Rungs.** Every head is first fitted on a stratified sample of about
  :data:`FIRST_RUNG_ROWS` rows; with ``halving`` only a third (those predicted best on all
  rows, see *learning curves*) moves on to a sample three times larger, and so on up to all
  rows, where at least :data:`FINAL_HEADS` heads arrive. Samples are nested prefixes of
  one stratified order, so each rung's rows include the previous rung's. Without
  ``halving`` the first rung only times the heads and every head moves on.
- **Learning curves.** Heads are not ranked for pruning on the rung's scores alone: heads
  whose error falls faster with the rows (networks, kernels) look worse than linear heads on
  small samples and overtake them later. Each head's score on all rows is predicted from the
  scores of its own rungs, a power law ``error = a * rows ** -b`` fitted in log-log and
  anchored at its latest rung; with a single rung, ``b`` is the median of its family's fitted
  exponents, or the prior its head type registers (``learning_curve``). Half of the heads
  that move on (at least one) are the rung's best on their scores, the others those
  predicted best on all rows. With a budget, a family with no head among them sends on its
  best head too while the fits to come still fit in what is left (:func:`promote`): curves
  fitted to small rungs see neither a plateau nor a late start.
- **Cost models.** A head's cost is ``seconds(rows) = s * (rows / r) ** growth``, with
  ``(r, s)`` its latest timed fit and ``growth`` what its head type declares. With a
  budget, heads whose cost grows much faster than the rows (``growth`` of
  :data:`PROBE_GROWTH` or more: the RBF SVM) are timed on :data:`PROBE_ROWS` rows before
  the first rung, so that even the first rung stays within the budget.
- **The budget.** Before each later rung, the seconds left (of ``budget``, on the usable
  cores) are shared among the fits still to come in proportion to their rows (torch heads,
  which run one after another, share one core). A head
  whose estimate at the final rung exceeds its share gets its registered stand-in (the
  same inductive bias for about the share); a head without one, or whose stand-in is not
  cheaper, is fitted on the largest stratified sample its share pays for (``subsampled``).
  Before the last rung, what is left goes to the heads that reach it, lane by lane
  (:func:`lane_shares`), and a head cut to fewer passes gets back what its share pays for
  (:func:`fit_final`).

Only decisions live here; :mod:`featurecache.sweep` runs the fits.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError
from ..heads import HeadConfig, head_type

LARGE_ROWS = 4000  # above: rungs, a holdout instead of k folds, the budget
FIRST_RUNG_ROWS = 1500  # about the rows of the first rung
ETA = 3  # each rung keeps a third of the heads on three times the rows
FINAL_HEADS = 2  # heads that reach all rows at least
CURVE_MAX = 1.0  # the largest exponent of error ~ rows ** -b a head's rungs may give it
ERROR_FLOOR = 1e-3  # errors are at least this, so that a perfect rung still has a logarithm
PROBE_ROWS, PROBE_GROWTH = 500, 1.5  # heads whose cost grows this fast are timed on this many rows first
HOLDOUT_FRACTION, HOLDOUT_MAX = 0.2, 10000  # of train, when there is no val split
TRAIN_EVAL_ROWS = 5000  # train metrics on at most this many rows the heads all saw
DEFAULT_BUDGET = 210.0  # seconds: the default sweep on 50,000 x 1,280 rows in about 5 minutes on 2 cores
USABLE_SHARE = 0.85  # of the cores' seconds that fits actually get (lanes never pack perfectly)
MEMORY_SHARE = 0.5  # default --max-memory: this share of the available memory
BUDGET_POLICY = "lanes+families/3"  # the final rung shared by lanes, families moving on: part of a run's address
WORKING_COPIES = 4  # a head in memory holds its rows about this many times (preprocessing, solver)


# --------------------------------------------------------------------------- sizes


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "g": 1 << 30, "gb": 1 << 30,
          "t": 1 << 40, "tb": 1 << 40}


def parse_size(value) -> int:
    """Bytes of ``512M``, ``2G``, ``1.5GB``, ``1048576``; UsageError for anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return int(value)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS or float(match.group(1)) <= 0:
        raise UsageError(f"max_memory must be a size such as 512M, 2G or 1.5GB, got {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable), or the physical memory where that is unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_cap(max_memory) -> int:
    """``max_memory`` in bytes; None: :data:`MEMORY_SHARE` of the available memory."""
    return int(MEMORY_SHARE * available_memory()) if max_memory is None else parse_size(max_memory)


def check_budget(budget) -> float | None:
    """Seconds, or None (0 too) for a sweep without a bound."""
    if budget is None or budget == 0:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget < 0:
        raise UsageError(f"budget must be a number of seconds (0: no bound), got {budget!r}")
    return float(budget)


# --------------------------------------------------------------------------- stratified orders


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """Positions ``0..N-1`` in an order whose every prefix is a stratified sample of ``labels``:
    each class shuffled, then the classes interleaved by their share."""
    rng = np.random.default_rng(seed)
    position = np.empty(len(labels))
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        position[rng.permutation(members)] = (np.arange(len(members)) + rng.random()) / len(members)
    return np.argsort(position, kind="stable")


def holdout_split(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(fit rows, holdout rows)`` of train, both sorted: a stratified holdout of
    :data:`HOLDOUT_FRACTION` of the rows, at most :data:`HOLDOUT_MAX`."""
    size = min(HOLDOUT_MAX, round(HOLDOUT_FRACTION * len(labels)))
    order = stratified_order(labels, seed + 1)
    return np.sort(order[size:]), np.sort(order[:size])


# --------------------------------------------------------------------------- rungs


@dataclass(frozen=True)
class Rung:
    index: int
    rows: int  # training rows of each fit
    keep: int  # heads fitted at this rung


def rungs(n_rows: int, n_heads: int, halving: bool, budget: float | None, per_image: float = 1.0) -> list[Rung]:
    """The rungs of a sweep on ``n_rows``: one rung up to :data:`LARGE_ROWS` rows (and without
    halving or budget); a timing rung and all rows without halving (or with too few heads to prune);
    else geometric sizes up to all rows, a third of the heads kept each time.

    ``n_rows`` counts training images; a head fitted on one learns from ``per_image`` rows (1 plus
    its augmented views), and the thresholds count those rows: what a fit costs."""
    first = max(1, round(FIRST_RUNG_ROWS / per_image))
    if n_rows * per_image <= LARGE_ROWS:
        return [Rung(0, n_rows, n_heads)]
    if not halving or n_heads <= FINAL_HEADS:  # nothing to prune: with a budget, time the heads on a sample first
        return [Rung(0, n_rows, n_heads)] if budget is None else \
            [Rung(0, min(first, n_rows), n_heads), Rung(1, n_rows, n_heads)]
    steps = max(1, math.floor(math.log(n_rows / first, ETA) + 1e-9))
    out, keep = [], n_heads
    for i in range(steps + 1):
        out.append(Rung(i, round(n_rows / ETA ** (steps - i)), keep))
        keep = max(min(FINAL_HEADS, keep), math.ceil(keep / ETA))
    return out


# --------------------------------------------------------------------------- heads through the rungs


@dataclass
class HeadState:
    """One requested head on its way through the rungs: what is fitted now and what it gave."""

    requested: HeadConfig
    form: HeadConfig  # the requested config or its stand-in
    status: str = "fitted"  # fitted, pruned, subsampled or failed
    reason: str = ""
    rows: int = 0  # training rows of the latest successful fit
    seconds: float = 0.0  # of every fit of this head
    cost: tuple[int, float] | None = None  # (rows, seconds) of the latest fit of ``form``
    curve: list = field(default_factory=list)  # (rows, selection accuracy) of each rung it got a result at
    cap: int | None = None  # rows of a sample its share pays for
    result: dict | None = None  # of the latest successful fit: probas, files, record
    fitted: HeadConfig | None = None  # the config of that fit

    def estimate(self, rows: int) -> float | None:
        """Seconds of a fit of ``form`` on ``rows``, from its latest fit; None when never timed."""
        if self.cost is None:
            return None
        timed_rows, seconds = self.cost
        return seconds * (rows / max(1, timed_rows)) ** head_type(self.form.name).growth

    def estimate_fit(self, rows: int) -> float | None:
        """:meth:`estimate` of its fit at a rung of ``rows`` rows, on its row cap when it has one."""
        return self.estimate(min(rows, self.cap or rows))


def final_shares(left: float, cores: int, plan: list[Rung], torch_heads: int) -> tuple[float, float]:
    """Seconds one head may take at the final rung, ``(other heads, torch heads)``: the final rung's part
    of the ``left`` seconds (in proportion to the rows of every fit to come), on ``cores`` cores for
    most heads; torch heads run one after another, so those that may reach it share one core's part."""
    total = sum(r.rows * r.keep for r in plan)
    wall = max(0.0, left) * USABLE_SHARE * plan[-1].rows * plan[-1].keep / total
    return wall * cores / plan[-1].keep, wall / max(1, min(plan[-1].keep, torch_heads))


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:,.0f} s" if seconds >= 10 else f"{seconds:.1f} s"


def fit_within(state: HeadState, rows: int, share: float, taken: set[str]) -> None:
    """Give ``state`` a stand-in or a row cap when its estimated fit on ``rows`` exceeds ``share`` seconds."""
    estimate = state.estimate(rows)
    if estimate is None or estimate <= share:
        return
    htype = head_type(state.form.name)
    stand_in = htype.stand_in(state.form, share / estimate) if htype.stand_in else None
    why = f"estimated {_fmt_seconds(estimate)} on {rows:,} rows, share of the budget {_fmt_seconds(share)}"
    if stand_in is not None and stand_in.spec not in taken:
        taken.discard(state.form.spec)
        taken.add(stand_in.spec)
        state.reason = f"stand-in for {state.requested.spec} ({why})"
        state.form, state.cost = stand_in, None
        return
    growth = head_type(state.form.name).growth
    state.cap = max(FIRST_RUNG_ROWS // 2, int(rows * (share / estimate) ** (1.0 / growth)))
    state.reason = f"fitted on a stratified sample of {state.cap:,} rows ({why})"


def _cost_ratio(requested: HeadConfig, form: HeadConfig) -> float | None:
    """What a stand-in of the requested head type costs against the requested head: the ratio of the
    numbers it scaled (passes, iterations); None for a stand-in of another head type (a kernel map)."""
    if form.name != requested.name:
        return None
    defaults, ratio = head_type(form.name).defaults, 1.0
    for key, value in form.params.items():
        now = requested.params.get(key, defaults.get(key))
        if value == now:
            continue
        if not (isinstance(value, (int, float)) and isinstance(now, (int, float)) and now):
            return None  # a change that is not a scaled number (a row sample per tree): no known ratio
        ratio *= value / now
    return ratio


def _fill(estimates: list[float], capacity: float, cap: float) -> float:
    """The share of each of ``estimates`` in ``capacity`` seconds (water-filling: a head estimated below
    the level leaves the rest to the others), at most ``cap``."""
    left, n = capacity, len(estimates)
    for estimate in sorted(estimates):
        if estimate * n > left:
            break
        left, n = left - estimate, n - 1
    return cap if n == 0 else min(cap, left / n)


def lane_shares(left: float, cores: int, states: list[HeadState], rows: int) -> dict[int, float]:
    """``id(state) -> seconds`` each head of the final rung may take, when what is ``left`` of the budget
    goes to these heads alone: torch heads one after another on one lane, every other head on the
    cores' remaining time, one core each; the time a cheap head leaves goes to the costly ones."""
    wall = max(0.0, left) * USABLE_SHARE
    estimate = {id(s): s.estimate_fit(rows) for s in states}
    torch_ids = {id(s) for s in states if head_type(s.form.name).kind == "torch"}
    known = {i: wall if e is None else e for i, e in estimate.items()}
    torch_share = _fill([known[i] for i in torch_ids], wall, wall)
    lane = min(wall, sum(min(known[i], torch_share) for i in torch_ids))  # the torch lane's time
    other_share = _fill([e for i, e in known.items() if i not in torch_ids], max(0.0, wall * cores - lane), wall)
    return {id(s): torch_share if id(s) in torch_ids else other_share for s in states}


def fit_final(state: HeadState, rows: int, share: float, taken: set[str]) -> None:
    """At the final rung: the requested head, or the stand-in of its own type that ``share`` pays for,
    when that is more than an earlier rung's share gave it (more passes); else :func:`fit_within`."""
    ratio, estimate = _cost_ratio(state.requested, state.form), state.estimate(rows)
    if state.form == state.requested or ratio is None or estimate is None or state.cap:
        fit_within(state, rows, share, taken)
        return
    full = estimate / ratio
    htype = head_type(state.requested.name)
    form = state.requested if full <= share else htype.stand_in(state.requested, share / full)
    better = form is not None and form.spec not in taken and (_cost_ratio(state.requested, form) or 0) > ratio
    if not better:
        fit_within(state, rows, share, taken)
        return
    taken.discard(state.form.spec)
    taken.add(form.spec)
    timed_rows, seconds = state.cost
    state.cost = (timed_rows, seconds * _cost_ratio(state.requested, form) / ratio)
    state.form = form
    notes = [] if form == state.requested else [f"stand-in for {state.requested.spec} (estimated {_fmt_seconds(full)} "
                                                 f"on {rows:,} rows, share of the budget {_fmt_seconds(share)})"]
    state.reason = "; ".join([*notes, *(n for n in state.reason.split("; ") if n and not n.startswith("stand-in "))])


def wall_estimate(states: list[HeadState], sizes: list[int], cores: int) -> float | None:
    """Wall seconds of fitting every one of ``states`` on each of ``sizes`` rows: torch heads one after
    another on one lane, the others beside them; None when a head was never timed."""
    lanes = {"torch": 0.0, "other": 0.0}
    for state in states:
        for rows in sizes:
            seconds = state.estimate_fit(rows)
            if seconds is None:
                return None
            lanes["torch" if head_type(state.form.name).kind == "torch" else "other"] += seconds
    return max(lanes["torch"], (lanes["torch"] + lanes["other"]) / max(1, cores))


# --------------------------------------------------------------------------- learning curves


@dataclass(frozen=True)
class Prediction:
    """A head's predicted selection accuracy on ``rows`` rows, and where its exponent came from."""

    accuracy: float
    rows: int
    exponent: float
    source: str  # "its N rungs", "its family's rungs" or "the prior of HEAD"

    def describe(self) -> str:
        return f"predicted {self.accuracy:.4f} on {self.rows:,} rows (error ~ rows^-{self.exponent:.2f}, {self.source})"


def curve_exponent(curve: list) -> float | None:
    """``b`` of ``error = a * rows ** -b`` fitted by least squares in log-log to ``(rows, accuracy)``
    points, within ``[0, CURVE_MAX]``; None with fewer than two distinct sizes."""
    rows = np.log([n for n, _ in curve])
    if len(curve) < 2 or np.ptp(rows) == 0:
        return None
    errors = np.log([max(ERROR_FLOOR, 1.0 - a) for _, a in curve])
    slope = np.polyfit(rows, errors, 1)[0]
    return float(np.clip(-slope, 0.0, CURVE_MAX))


def predict(states: list[HeadState], rows: int) -> dict[int, Prediction]:
    """``id(state) -> Prediction`` of each state's selection accuracy on ``rows`` rows, from the last
    point of its curve: its own exponent with two rungs or more, else its family's median, else the
    prior of its head type."""
    own = {id(s): curve_exponent(s.curve) for s in states if s.curve}
    family: dict[str, list[float]] = {}
    for state in states:
        if own.get(id(state)) is not None:
            family.setdefault(head_type(state.form.name).family, []).append(own[id(state)])
    out = {}
    for state in states:
        if not state.curve:
            continue
        htype = head_type(state.form.name)
        exponent, source = own[id(state)], f"its {len(state.curve)} rungs"
        if exponent is None and htype.family in family:
            exponent, source = float(np.median(family[htype.family])), f"its family's rungs ({htype.family})"
        if exponent is None:
            exponent, source = htype.learning_curve, f"the prior of {htype.name}"
        last_rows, last_accuracy = state.curve[-1]
        error = max(ERROR_FLOOR, 1.0 - last_accuracy) * (max(rows, last_rows) / last_rows) ** -exponent
        out[id(state)] = Prediction(1.0 - error, rows, exponent, source)
    return out


def survivors(ranked: list[HeadState], keep: int, rows: int) -> tuple[list, list, dict[int, Prediction]]:
    """``(moving on, pruned, predictions)`` of the heads of ``ranked`` (best first on the rung): the
    best half of ``keep`` (at least one) on the rung's scores, and the others predicted best on ``rows``
    rows (ties: the rung's order); both lists in the prediction's order. The half kept on its score
    hedges against a prior or a noisy curve that overrates a head."""
    predictions = predict(ranked, rows)
    place = {id(s): i for i, s in enumerate(ranked)}
    order = sorted(ranked, key=lambda s: (-predictions[id(s)].accuracy, place[id(s)]))
    moving = {id(s) for s in ranked[:max(1, keep // 2)]} if keep else set()
    for state in order:
        if len(moving) >= keep:
            break
        moving.add(id(state))
    return [s for s in order if id(s) in moving], [s for s in order if id(s) not in moving], predictions


def promote(moving: list[HeadState], pruned: list[HeadState], left: float | None, sizes: list[int],
            cores: int) -> list[HeadState]:
    """Heads of ``pruned`` (in the prediction's order) that move on anyway because the budget has room:
    the best of each family that has no head moving on, while every head moving on still fits in what is
    ``left`` of the budget on the rungs of ``sizes`` rows. A family whose error falls faster with the rows
    (networks, kernel maps, boosted trees) keeps a head to the end, where its learning curve can cross the
    others', and the ensemble of the last rung has heads of every family to draw from."""
    if left is None or not sizes:
        return []
    families = {head_type(s.form.name).family for s in moving}
    extra: list[HeadState] = []
    for state in pruned:
        family = head_type(state.form.name).family
        if family in families:
            continue
        wall = wall_estimate([*moving, *extra, state], sizes, cores)
        if wall is not None and wall <= max(0.0, left) * USABLE_SHARE:
            families.add(family)
            extra.append(state)
    return extra
