"""Temperature scaling: fitted on the selection split, recorded with the head, shown before and after."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.model_selection import StratifiedKFold
from test_sweep import digits_cache

import featurecache
from featurecache import store
from featurecache.heads import HeadConfig, make_estimator
from featurecache.metrics import calibration_metrics, class_probabilities
from featurecache.sweep.calibration import apply_temperature, fit_temperature
from featurecache.sweep.leaderboard import leaderboard_table
from featurecache.sweep.runs import load_head


def _overconfident(n=20000, classes=5, true_temperature=2.0, seed=0):
    """Logits z, labels drawn from softmax(z / T): softmax(z) is over-confident by exactly T."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 3, size=(n, classes))
    p = softmax(z / true_temperature, axis=1)
    y = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return softmax(z, axis=1), y


def test_the_fitted_temperature_is_the_one_that_made_the_labels():
    proba, y = _overconfident()
    temperature = fit_temperature(proba, y)
    assert temperature == pytest.approx(2.0, rel=0.05)
    before, after = calibration_metrics(y, proba), calibration_metrics(y, apply_temperature(proba, temperature))
    assert after["ece"] < 0.02 < 0.1 < before["ece"] and after["log_loss"] < before["log_loss"]


def test_a_temperature_keeps_the_ranking_of_classes_and_softens_the_logits():
    proba, _ = _overconfident(n=50)
    assert np.array_equal(apply_temperature(proba, 1.0), proba)
    tempered = apply_temperature(proba, 3.0)
    np.testing.assert_allclose(tempered.sum(axis=1), 1.0)
    assert np.array_equal(tempered.argmax(axis=1), proba.argmax(axis=1))
    np.testing.assert_allclose(tempered, softmax(np.log(proba) / 3.0, axis=1), rtol=1e-9)


def test_calibrated_probabilities_are_left_alone():
    proba, y = _overconfident(true_temperature=1.0)
    assert fit_temperature(proba, y) == pytest.approx(1.0, abs=0.05)


def test_fit_head_calibrates_every_head_on_val_and_records_it(tmp_path):
    cache = digits_cache(tmp_path / "fc-cache")
    res = featurecache.fit_head(cache, head=("logreg:C=0.01;pre=standardize", "knn:n_neighbors=3"), jobs=1,
                                calibrate="temperature", ensemble=False)
    X_val, y_val = store.load_features(cache, "val")[:2]
    assert [e["head"] for e in res.leaderboard] != ["ensemble"]
    for entry in res.leaderboard:
        cal = entry["calibration"]
        pipeline, head_meta = load_head(res.run_dir, entry["head"])
        assert head_meta["calibration"] == json.loads(json.dumps(cal))  # head.json carries it
        assert cal["fitted_on"] == "val"
        assert cal["temperature"] == pytest.approx(fit_temperature(pipeline.predict_proba(X_val), y_val), rel=1e-6)
        assert set(cal["metrics"]) == {"val", "test", "train"}
        assert cal["metrics"]["val"]["log_loss"] <= entry["metrics"]["val"]["log_loss"]
    logreg = next(e for e in res.leaderboard if e["head"].startswith("logreg"))
    assert logreg["calibration"]["temperature"] < 0.9  # strong regularization: timid probabilities, sharpened
    rows, columns = leaderboard_table(res.leaderboard, "test")
    assert {"test ece", "test ece calibrated", "T"} <= set(columns)
    row = next(r for r in rows if r["head"] == logreg["head"])
    assert row["test ece calibrated"] == f"{logreg['calibration']['metrics']['test']['ece']:.4f}"
    default = featurecache.fit_head(cache, head=("logreg:C=0.01;pre=standardize", "knn:n_neighbors=3"), jobs=1,
                                    ensemble=False)
    assert default.reused and default.run_dir == res.run_dir  # calibration is the default
    plain = featurecache.fit_head(cache, head=("logreg:C=0.01;pre=standardize", "knn:n_neighbors=3"), jobs=1,
                                  calibrate="none", ensemble=False)
    assert plain.run_dir != res.run_dir and "calibration" not in plain.leaderboard[0]


def test_with_cross_validation_the_temperature_is_fitted_out_of_fold(tmp_path):
    cache = digits_cache(tmp_path / "fc-cache", sizes=(("train", 200), ("test", 100)))
    res = featurecache.fit_head(cache, head="logreg:C=0.01;pre=standardize", jobs=1, cv=3, calibrate="temperature")
    cal = res.leaderboard[0]["calibration"]
    assert cal["fitted_on"] == "cv" and set(cal["metrics"]) == {"cv", "test", "train"}
    X, y = store.load_features(cache, "train")[:2]
    oof = np.zeros((len(y), 10))
    for fit_rows, rows in StratifiedKFold(3, shuffle=True, random_state=0).split(X, y):
        head = make_estimator(HeadConfig.parse("logreg:C=0.01;pre=standardize")).fit(X[fit_rows], y[fit_rows])
        oof[rows] = class_probabilities(head, X[rows], 10)
    assert cal["temperature"] == pytest.approx(fit_temperature(oof, y), rel=1e-6)


def test_with_calibration_tied_heads_are_ordered_by_their_calibrated_log_loss():
    """Two heads right on the same 180 of 200 images. The mlp is overconfident (a higher raw log-loss)
    but more confident where it is right, which a temperature turns into the lower log-loss: the
    calibrated run ranks it first, the uncalibrated one the logreg."""
    from featurecache.metrics import classification_metrics
    from featurecache.sweep.leaderboard import make_entry, rank
    from featurecache.sweep.postpass import post_options, post_pass

    y = np.arange(200) % 2
    right = np.arange(200) >= 20

    def probabilities(p_right: float, p_wrong: float) -> np.ndarray:
        top = np.where(right, p_right, p_wrong)
        predicted = np.where(right, y, 1 - y)
        proba = np.empty((200, 2))
        proba[np.arange(200), predicted] = top
        proba[np.arange(200), 1 - predicted] = 1 - top
        return proba

    probas = {"mlp": {"val": probabilities(0.9999, 0.99)}, "logreg": {"val": probabilities(0.8, 0.8)}}

    def board(options: dict) -> list[str]:
        entries = [make_entry(HeadConfig.parse(h), {"val": classification_metrics(y, probas[h]["val"])}, "val", 0.0)
                   for h in probas]
        entries = rank(entries, probas, {"val": y})
        return [e["head"] for e in post_pass(entries, probas, {"train": (None, y), "val": (None, y)}, options)]

    assert board(post_options()) == ["logreg", "mlp"]
    assert board(post_options(calibrate="temperature")) == ["mlp", "logreg"]
