"""What :func:`featurecache.fit_head` adds after ranking: ``--calibrate`` and ``--seeds``.

:func:`post_options` checks the two options before anything is fitted and returns what
they add to a run's address (with the ranking's version, so runs ranked the old way are
not reused). :func:`post_pass` then annotates the ranked leaderboard entries in place:
``calibration`` (:mod:`featurecache.sweep.calibration`) and ``seeds`` (:mod:`featurecache.sweep.seeds`).
"""

from __future__ import annotations

from ..errors import UsageError
from ..store import VIEWS
from .calibration import calibrate_entries, check_method
from .leaderboard import rank

RANKING = "paired-bootstrap/1"  # how the leaderboard is ranked: part of every run's address


def post_options(seeds: int = 1, calibrate: str | None = None) -> dict:
    """The checked options, as the part of the run's address they make (defaults left out)."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise UsageError(f"seeds must be a positive integer, got {seeds!r}")
    options = {"ranking": RANKING}
    if seeds != 1:
        options["seeds"] = seeds
    if check_method(calibrate) is not None:
        options["calibrate"] = calibrate
        options["tie_break"] = "calibrated-log-loss"  # how tied heads are ordered changed with calibration
    return options


def post_pass(entries: list[dict], probas: dict, data: dict, options: dict, seed: int = 0,
              cv: int | None = None, device="auto", progress: bool = False) -> list[dict]:
    """Calibrate and refit with seeds, as ``options`` (from :func:`post_options`) ask; returns ``entries``.

    ``probas``: head spec -> split -> probabilities (``cv``: out of fold); ``data``: split -> (X, y),
    and :data:`featurecache.store.VIEWS` -> (X, y, source row) when heads learnt from augmented views.
    """
    labels = {s: part[1] for s, part in data.items() if s != VIEWS} | {"cv": data["train"][1]}
    if options.get("calibrate"):
        calibrate_entries(entries, probas, labels)
        entries = rank(entries, probas, labels)  # tied heads, by the log-loss of their calibrated probabilities
    if options.get("seeds", 1) > 1:
        from .seeds import seed_spread

        seed_spread(entries, probas, data, labels, options["seeds"], seed, cv, device, progress)
    return entries
