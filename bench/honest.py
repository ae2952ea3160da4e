"""Honest numbers of a sweep: intervals, heads tied with the winner, ECE before and after temperature scaling.

For a cache (path, name or key prefix), the sweep (the default one, or ``--head`` specs)
is fitted with ``calibrate="temperature"`` (and ``--seeds K``); for a run directory its
saved leaderboard is read; for a pipeline (``--pipeline FILE``) every branch's sweep is
fitted with ``fit-head.calibrate=temperature`` and the comparison's path is printed.
For each run it prints every head's selection and held-out accuracy with its 95%
interval, whether it is tied with the most accurate head, its ECE before and after, the
number of heads tied with the winner, and the ECE of the best transferable head (the
one ``fc finetune`` starts from) before and after::

    python bench/honest.py CACHE [--cache-dir DIR] [--seeds 3] [--head SPEC ...] [--json]
    python bench/honest.py RUN_DIR
    python bench/honest.py --pipeline pipelines/fashion-mnist.toml [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import featurecache
from featurecache.pipeline import run as pipeline
from featurecache.sweep.leaderboard import calibrated, leaderboard_table, selection_note, tied_count
from featurecache.sweep.runs import RUN_FILE, best_transferable, load_run


def _ece(entry: dict, split: str) -> dict:
    before = entry["metrics"][split]
    return {"split": split, "before": before.get("ece"), "after": calibrated(entry, split).get("ece"),
            "temperature": (entry.get("calibration") or {}).get("temperature")}


def summarize(run_dir: str) -> dict:
    """The figures to quote about one run."""
    run = load_run(run_dir)
    board, selection, final = run.leaderboard, run.meta["selection_split"], run.meta["final_split"]
    transferable = best_transferable(board)
    entry = next((e for e in board if e["head"] == transferable), None)
    rows, columns = leaderboard_table(board, final)
    return {
        "run": str(run.path), "backbone": run.meta["config"].get("backbone"), "heads": len(board),
        "best": board[0]["head"], "selection_split": selection, "final_split": final,
        "best_selection_accuracy": board[0]["metrics"][selection]["accuracy"],
        "best_selection_ci": board[0]["metrics"][selection].get("accuracy_ci"),
        "best_final_accuracy": board[0]["metrics"][final]["accuracy"],
        "best_final_ci": board[0]["metrics"][final].get("accuracy_ci"),
        "tied_with_winner": tied_count(board), "most_accurate": board[0].get("gap", {}).get("to"),
        "best_transferable": transferable,
        "best_transferable_ece": [_ece(entry, s) for s in dict.fromkeys([selection, final])] if entry else [],
        "note": selection_note(selection, final, run.meta.get("cv"), board), "table": (rows, columns),
    }


def _print(summary: dict) -> None:
    from featurecache.cli import table

    rows, columns = summary.pop("table")
    print(f"\n== {summary['run']}  ({summary['backbone']})")
    print(summary["note"])
    print(table(rows, columns))
    print(f"tied with the winner: {summary['tied_with_winner']} of {summary['heads'] - 1} other heads "
          f"(most accurate: {summary['most_accurate']}); ranked first: {summary['best']}")
    for ece in summary["best_transferable_ece"]:
        after = "not calibrated" if ece["after"] is None else f"{ece['after']:.4f} (T={ece['temperature']:.3g})"
        print(f"best transferable {summary['best_transferable']}: {ece['split']} ECE {ece['before']:.4f} -> {after}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", nargs="?", help="A cache (path, name or key prefix) or a run directory.")
    parser.add_argument("--pipeline", type=Path, help="Run this pipeline with fit-head.calibrate=temperature.")
    parser.add_argument("--set", action="append", default=[], help="KEY=VALUE overrides of the pipeline.")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--head", action="append", default=[], help="Head specs (default: the default sweep).")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="Print the figures as JSON.")
    args = parser.parse_args()
    started = time.perf_counter()
    extra: dict = {}
    if args.pipeline:
        out = pipeline.run(args.pipeline, set=(*args.set, "fit-head.calibrate=temperature",
                                               f"fit-head.seeds={args.seeds}"), progress=True)
        runs = [b["stages"]["fit-head"]["run_dir"] for b in out["branches"] if "fit-head" in b["stages"]]
        extra["comparison"] = out.get("comparison")
    elif args.target and (Path(args.target) / RUN_FILE).is_file():
        runs = [args.target]
    elif args.target:
        runs = [featurecache.fit_head(args.target, head=tuple(args.head), cache_dir=args.cache_dir, seeds=args.seeds,
                                      calibrate="temperature", progress=True).run_dir]
    else:
        parser.error("give a cache, a run directory or --pipeline FILE")
    summaries = [summarize(r) for r in runs]
    if args.json:
        print(json.dumps({"runs": [{k: v for k, v in s.items() if k != "table"} for s in summaries], **extra},
                         indent=2))
        return
    for summary in summaries:
        _print(summary)
    if extra.get("comparison"):
        print(f"\ncomparison: {extra['comparison']}")
    print(f"\n{time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
