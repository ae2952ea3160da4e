"""``fc runs``: the runs of a cache directory, one row each.

:func:`run_row` turns a run's ``run.json`` and leaderboard into one row (backbone, best head,
its selection and final scores with their intervals, ties, seconds); :func:`list_runs` lists
every complete run. The comparison of runs (:mod:`featurecache.reporting.compare`) reads the
same rows.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from .. import files, store
from ..errors import FeatureCacheWarning
from ..sweep.leaderboard import is_ensemble, tied_count
from ..sweep.runs import RUN_FILE, RUNS


def read_run(run_dir: Path) -> tuple[dict, list[dict]]:
    """``run.json`` and the leaderboard of a run directory."""
    return json.loads((run_dir / RUN_FILE).read_text()), json.loads((run_dir / "leaderboard.json").read_text())


def weights_name(config: dict) -> str:
    """``IMAGENET1K_V1``, ``none``, or the first 12 hex of a weights file's sha256."""
    identity = config.get("weights") or {}
    if identity.get("weights"):
        return str(identity["weights"]).rpartition(".")[2]
    return str(identity.get("sha256", ""))[:12]


def run_row(run_dir: Path, meta: dict, leaderboard: list[dict]) -> dict:
    """One run as a row: backbone, best head, its selection and final scores with intervals, ties, seconds."""
    config, best = meta.get("config", {}), leaderboard[0]
    selection, final = meta["selection_split"], meta["final_split"]
    return {
        "run": meta["run_id"], "run_dir": str(run_dir), "backbone": config.get("backbone"),
        "weights": weights_name(config), "data": config.get("data", {}).get("root"), "best": meta["best"],
        "selection_split": selection, "selection_accuracy": best["metrics"][selection]["accuracy"],
        "selection_accuracy_ci": best["metrics"][selection].get("accuracy_ci"),
        "final_split": final, "final_accuracy": best["metrics"][final]["accuracy"],
        "final_accuracy_ci": best["metrics"][final].get("accuracy_ci"),
        "tied": tied_count(leaderboard), "heads": sum(not is_ensemble(e) for e in leaderboard),
        "extract_seconds": config.get("seconds"), "fit_seconds": meta.get("seconds"), "created": meta.get("created"),
    }


def list_runs(cache_dir: str | None = None) -> list[dict]:
    """Every complete run in the cache directory, as :func:`run_row` rows, by data, backbone and run id."""
    root = store.default_cache_dir(cache_dir) / RUNS
    found = sorted(p for p in root.glob("*") if (p / RUN_FILE).is_file() and not files.is_temp_name(p)) \
        if root.is_dir() else []
    rows = []
    for path in found:
        try:
            rows.append(run_row(path, *read_run(path)))
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else ""
            warnings.warn(FeatureCacheWarning(f"run {path.name} cannot be read ({type(exc).__name__}: {reason}); "
                                              "left out"), stacklevel=2)
    return sorted(rows, key=lambda r: (str(r["data"]), str(r["backbone"]), r["run"]))
