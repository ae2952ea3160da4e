"""What :func:`featurecache.fit_head` adds after ranking: ``--calibrate``, ``--seeds`` and ``--ensemble``.

:func:`post_options` checks the two options before anything is fitted and returns what
they add to a run's address (with the ranking's version, so runs ranked the old way are
not reused). :func:`post_pass` then annotates the ranked leaderboard entries in place:
``calibration`` (:mod:`featurecache.sweep.calibration`) and ``seeds`` (:mod:`featurecache.sweep.seeds`), and
adds the ensemble of the heads (:mod:`featurecache.sweep.ensemble`).
"""

from __future__ import annotations

from ..errors import UsageError
from ..store import VIEWS
from .calibration import calibrate_entries, check_method
from .ensemble import add_ensemble
from .leaderboard import rank

RANKING = "paired-bootstrap/2"  # how the leaderboard is ranked: part of every run's address
# /1: tied heads by log-loss; /2: the ensemble of the tied heads, then by accuracy (bench/selection.py)
ENSEMBLE = "caruana/1"  # how the ensemble is chosen and scored: part of the address of runs that have one


def post_options(seeds: int = 1, calibrate: str | None = None, ensemble: bool = False) -> dict:
    """The checked options, as the part of the run's address they make (``seeds`` 1 and no ensemble left out)."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise UsageError(f"seeds must be a positive integer, got {seeds!r}")
    options = {"ranking": RANKING}
    if seeds != 1:
        options["seeds"] = seeds
    method = check_method(calibrate)
    if method is not None:
        options["calibrate"] = method
        options["tie_break"] = "calibrated-log-loss"  # how tied heads are ordered changed with calibration
    if ensemble:
        options["ensemble"] = ENSEMBLE
    return options


def post_pass(entries: list[dict], probas: dict, data: dict, options: dict, seed: int = 0,
              cv: int | None = None, device="auto", progress: bool = False, classes: list | None = None) -> list[dict]:
    """Calibrate, refit with seeds and add the ensemble, as ``options`` (from :func:`post_options`) ask;
    returns the entries, ranked.

    ``probas``: head spec -> split -> probabilities (``cv``: out of fold); ``data``: split -> (X, y),
    and :data:`featurecache.store.VIEWS` -> (X, y, source row) when heads learnt from augmented views.
    ``classes``: the class names, for the ensemble's metrics.
    """
    labels = {s: part[1] for s, part in data.items() if s != VIEWS} | {"cv": data["train"][1]}
    if options.get("calibrate"):
        calibrate_entries(entries, probas, labels)
        entries = rank(entries, probas, labels)  # tied heads, by the log-loss of their calibrated probabilities
    if options.get("seeds", 1) > 1:
        from .seeds import seed_spread

        seed_spread(entries, probas, data, labels, options["seeds"], seed, cv, device, progress)
    if options.get("ensemble"):
        entries = add_ensemble(entries, probas, labels, classes, seed, bool(options.get("calibrate")))
    return entries
