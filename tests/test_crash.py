"""Crash safety: SIGKILL at any moment, then a rerun, gives exactly the uninterrupted result.

The runs under test stop themselves (SIGSTOP) at a moment the test chooses: just before
the Nth rename or removal of a file whose name contains a given text. The test waits
for that state, then kills, continues or races the run, so nothing here depends on how
fast the machine is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import make_split_folder

from featurecache import store
from featurecache.files import is_temp_name

ARGS = ["--weights", "none", "--resize", "64", "--crop", "56", "--batch-size", "4", "--workers", "0",
        "--checkpoint-every", "4"]

# `fc extract ...` that stops itself before the Nth os.replace (or shutil.rmtree) of a path whose
# name contains a text: FC_TEST_STOP="replace|shard-|3" stops just before the third shard is renamed.
# Under torchrun, FC_TEST_STOP_RANK names the only rank that stops.
STOPPING_FC = """
import os, shutil, signal
what, text, nth = os.environ["FC_TEST_STOP"].split("|")
here = os.environ.get("RANK", "0") == os.environ.get("FC_TEST_STOP_RANK", os.environ.get("RANK", "0"))
seen = []
def stopping(function, target_arg):
    def call(*args, **kwargs):
        if here and text in os.path.basename(os.fspath(args[target_arg])):
            seen.append(args[target_arg])
            if len(seen) == int(nth):
                os.kill(os.getpid(), signal.SIGSTOP)
        return function(*args, **kwargs)
    return call
if what == "replace":
    os.replace = stopping(os.replace, 1)
else:
    shutil.rmtree = stopping(shutil.rmtree, 0)
from featurecache.cli import main
main()
"""


def _fc(data, cache_dir, *extra, stop: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    program = ["-m", "featurecache"]
    if stop:
        env["FC_TEST_STOP"] = stop
        program = ["-c", STOPPING_FC]
    return subprocess.Popen(
        [sys.executable, *program, "extract", str(data), *ARGS, "--cache-dir", str(cache_dir), "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def _wait_stopped(proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until ``proc`` has stopped itself; fail if it ended instead (or neither happens in ``timeout``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
        if pid and os.WIFSTOPPED(status):
            return
        if pid:  # it ended, and is reaped: tell Popen
            proc.returncode = os.waitstatus_to_exitcode(status)
            raise AssertionError(f"the run ended (exit {proc.returncode}) before its stop point: {proc.stderr.read()}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("the run neither stopped nor ended")


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


def _finish(proc: subprocess.Popen) -> tuple[dict, str]:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return json.loads(out), err


def _shards(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*.partial/shard-*.npz"))


def _temp_files(cache_dir: Path) -> list[Path]:
    return [p for p in cache_dir.rglob("*") if is_temp_name(p)]


def _read(path):
    with h5py.File(path, "r") as f:
        return {s: (f[s]["features"][...], f[s]["labels"][...], list(f[s]["paths"].asstr()[...]))
                for s in ("train", "val")}


def _assert_same(a, b):
    for split in ("train", "val"):
        assert a[split][2] == b[split][2]  # every image exactly once, in order
        np.testing.assert_array_equal(a[split][1], b[split][1])
        np.testing.assert_allclose(a[split][0], b[split][0], rtol=1e-4, atol=1e-5)


@pytest.fixture
def dataset(tmp_path):
    return make_split_folder(tmp_path / "data", splits=(("train", 16), ("val", 8)))  # 48 images, 12 shards


@pytest.fixture
def reference(dataset, tmp_path):
    result, _ = _finish(_fc(dataset, tmp_path / "ref"))
    return _read(result["cache"])


@pytest.mark.slow
def test_sigkill_then_rerun_resumes(dataset, reference, tmp_path):
    cache_dir = tmp_path / "killed"
    killed = _fc(dataset, cache_dir, stop="replace|shard-|4")  # three shards written, the fourth being written
    _wait_stopped(killed)
    _kill(killed)
    before = _shards(cache_dir)
    assert len(before) == 3 and _temp_files(cache_dir)
    assert not list(cache_dir.glob("*.h5")), "an incomplete run left a cache file"
    assert store.list_caches(cache_dir)[0]["complete"] is False

    rerun = _fc(dataset, cache_dir, stop="rmtree|.partial|1")  # pause it before it removes the shards
    _wait_stopped(rerun)
    after = _shards(cache_dir)
    assert set(before) <= set(after), "the rerun keeps the finished shards"
    rows = np.concatenate([np.load(p)["indices"] for p in after])
    assert sorted(rows.tolist()) == list(range(48)), "the rerun computes only the missing images"
    assert not _temp_files(cache_dir), "the rerun removes what the killed run was writing"
    rerun.send_signal(signal.SIGCONT)
    result, _ = _finish(rerun)
    assert result["reused"] is False
    _assert_same(_read(result["cache"]), reference)
    assert not list(cache_dir.glob("*.partial")), "shards are cleaned up once the cache is complete"


# Each run is killed at one of these moments, in this order, carrying on where the one before stopped.
MOMENTS = [
    "replace|manifest.json|1",  # start-up: the entry is locked, nothing is written yet
    "replace|shard-|2",  # mid-extraction: one shard written, the next being written
    "replace|shard-|3",  # the next run: two more
    "replace|.h5|1",  # finalizing: every shard there, the cache file written but not renamed into place
    "rmtree|.partial|1",  # the cache complete, its shards not removed yet
]


@pytest.mark.slow
def test_sigkill_at_many_moments(dataset, reference, tmp_path):
    cache_dir = tmp_path / "many"
    for moment in MOMENTS:
        proc = _fc(dataset, cache_dir, stop=moment)
        _wait_stopped(proc)
        _kill(proc)
        for path in cache_dir.glob("*.h5"):
            assert store.is_complete(path), f"killed at {moment}: a file under the final name is always complete"
    result, _ = _finish(_fc(dataset, cache_dir))
    assert result["reused"] is True
    _assert_same(_read(result["cache"]), reference)
    assert not list(cache_dir.glob("*.partial")) and not _temp_files(cache_dir), "what the kills left is removed"


def _stderr_until(proc: subprocess.Popen, text: str) -> str:
    """``proc``'s stderr up to the first line holding ``text``, or all of it when it ends without one."""
    watchdog = threading.Timer(300, proc.kill)  # a run that neither says it nor ends fails the test, not hangs it
    watchdog.start()
    seen = ""
    try:
        for line in proc.stderr:
            seen += line
            if text in line:
                break
    finally:
        watchdog.cancel()
    return seen


def test_two_concurrent_runs_one_waits(dataset, tmp_path):
    cache_dir = tmp_path / "conc"
    first = _fc(dataset, cache_dir, stop="replace|shard-|1")  # paused while it holds the entry's lock
    _wait_stopped(first)
    second = _fc(dataset, cache_dir)
    said = _stderr_until(second, "waiting for another extraction")
    assert "waiting for another extraction" in said and f"(pid {first.pid})" in said, said
    first.send_signal(signal.SIGCONT)
    (result1, _), (result2, _) = _finish(first), _finish(second)
    assert result1["cache"] == result2["cache"]
    assert (result1["reused"], result2["reused"]) == (False, True)
    assert store.is_complete(result1["cache"])


def test_concurrent_run_with_no_wait_fails_clearly(dataset, tmp_path):
    cache_dir = tmp_path / "nowait"
    first = _fc(dataset, cache_dir, stop="replace|shard-|1")  # paused while it holds the entry's lock
    _wait_stopped(first)
    second = _fc(dataset, cache_dir, "--lock-timeout", "0")
    _, err = second.communicate(timeout=300)
    _kill(first)
    assert second.returncode == 3  # CacheLockedError is a CacheError
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: another process (pid {first.pid}) is writing "), err
