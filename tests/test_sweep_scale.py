"""Stage two on many rows: successive halving, the budget's stand-ins, a holdout, progress, a rerun after a kill.

The thresholds of :mod:`featurecache.scaling` are lowered so that scikit-learn's digits
(1,797 rows) count as many rows: what is tested is the behaviour, not the sizes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from conftest import run_cli
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.neighbors import NearestCentroid
from test_sweep import digits_cache

import featurecache
from featurecache import store
from featurecache.errors import UsageError
from featurecache.heads import register_head, to_torch
from featurecache.sweep import engine, runs
from featurecache.sweep import halving as scaling
from featurecache.sweep import stage as sweep
from featurecache.sweep.leaderboard import selection_note

GRID = ("logreg:C=0.01,1;pre=standardize", "knn:n_neighbors=3,25", "nearest-centroid", "ridge:alpha=10",
        "linear:lr=0.01;epochs=5;pre=standardize", "random-forest:n_estimators=10")
LARGE = (("train", 1200), ("val", 300), ("test", 297))


@pytest.fixture
def many_rows(monkeypatch):
    """Digits count as many rows: rungs from 100 rows on, above 400 training rows."""
    monkeypatch.setattr(scaling, "LARGE_ROWS", 400)
    monkeypatch.setattr(scaling, "FIRST_RUNG_ROWS", 100)


def _cache(tmp_path, sizes=LARGE, name="digits"):
    return digits_cache(tmp_path / "fc-cache", sizes=sizes, name=name)


# --------------------------------------------------------------------------- rungs and statuses


def test_rungs_grow_the_rows_and_keep_a_third_of_the_heads():
    assert scaling.rungs(3000, 22, halving=True, budget=240) == [scaling.Rung(0, 3000, 22)]
    assert [(r.rows, r.keep) for r in scaling.rungs(50000, 22, True, 240)] == [
        (1852, 22), (5556, 8), (16667, 3), (50000, 2)]
    assert [(r.rows, r.keep) for r in scaling.rungs(20000, 22, True, None)] == [(2222, 22), (6667, 8), (20000, 3)]
    assert [(r.rows, r.keep) for r in scaling.rungs(20000, 22, False, 240)] == [(1500, 22), (20000, 22)]
    assert scaling.rungs(20000, 22, False, None) == [scaling.Rung(0, 20000, 22)]
    assert scaling.rungs(20000, 2, True, 240) == [scaling.Rung(0, 1500, 2), scaling.Rung(1, 20000, 2)]


def test_a_stratified_order_gives_stratified_prefixes():
    labels = np.repeat(np.arange(4), [100, 200, 300, 400])
    order = scaling.stratified_order(labels, seed=0)
    assert sorted(order) == list(range(1000))
    for n in (10, 100, 500):
        counts = np.bincount(labels[order[:n]], minlength=4)
        assert np.abs(counts - n * np.array([0.1, 0.2, 0.3, 0.4])).max() <= 1


def test_halving_keeps_every_head_with_its_status_and_rows(tmp_path, many_rows):
    cache = _cache(tmp_path)
    res = featurecache.fit_head(cache, head=GRID, jobs=2, budget=0)
    board = res.leaderboard
    meta = runs.load_run(res.run_dir).meta
    assert meta["rungs"] == [{"rows": 133, "heads": 8}, {"rows": 400, "heads": 3}, {"rows": 1200, "heads": 2}]
    assert len(board) == 8 + 1 and not res.failed  # none silently dropped; the ensemble of the fitted heads
    by_status = {s: [e for e in board if e["status"] == s] for s in ("fitted", "pruned")}
    assert len(by_status["fitted"]) == 2 + 1 and len(by_status["pruned"]) == 6
    (ensemble,) = [e for e in board if e["head"] == "ensemble"]
    assert set(ensemble["params"]["members"]) <= {e["head"] for e in by_status["fitted"]}  # never a pruned head
    assert all(e["rows"] == 1200 and e["reason"] == "" for e in by_status["fitted"])
    assert sorted(e["rows"] for e in by_status["pruned"]) == [133] * 5 + [400]
    assert all(e["reason"].startswith("pruned after rung ") for e in by_status["pruned"])
    assert [e["status"] for e in board] == ["fitted"] * 3 + ["pruned"] * 6  # pruned heads rank last
    assert res.best == board[0]["head"] and board[0]["selection_accuracy"] > 0.9
    for entry in board:  # every head is saved and reproduces its numbers
        pipeline, head_meta = runs.load_head(res.run_dir, entry["head"])
        assert head_meta["status"] == entry["status"] and head_meta["rows"] == entry["rows"]
        X, y, _ = store.load_features(cache, "val")
        scored = (entry.get("ensemble") or {}).get("saved_weights_accuracy", {}).get("val", entry["selection_accuracy"])
        assert float((pipeline.predict(X) == y).mean()) == scored  # an ensemble's own score is cross-fitted


def test_a_holdout_selects_when_there_is_no_val_split(tmp_path, many_rows):
    cache = _cache(tmp_path, sizes=(("train", 1500), ("test", 297)))
    res = featurecache.fit_head(cache, head=("logreg:C=1;pre=standardize", "nearest-centroid"), jobs=1, budget=0)
    assert res.selection_split == "holdout" and res.final_split == "test"
    entry = res.leaderboard[0]
    assert list(entry["metrics"]) == ["holdout", "test", "train"]
    assert entry["metrics"]["holdout"]["n"] == 300 and entry["metrics"]["test"]["n"] == 297
    assert entry["rows"] == 1200  # the heads never learn from the holdout
    assert selection_note("holdout", "test") == ("heads selected on a stratified holdout of train (holdout); "
                                                 "test is held out: quote its scores")


def test_small_caches_are_swept_as_before(tmp_path):
    res = featurecache.fit_head(_cache(tmp_path, sizes=(("train", 300), ("val", 150))), head=("knn",), jobs=1)
    assert res.leaderboard[0]["status"] == "fitted" and res.leaderboard[0]["rows"] == 300
    assert runs.load_run(res.run_dir).meta["rungs"] == [{"rows": 300, "heads": 1}]


# --------------------------------------------------------------------------- the budget


def test_over_budget_heads_get_a_stand_in_or_a_sample(tmp_path, many_rows):
    grid = ("svm:C=10;pre=standardize", "knn:n_neighbors=3", "logreg:C=1;pre=standardize")
    cache = _cache(tmp_path, sizes=(("train", 600), ("val", 300), ("test", 297)))
    res = featurecache.fit_head(cache, head=grid, jobs=1, budget=1e-6, halving=False)
    heads = {e["head"].partition(":")[0]: e for e in res.leaderboard}
    stand_in = heads["rbf-map"]
    # timed on a few rows first, the RBF SVM became a kernel map; timed again, a smaller one
    assert stand_in["head"] == "rbf-map:C=100.0;n_components=100;pre=standardize" and stand_in["status"] == "fitted"
    assert stand_in["reason"].startswith("stand-in for svm:C=10;pre=standardize (estimated ")
    assert heads["knn"]["status"] == "subsampled" and heads["knn"]["rows"] < 600  # knn has no stand-in
    assert "fitted on a stratified sample of" in heads["knn"]["reason"]
    # the kernel-map stand-in becomes a layer with fixed weights, exactly
    pipeline, head_meta = runs.load_head(res.run_dir, stand_in["head"])
    assert head_meta["transferable"]
    X, _, _ = store.load_features(cache, "test")
    module = to_torch(pipeline, "rbf-map")
    with torch.no_grad():
        proba = torch.softmax(module(torch.from_numpy(X)).double(), dim=1).numpy()
    np.testing.assert_allclose(proba, pipeline.predict_proba(X), atol=1e-4)
    assert {name for name, _ in module.named_buffers()} == {"kernel.centers", "kernel.scale"}  # fixed weights


def test_budget_and_memory_values_are_checked(tmp_path):
    cache = _cache(tmp_path, sizes=(("train", 100), ("val", 50)))
    for options, message in (({"budget": -1}, "budget must be"), ({"max_memory": "lots"}, "max_memory must be"),
                             ({"backend": "spark"}, "unknown backend"), ({"backend": "dask"}, "--scheduler")):
        with pytest.raises(UsageError, match=message):
            featurecache.fit_head(cache, head=("knn",), **options)
    assert scaling.parse_size("1.5G") == 3 << 29 and scaling.parse_size("512M") == 512 << 20


# --------------------------------------------------------------------------- progress


class _Log:
    """A non-terminal stream that remembers its lines and says when one arrived."""

    def __init__(self):
        self.lines, self.arrived = [], threading.Event()

    def write(self, text):
        self.lines += [line for line in text.splitlines() if line.strip()]
        self.arrived.set()

    def flush(self):
        pass

    def isatty(self):
        return False


def test_progress_lines_for_a_log(tmp_path, many_rows, monkeypatch):
    log = _Log()
    monkeypatch.setattr(sys, "stderr", log)
    monkeypatch.setattr(sweep, "PROGRESS_EVERY", 0.0)
    featurecache.fit_head(_cache(tmp_path), head=GRID, jobs=1, budget=100, progress=True)
    assert log.lines[0].startswith("fit-head: 8 heads on 1,200 training rows x 64 features, selected on val; "
                                   "budget 100 s on 1 cores")
    assert log.lines[1] == "fit-head: rungs: 8 heads on 133 rows, 3 heads on 400 rows, 2 heads on 1,200 rows"
    counts = [line for line in log.lines if " fits (" in line]
    assert counts and all("elapsed, ETA " in line and "; now: " in line for line in counts)
    # 13 fits planned, and one more on each of the last two rungs for the forest that moves on as the trees' best
    assert any(line.startswith("fit-head: 15/15 fits (100%)") for line in counts)
    assert any("as the best of its family (trees)" in line for line in log.lines)
    assert any("estimated" in line and "on 1,200 rows" in line for line in log.lines)  # the plan from timed fits


class _Waiting(NearestCentroid):
    """Nearest centroid whose fit waits until a progress line arrives in ``LOG``."""

    def fit(self, X, y):
        assert LOG.arrived.wait(60), "no progress line while a fit ran"
        return super().fit(X, y)


LOG = _Log()


def _waiting():
    """Nearest centroid that waits for a progress line."""
    return _Waiting()


def test_a_line_every_interval_while_a_long_fit_runs(tmp_path, monkeypatch):
    """A head that does not finish until a progress line arrives: the line must come from the clock."""
    log = LOG
    register_head("waiting", _waiting, family="neighbors", trusted=[f"{__name__}._Waiting"])
    try:
        monkeypatch.setattr(sys, "stderr", log)
        monkeypatch.setattr(sweep, "PROGRESS_EVERY", 0.5)
        featurecache.fit_head(_cache(tmp_path, sizes=(("train", 100), ("val", 50))), head=("waiting",), jobs=1,
                              progress=True)
    finally:
        from featurecache.heads import HEADS

        HEADS.pop("waiting")
    assert log.lines[0].startswith("fit-head: 0/1 fits (0%)") and log.lines[0].endswith("now: waiting (100 rows)")


def test_cli_json_still_reports_progress_on_stderr(tmp_path, cli_runner, monkeypatch):
    monkeypatch.setattr(sweep, "PROGRESS_EVERY", 0.0)
    out = run_cli(cli_runner, "fit-head", _cache(tmp_path, sizes=(("train", 100), ("val", 50))), "--head", "knn",
                  "--jobs", 1, "--json")
    assert out.exit_code == 0 and json.loads(out.stdout)["leaderboard"][0]["status"] == "fitted"
    assert "fit-head: 1/1 fits (100%)" in out.stderr


# --------------------------------------------------------------------------- a rerun after a kill

_KILLED_SWEEP = """
import sys
import featurecache
featurecache.fit_head(sys.argv[1], head=sys.argv[2:], jobs=1, seed=0)
"""
SLOW = tuple(f"mlp:hidden=64;epochs=60;dropout={d};pre=standardize" for d in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5))


@pytest.mark.slow  # a child process with torch, killed midway
def test_a_killed_sweep_reuses_its_finished_fits(tmp_path, monkeypatch):
    cache = _cache(tmp_path, sizes=(("train", 300), ("val", 150)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(featurecache.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", _KILLED_SWEEP, cache, *SLOW], env=env)
    runs_dir = Path(cache).parent / "runs"
    try:
        deadline = time.monotonic() + 120
        while not any(p.name.endswith(".partial") and len([f for f in p.iterdir() if not f.name.startswith(".")]) >= 2
                      for p in (runs_dir.iterdir() if runs_dir.is_dir() else [])):
            assert child.poll() is None, "the sweep ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    [partial] = [p for p in runs_dir.iterdir() if p.name.endswith(".partial")]
    finished = len([f for f in partial.iterdir() if (f / "fit.json").is_file()])
    assert 2 <= finished < len(SLOW) and not any((p / "run.json").exists() for p in runs_dir.iterdir())
    fitted = []
    real = engine.FITTERS["single"]

    def counting(configs, *args):
        fitted.extend(c.spec for c in configs)
        return real(configs, *args)

    monkeypatch.setitem(engine.FITTERS, "single", counting)
    resumed = featurecache.fit_head(cache, head=SLOW, jobs=1, seed=0)
    assert len(fitted) == len(SLOW) - finished and not partial.exists()
    fresh = featurecache.fit_head(_cache(tmp_path / "fresh", sizes=(("train", 300), ("val", 150))), head=SLOW, jobs=1)
    strip = lambda board: [{k: v for k, v in e.items() if k != "fit_seconds"} for e in board]  # noqa: E731
    assert strip(resumed.leaderboard) == strip(fresh.leaderboard)


@pytest.mark.slow
def test_stage_three_starts_from_the_kernel_map_stand_in(tmp_path):
    from conftest import FAST, make_split_folder

    root = make_split_folder(tmp_path / "images", splits=(("train", 12), ("val", 6)))
    cache = featurecache.extract(str(root), cache_dir=str(tmp_path / "c"), **FAST).cache
    run = featurecache.fit_head(cache, head=("rbf-map:n_components=10;pre=standardize",), jobs=1)
    tuned = featurecache.finetune(run.run_dir, epochs=1, batch_size=4, workers=0, progress=False)
    assert tuned.head.startswith("rbf-map:") and tuned.start_accuracy == tuned.head_accuracy  # an exact start
    assert len(featurecache.predict(tuned.model, [str(root / "val")], workers=0, progress=False)["predictions"]) == 12


def test_calibration_on_a_holdout_and_seeds_only_on_few_rows(tmp_path, many_rows):
    cache = _cache(tmp_path, sizes=(("train", 1500), ("test", 297)))
    res = featurecache.fit_head(cache, head=("logreg:C=1;pre=standardize", "nearest-centroid"), jobs=1, budget=0,
                                calibrate="temperature")
    assert res.selection_split == "holdout"
    assert all(e["calibration"]["temperature"] > 0 for e in res.leaderboard)
    with pytest.raises(UsageError, match="seeds > 1 refits every head on all training rows"):
        featurecache.fit_head(cache, head=("knn",), seeds=3)


# --------------------------------------------------------------------------- late bloomers


class _Curve(ClassifierMixin, BaseEstimator):
    """A planted learning curve: on a cache whose first feature is the label and whose second is a
    uniform key, right on the rows whose key is below ``1 - error * (rows / 133) ** -slope`` (at most
    ``plateau``), where ``rows`` is how many it learnt from; wrong (the next class) on the others."""

    _parameter_constraints: ClassVar[dict] = {"error": [float], "slope": [float], "plateau": [float]}

    def __init__(self, error=0.2, slope=0.0, plateau=1.0):
        self.error, self.slope, self.plateau = error, slope, plateau

    def fit(self, X, y):
        self.classes_, self.rows_ = np.unique(y), len(X)
        return self

    def predict_proba(self, X):
        accuracy = min(self.plateau, 1.0 - self.error * (self.rows_ / 133) ** -self.slope)
        label = X[:, 0].astype(int)
        guess = np.where(X[:, 1] < accuracy, label, (label + 1) % len(self.classes_))
        proba = np.full((len(X), len(self.classes_)), 0.1 / (len(self.classes_) - 1))
        proba[np.arange(len(X)), guess] = 0.9
        return proba


def _curve(*, error=0.2, slope=0.0, plateau=1.0):
    """A planted learning curve."""
    return _Curve(error=error, slope=slope, plateau=plateau)


def _curve_cache(tmp_path) -> str:
    """1,200 train, 300 val and 300 test rows of (label, key, noise, noise); val's keys evenly spaced, so that
    a planted accuracy is what the sweep measures."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 1200), ("val", 300), ("test", 300)):
        y = np.arange(n) % 10
        X = np.column_stack([y, (rng.permutation(n) + 0.5) / n, rng.normal(size=(n, 2))]).astype(np.float32)
        splits[split] = {"features": X, "labels": y, "paths": [f"{split}/{i}" for i in range(n)], "skipped": []}
    config = {"backbone": "planted", "weights": {"weights": "none"}, "feature_dim": 4, "data": {"root": "planted"}}
    return str(store.write_cache(tmp_path / "planted.h5", [str(c) for c in range(10)], config, splits))


@pytest.fixture
def curve_head():
    register_head("curve", _curve, family="linear", trusted=[f"{__name__}._Curve"])
    register_head("curve-net", _curve, family="mlp", learning_curve=0.3, trusted=[f"{__name__}._Curve"])
    yield
    from featurecache.heads import HEADS

    HEADS.pop("curve")
    HEADS.pop("curve-net")


def test_halving_keeps_the_late_bloomer_that_wins_on_all_rows(tmp_path, many_rows, curve_head):
    """Rungs of 133, 400 and 1,200 rows. The bloomer is third of seven on 133 rows (0.74) and third of three on
    400 (0.785, below 0.804 and 0.795), where the last rung has room for two; its error falls fastest, and on all
    rows it is the best head (0.822 against 0.809). Ranked on the last rung's scores it would be pruned."""
    bloomer = "curve:error=0.26;slope=0.173"
    grid = ("curve:error=0.2;slope=0.02", "curve:error=0.21;slope=0.02", bloomer,
            "curve:error=0.3,0.32,0.34,0.36;slope=0.02")
    result = featurecache.fit_head(_curve_cache(tmp_path), head=grid, jobs=1, budget=None)
    board = {e["head"]: e for e in result.leaderboard}
    assert [r["rows"] for r in json.loads((Path(result.run_dir) / "run.json").read_text())["rungs"]] == [133, 400, 1200]
    assert board[bloomer]["status"] == "fitted" and board[bloomer]["rows"] == 1200
    assert result.best == bloomer and board[bloomer]["selection_accuracy"] == pytest.approx(0.8233, abs=1e-3)
    second = board["curve:error=0.21;slope=0.02"]  # the heads ahead of it on 400 rows: one of them makes room
    assert second["status"] == "pruned" and second["rows"] == 400
    assert re.search(r"\(400 rows\): val 0\.7933, predicted 0\.79\d\d on 1,200 rows", second["reason"])


def test_half_of_the_heads_moving_on_are_the_rung_leaders():
    """Neighbours' prior (error ~ rows^-0.2) predicts them above the linear heads on 100 times the rows; half the
    places still go to the heads that lead the rung."""
    from featurecache.heads import parse_grid

    configs = [*parse_grid("logreg:C=1,2,3"), *parse_grid("knn:n_neighbors=1,2,3")]
    states = [scaling.HeadState(cfg, cfg, curve=[(1000, accuracy)])
              for cfg, accuracy in zip(configs, (0.90, 0.89, 0.88, 0.87, 0.86, 0.85))]
    moving, pruned, predictions = scaling.survivors(states, 4, 100000)
    assert predictions[id(states[3])].accuracy > predictions[id(states[0])].accuracy
    assert {s.form.spec for s in moving} == {"logreg:C=1", "logreg:C=2", "knn:n_neighbors=1", "knn:n_neighbors=2"}
    assert [s.form.spec for s in pruned] == ["knn:n_neighbors=3", "logreg:C=3"]


def test_the_budget_keeps_a_late_blooming_family_to_the_end(tmp_path, many_rows, curve_head):
    """Six linear heads climb fast to a plateau of 0.80 by 400 rows; their two rungs predict them above 0.84 on
    1,200, so the curves rank them first. The network family's one head is below them on every rung up to 400
    rows (0.70, 0.77), and it is the best head on all rows (0.83). Without a budget it is pruned; with a budget
    that has room, it moves on as its family's best and is selected."""
    bloomer = "curve-net:error=0.3;slope=0.25"
    grid = ("curve:error=0.28,0.285,0.29,0.295,0.3,0.305;slope=0.4;plateau=0.8", bloomer)
    cache = _curve_cache(tmp_path)
    pruned = {e["head"]: e for e in featurecache.fit_head(cache, head=grid, jobs=1, budget=None).leaderboard}
    assert pruned[bloomer]["status"] == "pruned" and pruned[bloomer]["rows"] == 400
    assert pruned[bloomer]["reason"].endswith("ranked 3 of 3 by the prediction; 2 moved on")
    result = featurecache.fit_head(cache, head=grid, jobs=1, budget=600)
    board = {e["head"]: e for e in result.leaderboard}
    assert board[bloomer]["status"] == "fitted" and board[bloomer]["rows"] == 1200
    assert "as the best of its family (mlp)" in board[bloomer]["reason"]
    assert result.best == bloomer and board[bloomer]["selection_accuracy"] == pytest.approx(0.8267, abs=2e-3)
    assert sum(e["status"] == "fitted" for e in board.values()) == 3  # the two of the plan, and the bloomer
    rungs = json.loads((Path(result.run_dir) / "run.json").read_text())["rungs"]
    assert [(r["rows"], r["heads"]) for r in rungs] == [(133, 7), (400, 3), (1200, 3)]  # as fitted


def _state(spec: str, timed: tuple[int, float], requested: str | None = None):
    from featurecache.heads import parse_grid

    form = parse_grid(spec)[0]
    return scaling.HeadState(parse_grid(requested)[0] if requested else form, form, cost=timed)


def test_the_final_rung_shares_the_budget_by_lanes_and_gives_back_passes():
    """At the final rung the heads are known: the torch lane gets all of what is left, the cheap heads beside it
    leave their time to the costly one, and a stand-in cut early (29 of 50 epochs) gets back what the lane pays for."""
    mlp = _state("mlp:epochs=29", (16667, 38.0), requested="mlp:epochs=50")
    mlp.reason = "stand-in for mlp:epochs=50 (estimated 131 s on 50,000 rows, share of the budget 82 s); moved on"
    svm, ridge = _state("linear-svm:C=0.0001", (16667, 11.0)), _state("ridge", (16667, 2.0))
    shares = scaling.lane_shares(160.0, 2, [mlp, svm, ridge], 50000)
    wall = 160.0 * scaling.USABLE_SHARE
    assert shares[id(mlp)] == pytest.approx(wall) and shares[id(svm)] == pytest.approx(wall)
    scaling.fit_final(mlp, 50000, shares[id(mlp)], {"mlp:epochs=29"})
    # 50 epochs would take 114 / 0.58 = 197 s; the lane pays for 136 s: 34 epochs
    assert mlp.form.spec == "mlp:epochs=34" and mlp.reason.startswith("stand-in for mlp:epochs=50 (estimated 197 s")
    assert mlp.estimate(50000) == pytest.approx(114.0 * 34 / 29, rel=1e-3)
    scaling.fit_final(mlp, 50000, 1000.0, {"mlp:epochs=34"})  # room for all of it: the requested head itself
    assert mlp.form.spec == "mlp:epochs=50" and mlp.reason == "moved on"  # what else the reason said stays
    # a stand-in that is not only a scaled number (trees on a row sample each) keeps its form
    forest = _state("random-forest:n_estimators=100;max_samples=0.4", (1000, 5.0),
                    requested="random-forest:n_estimators=300")
    scaling.fit_final(forest, 1000, 1000.0, set())
    assert forest.form.spec == "random-forest:max_samples=0.4;n_estimators=100"
    # on one core the torch lane and the others share it
    shares = scaling.lane_shares(100.0, 1, [_state("mlp", (1000, 500.0)), _state("ridge", (1000, 5.0))], 1000)
    assert sorted(shares.values()) == pytest.approx([0.0, 85.0])


def test_a_family_moves_on_only_while_the_budget_has_room():
    from featurecache.heads import parse_grid

    configs = [*parse_grid("logreg:C=1,2"), *parse_grid("mlp:hidden=64,128")]
    states = [scaling.HeadState(cfg, cfg, curve=[(1000, a)], cost=(1000, 10.0))
              for cfg, a in zip(configs, (0.9, 0.89, 0.85, 0.8))]
    moving, pruned, _ = scaling.survivors(states, 1, 10000)
    assert [s.form.spec for s in moving] == ["logreg:C=1"]
    # the best mlp moves on when its 100 s beside logreg's 100 s fit in what is left; one head a family
    extra = scaling.promote(moving, pruned, 150.0, [10000], cores=2)
    assert [s.form.spec for s in extra] == ["mlp:hidden=64"]
    assert scaling.promote(moving, pruned, 100.0, [10000], cores=2) == []  # 100 s: no room
    assert scaling.promote(moving, pruned, None, [10000], cores=2) == []  # no budget
