"""What the caches' Fletcher-32 checksums cost, measured side by side in one run.

On Fashion-MNIST with ``--limit 10000`` (10,000 train and 10,000 test images, MobileNetV2's
1,280 features each: 98 MB of float32), with ``store.CHECKSUM`` on and off in turn:

1. writing the cache file (``store.write_cache``, the last step of ``fc extract``), on the
   extracted features, ``--repeats`` times each, alternating;
2. reading every feature (``store.read_rows`` of every split, what ``fc fit-head`` does), and
   ``store.verify`` (every number, with its checksum: what ``fc extract`` now reads before it
   reuses a cache, and ``fc cache verify``);
3. ``fc fit-head --head logreg:C=1`` end to end on each file (its own run folder each time);
4. with ``--extract``: ``fc extract torchvision:FashionMNIST --limit 10000`` end to end into fresh
   cache folders, after one extraction that warms up (the dataset's files, the weights, the
   imports): with, without, without, with (``--resize``/``--crop``, default 32/28, keep it short:
   the features have the same size at any resolution, and the forward pass, which the checksum
   does not touch, is most of an extraction).

    python bench/checksums.py [--extract] [--repeats 3] [--resize 32 --crop 28]

Every time is printed with the load averages; the ratios compare runs made side by side.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

import featurecache
from featurecache import store
from featurecache.errors import FeatureCacheWarning

FASHION = "/usr/share/datasets/fashion-mnist"


def _load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _extract(cache_dir: Path, checksum: bool, args) -> tuple[float, str]:
    store.CHECKSUM = checksum
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FeatureCacheWarning)
        res = featurecache.extract("torchvision:FashionMNIST", root=FASHION, limit=10000, resize=args.resize,
                                   crop=args.crop, weights=args.weights, cache_dir=str(cache_dir), progress=False)
    return time.perf_counter() - start, res.cache


def _splits(cache: str) -> tuple[list[str], dict, dict]:
    meta = store.info(cache)
    splits = {}
    for name in meta["splits"]:
        X, y, paths = store.load_features(cache, name)
        splits[name] = {"features": X, "labels": y, "paths": paths, "skipped": store.load_skipped(cache, name)}
    return meta["classes"], meta["config"], splits


def _row(what: str, on: list[float], off: list[float]) -> str:
    a, b = statistics.median(on), statistics.median(off)
    return f"{what:<34} with {a:8.3f} s   without {b:8.3f} s   ratio {a / b:5.2f}   ({_load()})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extract", action="store_true", help="also time fc extract end to end, each setting")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resize", type=int, default=32)
    parser.add_argument("--crop", type=int, default=28)
    parser.add_argument("--weights", default="IMAGENET1K_V1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"start ({_load()})")
        os.environ[store.CACHE_ENV] = str(tmp / "staging")  # where the dataset's files are unpacked, once
        _, cache = _extract(tmp / "warm-up", True, args)
        if args.extract:
            times = {True: [], False: []}
            for i, checksum in enumerate((True, False, False, True)):
                times[checksum].append(_extract(tmp / f"extract-{i}", checksum, args)[0])
            print(_row("fc extract, end to end", times[True], times[False]))
        classes, config, splits = _splits(cache)
        rows = sum(len(s["labels"]) for s in splits.values())
        print(f"{rows} rows x {splits['train']['features'].shape[1]} features, "
              f"{sum(s['features'].nbytes for s in splits.values()) / 2**20:.0f} MB")
        files = {True: tmp / "w-on.h5", False: tmp / "w-off.h5"}
        write = {True: [], False: []}
        for _ in range(args.repeats):
            for checksum in (True, False):
                store.CHECKSUM = checksum
                write[checksum].append(_timed(lambda c=checksum: store.write_cache(files[c], classes, config, splits)))
        store.CHECKSUM = True
        print(_row("write the cache file", write[True], write[False]))
        read = {True: [], False: []}
        full = {True: [], False: []}
        for _ in range(args.repeats):
            for checksum in (True, False):
                read[checksum].append(_timed(lambda c=checksum: [store.read_rows(files[c], s) for s in splits]))
                full[checksum].append(_timed(lambda c=checksum: store.verify(files[c])))
        print(_row("read every feature (fit-head)", read[True], read[False]))
        print(_row("verify (extract's reuse check)", full[True], full[False]))
        fit = {True: [], False: []}
        for i in range(args.repeats):
            for checksum in (True, False):
                fit[checksum].append(_timed(lambda c=checksum, i=i: featurecache.fit_head(
                    str(files[c]), head=["logreg:C=1"], seed=i, cache_dir=str(tmp / f"fit-{c}"), progress=False)))
        print(_row("fc fit-head --head logreg:C=1", fit[True], fit[False]))
        assert store.verify(files[True])["checksums"] and not store.verify(files[False])["checksums"]
        print(f"file size with {files[True].stat().st_size:,} B, without {files[False].stat().st_size:,} B")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
