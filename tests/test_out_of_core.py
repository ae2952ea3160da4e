"""Features larger than max_memory: heads learn from row chunks of the file, the others from a sample,
and the sweep's peak memory stays under the cap plus what the interpreter needs on its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import featurecache
from featurecache import store

CAP = 32 << 20  # bytes of features the sweep may hold
GRID = ["linear:epochs=2;lr=0.01;pre=standardize", "sgd:max_iter=2;pre=standardize", "nearest-centroid:pre=l2",
        "logreg:C=1;max_iter=50;pre=standardize"]
_CHILD = """
import json, resource, sys
import featurecache
res = featurecache.fit_head(sys.argv[1], head=json.loads(sys.argv[2]), max_memory=sys.argv[3], jobs=1, budget=0,
                            halving=False)
print(json.dumps({"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "leaderboard": res.leaderboard}))
"""


def _cache(path: Path, n: int, d: int = 640) -> str:
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1, size=(10, d)).astype(np.float32)

    def split(rows, offset):
        y = (np.arange(rows) + offset) % 10
        X = np.maximum(centers[y] + rng.normal(0, 12.0, size=(rows, d)).astype(np.float32), 0)
        return {"features": X, "labels": y, "paths": [str(i) for i in range(rows)], "skipped": []}

    splits = {"train": split(n, 0), "val": split(2000, 3), "test": split(2000, 7)}
    return str(store.write_cache(path, [f"c{i}" for i in range(10)], {"rows": n}, splits))


def _sweep(cache: str) -> dict:
    package = str(Path(featurecache.__file__).parents[1])
    out = subprocess.run([sys.executable, "-c", _CHILD, cache, json.dumps(GRID), str(CAP)], check=True,
                         capture_output=True, text=True, env={"PYTHONPATH": package, "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout)


@pytest.mark.slow
def test_features_beyond_the_cap_are_read_in_chunks_under_the_cap(tmp_path):
    big = _cache(tmp_path / "big.h5", 50_000)  # 128 MB of train features: 3.8 times the cap
    assert store.info(big)["splits"]["train"]["n"] * 640 * 4 > 3.5 * CAP
    baseline = _sweep(_cache(tmp_path / "small.h5", 4_100))  # the interpreter, torch and the heads, measured alike
    large = _sweep(big)
    assert large["peak"] <= baseline["peak"] + CAP, (large["peak"] >> 20, baseline["peak"] >> 20)
    heads = {e["head"].partition(":")[0]: e for e in large["leaderboard"]}
    for name in ("linear", "sgd", "nearest-centroid"):  # learnt from every row, a chunk at a time
        assert heads[name]["status"] == "fitted" and heads[name]["rows"] == 50_000
        assert heads[name]["metrics"]["test"]["accuracy"] > 0.4  # chance: 0.1
    logreg = heads["logreg"]  # needs its rows in memory: the largest sample that fits
    assert logreg["status"] == "subsampled" and 1000 < logreg["rows"] < 50_000
    assert logreg["reason"].startswith("the features of train exceed max_memory")
