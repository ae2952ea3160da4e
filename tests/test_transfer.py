"""Stage three starts from stage two's answer: the selected entry when it can become a layer, else its
transferable form when that is tied with it, else the best entry that can; and it says which and how far."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_sweep import digits_cache

import featurecache
from featurecache import store
from featurecache.heads import HEADS, make_estimator, parse_grid, to_torch
from featurecache.sweep.runs import best_transferable, load_head, start_note


@pytest.mark.parametrize("pre", ["none", "l2", "standardize"])
def test_the_nearest_class_prototype_is_a_layer(pre):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    pipeline = make_estimator(parse_grid(f"nearest-centroid:pre={pre}")[0]).fit(X, y)
    with torch.no_grad():
        network = torch.softmax(to_torch(pipeline, "nearest-centroid")(torch.from_numpy(X)), dim=1).numpy()
    assert (network.argmax(1) == pipeline.predict(X)).all()
    assert np.abs(network - pipeline.predict_proba(X)).max() < 1e-4


def test_heads_that_cannot_become_a_layer_name_a_form_that_can():
    for name in ("svm", "knn"):
        form = HEADS[name].transfer(parse_grid(f"{name}:pre=l2")[0])
        assert HEADS[form.name].transferable and form.pre == "l2"
    assert HEADS["svm"].transfer(parse_grid("svm:C=10")[0]).spec == "rbf-map:C=100.0;n_components=2000"


def _entry(head, accuracy, tied=True, **more):
    return {"head": head, "selection_split": "val", "selection_accuracy": accuracy, "tied": tied, **more}


def test_stage_three_starts_from_the_selected_entry_its_tied_form_or_the_best_that_can():
    form = {"head": "svm:C=10", "difference": 0.004, "ci": [-0.01, 0.02], "tied": True}
    board = [_entry("svm:C=10", 0.90), _entry("logreg:C=1", 0.89),
             _entry("rbf-map:C=100.0;n_components=2000", 0.896, transfer_of=form)]
    assert best_transferable(board) == "rbf-map:C=100.0;n_components=2000"
    assert "its transferable form rbf-map" in start_note(board, best_transferable(board))
    board[2]["transfer_of"] = {**form, "ci": [0.01, 0.03], "tied": False}
    assert best_transferable(board) == "logreg:C=1"
    assert start_note(board, "logreg:C=1") == (
        "the selected entry svm:C=10 cannot become a layer of the network: fine-tuning starts from the best entry "
        "that can, logreg:C=1 (+1.00 points below it on val)")
    board.insert(0, _entry("ensemble", 0.91, transferable=True))
    assert best_transferable(board) == "ensemble" and start_note(board, "ensemble") is None


def test_a_selected_knn_gets_its_prototypes_fitted_beside_it(tmp_path):
    cache = digits_cache(tmp_path / "fc-cache")
    run = featurecache.fit_head(cache, head=("knn:n_neighbors=3;pre=l2", "logreg:C=0.0001;pre=standardize"), jobs=1)
    assert run.best == "knn:n_neighbors=3;pre=l2"
    (form,) = [e for e in run.leaderboard if "transfer_of" in e]
    assert form["head"] == "nearest-centroid:pre=l2" and form["transfer_of"]["head"] == run.best
    assert "transferable form of knn:n_neighbors=3;pre=l2" in form["reason"]
    # its score is its own: the prototypes, refitted, predict what the run recorded
    pipeline, _ = load_head(run.run_dir, form["head"])
    X, y = store.read_rows(cache, "test"), store.load_labels(cache, "test")
    assert float((pipeline.predict(X) == y).mean()) == form["metrics"]["test"]["accuracy"]
    layers = [e["head"] for e in run.leaderboard
              if e.get("transferable") or HEADS.get(e["head"].partition(":")[0], HEADS["knn"]).transferable]
    assert best_transferable(run.leaderboard) == (form["head"] if form["transfer_of"]["tied"] else layers[0])
    # a head that can become a layer, selected, gets no form fitted beside it
    plain = featurecache.fit_head(cache, head=("logreg:C=1;pre=standardize", "knn:n_neighbors=50;pre=l2"), jobs=1)
    assert not [e for e in plain.leaderboard if "transfer_of" in e]
