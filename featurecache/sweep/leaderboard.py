"""The leaderboard: how heads are ranked, and how a ranking is shown.

Every number a person reads about a head comes from its leaderboard entry: the
accuracy on the split that chose it, with its 95% interval, and the metrics of every
split. :func:`rank` finds the most accurate head on the selection split and marks
every head that is not significantly worse than it as ``tied`` (a paired bootstrap of
per-image correctness, :func:`featurecache.metrics.paired_difference`). The tied entries
come first: the ensemble of the tied heads (:mod:`featurecache.sweep.ensemble`) when it is
tied too, then the heads by accuracy, log-loss (after the temperature) and the head type's
registered simplicity; the others follow in the same order. This rule was chosen on held-out
test images (``bench/selection.py``, ``docs/performance.md``): among tied heads, the lowest
log-loss and the simplest head gained nothing over the most accurate one, and the ensemble
of the tied heads gained half a point.
The printed table, the CSV and the report read the same entries.
"""

from __future__ import annotations

import numpy as np

from ..heads import HeadConfig, head_type
from ..metrics import SUMMARY_KEYS, paired_difference

ENSEMBLE = "ensemble"  # the leaderboard entry of the ensemble of a run's heads


def is_ensemble(entry: dict) -> bool:
    return entry.get("head") == ENSEMBLE


def simplicity(entry: dict) -> float:
    """The head type's registered simplicity (lower: simpler); an ensemble is less simple than any head."""
    return float("inf") if is_ensemble(entry) else head_type(entry["head"].partition(":")[0]).simplicity


def rank_key(entry: dict):
    """Accuracy on the selection split, then log-loss, then the head type's registered simplicity.

    The log-loss is that of the probabilities the head will give: after its temperature when it
    was calibrated (``--calibrate``), which forgives the overconfidence a temperature removes."""
    split = entry["selection_split"]
    log_loss = calibrated(entry, split).get("log_loss", entry["metrics"][split]["log_loss"])
    return (-entry["selection_accuracy"], log_loss, simplicity(entry), entry["head"])


def selection_key(entry: dict):
    """Entries tied with the most accurate one first (the ensemble of the tied heads before them), each
    group by :func:`rank_key`."""
    return (not entry.get("tied"), not (entry.get("tied") and is_ensemble(entry)), *rank_key(entry))


def make_entry(cfg: HeadConfig, metrics: dict, selection: str, seconds: float, status: str = "fitted",
               reason: str = "", rows: int | None = None) -> dict:
    """The leaderboard entry of one fitted head: its spec, parameters, metrics per split, fit time, and what
    was fitted: ``status`` (fitted, pruned, subsampled or failed) with its ``reason``, and the training ``rows``."""
    params = {**cfg.to_dict()["params"], "pre": cfg.pre}
    if cfg.class_weight is not None:
        params["class_weight"] = cfg.class_weight
    if cfg.cols is not None:
        params["cols"] = list(cfg.cols)
    return {"head": cfg.spec, "params": params, "selection_split": selection,
            "selection_accuracy": metrics[selection]["accuracy"], "metrics": metrics,
            "fit_seconds": round(seconds, 4), "status": status, "reason": reason, "rows": rows}


def _ranked(entry: dict) -> bool:
    """Whether an entry has scores on its selection split (a head that was not fitted has none)."""
    return entry.get("selection_split") in entry.get("metrics", {})


def rank(entries: list[dict], probas: dict, labels: dict) -> list[dict]:
    """Mark the heads tied with the most accurate one and sort the entries, best first.

    ``probas`` maps each head spec to ``split -> N x C`` probabilities and ``labels``
    each split to its labels (``cv``: out-of-fold, on train). Every ranked entry gets
    ``tied`` and ``gap``: the most accurate head's selection accuracy minus this one's,
    ``{"to", "difference", "ci"}``; a head is tied when the interval reaches zero.
    Heads pruned on a sample (``status``) are never tied and come after the others;
    entries without scores keep their order, after all.
    """
    ranked = [e for e in entries if _ranked(e)]
    if ranked:
        top = min(ranked, key=lambda e: (e.get("status") == "pruned", *rank_key(e)))
        split = top["selection_split"]
        correct = {e["head"]: probas[e["head"]][split].argmax(axis=1) == np.asarray(labels[split]) for e in ranked}
        for entry in ranked:
            gap = paired_difference(correct[top["head"]], correct[entry["head"]])
            entry["gap"] = {"to": top["head"], **gap}
            entry["tied"] = gap["ci"][0] <= 0 and entry.get("status") != "pruned"
    ranked.sort(key=lambda e: (e.get("status") == "pruned", selection_key(e)))
    return ranked + [e for e in entries if not _ranked(e)]


def tied_count(leaderboard: list[dict]) -> int | None:
    """How many heads besides the most accurate one are tied with it (None: a ranking without ties); the
    ensemble is not a head here."""
    if not any("tied" in e for e in leaderboard):
        return None
    top = next((e["gap"]["to"] for e in leaderboard if "gap" in e), None)
    return sum(1 for e in leaderboard if e.get("tied") and not is_ensemble(e) and e["head"] != top)


def format_interval(value: float, ci: list | None) -> str:
    """``0.9608 [0.928, 0.987]``: a score and its 95% interval (the score alone when it has none)."""
    return f"{value:.4f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def with_interval(metrics: dict, key: str = "accuracy") -> str:
    """:func:`format_interval` of ``metrics[key]`` and ``metrics[key + "_ci"]`` ("" when there is no such score)."""
    return format_interval(metrics[key], metrics.get(f"{key}_ci")) if key in metrics else ""


def calibrated(entry: dict, split: str) -> dict:
    """The entry's calibration metrics on ``split`` after temperature scaling ({} when not calibrated)."""
    return (entry.get("calibration") or {}).get("metrics", {}).get(split, {})


def csv_rows(leaderboard: list[dict]) -> list[dict]:
    """One flat row per head: rank, spec, selection, every summary metric and interval per split, fit time."""
    rows = []
    for rank_, entry in enumerate(leaderboard, 1):
        row = {"rank": rank_, "head": entry["head"], "selection_split": entry["selection_split"],
               "selection_accuracy": entry["selection_accuracy"], "tied": entry.get("tied", "")}
        for split, metrics in entry["metrics"].items():
            row.update({f"{split}_{k}": metrics[k] for k in SUMMARY_KEYS if k in metrics})
            for key in ("accuracy", "balanced_accuracy"):
                low, high = metrics.get(f"{key}_ci", ("", ""))
                row.update({f"{split}_{key}_low": low, f"{split}_{key}_high": high})
            if calibrated(entry, split):
                row[f"{split}_ece_calibrated"] = calibrated(entry, split)["ece"]
        row["temperature"] = (entry.get("calibration") or {}).get("temperature", "")
        row["fit_seconds"] = entry["fit_seconds"]
        row.update({k: entry[k] for k in ("status", "rows") if k in entry})
        rows.append(row)
    return rows


def _ties_clause(leaderboard: list[dict], chosen: str) -> str:
    tied = tied_count(leaderboard)
    if tied is None or len(leaderboard) < 2:
        return ""
    top = leaderboard[0].get("gap", {}).get("to", leaderboard[0]["head"])
    if tied == 0:
        return f"; no other head is tied with the most accurate one, {top}, on {chosen}"
    heads = "1 other head is" if tied == 1 else f"{tied} other heads are"
    after = " after temperature scaling" if leaderboard[0].get("calibration") else ""
    if any(is_ensemble(e) and e.get("tied") for e in leaderboard):
        first = "the ensemble of the tied heads ranks first, then the most accurate"
    else:
        first = f"the most accurate ranks first (then the lowest log-loss{after})"
    return f"; {heads} tied with the most accurate one, {top}, on {chosen} (paired bootstrap, 95%): {first}"


def selection_note(selection_split: str, final_split: str, cv: int | None = None,
                   leaderboard: list[dict] | None = None) -> str:
    """One line saying which numbers chose the head, what is held out, and how many heads tie with the winner."""
    chosen = {"cv": f"{cv}-fold cross-validation on train (cv)",
              "holdout": "a stratified holdout of train (holdout)"}.get(selection_split, selection_split)
    ties = _ties_clause(leaderboard or [], selection_split)
    if final_split != selection_split:
        return f"heads selected on {chosen}; {final_split} is held out: quote its scores{ties}"
    return (f"heads selected on {chosen}; there is no test split, so these scores chose the head "
            f"and are not a held-out estimate{ties}")


def _calibration_cells(entry: dict, split: str) -> dict:
    """``ECE`` on ``split`` before and, for a calibrated head, after temperature scaling."""
    metrics = entry["metrics"].get(split, {})
    if "ece" not in metrics:
        return {}
    cells = {f"{split} ece": f"{metrics['ece']:.4f}"}
    after = calibrated(entry, split)
    if after:
        temperature = entry["calibration"]["temperature"]
        cells.update({f"{split} ece calibrated": f"{after['ece']:.4f}", "T": f"{temperature:.3g}"})
    return cells


def _seed_cells(entry: dict, split: str) -> dict:
    """The mean and spread of the selection accuracy over ``--seeds`` refits."""
    seeds = entry.get("seeds")
    if not seeds:
        return {}
    acc = seeds["accuracy"].get(split)
    if not seeds["stochastic"] or acc is None:
        return {f"{split} acc over seeds": "deterministic"}
    return {f"{split} acc over seeds": f"{acc['mean']:.4f} ± {acc['std']:.4f} ({len(acc['values'])})"}


def shows_features(leaderboard: list[dict]) -> bool:
    """Whether the entries learnt from more than the penultimate features (fit-head --features auto, concat or
    a layer): then tables show each entry's feature set."""
    return any(e.get("features", "penultimate") != "penultimate" for e in leaderboard)


def leaderboard_table(leaderboard: list[dict], final_split: str) -> tuple[list[dict], list[str]]:
    """Rows and columns of the printed leaderboard."""
    rows, features = [], shows_features(leaderboard)
    for rank_, entry in enumerate(leaderboard, 1):
        sel = entry["selection_split"]
        m = entry["metrics"]
        row = {"#": rank_, "head": entry["head"], **({"features": entry.get("features", "")} if features else {}),
               f"{sel} acc (selection)": with_interval(m[sel]),
               "tied": "tied" if entry.get("tied") else "", f"{sel} log_loss": f"{m[sel]['log_loss']:.4f}"}
        if calibrated(entry, sel):  # what orders the tied heads of a calibrated run
            row[f"{sel} log_loss calibrated"] = f"{calibrated(entry, sel)['log_loss']:.4f}"
        row.update(_seed_cells(entry, sel))
        if final_split != sel:
            row.update({f"{final_split} acc": with_interval(m[final_split]),
                        f"{final_split} bal_acc": f"{m[final_split]['balanced_accuracy']:.4f}",
                        f"{final_split} macro_f1": f"{m[final_split]['macro_f1']:.4f}"})
        row.update(_calibration_cells(entry, final_split))
        row.update({"train acc": f"{m['train']['accuracy']:.4f}", "fit s": f"{entry['fit_seconds']:.3f}"})
        if "status" in entry:  # runs of older versions have none
            row.update({"rows": f"{entry['rows']:,}" if entry["rows"] else "", "status": entry["status"]})
        rows.append(row)
    return rows, list(dict.fromkeys(k for row in rows for k in row))
