"""Stage two at scale: the default sweep on 5,000, 20,000 and 50,000 training rows, and Fashion-MNIST.

1. For each size, a cache of N train rows (and N/10 val, N/10 test) x 1,280 features, 10
   classes, written with ``featurecache.store.write_cache``: MobileNetV2-like features
   (non-negative, about half zeros; each class a mixture of three clusters in a
   64-dimensional latent space, so that the classes are not trivially separable and not
   linearly so). ``fc fit-head CACHE --json`` with the default sweep runs on each, as a
   user types it. Printed: wall seconds, training rows per second, the selected head and
   its val and test accuracy, and the ratio of the largest size's time to the smallest's.
2. On the ``--reference-size`` cache (default 20,000 rows), the same sweep unpruned and
   unbudgeted (``--no-halving --budget 0``: every head on every row; the RBF SVMs alone take
   tens of minutes on 2 cores), and the gap between the selected head's test accuracy and
   the best the reference reaches.
3. ``--fashion-mnist``: ``fc extract torchvision:FashionMNIST`` (the Debian
   ``dataset-fashion-mnist`` files, ``--limit`` train images and the full 10,000 test
   images, MobileNetV2 IMAGENET1K_V1, also storing three intermediate layers) and the default
   sweep on the penultimate features and on their concatenation with the layers
   (``--features concat``); extract seconds, sweep seconds and the selected head's test
   accuracy with its interval.

    python bench/heads_scale.py                                  # 5k, 20k, 50k, then the 20k reference
    python bench/heads_scale.py --sizes 6000 --no-reference      # a quick smoke run
    python bench/heads_scale.py --sizes none --fashion-mnist     # Fashion-MNIST only

Absolute times are noisy on shared machines: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from featurecache import store

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
# MobileNetV2's last blocks at strides 8, 16 and 32, stored besides the penultimate features (docs/stages.md).
LAYERS = "features.6,features.13,features.17"


def features(n: int, d: int = 1280, n_classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """MobileNetV2-like features: 3 latent clusters per class, a random map to ``d`` dims, noise, ReLU."""
    rng = np.random.default_rng(seed)
    latent, clusters = 64, 3
    centers = rng.normal(0.0, 1.0, size=(n_classes, clusters, latent))
    mix = rng.normal(0.0, 1.0 / np.sqrt(latent), size=(latent, d))
    y = rng.integers(0, n_classes, size=n)
    z = centers[y, rng.integers(0, clusters, size=n)] + rng.normal(0.0, 2.0, size=(n, latent))
    X = np.maximum(z @ mix + rng.normal(0.0, 0.4, size=(n, d)) - 0.1, 0.0)
    return X.astype(np.float32), y.astype(np.int64)


def write_cache(folder: Path, n: int) -> str:
    """A complete cache of ``n`` train, ``n // 10`` val and ``n // 10`` test rows (the same generator,
    one draw, so that the splits share the class structure)."""
    X, y = features(n + 2 * (n // 10))
    cuts = {"train": (0, n), "val": (n, n + n // 10), "test": (n + n // 10, len(y))}
    splits = {name: {"features": X[a:b], "labels": y[a:b], "paths": [f"{name}/{i}" for i in range(b - a)],
                     "skipped": []} for name, (a, b) in cuts.items()}
    config = {"backbone": "synthetic-mobilenet-like", "rows": n, "feature_dim": X.shape[1]}
    return str(store.write_cache(folder / f"synthetic-{n}.h5", [f"c{i}" for i in range(10)], config, splits))


def fc(*args: str) -> tuple[dict, float]:
    """Run one ``fc`` command as a user would; its ``--json`` output and wall seconds (progress lines pass through)."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "featurecache", *args, "--json"], check=True,
                         stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout), time.perf_counter() - start


def sweep(cache: str, *extra: str) -> dict:
    result, seconds = fc("fit-head", cache, "--cache-dir", str(Path(cache).parent), *extra)
    best = result["leaderboard"][0]
    return {"seconds": seconds, "best": best["head"], "val": best["metrics"]["val"]["accuracy"],
            "test": best["metrics"]["test"]["accuracy"],
            "best_test": max(e["metrics"]["test"]["accuracy"] for e in result["leaderboard"]),
            "heads": len(result["leaderboard"])}


def scale(sizes: list[int], reference: int | None, extra: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="fc-scale-") as tmp:
        times, outs = {}, {}
        for n in sizes:
            out = outs[n] = sweep(write_cache(Path(tmp), n), *extra)
            times[n] = out["seconds"]
            print(f"{n:>6,} rows: {out['seconds']:7.1f} s, {n / out['seconds']:8.1f} rows/s; selected {out['best']}: "
                  f"val {out['val']:.4f}, test {out['test']:.4f}", flush=True)
        if len(sizes) > 1:
            print(f"time ratio {max(sizes):,}/{min(sizes):,} rows: {times[max(sizes)] / times[min(sizes)]:.1f} "
                  f"(rows ratio {max(sizes) / min(sizes):.0f})")
        if reference:
            compare_with_reference(Path(tmp), reference, extra, outs.get(reference))


def compare_with_reference(folder: Path, n: int, extra: list[str], ours: dict | None) -> None:
    """The default sweep (``ours``, unless it ran already) against the unpruned, unbudgeted one on ``n`` rows."""
    existing = folder / f"synthetic-{n}.h5"
    cache = str(existing) if existing.exists() else write_cache(folder, n)
    ours = ours or sweep(cache, *extra)
    print(f"reference on {n:,} rows: the default sweep unpruned and unbudgeted (every head on every row) ...",
          flush=True)
    full = sweep(cache, *extra, "--no-halving", "--budget", "0")
    print(f"{n:,} rows: selected {ours['best']} test {ours['test']:.4f} in {ours['seconds']:.1f} s; unpruned, "
          f"unbudgeted: selected {full['best']} test {full['test']:.4f}, best test of its {full['heads']} heads "
          f"{full['best_test']:.4f}, in {full['seconds']:.1f} s; gap to its best "
          f"{100 * (full['best_test'] - ours['test']):+.2f} points, to its selected "
          f"{100 * (full['test'] - ours['test']):+.2f} points")


def fashion_mnist(limit: int, root: str, extra: list[str]) -> None:
    """One extraction that also stores :data:`LAYERS`, then the default sweep on the penultimate
    features and on their concatenation with those layers (``--features concat``), on the same test."""
    with tempfile.TemporaryDirectory(prefix="fc-fmnist-") as cache_dir:
        extracted, extract_seconds = fc("extract", "torchvision:FashionMNIST", "--root", root, "--limit", str(limit),
                                        "--backbone", "mobilenet_v2", "--weights", "IMAGENET1K_V1",
                                        "--layers", LAYERS, "--cache-dir", cache_dir)
        splits = ", ".join(f"{k} {v['n']:,}" for k, v in extracted["splits"].items())
        print(f"Fashion-MNIST ({splits}), MobileNetV2 IMAGENET1K_V1 with --layers {LAYERS}: "
              f"extract {extract_seconds:.1f} s", flush=True)
        for features in ("penultimate", "concat"):
            result, sweep_seconds = fc("fit-head", extracted["cache"], "--cache-dir", cache_dir,
                                       "--features", features, *extra)
            best = result["leaderboard"][0]
            test = best["metrics"]["test"]
            print(f"  --features {features}: sweep {sweep_seconds:.1f} s ({len(result['leaderboard'])} heads, "
                  f"selected on {best['selection_split']}); selected {best['head']}: test accuracy "
                  f"{test['accuracy']:.4f} [{test['accuracy_ci'][0]:.4f}, {test['accuracy_ci'][1]:.4f}]", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="5000,20000,50000",
                        help="Training rows of each synthetic cache, comma-separated, or none.")
    parser.add_argument("--reference-size", type=int, default=20000,
                        help="Rows of the cache compared with the unpruned, unbudgeted sweep.")
    parser.add_argument("--no-reference", action="store_true",
                        help="Skip the unpruned, unbudgeted sweep (tens of minutes).")
    parser.add_argument("--fashion-mnist", action="store_true", help="Also run the Fashion-MNIST acceptance.")
    parser.add_argument("--limit", type=int, default=20000, help="Fashion-MNIST images per split (--limit).")
    parser.add_argument("--root", default=FASHION_MNIST, help="The Fashion-MNIST files.")
    parser.add_argument("--fit-head-args", default="", help="Extra fc fit-head options, e.g. '--jobs 2'.")
    args = parser.parse_args()
    extra = args.fit_head_args.split()
    print(f"load average before: {', '.join(f'{x:.1f}' for x in os.getloadavg())}; "
          f"{len(os.sched_getaffinity(0))} cores", flush=True)
    sizes = [] if args.sizes == "none" else [int(s) for s in args.sizes.split(",")]
    if sizes:
        scale(sizes, None if args.no_reference else args.reference_size, extra)
    if args.fashion_mnist:
        fashion_mnist(args.limit, args.root, extra)
    print(f"load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
