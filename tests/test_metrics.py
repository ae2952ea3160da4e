"""Uncertainty: intervals on every accuracy, ECE and Brier, ties with the most accurate head, --seeds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli
from test_sweep import digits_cache

import featurecache
from featurecache import store
from featurecache.errors import UsageError
from featurecache.heads import HeadConfig, make_estimator
from featurecache.metrics import classification_metrics, paired_difference, proportion_interval, resampled_counts
from featurecache.sweep.leaderboard import calibrated, make_entry, rank, selection_note, tied_count


@pytest.fixture
def cache(tmp_path) -> str:
    return digits_cache(tmp_path / "fc-cache")


# --------------------------------------------------------------------------- numbers


def test_counting_resampled_images_by_category_is_the_bootstrap():
    """Multinomial category counts have the mean and covariance of counting an index-matrix resample."""
    categories = np.repeat([0, 1, 2], [70, 20, 10])
    index = np.random.default_rng(1).integers(0, len(categories), size=(20000, len(categories)))
    by_index = np.stack([np.bincount(row, minlength=3) for row in categories[index]])
    drawn = resampled_counts(np.bincount(categories), n_resamples=20000)
    np.testing.assert_allclose(drawn.mean(axis=0), by_index.mean(axis=0), atol=0.15)
    np.testing.assert_allclose(np.cov(drawn.T), np.cov(by_index.T), atol=0.6)


def test_intervals_are_fixed_and_hold_the_score():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 200)
    proba = rng.dirichlet(np.ones(6), 200)
    proba[np.arange(150), y[:150]] += 2
    proba /= proba.sum(axis=1, keepdims=True)
    first, again = classification_metrics(y, proba), classification_metrics(y, proba)
    for key in ("accuracy", "balanced_accuracy", "top5_accuracy"):
        low, high = first[f"{key}_ci"]
        assert low < first[key] < high and first[f"{key}_ci"] == again[f"{key}_ci"]
    # the textbook width of a 95% interval for a proportion: about 4 standard errors
    p = first["accuracy"]
    assert np.diff(first["accuracy_ci"])[0] == pytest.approx(3.92 * np.sqrt(p * (1 - p) / 200), rel=0.15)
    assert proportion_interval(np.ones(10, dtype=bool)) == [1.0, 1.0]


def test_ece_brier_and_reliability_on_a_hand_example():
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    y = np.array([0, 1, 1, 0])  # right, wrong, right, wrong
    m = classification_metrics(y, proba, ["a", "b"])
    assert m["ece"] == pytest.approx((0.1 + 0.8 + 0.3 + 0.6) / 4)
    assert m["brier"] == pytest.approx((0.02 + 1.28 + 0.18 + 0.72) / 4)
    bins = m["reliability"]
    assert bins["bins"] == 15 and sum(bins["count"]) == 4
    assert [bins["accuracy"][i] for i in (9, 10, 12, 13)] == [0.0, 1.0, 0.0, 1.0]
    assert bins["confidence"][0] is None


def test_paired_difference_sees_through_shared_images():
    a = np.ones(150, dtype=bool)
    same = paired_difference(a, a)
    assert same == {"difference": 0.0, "ci": [0.0, 0.0]}
    one_behind = a.copy()
    one_behind[0] = False
    assert paired_difference(a, one_behind)["ci"][0] <= 0  # one image of 150: not a real difference
    worse = a.copy()
    worse[:30] = False
    gap = paired_difference(a, worse)
    assert gap["difference"] == pytest.approx(0.2) and gap["ci"][0] > 0.1


# --------------------------------------------------------------------------- ranking


def _entries(probas: dict, y: np.ndarray) -> list[dict]:
    return [make_entry(HeadConfig.parse(spec), {"val": classification_metrics(y, p)}, "val", 0.0)
            for spec, p in probas.items()]


def test_among_tied_heads_the_more_accurate_then_the_lower_log_loss_ranks_first():
    y = np.tile([0, 1], 75)
    sure, hedged, poor = np.eye(2)[y] * 0.9998 + 0.0001, np.eye(2)[y] * 0.8 + 0.1, np.eye(2)[y] * 0.6 + 0.2
    most = sure.copy()
    most[:3] = most[:3, ::-1]  # 147 of 150, wrong with confidence: the highest log-loss
    sure[:4] = sure[:4, ::-1]  # 146 of 150, wrong with confidence
    hedged[:4] = hedged[:4, ::-1]  # 146 of 150, wrong without much confidence: a lower log-loss
    poor[:40] = poor[:40, ::-1]  # 110 of 150
    probas = {"knn:n_neighbors=5": {"val": sure}, "logreg:C=1": {"val": hedged}, "nearest-centroid": {"val": poor},
              "linear-svm": {"val": most}}
    board = rank(_entries({k: v["val"] for k, v in probas.items()}, y), probas, {"val": y})
    # the rule bench/selection.py chose on held-out images: accuracy first, log-loss among equals
    assert [e["head"] for e in board] == ["linear-svm", "logreg:C=1", "knn:n_neighbors=5", "nearest-centroid"]
    assert [e["tied"] for e in board] == [True, True, True, False]
    assert board[0]["gap"] == {"to": "linear-svm", "difference": 0.0, "ci": [0.0, 0.0]}
    assert board[1]["gap"]["difference"] == pytest.approx(1 / 150) and board[3]["gap"]["ci"][0] > 0
    assert tied_count(board) == 2
    note = selection_note("val", "val", None, board)
    assert "2 other heads are tied with the most accurate one, linear-svm, on val" in note


def test_fit_head_marks_ties_and_keeps_the_run_deterministic(cache, cli_runner):
    res = featurecache.fit_head(cache, head=("logreg:C=0.01,1;pre=standardize", "knn:n_neighbors=3",
                                             "nearest-centroid"), jobs=1)
    board = res.leaderboard
    tied = [e for e in board if e["tied"]]
    assert board[:len(tied)] == tied and tied[0]["head"] == res.best
    singles = [e for e in tied if e["head"] != "ensemble"]  # a tied ensemble comes before the tied single heads
    assert tied[-len(singles):] == singles and tied[0]["head"] == "ensemble"
    keys = [(-e["selection_accuracy"], calibrated(e, "val")["log_loss"]) for e in singles]
    assert keys == sorted(keys)  # by accuracy, then log-loss
    assert all(e["gap"]["ci"][0] > 0 for e in board[len(tied):])
    for entry in board:
        for split in ("val", "test", "train"):
            m = entry["metrics"][split]
            assert m["accuracy_ci"][0] <= m["accuracy"] <= m["accuracy_ci"][1] and 0 <= m["ece"] <= 1
    saved = json.loads((Path(res.run_dir) / "leaderboard.json").read_text())
    assert saved == json.loads(json.dumps(board))
    out = run_cli(cli_runner, "fit-head", cache, "--head", "knn:n_neighbors=3", "--head", "nearest-centroid")
    assert out.exit_code == 0 and "tied with the most accurate one" in out.output and " [0." in out.output


# --------------------------------------------------------------------------- --seeds


def test_seeds_refit_the_heads_that_depend_on_a_seed(cache):
    heads = ("logreg:C=1;pre=standardize", "random-forest:n_estimators=10", "knn:n_neighbors=3")
    plain = featurecache.fit_head(cache, head=heads, jobs=1)
    res = featurecache.fit_head(cache, head=heads, jobs=1, seeds=3)
    assert res.run_dir != plain.run_dir  # seeds change the run
    by_head = {e["head"]: e["seeds"] for e in res.leaderboard if e["head"] != "ensemble"}
    forest = by_head["random-forest:n_estimators=10"]
    assert forest["stochastic"] and forest["seeds"] == [0, 1, 2]
    X, y = store.load_features(cache, "train")[:2]
    X_val, y_val = store.load_features(cache, "val")[:2]
    fit = make_estimator(HeadConfig.parse("random-forest:n_estimators=10"), random_state=1).fit(X, y)
    assert forest["accuracy"]["val"]["values"][1] == (fit.predict(X_val) == y_val).mean()
    assert forest["accuracy"]["val"]["mean"] == pytest.approx(np.mean(forest["accuracy"]["val"]["values"]))
    assert by_head["logreg:C=1;pre=standardize"] == {"seeds": [0], "stochastic": False, "accuracy": {}}  # L-BFGS
    assert not by_head["knn:n_neighbors=3"]["stochastic"]  # takes no seed at all
    assert [e["head"] for e in res.leaderboard] == [e["head"] for e in plain.leaderboard]


def test_seeds_with_cross_validation_use_the_sweeps_folds(tmp_path):
    cache = digits_cache(tmp_path, sizes=(("train", 200), ("test", 100)))
    res = featurecache.fit_head(cache, head="random-forest:n_estimators=5", jobs=1, cv=3, seeds=2)
    seeds = res.leaderboard[0]["seeds"]
    assert seeds["stochastic"] and set(seeds["accuracy"]) == {"cv", "test", "train"}


@pytest.mark.parametrize("options, message", [({"seeds": 0}, "seeds must be a positive integer"),
                                              ({"calibrate": "platt"}, "unknown calibration 'platt'")])
def test_bad_post_pass_options_fail_before_any_fit(cache, options, message, cli_runner):
    with pytest.raises(UsageError, match=message):
        featurecache.fit_head(cache, head="nearest-centroid", **options)
    for flag in (["--seeds", "0"], ["--calibrate", "platt"]):
        out = run_cli(cli_runner, "fit-head", cache, "--head", "nearest-centroid", *flag)
        assert out.exit_code == 2 and out.stderr.startswith("Error: ")
