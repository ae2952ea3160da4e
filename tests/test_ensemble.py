"""The ensemble of a sweep's tied heads: chosen greedily, scored on data that did not choose it, ranked first
unless significantly worse than the most accurate head, and saved, loaded, predicted with, fine-tuned and
exported like a head."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_finetune import WITH_TEST, folder_probabilities, tiny_run
from test_sweep import digits_cache

import featurecache
from featurecache import store
from featurecache.errors import RunError
from featurecache.heads import to_torch
from featurecache.heads.mixture import WeightedMixture, mix
from featurecache.sweep.ensemble import cross_fitted, greedy_weights
from featurecache.sweep.leaderboard import rank
from featurecache.sweep.runs import load_head, load_run

# heads of several families, quick on 64 digit features
HEADS = ("logreg:C=0.01,1;pre=standardize", "knn:n_neighbors=5,25;pre=l2", "random-forest:n_estimators=50")


def _onehot(labels, n_classes, sharpness):
    p = np.full((len(labels), n_classes), (1 - sharpness) / (n_classes - 1))
    p[np.arange(len(labels)), labels] = sharpness
    return p


def test_greedy_selection_weights_the_better_heads_up():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    good = _onehot(y, 3, 0.8)
    wrong = _onehot((y + 1) % 3, 3, 0.8)  # confidently wrong everywhere
    noisy = _onehot(np.where(rng.random(300) < 0.6, y, rng.integers(0, 3, 300)), 3, 0.6)
    weights = greedy_weights([wrong, noisy, good], y, rounds=20, init=1)
    assert weights.sum() == pytest.approx(1.0)
    assert weights[2] == weights.max() and weights[0] == 0
    # with replacement: the best head gets several votes, the start is the head of lowest log-loss
    assert weights[2] >= 0.5


def test_cross_fitted_probabilities_never_come_from_weights_that_saw_the_row():
    """Heads that are pure noise: weights chosen on the rows they score look better than chance, the
    cross-fitted score does not, over many draws."""
    in_sample, honest = [], []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 5, 400)
        heads = [rng.dirichlet(np.full(5, 0.3), 400) for _ in range(30)]
        in_sample.append((mix(heads, greedy_weights(heads, y)).argmax(1) == y).mean())
        honest.append((cross_fitted(heads, y, seed).argmax(1) == y).mean())
    # chance is 0.2; the mean of 20 draws of 400 rows has a standard error of 0.0045
    assert np.mean(in_sample) > 0.22
    assert abs(np.mean(honest) - 0.2) < 0.015


@pytest.fixture
def random_label_cache(tmp_path) -> str:
    rng = np.random.default_rng(1)
    sizes = (("train", 500), ("val", 400), ("test", 400))
    labels = {split: rng.integers(0, 10, n) for split, n in sizes}
    return digits_cache(tmp_path / "fc-cache", sizes=sizes, labels=labels, name="random")


def test_on_random_labels_the_ensembles_score_stays_near_chance(random_label_cache):
    run = featurecache.fit_head(random_label_cache, head=HEADS, jobs=1)
    (entry,) = [e for e in run.leaderboard if e["head"] == "ensemble"]
    # 400 val rows, 10 classes: chance is 0.10, and 0.16 is four standard errors above it
    assert entry["selection_accuracy"] < 0.16
    assert entry["metrics"]["test"]["accuracy"] < 0.16
    assert "ensemble" not in entry["params"]["members"]


def test_a_tied_ensemble_ranks_first_and_one_significantly_worse_after_the_tied_heads():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 600)

    def entries_and_probas(ensemble_hits: float):
        probas, entries = {}, []
        for name, hits, loss in (("logreg:C=1", 0.80, 1.0), ("knn", 0.78, 0.5), ("ensemble", ensemble_hits, 0.9)):
            right = np.zeros(600, dtype=bool)
            right[rng.permutation(600)[:round(hits * 600)]] = True  # exactly this accuracy
            p = _onehot(np.where(right, y, (y + 1) % 4), 4, 0.7)
            probas[name] = {"val": p}
            accuracy = float((p.argmax(1) == y).mean())
            entries.append({"head": name, "selection_split": "val", "selection_accuracy": accuracy,
                            "metrics": {"val": {"accuracy": accuracy, "log_loss": loss}}})
        return entries, probas

    ranked = rank(*entries_and_probas(0.97), {"val": y})  # better than every head
    assert ranked[0]["head"] == "ensemble" and not ranked[1]["tied"]
    ranked = rank(*entries_and_probas(0.80), {"val": y})  # tied
    assert [e["head"] for e in ranked] == ["ensemble", "logreg:C=1", "knn"]  # then by accuracy, not log-loss
    assert ranked[2]["tied"]
    ranked = rank(*entries_and_probas(0.60), {"val": y})  # significantly worse
    assert [e["head"] for e in ranked] == ["logreg:C=1", "knn", "ensemble"] and not ranked[2]["tied"]


def test_no_ensemble_leaves_the_run_as_before_and_has_its_own_address(tmp_path):
    cache = digits_cache(tmp_path / "fc-cache")
    without = featurecache.fit_head(cache, head=HEADS, jobs=1, ensemble=False)
    with_it = featurecache.fit_head(cache, head=HEADS, jobs=1)
    assert without.run_dir != with_it.run_dir
    assert "ensemble" not in [e["head"] for e in without.leaderboard]
    assert "ensemble" in [e["head"] for e in with_it.leaderboard]
    singles = [e for e in with_it.leaderboard if e["head"] != "ensemble"]
    # the single heads and their scores do not change
    assert {e["head"]: e["metrics"]["test"] for e in without.leaderboard} == \
        {e["head"]: e["metrics"]["test"] for e in singles}


def test_a_saved_ensemble_predicts_what_the_sweep_scored(tmp_path):
    cache = digits_cache(tmp_path / "fc-cache")
    run = featurecache.fit_head(cache, head=HEADS, jobs=1, calibrate="temperature")
    (entry,) = [e for e in run.leaderboard if e["head"] == "ensemble"]
    mixture, head_meta = load_head(run.run_dir, "ensemble")
    assert isinstance(mixture, WeightedMixture)
    assert [m["head"] for m in head_meta["members"]] == list(entry["params"]["members"])
    assert sum(m["weight"] for m in head_meta["members"]) == pytest.approx(1.0)
    X, y = store.read_rows(cache, "test"), store.load_labels(cache, "test")
    accuracy = float((mixture.predict_proba(X).argmax(1) == y).mean())
    assert accuracy == entry["metrics"]["test"]["accuracy"]
    assert head_meta["transferable"] is False  # knn and a random forest are members: no torch form
    # the run's files record the ensemble's head.json; a changed weight is refused
    path = Path(run.run_dir) / "heads" / "ensemble" / "head.json"
    meta = json.loads(path.read_text())
    meta["members"][0]["weight"] += 0.1
    path.write_text(json.dumps(meta))
    with pytest.raises(RunError, match="sha256 mismatch"):
        load_head(run.run_dir, "ensemble")


@pytest.mark.slow
def test_a_transferable_ensemble_predicts_fine_tunes_and_exports(tmp_path_factory, real_weights):
    base = tmp_path_factory.mktemp("ensemble")
    heads = ["logreg:C=0.1,10;pre=standardize", "linear-svm:pre=standardize", "mlp:pre=l2"]
    run_dir, cache = tiny_run(base, 3, heads, real_weights, WITH_TEST)
    loaded = load_run(run_dir)
    assert "ensemble" in loaded.meta["heads"]
    mixture, head_meta = load_head(run_dir, "ensemble")
    assert head_meta["transferable"] is True
    X = store.read_rows(cache, "test")
    with torch.no_grad():
        network = torch.softmax(to_torch(mixture)(torch.from_numpy(X)), dim=1).numpy()
    assert np.abs(network - mixture.predict_proba(X)).max() < 1e-4

    classes = ["class0", "class1", "class2"]
    root = Path(store.info(cache)["config"]["data"]["root"])
    predicted = featurecache.predict(run_dir, [str(root / "test")], head="ensemble", topk=3, workers=0, progress=False)
    _, proba = folder_probabilities(predicted["predictions"], classes)
    order = {p: i for i, p in enumerate(featurecache.load_features(cache, "test")[2])}
    rows = [order[Path(p["path"]).relative_to(root).as_posix()] for p in predicted["predictions"]]
    assert np.abs(proba - mixture.predict_proba(X[rows])).max() < 1e-4

    result = featurecache.finetune(run_dir, head="ensemble", epochs=1, batch_size=4, workers=0, progress=False)
    assert result.head == "ensemble"
    assert result.start_accuracy == result.head_accuracy  # step 0 is the ensemble itself
    tuned = featurecache.predict(result.output_dir, [str(root / "test")], topk=3, workers=0, progress=False)
    labels, proba = folder_probabilities(tuned["predictions"], classes)
    assert proba.shape == (12, 3) and np.allclose(proba.sum(1), 1, atol=1e-5)
    assert result.metrics["finetuned"]["test"]["accuracy"] == float((proba.argmax(1) == labels).mean())


def test_the_audit_of_a_run_refits_a_single_head_even_when_the_ensemble_ranks_first(tmp_path, monkeypatch):
    from featurecache.sweep import leaderboard

    cache = digits_cache(tmp_path / "fc-cache")
    # the ensemble ranks first whatever the scores: as if no single head were tied with it
    monkeypatch.setattr(leaderboard, "selection_key", lambda e: (e["head"] != "ensemble", e["head"]))
    run = featurecache.fit_head(cache, head=("logreg:C=0.5,1;pre=standardize",), jobs=1)  # tied
    assert run.best == "ensemble" and load_head(run.run_dir, "ensemble")[1]["transferable"]
    result = featurecache.audit(cache, run=run.run_dir)
    assert result.report["head"] in {"logreg:C=0.5;pre=standardize", "logreg:C=1;pre=standardize"}
