"""Do richer features pay? Held-out test accuracy of the default sweep with and without each trick.

The tricks of stage one are ``--layers`` (heads learn from the concatenation of several
layers' pooled features, ``fit-head --features concat``), ``--tta flip`` (the mean feature
of an image and its mirror) and ``--augment-views K`` (heads also learn from K augmented
views of every training image). For each, this extracts a fresh cache (so that its seconds
are measured), runs the default sweep, and prints the selected head's test accuracy with
its 95% interval, the best transferable head's, and the paired difference to the plain
features on the same test images (a bootstrap interval: a trick wins only where the
interval is above 0).

Two data sets:

- ``--data hymenoptera`` (default): the tutorial's ants and bees. Its ``train`` folder is
  split into train and val (stratified, ``--split-seed``), and its ``val`` folder is the
  test split, never seen by selection.
- ``--data fashion-mnist``: the Debian files, ``--limit`` images per split (train is split by
  the sweep's holdout; the 10,000 test images, or ``--limit`` of them, are the test).

    python bench/tricks.py [--data hymenoptera] [--split-seeds 0,1,2] [--views 4]
    python bench/tricks.py --data fashion-mnist --limit 5000
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np

import featurecache
from featurecache.data.sources import stratified_assign
from featurecache.metrics import paired_difference, proportion_interval
from featurecache.sweep.runs import best_transferable, load_head

REPO = Path(__file__).resolve().parents[1]
HYMENOPTERA = REPO.parent / "shared" / "data" / "hymenoptera_data"
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
# The last MobileNetV2 blocks at strides 8, 16 and 32 (28, 14 and 7 pixels at 224): 32, 96 and 320 channels.
LAYERS = "features.6,features.13,features.17"


def hymenoptera_manifest(folder: Path, seed: int) -> Path:
    """The tutorial's train folder split 80/20 into train and val (stratified, ``seed``); its val folder as test."""
    rows = [{"path": str(path), "label": path.parent.name, "split": "test" if part == "val" else "train"}
            for part in ("train", "val") for path in sorted((HYMENOPTERA / part).glob("*/*"))]
    train = [r for r in rows if r["split"] == "train"]
    labels = sorted({r["label"] for r in rows})
    assigned = stratified_assign([labels.index(r["label"]) for r in train], {"train": 0.8, "val": 0.2}, seed)
    for row, split in zip(train, assigned):
        row["split"] = split
    manifest = folder / f"hymenoptera-split{seed}.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["path", "label", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return manifest


VARIANTS = {  # name -> (extract options, fit-head options)
    "plain": ({}, {}),
    "layers": ({"layers": LAYERS}, {"features": "concat"}),
    "tta": ({"tta": "flip"}, {}),
    "views": ({"augment_views": 4}, {"views": True}),
}


def _test_correct(run_dir: str, head: str, cache: str, features: str) -> np.ndarray:
    """Per test image: did ``head`` of the run classify it right (for paired differences)."""
    pipeline, _ = load_head(run_dir, head)
    X, y, _ = featurecache.load_features(cache, "test", features=features)
    return pipeline.predict(X) == y


def run_variant(name: str, data: str, extract_options: dict, fit_options: dict, cache_dir: str) -> dict:
    start = time.perf_counter()
    extracted = featurecache.extract(data, backbone="mobilenet_v2", weights="IMAGENET1K_V1", cache_dir=cache_dir,
                                     progress=False, **extract_options)
    extract_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = featurecache.fit_head(extracted.cache, cache_dir=cache_dir, **fit_options)
    sweep_seconds = time.perf_counter() - start
    best, transferable = result.leaderboard[0], best_transferable(result.leaderboard)
    features = fit_options.get("features", "penultimate")
    return {"name": name, "extract_s": extract_seconds, "sweep_s": sweep_seconds, "best": best["head"],
            "selection": best["selection_accuracy"], "test": best["metrics"]["test"]["accuracy"],
            "correct": _test_correct(result.run_dir, best["head"], extracted.cache, features),
            "transferable": transferable,
            "transferable_correct": _test_correct(result.run_dir, transferable, extracted.cache, features)}


def report(rows: list[dict], label: str) -> None:
    plain = next(r for r in rows if r["name"] == "plain")
    print(f"\n{label}")
    print(f"{'variant':8s} {'extract s':>9s} {'sweep s':>8s}  {'selected head':45s} {'test acc [95%]':>22s}  "
          f"{'vs plain [95%]':>24s}  {'transferable test':>17s}")
    for r in rows:
        n = len(r["correct"])
        low, high = proportion_interval(r["correct"])
        diff = paired_difference(r["correct"], plain["correct"])
        t_acc = float(r["transferable_correct"].mean())
        t_diff = paired_difference(r["transferable_correct"], plain["transferable_correct"])
        print(f"{r['name']:8s} {r['extract_s']:9.1f} {r['sweep_s']:8.1f}  {r['best'][:45]:45s} "
              f"{r['test']:.4f} [{low:.3f},{high:.3f}]  {_diff(diff)}  {t_acc:.4f} ({_diff(t_diff)}) of {n}")


def pooled(tables: list[list[dict]]) -> None:
    """Over several train/val splits of the same test images: per trick, the mean test accuracy
    of the selected head and its difference to plain, averaged per image over the splits, with a
    95% bootstrap interval over the test images."""
    rng = np.random.default_rng(0)
    plain = np.mean([next(r for r in rows if r["name"] == "plain")["correct"] for rows in tables], axis=0)
    draws = rng.integers(0, len(plain), size=(2000, len(plain)))
    print(f"\nOver {len(tables)} splits (per-image means, bootstrap over the {len(plain)} test images):")
    for name in [r["name"] for r in tables[0]]:
        mean = np.mean([next(r for r in rows if r["name"] == name)["correct"] for rows in tables], axis=0)
        diff = (mean - plain)[draws].mean(axis=1)
        low, high = np.quantile(diff, [0.025, 0.975])
        print(f"{name:8s} test {mean.mean():.4f}  vs plain {(mean - plain).mean():+.4f} [{low:+.4f},{high:+.4f}]")


def _diff(d: dict) -> str:
    return f"{d['difference']:+.4f} [{d['ci'][0]:+.3f},{d['ci'][1]:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=["hymenoptera", "fashion-mnist"], default="hymenoptera")
    parser.add_argument("--split-seeds", default="0", help="Hymenoptera: train/val split seeds, e.g. 0,1,2.")
    parser.add_argument("--limit", type=int, default=5000, help="Fashion-MNIST: images per split.")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated: " + ", ".join(VARIANTS))
    args = parser.parse_args()
    names = args.variants.split(",")
    if "plain" not in names:
        names.insert(0, "plain")
    with tempfile.TemporaryDirectory(prefix="fc-tricks-") as tmp:
        if args.data == "fashion-mnist":
            data = [("Fashion-MNIST", "torchvision:FashionMNIST", {"root": FASHION_MNIST, "limit": args.limit})]
        else:
            data = [(f"hymenoptera, split seed {s}", str(hymenoptera_manifest(Path(tmp), int(s))), {})
                    for s in args.split_seeds.split(",")]
        tables = []
        for label, source, common in data:
            rows = []
            for name in names:
                extract_options, fit_options = VARIANTS[name]
                cache_dir = str(Path(tmp) / f"{label}-{name}".replace(" ", "_").replace(",", ""))
                rows.append(run_variant(name, source, {**common, **extract_options}, fit_options, cache_dir))
                print(f"{label}: {name}: extract {rows[-1]['extract_s']:.1f} s, sweep {rows[-1]['sweep_s']:.1f} s, "
                      f"{rows[-1]['best']} test {rows[-1]['test']:.4f}", flush=True)
            report(rows, label)
            tables.append(rows)
        if len(tables) > 1:
            pooled(tables)


if __name__ == "__main__":
    main()
