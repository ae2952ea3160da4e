"""Reports: one Markdown file and one self-contained HTML page per run.

``report(run)`` writes ``<run_dir>/report/`` with ``report.md`` (next to its PNG
figures) and ``report.html`` (the same content, figures embedded as base64 data
URIs, so the page can be mailed or archived alone). It holds the leaderboard, the
confusion matrix and per-class metrics of the chosen head (the numbers fit-head
computed with :func:`featurecache.metrics.classification_metrics`, so report and
leaderboard agree), the learning curve ``fc curve`` saved in the run folder (how many labels are
enough, :mod:`featurecache.sweep.curve`), the fine-tuning curves of every fine-tune under the run, a grid of
sample images with the head's predictions on their cached features next to the true
labels, and the full provenance. Plots are drawn by matplotlib's Agg renderer through
``matplotlib.figure.Figure`` (no pyplot, no global state). A report is keyed by the
hash of everything it shows: asking again for an unchanged run returns the page at once.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path

import numpy as np

from .. import __version__, store
from ..auditing.stage import PAGE_FILE, audit_dir_of, leaks_into_test, saved_audit
from ..data.images import ImageSkipped, load_rgb
from ..data.sources import Dataset, Record, reopen
from ..errors import UsageError, plural
from ..files import sha256_file, versions, write_json
from ..finetuning.network import FINETUNE_DIR, HISTORY_FILE, RESULT_FILE
from ..metrics import SUMMARY_KEYS, class_probabilities
from ..sweep.curve import saved_curve
from ..sweep.leaderboard import calibrated, selection_note, shows_features, with_interval
from .document import Chart, interval_chart, png, up_to_date, write_document

REPORT_DIR = "report"
INTERVAL_HEADS = 30  # heads drawn with their intervals


# --------------------------------------------------------------------------- inputs


def _finetunes(run_dir: Path) -> list[dict]:
    """Every complete fine-tune under the run: its folder name, history and JSON files."""
    out = []
    for folder in sorted((run_dir / FINETUNE_DIR).glob("*/")):
        if (folder / RESULT_FILE).is_file() and (folder / HISTORY_FILE).is_file():
            docs = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
            out.append({"name": folder.name, "epochs": docs["history"], "files": docs})
    return out


def _report_key(run_dir: Path, head: str, samples: int) -> str:
    parts = {
        "run": (run_dir / "run.json").read_text(),
        "leaderboard": (run_dir / "leaderboard.json").read_text(),
        "finetune": {str(p.relative_to(run_dir)): p.read_text()
                     for p in sorted(run_dir.glob(f"{FINETUNE_DIR}/*/*.json"))},
        "head": head,
        "samples": samples,
        "audit": (saved_audit(json.loads((run_dir / "run.json").read_text())["cache"]) or {}).get("key"),
        "curve": (saved_curve(run_dir) or {}).get("key"),
        "code": sha256_file(__file__),
        "version": __version__,
    }
    return store.cache_key(parts)


def _image_dataset(config: dict) -> Dataset:
    """Where the cached paths can be read again: the data root, a torchvision dataset, shards or tables."""
    return reopen(config.get("data", {}))


# --------------------------------------------------------------------------- figures


def _confusion_figure(matrix: list[list[int]], classes: list[str], title: str) -> bytes:
    from matplotlib.figure import Figure

    cm = np.asarray(matrix)
    n = len(classes)
    size = min(3.0 + 0.45 * n, 16.0)
    fig = Figure(figsize=(size, size), dpi=100)
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues", vmin=0)
    ax.set_xticks(range(n), classes, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 25:
        threshold = cm.max() / 2 if cm.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=10 if n <= 10 else 7,
                        color="white" if cm[i, j] > threshold else "black")
    return png(fig)


def _curves_figure(finetunes: list[dict]) -> bytes:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 3.8), dpi=100)
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ft in finetunes:
        epochs = ft["epochs"]
        x = [e.get("epoch", i + 1) for i, e in enumerate(epochs)]
        label = ft["name"][:12]
        for key, style in (("train_loss", "-"), ("val_loss", "--")):
            values = [e.get(key) for e in epochs]
            if any(v is not None for v in values):
                loss_ax.plot(x, [np.nan if v is None else v for v in values], style, marker="o",
                             label=f"{key.split('_')[0]} ({label})")
        acc = [e.get("val_accuracy") for e in epochs]
        acc_ax.plot(x, [np.nan if v is None else v for v in acc], marker="o", label=f"val ({label})")
        start = ft["files"].get("result", {}).get("start_accuracy")
        if start is not None:
            acc_ax.axhline(start, color="grey", linestyle=":", label=f"step 0 ({label})")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="validation accuracy")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return png(fig)


def _reliability_figure(panels: list[tuple[str, dict]]) -> bytes:
    """One reliability diagram per ``(title, bins)``: accuracy against confidence per bin (with its image
    count), and the diagonal."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.4 * len(panels), 4.2), dpi=100)
    for ax, (title, bins) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        width = 1.0 / bins["bins"]
        left = np.arange(bins["bins"]) * width
        accuracy = np.array([np.nan if a is None else a for a in bins["accuracy"]])
        confidence = np.array([np.nan if c is None else c for c in bins["confidence"]])
        ax.bar(left, np.nan_to_num(accuracy), width=width, align="edge", edgecolor="black", alpha=0.6,
               label="accuracy in the bin")
        ax.plot(left + width / 2, confidence, "o", color="tab:red", markersize=4, label="mean confidence in the bin")
        ax.plot([0, 1], [0, 1], "--", color="grey", label="calibrated")
        for x, n, a in zip(left + width / 2, bins["count"], np.nan_to_num(accuracy)):
            if n:  # how many images each bar stands on
                ax.text(x, min(a + 0.02, 0.93), str(n), ha="center", fontsize=6)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top probability)", ylabel="accuracy", title=title)
        ax.legend(fontsize=7, loc="center left")  # confidences below 1/C are rare: the left is free
    return png(fig)


def _learning_curve_figure(curve: dict) -> bytes:
    """The selection accuracy by training images (log scale): each seed's subsample faint, their mean with its
    95% interval, the sentence on the last doubling as the title."""
    from matplotlib.figure import Figure

    points = [p for p in curve["points"] if p["accuracy"] is not None]
    fig = Figure(figsize=(8, 4.2), dpi=100)
    ax = fig.add_subplot()
    for i, p in enumerate(points):
        ax.plot([p["images"]] * len(p["accuracies"]), p["accuracies"], ".", color="grey", alpha=0.6,
                label=None if i else "each subsample")
    x = np.array([p["images"] for p in points])
    y = np.array([p["accuracy"] for p in points])
    ci = np.array([p["ci"] for p in points]).reshape(-1, 2)
    ax.errorbar(x, y, yerr=[y - ci[:, 0], ci[:, 1] - y], fmt="o-", capsize=3, label="mean of the subsamples (95%)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(x, [f"{p['images']:,} ({'all' if p['per_class'] is None else p['per_class']})" for p in points],
                  fontsize=7, rotation=45, ha="right")
    ax.minorticks_off()
    ax.set(xlabel="labelled training images (per class)", ylabel=f"{curve['selection_split']} accuracy")
    ax.set_title(_sentence(curve["sentence"]), fontsize=9, wrap=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return png(fig)


def _curve_lines(curve: dict) -> list[str]:
    """The sentence on the slope and how the curve was measured."""
    head = curve["head"] + (" (" + ", ".join(f"{m['weight']:.2f} {m['head']}" for m in curve["members"]) + ")"
                            if curve["members"] else "")
    lines = [_sentence(curve["sentence"]),
             f"{head} refitted on 1, 2, 4, ... images per class, then all; up to {curve['seeds']} stratified "
             f"subsamples a size; scored on the {curve['selection_split']} selection rows ({curve['scored']:,} "
             f"images), never learnt from; {curve['seconds']:.1f} s (fc curve)"]
    return lines + [f"{p['per_class'] or 'all'} per class: {p['error']}" for p in curve["points"] if p.get("error")]


def _samples_figure(images: list, titles: list[str], correct: list[bool]) -> bytes:
    from matplotlib.figure import Figure

    cols = min(4, len(images)) or 1
    rows = -(-len(images) // cols)
    fig = Figure(figsize=(2.6 * cols, 2.9 * rows), dpi=80)
    for k, (img, title, ok) in enumerate(zip(images, titles, correct)):
        ax = fig.add_subplot(rows, cols, k + 1)
        if isinstance(img, str):
            ax.text(0.5, 0.5, img, ha="center", va="center", wrap=True, fontsize=8)
        else:
            ax.imshow(np.asarray(img), interpolation="nearest")
        ax.set_title(title, fontsize=9, color="tab:green" if ok else "tab:red")
        ax.axis("off")
    fig.tight_layout()
    return png(fig)


def _pick_samples(y: np.ndarray, pred: np.ndarray, samples: int, seed: int = 0) -> np.ndarray:
    """A seeded choice of up to ``samples`` rows: up to half of them misclassified, the rest right."""
    rng = np.random.default_rng(seed)
    wrong, right = np.flatnonzero(pred != y), np.flatnonzero(pred == y)
    n_wrong = min(len(wrong), samples // 2 if len(right) >= samples - samples // 2 else samples - len(right))
    n_right = min(len(right), samples - n_wrong)
    return np.concatenate([rng.choice(wrong, n_wrong, replace=False), rng.choice(right, n_right, replace=False)])


def _samples_chart(meta: dict, estimator, split: str, samples: int) -> Chart:
    """A grid of ``samples`` images of ``split`` with the head's prediction, misclassified ones first."""
    classes = list(meta["classes"])
    X, y, paths = store.load_features(meta["cache"], split, features=meta.get("features", "penultimate"))
    proba = class_probabilities(estimator, X, len(classes))
    title = f"Sample {split} images: predicted class (probability) and true class, misclassified ones first (in red)"
    if split == "train":
        title += " (training images: the head was fitted on them)"
    return Chart("samples", title, _sample_images(meta["config"], (paths, y, proba), classes, split, samples))


def _sample_images(config: dict, rows: tuple, classes: list[str], split: str, samples: int) -> bytes:
    """The figure of :func:`_samples_chart`; ``rows`` are the split's paths, labels and probabilities."""
    paths, y, proba = rows
    picks = _pick_samples(y, proba.argmax(axis=1), samples)
    dataset = _image_dataset(config)
    images, titles, correct = [], [], []
    for i in picks:
        record = Record(paths[i], int(y[i]), split)
        try:
            img = load_rgb(dataset, record)
            img.thumbnail((160, 160))
        except ImageSkipped as exc:
            img = f"{paths[i]}\n{exc}"
        pred = int(proba[i].argmax())
        images.append(img)
        titles.append(f"pred {classes[pred]} ({proba[i, pred]:.2f})\ntrue {classes[int(y[i])]}")
        correct.append(pred == int(y[i]))
    return _samples_figure(images, titles, correct)


# --------------------------------------------------------------------------- the document


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if value is None:
        return ""
    return str(value)


def _leaderboard_rows(leaderboard: list[dict], final_split: str) -> tuple[list[str], list[list[str]]]:
    """Accuracies with their 95% intervals, ties, the final split's scores and calibration, fit time."""
    calibrated_ = any(calibrated(e, final_split) for e in leaderboard)
    sets = shows_features(leaderboard)
    columns = ["rank", "head", *(["features"] if sets else []), "selected on", "selection accuracy [95%]", "tied",
               f"{final_split} accuracy [95%]", f"{final_split} balanced accuracy", f"{final_split} macro-F1",
               f"{final_split} log-loss",
               f"{final_split} ECE", *([f"{final_split} ECE calibrated"] if calibrated_ else []), "fit s"]
    rows = []
    for rank, entry in enumerate(leaderboard, start=1):
        final = entry["metrics"][final_split]
        after = [_fmt(calibrated(entry, final_split).get("ece"))] if calibrated_ else []
        features = [entry.get("features", "")] if sets else []
        rows.append([str(rank), entry["head"], *features, entry["selection_split"],
                     with_interval(entry["metrics"][entry["selection_split"]]), "tied" if entry.get("tied") else "",
                     with_interval(final), _fmt(final["balanced_accuracy"]), _fmt(final["macro_f1"]),
                     _fmt(final["log_loss"]), _fmt(final.get("ece")), *after, f"{entry['fit_seconds']:.2f}"])
    return columns, rows


def _sentence(text: str) -> str:
    """``text`` with its first letter upper case (the rest as it is: head specs keep their case)."""
    return text[:1].upper() + text[1:]


def _calibration_line(head_meta: dict, split: str) -> list[str]:
    """How the head was calibrated and what it changed on ``split`` (nothing for a head that was not)."""
    calibration = head_meta.get("calibration")
    after = (calibration or {}).get("metrics", {}).get(split)
    before = head_meta["metrics"][split]
    if not after or "ece" not in before:
        return []
    return [f"Calibration: temperature {calibration['temperature']:.3g} fitted on {calibration['fitted_on']}; "
            f"{split} ECE {before['ece']:.4f} before, {after['ece']:.4f} after; {split} log-loss "
            f"{before['log_loss']:.4f} before, {after['log_loss']:.4f} after"]


def _finetune_line(ft: dict, final_split: str) -> str:
    result = ft["files"]["result"]
    line = (f"Fine-tuned {result['head']} ({ft['name']}): {result['split']} accuracy "
            f"{_fmt(result['head_accuracy'])} with the head alone, {_fmt(result['start_accuracy'])} at "
            f"step 0, {_fmt(result['best_accuracy'])} after {plural(result['epochs'], 'epoch')} "
            f"(best epoch {result['best_epoch']})")
    held_out = result["metrics"]["finetuned"].get(final_split) if final_split != result["split"] else None
    if held_out:
        line += f"; {final_split} accuracy {_fmt(held_out['accuracy'])} fine-tuned"
    return line


def _summary_lines(run, head_meta: dict, finetunes: list[dict], cache_info: dict) -> list[str]:
    meta = run.meta
    config, final_split = meta["config"], meta["final_split"]
    weights = config.get("weights", {})
    lines = [
        f"Data: {config.get('data', {}).get('root')} ({len(meta['classes'])} classes; "
        + ", ".join(f"{k} {v['n']}" for k, v in cache_info["splits"].items()) + " images)",
        f"Backbone: {config.get('backbone')}, weights {weights.get('weights', weights.get('sha256', ''))}",
        f"Head: {head_meta['head']}, {final_split} accuracy {with_interval(head_meta['metrics'][final_split])} ("
        + ("the best" if head_meta["head"] == meta["best"] else f"the best is {meta['best']}")
        + f" of {len(run.leaderboard)} heads; 95% bootstrap interval)",
        _sentence(selection_note(meta["selection_split"], final_split, meta.get("cv"), run.leaderboard)),
        *_calibration_line(head_meta, final_split),
        *_ensemble_line(head_meta),
    ]
    return lines + [_finetune_line(ft, final_split) for ft in finetunes] + _audit_lines(meta)


def _ensemble_line(head_meta: dict) -> list[str]:
    """The members and weights of an ensemble, and how its selection score was computed."""
    if not head_meta.get("members"):
        return []
    members = ", ".join(f"{m['weight']:.2f} {m['head']}" for m in head_meta["members"])
    return [f"Ensemble of {len(head_meta['members'])} heads: {members}; its selection score comes from "
            f"{head_meta['ensemble']['scored']}"]


def _audit_lines(meta: dict) -> list[str]:
    """What ``fc audit`` found in the run's cache, with a warning for test leaks; what ``--exclude`` left out."""
    lines = []
    excluded = meta.get("exclude")
    if excluded:
        scored = ", ".join(f"{n} {s}" for s, n in excluded["scores"].items()) or "none"
        why = f": {excluded['reason']}" if excluded["reason"] else ""
        lines.append(f"Excluded ({Path(excluded['file']).name}{why}): {excluded['train']} train images left out of "
                     f"training; left out of the scores: {scored}")
    audit = saved_audit(meta["cache"])
    if audit is None:
        return lines
    c = audit["counts"]
    leaks = ", ".join(f"{pair} {n}" for pair, n in c["leaks"].items()) or "none"
    lines.append(f"Audit of the cache: leaks {leaks}; conflicts {c['conflicts']}; likely label errors "
                 + ", ".join(f"{s} {n}" for s, n in c["label_issues"].items()))
    n_test = leaks_into_test(audit)
    scored = (excluded or {}).get("scores", {}).get("test", 0)
    if n_test and not scored:
        lines.append(f"Warning: fc audit found {n_test} test images with a duplicate in another split: the test "
                     "scores are optimistic; fit-head --exclude with fc audit --list leaks leaves them out")
    return lines


def _audit_link(meta: dict) -> list[tuple]:
    page = audit_dir_of(meta["cache"]) / PAGE_FILE
    if saved_audit(meta["cache"]) is None or not page.is_file():
        return []
    return [("link", "Audit of the cache", (str(page), page.as_uri()))]


def _provenance(run) -> dict:
    meta = run.meta
    config = meta["config"]
    data = config.get("data", {})
    return {
        "run": meta["run_id"],
        "run directory": str(run.path),
        "cache": meta["cache"],
        "cache key": meta["cache_key"],
        "backbone": config.get("backbone"),
        "weights": json.dumps(config.get("weights", {}), sort_keys=True),
        "layer": config.get("layer"),
        "preprocessing": json.dumps(config.get("preprocess", {}), sort_keys=True),
        "precision / storage": f"{config.get('precision')} / {config.get('dtype')}",
        "feature dimension": config.get("feature_dim"),
        "data": data.get("root"),
        "data source": data.get("source"),
        "data fingerprint": data.get("fingerprint"),
        "classes": ", ".join(meta["classes"]),
        "selection split / final split": f"{meta['selection_split']} / {meta['final_split']}",
        "seed": meta.get("seed"),
        "features extracted": config.get("created"),
        "heads fitted": meta.get("created"),
        "versions at extraction": json.dumps(config.get("versions", {}), sort_keys=True),
        "versions at fitting": json.dumps(meta.get("versions", {}), sort_keys=True),
        "versions at reporting": json.dumps(
            versions("torch", "torchvision", "sklearn", "numpy", "matplotlib"), sort_keys=True),
        "report generated": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def _figure_blocks(figures: dict, *names: str) -> list[tuple]:
    """The figure blocks of those ``names`` that were drawn."""
    return [("figure", figures[name].title, figures[name]) for name in names if name in figures]


def _curve_blocks(run_dir: Path, figures: dict) -> list[tuple]:
    """The learning curve of ``fc curve``, when the run has one: the figure and what it says."""
    curve = saved_curve(run_dir)
    if curve is None or "learning_curve" not in figures:
        return []
    return [*_figure_blocks(figures, "learning_curve"), ("list", "How many labels are enough", _curve_lines(curve))]


def _finetune_blocks(finetunes: list[dict], figures: dict) -> list[tuple]:
    if "finetune_curves" not in figures:
        return []
    blocks = _figure_blocks(figures, "finetune_curves")
    for ft in finetunes:
        keys = [k for k in ("epoch", "train_loss", "val_loss", "val_accuracy", "seconds") if k in ft["epochs"][0]]
        blocks.append(("table", f"Fine-tuning history ({ft['name']})",
                       (keys, [[_fmt(e.get(k)) for k in keys] for e in ft["epochs"]])))
    return blocks


def _sections(run, head_meta: dict, finetunes: list[dict], figures: dict, cache_info: dict) -> list[tuple]:
    """The report as (kind, title, payload) blocks; Markdown and HTML render the same list."""
    meta = run.meta
    final_split = meta["final_split"]
    metrics = head_meta["metrics"][final_split]
    summary = {k: metrics[k] for k in SUMMARY_KEYS if k in metrics}
    per_class = [[name, _fmt(m["precision"]), _fmt(m["recall"]), _fmt(m["f1"]), str(m["support"])]
                 for name, m in metrics.get("per_class", {}).items()]
    blocks: list[tuple] = [
        ("title", f"featurecache report: {meta['run_id']}", None),
        ("list", "Summary", _summary_lines(run, head_meta, finetunes, cache_info)),
        *_audit_link(meta),
        ("table", "Leaderboard", _leaderboard_rows(run.leaderboard, final_split)),
        *_figure_blocks(figures, "intervals"),
        *_curve_blocks(run.path, figures),
        ("table", f"Metrics of {head_meta['head']} on {final_split}",
         (list(summary), [[_fmt(v) for v in summary.values()]])),
        *_figure_blocks(figures, "reliability"),
        *_figure_blocks(figures, "confusion_matrix"),
        ("table", f"Per-class metrics on {final_split}",
         (["class", "precision", "recall", "f1", "support"], per_class)),
        *_finetune_blocks(finetunes, figures),
        *_figure_blocks(figures, "samples"),
    ]
    provenance = _provenance(run)
    blocks.append(("table", "Provenance", (["item", "value"], [[k, _fmt(v)] for k, v in provenance.items()])))
    return blocks


# --------------------------------------------------------------------------- the stage


def _figures(meta: dict, estimator, head_meta: dict, finetunes: list[dict], cache_info: dict,
             samples: int) -> dict[str, Chart]:
    """The confusion matrix, the fine-tuning curves (if any) and the grid of sample predictions."""
    classes, split = list(meta["classes"]), meta["final_split"]
    name = head_meta["head"]
    figures = {"confusion_matrix": Chart("confusion_matrix", f"Confusion matrix of {name} on {split}",
                                          _confusion_figure(head_meta["metrics"][split]["confusion_matrix"], classes,
                                                            f"{name} on {split}"))}
    if finetunes:
        figures["finetune_curves"] = Chart("finetune_curves", "Fine-tuning curves (loss and accuracy per epoch)",
                                            _curves_figure(finetunes))
    # With cross-validation there is no held-out split of images to show: the grid shows train.
    grid_split = split if split in cache_info["splits"] else "train"
    if samples:
        figures["samples"] = _samples_chart(meta, estimator, grid_split, samples)
    return figures


def _honest_figures(leaderboard: list[dict], head_meta: dict, meta: dict) -> dict[str, Chart]:
    """The accuracy of every head with its interval, and the reliability diagram of the head shown."""
    shown, selection, split = leaderboard[:INTERVAL_HEADS], meta["selection_split"], meta["final_split"]
    series = {s: [(e["metrics"][s]["accuracy"], e["metrics"][s].get("accuracy_ci")) for e in shown]
              for s in dict.fromkeys([selection, split])}
    first = f" (the first {len(shown)} of {len(leaderboard)})" if len(shown) < len(leaderboard) else ""
    title = (f"Accuracy of every head{first} with its 95% bootstrap interval; green: tied with the most "
             f"accurate head on {selection}")
    figures = {"intervals": Chart("intervals", title, interval_chart(
        [e["head"] for e in shown], series, [bool(e.get("tied")) for e in shown]))}
    before = head_meta["metrics"][split].get("reliability")
    if before is not None:
        panels = [(f"{split}: ECE {head_meta['metrics'][split]['ece']:.4f}", before)]
        after = calibrated(head_meta, split)
        if after:
            panels.append((f"temperature {head_meta['calibration']['temperature']:.3g}: ECE {after['ece']:.4f}",
                           after["reliability"]))
        figures["reliability"] = Chart("reliability", f"Reliability diagram of {head_meta['head']} on {split} "
                                       f"({before['bins']} bins of the top probability)", _reliability_figure(panels))
    return figures


def _curve_figure(run_dir: Path) -> dict[str, Chart]:
    """The learning curve that ``fc curve`` saved in the run folder (none without one, or without a scored size)."""
    curve = saved_curve(run_dir)
    if curve is None or sum(p["accuracy"] is not None for p in curve["points"]) < 1:
        return {}
    title = (f"How many labels are enough: {curve['head']} on 1, 2, 4, ... images per class, "
             f"{curve['selection_split']} accuracy (fc curve)")
    return {"learning_curve": Chart("learning_curve", title, _learning_curve_figure(curve))}


def _one_run(run):
    """The run of a single report: ``run`` itself, or the one item of a list."""
    if isinstance(run, (str, os.PathLike)):
        return run
    runs = list(run)
    if len(runs) != 1:
        raise UsageError(f"a report is of one run, got {len(runs)}: pass --compare (compare=True) to compare runs")
    return runs[0]


def report(run, head: str = "best", samples: int = 16, trust: bool = False, cache_dir: str | None = None,
           compare: bool = False) -> Path:
    """Write the report of a fit-head run (and its fine-tunes); return the path of ``report.html``.

    ``run`` is a run directory, run id or unique prefix; ``head`` the head to detail ("best",
    "best-transferable", a spec or a slug); ``samples`` the number of images in the sample grid (0: none);
    ``trust`` also loads a run saved in the old pickle format, which can run code when loaded.
    With ``compare``, ``run`` is a list of runs and one table compares them, backbone by head
    family (:func:`featurecache.reporting.compare.compare_runs`); the path of ``comparison.html`` is returned.
    """
    from ..sweep.runs import load_head, load_run, resolve_run

    if compare:
        from .compare import compare_runs

        return compare_runs([run] if isinstance(run, (str, os.PathLike)) else list(run), cache_dir)
    if samples < 0:
        raise UsageError("--samples must be 0 or more")
    run_dir = Path(resolve_run(_one_run(run), cache_dir))
    out_dir = run_dir / REPORT_DIR
    html_path, stamp = out_dir / "report.html", out_dir / "report.json"
    key = _report_key(run_dir, head, samples)
    if up_to_date(html_path, stamp, key):
        return html_path

    loaded = load_run(run_dir)
    estimator, head_meta = load_head(run_dir, head, trust=trust)
    cache_info = store.info(loaded.meta["cache"])
    finetunes = _finetunes(run_dir)
    figures = {**_figures(loaded.meta, estimator, head_meta, finetunes, cache_info, samples),
               **_honest_figures(loaded.leaderboard, head_meta, loaded.meta), **_curve_figure(run_dir)}
    blocks = _sections(loaded, head_meta, finetunes, figures, cache_info)
    write_document(out_dir, "report", blocks, figures.values())
    metrics = head_meta["metrics"][loaded.meta["final_split"]]  # what fit-head computed: the leaderboard's numbers
    write_json(stamp, {"key": key, "head": head_meta["head"], "split": loaded.meta["final_split"],
                       "metrics": {k: metrics[k] for k in SUMMARY_KEYS if k in metrics}, "figures": sorted(figures)})
    return html_path
