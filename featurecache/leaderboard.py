"""The leaderboard: how heads are ranked, and how a ranking is shown.

Every number a person reads about a head comes from its leaderboard entry: the
accuracy on the split that chose it, and the metrics of every split. The entries are
ranked by selection accuracy, then log-loss, then the head type's registered
simplicity; the printed table, the CSV and the report read the same entries.
"""

from __future__ import annotations

from .heads import HeadConfig, head_type
from .metrics import SUMMARY_KEYS


def rank_key(entry: dict):
    """Heads pruned on a sample after the others; then accuracy on the selection split, log-loss, and
    the head type's registered simplicity."""
    metrics = entry["metrics"][entry["selection_split"]]
    simplicity = head_type(entry["head"].partition(":")[0]).simplicity
    return (entry.get("status") == "pruned", -entry["selection_accuracy"], metrics["log_loss"], simplicity,
            entry["head"])


def make_entry(cfg: HeadConfig, metrics: dict, selection: str, seconds: float, status: str = "fitted",
               reason: str = "", rows: int | None = None) -> dict:
    """The leaderboard entry of one fitted head: its spec, parameters, metrics per split, fit time, and what
    was fitted: ``status`` (fitted, pruned, subsampled or failed) with its ``reason``, and the training ``rows``."""
    params = {**cfg.to_dict()["params"], "pre": cfg.pre}
    if cfg.class_weight is not None:
        params["class_weight"] = cfg.class_weight
    return {"head": cfg.spec, "params": params, "selection_split": selection,
            "selection_accuracy": metrics[selection]["accuracy"], "metrics": metrics,
            "fit_seconds": round(seconds, 4), "status": status, "reason": reason, "rows": rows}


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


def selection_note(selection_split: str, final_split: str, cv: int | None = None) -> str:
    """One line saying which numbers chose the head and which, if any, are held out."""
    chosen = {"cv": f"{cv}-fold cross-validation on train (cv)",
              "holdout": "a stratified holdout of train (holdout)"}.get(selection_split, selection_split)
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
        if "status" in entry:  # runs of older versions have none
            row.update({"rows": f"{entry['rows']:,}" if entry["rows"] else "", "status": entry["status"]})
        rows.append(row)
    return rows, list(rows[0]) if rows else []
