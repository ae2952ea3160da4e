"""Crash safety: SIGKILL at any moment, then a rerun, gives exactly the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import make_split_folder

from featurecache import store

ARGS = ["--weights", "none", "--resize", "64", "--crop", "56", "--batch-size", "4", "--workers", "0",
        "--checkpoint-every", "4"]


def _fc(data, cache_dir, *extra) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "-m", "featurecache", "extract", str(data), *ARGS, "--cache-dir", str(cache_dir), "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _shards(cache_dir: Path) -> int:
    return sum(1 for _ in cache_dir.glob("*.partial/shard-*.npz"))


def _read(path):
    with h5py.File(path, "r") as f:
        return {s: (f[s]["features"][...], f[s]["labels"][...], list(f[s]["paths"].asstr()[...])) for s in ("train", "val")}


def _assert_same(a, b):
    for split in ("train", "val"):
        assert a[split][2] == b[split][2]  # every image exactly once, in order
        np.testing.assert_array_equal(a[split][1], b[split][1])
        np.testing.assert_allclose(a[split][0], b[split][0], rtol=1e-4, atol=1e-5)


@pytest.fixture
def dataset(tmp_path):
    return make_split_folder(tmp_path / "data", splits=(("train", 16), ("val", 8)))


@pytest.fixture
def reference(dataset, tmp_path):
    proc = _fc(dataset, tmp_path / "ref")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return _read(json.loads(out)["cache"])


def test_sigkill_then_rerun_resumes(dataset, reference, tmp_path):
    cache_dir = tmp_path / "killed"
    proc = _fc(dataset, cache_dir)
    deadline = time.time() + 120
    while _shards(cache_dir) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "extraction finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = _shards(cache_dir)
    assert done_before >= 3
    assert not list(cache_dir.glob("*.h5")), "an incomplete run left a cache file"
    assert store.list_caches(cache_dir)[0]["complete"] is False

    rerun = _fc(dataset, cache_dir)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    result = json.loads(out)
    assert result["reused"] is False
    _assert_same(_read(result["cache"]), reference)
    assert not list(cache_dir.glob("*.partial")), "shards are cleaned up once the cache is complete"


def test_sigkill_at_many_moments(dataset, reference, tmp_path):
    """Kill repeatedly at growing delays (startup, mid-batch, while finalizing) until a run completes."""
    cache_dir = tmp_path / "many"
    for delay in (0.3, 1.0, 1.6, 2.2, 2.8, 3.4, 4.0, 5.0, 6.0, 8.0):
        proc = _fc(dataset, cache_dir)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        for path in cache_dir.glob("*.h5"):
            assert store.is_complete(path), "a file under the final name is always complete"
    final = _fc(dataset, cache_dir)
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    _assert_same(_read(json.loads(out)["cache"]), reference)


def test_two_concurrent_runs_one_waits(dataset, tmp_path):
    cache_dir = tmp_path / "conc"
    slow = ["--resize", "320", "--crop", "320"]  # the first holds the lock while the second starts
    first, second = _fc(dataset, cache_dir, *slow), _fc(dataset, cache_dir, *slow)
    (out1, err1), (out2, err2) = first.communicate(timeout=300), second.communicate(timeout=300)
    assert first.returncode == 0 and second.returncode == 0, (err1, err2)
    results = [json.loads(out1), json.loads(out2)]
    assert results[0]["cache"] == results[1]["cache"]
    assert sorted(r["reused"] for r in results) == [False, True]
    assert "waiting for another extraction" in err1 + err2
    assert store.is_complete(results[0]["cache"])


def test_concurrent_run_with_no_wait_fails_clearly(tmp_path):
    dataset = make_split_folder(tmp_path / "bigger", splits=(("train", 120), ("val", 8)))
    cache_dir = tmp_path / "nowait"
    slow = ["--resize", "320", "--crop", "320"]  # long enough for the second process to start meanwhile
    first = _fc(dataset, cache_dir, *slow)
    deadline = time.time() + 120
    while _shards(cache_dir) < 1 and time.time() < deadline:
        time.sleep(0.02)
    second = _fc(dataset, cache_dir, *slow, "--lock-timeout", "0")
    _, err = second.communicate(timeout=120)
    still_running = first.poll() is None
    first.kill()
    first.communicate()
    assert still_running, "the first run ended before the second asked for the lock"
    assert second.returncode != 0
    assert err.strip().splitlines()[-1].startswith("Error: another process (pid ")
    assert "Traceback" not in err
