"""The Dask engine: the same leaderboard as the local one, with the features scattered once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import run_cli
from test_sweep import digits_cache

import featurecache
from featurecache.sweep import engine

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.slow  # a cluster of two worker processes

GRID = ("logreg:C=0.1,1;pre=standardize", "knn:n_neighbors=3", "nearest-centroid",
        "linear:lr=0.01;weight_decay=0,0.001;epochs=10;pre=standardize",
        "mlp:hidden=32;dropout=0.2;epochs=10;pre=standardize")


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes of one thread each, on the loopback interface only."""
    package, before = str(Path(featurecache.__file__).parents[1]), os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (package, before) if p)  # the workers import this copy
    try:
        with distributed.LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                                      dashboard_address=None) as local:
            yield local
    finally:
        os.environ.pop("PYTHONPATH") if before is None else os.environ.update(PYTHONPATH=before)


def _decisions(board):
    return [(e["head"], e["status"], e["rows"], {s: m["accuracy"] for s, m in e["metrics"].items()}) for e in board]


def test_dask_gives_the_local_leaderboard(tmp_path, cluster, monkeypatch):
    scattered = []
    real = distributed.Client.scatter

    def spy(self, data, *args, **kwargs):
        scattered.append(type(data[0]).__name__ if isinstance(data, list) else type(data).__name__)
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(distributed.Client, "scatter", spy)
    local = featurecache.fit_head(digits_cache(tmp_path / "local"), head=GRID, jobs=2)
    remote = featurecache.fit_head(digits_cache(tmp_path / "dask"), head=GRID, backend="dask",
                                   scheduler=cluster.scheduler_address)
    assert Path(local.run_dir).name == Path(remote.run_dir).name  # the engine is not part of the inputs
    assert _decisions(remote.leaderboard) == _decisions(local.leaderboard)
    assert [e["metrics"] for e in remote.leaderboard] == [e["metrics"] for e in local.leaderboard]
    assert scattered == ["SweepData"]  # the features went to the workers once, not with every task


def test_the_scheduler_comes_from_the_environment_and_a_bad_one_is_one_line(tmp_path, cluster, cli_runner,
                                                                           monkeypatch):
    cache = digits_cache(tmp_path / "env")
    monkeypatch.setenv(engine.SCHEDULER_ENV, cluster.scheduler_address)
    out = run_cli(cli_runner, "fit-head", cache, "--head", "knn", "--backend", "dask")
    assert out.exit_code == 0, out.output
    monkeypatch.setenv(engine.SCHEDULER_ENV, "tcp://127.0.0.1:9")
    monkeypatch.setattr(engine, "CONNECT_TIMEOUT", 2)
    out = run_cli(cli_runner, "fit-head", cache, "--head", "nearest-centroid", "--backend", "dask")
    assert out.exit_code == 2 and out.stderr.startswith("Error: cannot reach the Dask scheduler at tcp://127.0.0.1:9")
