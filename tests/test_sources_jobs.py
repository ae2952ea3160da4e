"""WebDataset shards under torchrun, in ``--shard I/N`` slices and after a SIGKILL: each gives the
cache of one uninterrupted process, whose features are those of the same images in a folder."""

from __future__ import annotations

import signal

import numpy as np
import pytest
from conftest import make_split_folder
from formats import assert_same_images, write_shards
from test_crash import _fc, _finish, _kill, _shards, _wait_stopped
from test_torchrun import _assert_equal, _torchrun

from featurecache import store

pytestmark = pytest.mark.slow  # subprocesses, and torchrun with two ranks


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """48 images in a folder, and as 7 shards of 7 samples at most."""
    root = tmp_path_factory.mktemp("jobs")
    folder = make_split_folder(root / "folder", splits=(("train", 16), ("val", 8)))
    return folder, f"webdataset:{write_shards(folder, root / 'wds', per_shard=7)}"


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> str:
    """What one process writes from the shards; it has the folder's features."""
    folder, shards = data
    root = tmp_path_factory.mktemp("single")
    reference = _finish(_fc(folder, root / "folder"))[0]["cache"]
    cache = _finish(_fc(shards, root / "shards"))[0]["cache"]
    assert_same_images(cache, reference)
    return cache


def test_two_torchrun_ranks_write_the_single_process_cache(data, single, tmp_path):
    proc = _torchrun(["-m", "featurecache"], data[1], tmp_path / "ranks")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    import json

    result = json.loads(out)
    _assert_equal(result["cache"], single)
    assert store.info(result["cache"])["config"]["processes"] == 2


def test_slices_add_up_to_the_single_process_cache(data, single, tmp_path):
    first = _finish(_fc(data[1], tmp_path / "sliced", "--shard", "0/2"))[0]
    assert first["missing"] == 24
    last = _finish(_fc(data[1], tmp_path / "sliced", "--shard", "1/2"))[0]
    assert last["missing"] == 0
    _assert_equal(last["cache"], single)


def test_sigkill_then_rerun_resumes(data, single, tmp_path):
    cache_dir = tmp_path / "killed"
    killed = _fc(data[1], cache_dir, stop="replace|shard-|4")  # three shards written, the fourth being written
    _wait_stopped(killed)
    _kill(killed)
    before = _shards(cache_dir)
    assert len(before) == 3
    rerun = _fc(data[1], cache_dir, stop="rmtree|.partial|1")
    _wait_stopped(rerun)
    rows = np.concatenate([np.load(p)["indices"] for p in _shards(cache_dir)])
    assert sorted(rows.tolist()) == list(range(48)), "the rerun computes only the missing rows"
    rerun.send_signal(signal.SIGCONT)
    result, _ = _finish(rerun)
    _assert_equal(result["cache"], single)


