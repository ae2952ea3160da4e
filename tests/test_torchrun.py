"""Stage one under torchrun (gloo on the CPU): the ranks write the single-process cache, a
killed job loses nothing its ranks finished, and ranks that disagree, or a second job on
the same cache, fail in one line on every rank.

The runs under test stop themselves at a moment the test chooses (test_crash's STOPPING_FC);
the test waits for the shard files that mark that moment, never for a time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, make_split_folder
from test_crash import ARGS, STOPPING_FC, _fc, _finish, _kill, _shards, _temp_files, _wait_stopped

from featurecache import store

pytestmark = pytest.mark.slow  # each test starts torchrun and two ranks: several seconds

N_IMAGES = 48


@pytest.fixture
def dataset(tmp_path):
    return make_split_folder(tmp_path / "data", splits=(("train", 16), ("val", 8)))  # 48 images, 12 shards


@pytest.fixture
def single(dataset, tmp_path) -> dict:
    """What one process writes."""
    return _finish(_fc(dataset, tmp_path / "single"))[0]


def _torchrun(program: list[str], data, cache_dir, *extra, env: dict | None = None) -> subprocess.Popen:
    environ = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {}),
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *program, "extract",
         str(data), *ARGS, "--cache-dir", str(cache_dir), "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ,
    )


def _script(tmp_path: Path, name: str, code: str) -> list[str]:
    path = tmp_path / name
    path.write_text(code)
    return [str(path)]


def _assert_equal(cache: str, reference: str) -> None:
    """The same key, paths and labels; features within 1e-5."""
    assert Path(cache).name == Path(reference).name and store.info(cache)["key"] == store.info(reference)["key"]
    for split in ("train", "val"):
        (x, y, paths), (x2, y2, paths2) = (store.load_features(c, split) for c in (cache, reference))
        assert paths == paths2
        np.testing.assert_array_equal(y, y2)
        np.testing.assert_allclose(x, x2, rtol=0, atol=1e-5)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (torchrun starts each rank in a session of its own)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append(int(stat.parent.name))
    return found


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"torchrun ended (exit {proc.returncode}) first: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("the state waited for never came")
        time.sleep(0.05)


def test_two_ranks_write_the_single_process_cache(dataset, single, tmp_path):
    proc = _torchrun(["-m", "featurecache"], dataset, tmp_path / "ranks")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    result = json.loads(out)  # one object: the first rank speaks for the job
    assert result["reused"] is False and result["missing"] == 0
    _assert_equal(result["cache"], single["cache"])
    assert store.info(result["cache"])["config"]["processes"] == 2
    assert not list((tmp_path / "ranks").glob("*.partial"))


def test_sigkill_the_group_then_resume_with_one_process(dataset, single, tmp_path):
    cache_dir = tmp_path / "killed"
    # Rank 1 stops itself while it writes its second shard; rank 0 finishes its share and waits for it.
    stopping = _script(tmp_path, "stopping_fc.py", STOPPING_FC)
    job = _torchrun(stopping, dataset, cache_dir, env={"FC_TEST_STOP": "replace|shard-|2", "FC_TEST_STOP_RANK": "1"})

    def rank0_done_rank1_stopped() -> bool:
        partial = next(iter(cache_dir.glob("*.partial")), None)
        done = store.rows_done(partial, N_IMAGES) if partial else np.zeros(N_IMAGES, bool)
        return bool(done[:24].all() and done[24:].any() and _temp_files(cache_dir))

    _wait_for(rank0_done_rank1_stopped, job)
    for pid in _children(job.pid):
        os.kill(pid, signal.SIGKILL)
    _kill(job)
    before = _shards(cache_dir)
    assert not list(cache_dir.glob("*.h5")), "a killed job left a cache file"

    rerun = _fc(dataset, cache_dir, stop="rmtree|.partial|1")  # world size 1; paused before it removes the shards
    _wait_stopped(rerun)
    after = _shards(cache_dir)
    assert set(before) <= set(after), "what the ranks finished is kept"
    rows = np.concatenate([np.load(p)["indices"] for p in after])
    assert sorted(rows.tolist()) == list(range(N_IMAGES)), "the rerun computes only the missing images"
    assert not _temp_files(cache_dir)
    rerun.send_signal(signal.SIGCONT)
    result, _ = _finish(rerun)
    assert result["reused"] is False
    _assert_equal(result["cache"], single["cache"])


_RANK_1_CROPS_LESS = """
import os, sys
from featurecache.cli import main
if os.environ["RANK"] == "1":
    sys.argv += ["--crop", "48"]
main()
"""


def _errors(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("Error: ")]


def test_ranks_with_different_settings_fail_in_one_line_each(dataset, tmp_path):
    proc = _torchrun(_script(tmp_path, "differ.py", _RANK_1_CROPS_LESS), dataset, tmp_path / "c")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode != 0 and out == ""
    errors = _errors(err)
    assert len(errors) == 2 and errors[0] == errors[1], err
    assert errors[0].startswith("Error: the ranks were started with different settings (preprocess): rank 1 has "
                                "preprocess {"), errors[0]
    assert errors[0].endswith("; start every rank with the same options")
    assert not list((tmp_path / "c").glob("*.partial")), "nothing is computed"


def test_a_second_job_on_the_same_cache_fails_clearly(dataset, tmp_path):
    cache_dir = tmp_path / "c"
    first = _fc(dataset, cache_dir, stop="replace|shard-|1")  # paused while it holds the entry's lock
    _wait_stopped(first)
    try:
        proc = _torchrun(["-m", "featurecache"], dataset, cache_dir, "--lock-timeout", "0")
        out, err = proc.communicate(timeout=600)
    finally:
        _kill(first)
    errors = _errors(err)
    assert proc.returncode != 0 and out == "" and len(errors) == 2, err
    for line in errors:
        assert line.startswith(f"Error: another process (pid {first.pid}) is writing mobilenet_v2-data-"), err
