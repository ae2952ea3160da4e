"""``--shard I/N``: slices computed by separate processes (Slurm arrays, Kubernetes indexed jobs)
add up to the cache a single process writes; the last slice to finish, or a later plain
run, writes it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, make_split_folder, run_cli

import featurecache
from featurecache import store
from featurecache.errors import CacheLockedError, UsageError
from featurecache.extraction import distributed
from featurecache.extraction import stage as extractor


@pytest.fixture
def data(tmp_path):
    return make_split_folder(tmp_path / "data", splits=(("train", 5), ("val", 3)))  # 16 images


def _same(a: str, b: str) -> None:
    assert store.info(a)["key"] == store.info(b)["key"]
    for split in ("train", "val"):
        (x, y, p), (x2, y2, p2) = featurecache.load_features(a, split), featurecache.load_features(b, split)
        assert p == p2 and list(y) == list(y2)
        np.testing.assert_allclose(x, x2, rtol=0, atol=1e-5)


def _computed(monkeypatch) -> list[int]:
    """Record how many images each run of the model computes."""
    counts: list[int] = []
    work = extractor._work

    def counting(job, writer, pending, already):
        counts.append(len(pending))
        return work(job, writer, pending, already)

    monkeypatch.setattr(extractor, "_work", counting)
    return counts


def test_the_last_slice_writes_the_cache_of_a_single_run(data, tmp_path, monkeypatch):
    single = featurecache.extract(str(data), cache_dir=str(tmp_path / "single"), **FAST)
    counts = _computed(monkeypatch)
    options = {**FAST, "cache_dir": str(tmp_path / "sliced")}
    first = featurecache.extract(str(data), shard="0/3", **options)
    assert first.missing == 11 and not Path(first.cache).exists() and first.splits == {}
    assert Path(first.cache).name == Path(single.cache).name  # the same key: how many processes is not part of it
    names = sorted(p.name for p in (tmp_path / "sliced").glob("*.partial/shard-*.npz"))
    assert names and all(n.startswith("shard-000000000000-000000000004-") for n in names)  # rows 0 to 4
    assert featurecache.extract(str(data), shard="2/3", **options).missing == 5
    last = featurecache.extract(str(data), shard="1/3", **options)
    assert last.missing == 0 and not last.reused and last.cache == first.cache
    assert counts == [5, 6, 5]
    _same(last.cache, single.cache)
    assert not list((tmp_path / "sliced").glob("*.partial")), "the shards are removed once the cache is written"
    assert featurecache.extract(str(data), shard="0/3", **options).reused


def test_a_plain_run_finishes_what_the_slices_left(data, tmp_path, monkeypatch):
    counts = _computed(monkeypatch)
    options = {**FAST, "cache_dir": str(tmp_path / "c")}
    featurecache.extract(str(data), shard="1/4", **options)
    res = featurecache.extract(str(data), **options)
    assert counts == [4, 12] and res.missing == 0 and store.is_complete(res.cache)
    _same(res.cache, featurecache.extract(str(data), cache_dir=str(tmp_path / "single"), **FAST).cache)


def test_slices_share_the_entry_and_a_plain_run_excludes_them(data, tmp_path):
    options = {**FAST, "cache_dir": str(tmp_path / "c")}
    entry = store.Entry(Path(featurecache.extract(str(data), shard="0/2", **options).cache))
    with store.locked(entry, shared=True):  # another slice is running
        other = featurecache.extract(str(data), shard="1/2", lock_timeout=0, **options)
        assert other.missing == 0 and not entry.path.exists(), "the slice still running writes the cache, not this one"
        with pytest.raises(CacheLockedError, match=r"^another process \(pid \d+\) is writing "):
            featurecache.extract(str(data), lock_timeout=0, **options)
    with store.locked(entry):  # a plain run is writing it
        with pytest.raises(CacheLockedError):
            featurecache.extract(str(data), shard="1/2", lock_timeout=0, **options)
    assert featurecache.extract(str(data), **options).missing == 0 and store.is_complete(entry.path)


@pytest.mark.parametrize("spec", ["2/2", "-1/2", "1", "a/b", "0/0", "1/2/3"])
def test_a_bad_shard_is_one_line(cli_runner, data, tmp_path, spec):
    out = run_cli(cli_runner, "extract", data, "--weights", "none", "--shard", spec, "--cache-dir", tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.exit_code == 2 and len(lines) == 1, out.stderr
    assert lines[0] == f"Error: --shard must be I/N with 0 <= I < N (e.g. 0/4), not {spec!r}"


def test_the_cli_says_what_a_slice_left(cli_runner, data, tmp_path):
    args = ["extract", data, "--weights", "none", "--resize", 48, "--crop", 40, "--workers", 0, "--cache-dir", tmp_path]
    out = run_cli(cli_runner, *args, "--shard", "0/2")
    assert out.exit_code == 0, out.output
    assert out.stdout.startswith("slice 0/2 done (")
    assert "; 8 images of other slices to go: the last slice" in out.stdout
    done = run_cli(cli_runner, *args, "--shard", "1/2", "--json")
    assert done.exit_code == 0 and '"missing": 0' in done.stdout and '"n": 10' in done.stdout


def test_who_does_which_rows(monkeypatch):
    assert distributed.Group("shard", 1, 3).rows(10).tolist() == [3, 4, 5]
    assert [distributed.Group("shard", i, 3).rows(10).size for i in range(3)] == [3, 3, 4]
    assert distributed.Group("torchrun", 1, 2).share(np.array([3, 5, 8, 9, 11])).tolist() == [8, 9, 11]
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    group = distributed.Group.from_environment()
    assert (group.mode, group.rank, group.world, group.local_rank, group.local_world) == ("torchrun", 2, 4, 0, 2)
    assert group.prefix == "[rank 2/4] " and not distributed.is_primary()
    with pytest.raises(UsageError, match=r"^--shard is for launches without torchrun"):
        distributed.Group.from_environment("0/2")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.Group.from_environment("1/3").prefix == "[shard 1/3] "
    assert distributed.Group.from_environment().prefix == ""


def test_sigterm_becomes_an_exit_that_runs_the_cleanup():
    """torchrun stops the other ranks with SIGTERM: the exit runs ``finally`` steps (the last shard)."""
    before = signal.getsignal(signal.SIGTERM)
    flushed = []
    with pytest.raises(SystemExit) as stop, distributed.sigterm_exits():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            pytest.fail("SIGTERM did not stop the block")
        finally:
            flushed.append(True)
    assert stop.value.code == 128 + signal.SIGTERM and flushed == [True]
    assert signal.getsignal(signal.SIGTERM) == before
