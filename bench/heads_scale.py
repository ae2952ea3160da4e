"""Stage two at scale: the default sweep on 5,000, 20,000 and 50,000 training rows, and Fashion-MNIST.

1. For each generator of ``bench/synthetic_cache.py`` (``latent``: 3 clusters per class in a
   64-dimensional latent space, N/10 val and test rows; ``subclusters``: 4 sub-clusters per
   class in the feature space, 2,000 val and 2,000 test rows, where a non-linear head gains
   the most from more rows) and each size, a cache of N train rows x 1,280 MobileNetV2-like
   features (non-negative), 10 classes, written with ``featurecache.store.write_cache``.
   ``fc fit-head CACHE --json`` with the default sweep runs on each, as a user types it.
   Printed: wall seconds, training rows per second, the selected head and its val and test
   accuracy, and the ratio of the largest size's time to the smallest's.
2. On the ``--reference-sizes`` caches (default 20,000 and 50,000 rows), the same sweep unpruned
   and unbudgeted (``--no-halving --budget 0``: every head on every row; the RBF SVMs and the
   MLP alone take tens of minutes on 2 cores at 50,000 rows), and the gap between the selected
   head's test accuracy and the best test accuracy the reference reaches (goal: within 0.5
   points at 20,000 rows, 2 at 50,000). With ``--reference-dir`` the reference caches and runs
   are kept there, and a later run of the bench reuses a finished reference instead of fitting it
   again (the default sweeps are always timed afresh, in a temporary folder). ``--reference-without
   svm`` leaves the exact RBF SVMs out of the reference: on 20,000 rows of sub-clusters each one ran
   for over 40 minutes of one core without finishing (their stand-in in the default sweep is the
   kernel map).
3. ``--fashion-mnist``: ``fc extract torchvision:FashionMNIST`` (the Debian
   ``dataset-fashion-mnist`` files, ``--limit`` train images and the full 10,000 test
   images, MobileNetV2 IMAGENET1K_V1, also storing three intermediate layers) and the default
   sweep on the penultimate features and on their concatenation with the layers
   (``--features concat``); extract seconds, sweep seconds and the selected head's test
   accuracy with its interval.

    python bench/heads_scale.py                                  # both generators: 5k, 20k, 50k, references
    python bench/heads_scale.py --generators subclusters --sizes 20000,50000 --reference-dir ~/fc-reference
    python bench/heads_scale.py --reference-without svm          # references without the exact RBF SVMs
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

import synthetic_cache

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
# MobileNetV2's last blocks at strides 8, 16 and 32, stored besides the penultimate features (docs/stages.md).
LAYERS = "features.6,features.13,features.17"
STEM = {"latent": "synthetic", "subclusters": "sub4"}  # cache file names: STEM-ROWS.h5
GOAL_POINTS = {20000: 0.5, 50000: 2.0}  # the largest gap to the reference's best test accuracy


def _load() -> str:
    return ", ".join(f"{x:.1f}" for x in os.getloadavg())


def write_cache(folder: Path, n: int, generator: str = "latent") -> str:
    """A complete cache of ``n`` train rows of ``generator`` in ``folder`` (kept when it is there):
    ``latent`` with ``n // 10`` val and test rows, ``subclusters`` with 2,000 of each."""
    out = folder / f"{STEM[generator]}-{n}.h5"
    if out.exists():
        return str(out)
    held = n // 10 if generator == "latent" else 2000
    return synthetic_cache.write(out, n, held, held, generator=generator)


def fc(*args: str) -> tuple[dict, float]:
    """Run one ``fc`` command as a user would; its ``--json`` output and wall seconds (progress lines pass through)."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "featurecache", *args, "--json"], check=True,
                         stdout=subprocess.PIPE, text=True)
    return json.loads(out.stdout), time.perf_counter() - start


def sweep(cache: str, *extra: str) -> dict:
    result, seconds = fc("fit-head", cache, "--cache-dir", str(Path(cache).parent), *extra)
    best = result["leaderboard"][0]
    top = max(result["leaderboard"], key=lambda e: e["metrics"]["test"]["accuracy"])
    return {"seconds": seconds, "best": best["head"], "val": best["metrics"]["val"]["accuracy"],
            "test": best["metrics"]["test"]["accuracy"], "best_test": top["metrics"]["test"]["accuracy"],
            "best_test_head": top["head"], "heads": len(result["leaderboard"]),
            "run_seconds": json.loads((Path(result["run_dir"]) / "run.json").read_text())["seconds"]}


def reference_heads(without: list[str]) -> list[str]:
    """``--head`` options for the default sweep without the head types named in ``without`` (none: the default)."""
    from featurecache.heads.builtin import DEFAULT_SWEEP

    if not without:
        return []
    return [arg for spec in DEFAULT_SWEEP if spec.partition(":")[0] not in without for arg in ("--head", spec)]


def scale(generator: str, sizes: list[int], references: list[int], reference_dir: str | None,
          extra: list[str], without: list[str]) -> None:
    with tempfile.TemporaryDirectory(prefix="fc-scale-") as tmp:
        times, outs = {}, {}
        for n in sizes:
            out = outs[n] = sweep(write_cache(Path(tmp), n, generator), *extra)
            times[n] = out["seconds"]
            print(f"{generator} {n:>6,} rows: {out['seconds']:7.1f} s, {n / out['seconds']:8.1f} rows/s; selected "
                  f"{out['best']}: val {out['val']:.4f}, test {out['test']:.4f} (load {_load()})", flush=True)
        if len(sizes) > 1:
            print(f"{generator} time ratio {max(sizes):,}/{min(sizes):,} rows: "
                  f"{times[max(sizes)] / times[min(sizes)]:.1f} (rows ratio {max(sizes) / min(sizes):.0f})")
        for n in references:
            folder = Path(reference_dir or tmp)
            folder.mkdir(parents=True, exist_ok=True)
            compare_with_reference(folder, generator, n, extra, outs.get(n), without)


def compare_with_reference(folder: Path, generator: str, n: int, extra: list[str], ours: dict | None,
                           without: list[str]) -> None:
    """The default sweep (``ours``, unless it ran already) against the unpruned, unbudgeted one on ``n`` rows
    (a finished one in ``folder`` is reused), less the head types of ``without``."""
    cache = write_cache(folder, n, generator)
    if ours is None:
        with tempfile.TemporaryDirectory(prefix="fc-scale-") as tmp:
            ours = sweep(write_cache(Path(tmp), n, generator), *extra)
    less = f", without {', '.join(without)}" if without else ""
    print(f"{generator} reference on {n:,} rows: the default sweep unpruned and unbudgeted (every head on every "
          f"row{less}) ...", flush=True)
    full = sweep(cache, *extra, *reference_heads(without), "--no-halving", "--budget", "0")
    gap = 100 * (full["best_test"] - ours["test"])
    goal = GOAL_POINTS.get(n)
    verdict = "" if goal is None else f" (goal: within {goal} points: {'met' if gap <= goal else 'NOT met'})"
    print(f"{generator} {n:,} rows: selected {ours['best']} test {ours['test']:.4f} in {ours['seconds']:.1f} s; "
          f"unpruned, unbudgeted: selected {full['best']} test {full['test']:.4f}, best test of its {full['heads']} "
          f"heads {full['best_test']:.4f} ({full['best_test_head']}), in {full['run_seconds']:.1f} s"
          f"{' (a finished run, reused)' if full['seconds'] < full['run_seconds'] / 2 else ''}; "
          f"gap to its best {gap:+.2f} points{verdict}, to its selected "
          f"{100 * (full['test'] - ours['test']):+.2f} points (load {_load()})", flush=True)


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
    parser.add_argument("--generators", default="latent,subclusters",
                        help=f"Synthetic generators, comma-separated: {', '.join(synthetic_cache.GENERATORS)}.")
    parser.add_argument("--reference-sizes", default="20000,50000",
                        help="Rows of the caches compared with the unpruned, unbudgeted sweep, comma-separated.")
    parser.add_argument("--reference-dir", help="Keep the reference caches and runs here; a finished one is reused.")
    parser.add_argument("--no-reference", action="store_true",
                        help="Skip the unpruned, unbudgeted sweeps (hours at 50,000 rows).")
    parser.add_argument("--reference-without", default="",
                        help="Head types left out of the reference, comma-separated (svm: the exact RBF SVMs, "
                             "each over 40 minutes on 20,000 rows of sub-clusters on 2 cores).")
    parser.add_argument("--fashion-mnist", action="store_true", help="Also run the Fashion-MNIST acceptance.")
    parser.add_argument("--limit", type=int, default=20000, help="Fashion-MNIST images per split (--limit).")
    parser.add_argument("--root", default=FASHION_MNIST, help="The Fashion-MNIST files.")
    parser.add_argument("--fit-head-args", default="", help="Extra fc fit-head options, e.g. '--jobs 2'.")
    args = parser.parse_args()
    extra = args.fit_head_args.split()
    print(f"load average before: {_load()}; {len(os.sched_getaffinity(0))} cores", flush=True)
    sizes = [] if args.sizes == "none" else [int(s) for s in args.sizes.split(",")]
    references = [] if args.no_reference else [int(s) for s in args.reference_sizes.split(",")]
    for generator in args.generators.split(",") if sizes or references else []:
        scale(generator, sizes, references, args.reference_dir, extra,
              [h for h in args.reference_without.split(",") if h])
    if args.fashion_mnist:
        fashion_mnist(args.limit, args.root, extra)
    print(f"load average after: {_load()}")


if __name__ == "__main__":
    main()
