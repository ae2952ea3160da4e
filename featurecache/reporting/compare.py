"""Runs side by side: which backbone, with which head, for these data.

:func:`list_runs` (``fc runs``) lists the runs of a cache directory with their backbone,
best head, and its selection score with the 95% interval. :func:`compare_runs` (``fc
report --compare RUN RUN ...``, and the end of a pipeline with several backbones) writes
one table of backbone × head family: in each cell the best-ranked head of that family
in that run, its accuracy and interval, next to the seconds the features took to extract
and the heads to fit. Everything comes from the runs' JSON files, the numbers
``fit-head`` computed; the page is keyed by them, so asking again is a lookup::

    <cache dir>/comparisons/<12 hex>/comparison.md  comparison.html  comparison.json  intervals.png
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import __version__, files, store
from ..errors import HeadError, UsageError
from ..sweep.leaderboard import ENSEMBLE, with_interval
from ..sweep.runs import RUN_FILE, resolve_run
from .document import Chart, interval_chart, up_to_date, write_document
from .listing import read_run, run_row, weights_name

COMPARISONS = "comparisons"
OTHER = "other"  # the family of a head this process does not know


# --------------------------------------------------------------------------- the comparison


def family_of(spec: str) -> str:
    """The registry's family of a head spec (``ensemble`` for the ensemble, ``other`` for a head this process
    does not know)."""
    from ..heads import head_type

    if spec == ENSEMBLE:
        return ENSEMBLE
    try:
        return head_type(spec.partition(":")[0]).family
    except HeadError:
        return OTHER


def _families(runs: list[tuple]) -> list[str]:
    """The families of the runs' heads, in the registry's order, then the others by name."""
    from ..heads import HEADS

    present = {family_of(e["head"]) for _, _, board in runs for e in board}
    known = [f for f in dict.fromkeys(h.family for h in HEADS.values()) if f in present]
    return known + sorted(present - set(known))


def _split(runs: list[tuple]) -> str:
    """``final`` when every run holds a split out of selection, else ``selection``."""
    return "final" if all(m["final_split"] != m["selection_split"] for _, m, _ in runs) else "selection"


def _seconds(value) -> str:
    return "" if value is None else f"{value:.1f}"


def _table(runs: list[tuple], families: list[str], which: str) -> tuple[list[str], list[list[str]]]:
    """Backbone x head family: the best-ranked head of each family, its accuracy and interval."""
    columns = ["backbone", "weights", "run", "extract s", "fit s", *families, "best head"]
    rows = []
    for _, meta, board in runs:
        split = meta[f"{which}_split"]
        first = {}
        for entry in board:
            first.setdefault(family_of(entry["head"]), entry)
        cells = [with_interval(first[f]["metrics"][split]) if f in first else "" for f in families]
        config = meta.get("config", {})
        rows.append([str(config.get("backbone")), weights_name(config), meta["run_id"], _seconds(config.get("seconds")),
                     _seconds(meta.get("seconds")), *cells, meta["best"]])
    return columns, rows


def _details(runs: list[tuple], families: list[str], which: str) -> tuple[list[str], list[list[str]]]:
    """Which head each cell of the table is, with its rank, ties and fit seconds."""
    rows = []
    for _, meta, board in runs:
        for family in families:
            ranked = [(i, e) for i, e in enumerate(board, 1) if family_of(e["head"]) == family]
            if ranked:
                rank, entry = ranked[0]
                rows.append([str(meta.get("config", {}).get("backbone")), family, entry["head"], str(rank),
                             with_interval(entry["metrics"][meta[f"{which}_split"]]),
                             "tied" if entry.get("tied") else "", f"{entry['fit_seconds']:.2f}"])
    return ["backbone", "family", "head", "rank in its run", "accuracy [95%]", "tied", "fit s"], rows


def _notes(runs: list[tuple], which: str) -> list[str]:
    splits = sorted({m[f"{which}_split"] for _, m, _ in runs})
    lines = [f"Scores: {', '.join(splits)} accuracy with its 95% bootstrap interval over the images; "
             + ("held out from selection in every run." if which == "final" else
                "these scores chose the heads (a run has no held-out split), so they are optimistic."),
             "Each cell is the best-ranked head of that family in that run; overlapping intervals are no clear "
             "difference. extract s: seconds of the backbone pass; fit s: seconds of the sweep."]
    data = {m.get("config", {}).get("data", {}).get("fingerprint") for _, m, _ in runs}
    if len(data) > 1:
        lines.append("The runs were made on different data: their scores do not compare like for like.")
    if all(m.get("config", {}).get("seconds") is None for _, m, _ in runs):
        lines.append("The caches do not record their extraction seconds (made by an older featurecache).")
    return lines


def _blocks(runs: list[tuple]) -> tuple[list[tuple], object]:
    """The comparison's blocks and its chart of each run's best head with its interval."""

    which, families = _split(runs), _families(runs)
    labels = [f"{m.get('config', {}).get('backbone')} ({m['run_id'][-12:]}): {m['best']}" for _, m, _ in runs]
    scores = [b[0]["metrics"][m[f"{which}_split"]] for _, m, b in runs]
    split_names = " / ".join(sorted({m[f"{which}_split"] for _, m, _ in runs}))
    series = {split_names: [(score["accuracy"], score.get("accuracy_ci")) for score in scores]}
    chart = Chart("intervals", "The best head of each run with its 95% interval", interval_chart(labels, series))
    blocks = [("title", f"featurecache comparison of {len(runs)} runs", None),
              ("list", "Summary", _notes(runs, which)),
              ("table", "Backbone × head family", _table(runs, families, which)),
              ("figure", chart.title, chart),
              ("table", "The heads in the table", _details(runs, families, which))]
    return blocks, chart


def compare_runs(runs: list, cache_dir: str | os.PathLike | None = None) -> Path:
    """Write the comparison of ``runs`` (directories, ids or unique prefixes); return ``comparison.html``."""

    dirs = list(dict.fromkeys(Path(resolve_run(r, cache_dir)).resolve() for r in runs))
    if len(dirs) < 2:
        raise UsageError(f"a comparison needs at least two different runs, got {len(dirs)}")
    loaded = [(d, *read_run(d)) for d in dirs]
    key = store.cache_key({"runs": [(d / RUN_FILE).read_text() + (d / "leaderboard.json").read_text() for d in dirs],
                           "code": files.sha256_file(__file__), "version": __version__})
    out_dir = dirs[0].parent.parent / COMPARISONS / key[:12]
    html_path, stamp = out_dir / "comparison.html", out_dir / "comparison.json"
    if up_to_date(html_path, stamp, key):
        return html_path
    blocks, chart = _blocks(loaded)
    write_document(out_dir, "comparison", blocks, [chart])
    files.write_json(stamp, {"key": key, "runs": [run_row(*run) for run in loaded]})
    return html_path
