"""Stage two on richer caches: heads learn from a layer or the concatenation of layers
(``features=``), and from augmented views of the training images (``views=``) without any
score ever reading a view."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, run_cli

import featurecache
from featurecache import store
from featurecache.errors import HeadError
from featurecache.sweep.calibration import apply_temperature, head_temperature
from featurecache.sweep.runs import load_head

CLASSES = ["a", "b"]


def _part(X: np.ndarray, y: np.ndarray, split: str, layers: dict | None = None) -> dict:
    part = {"features": X.astype(np.float32), "labels": y, "paths": [f"{split}/{i}.png" for i in range(len(y))],
            "skipped": []}
    if layers is not None:
        part["layers"] = {name: values.astype(np.float32) for name, values in layers.items()}
    return part


def layered_cache(folder: Path, n: int = 120, seed: int = 0) -> str:
    """Two classes told apart only by the layer ``deep`` (4 columns); ``features`` (6 columns) is
    noise, and ``noise`` (3 columns) too."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split in ("train", "val", "test"):
        y = np.arange(n) % 2
        deep = rng.normal(size=(n, 4)) + 2.5 * y[:, None]
        splits[split] = _part(rng.normal(size=(n, 6)), y, split,
                              {"deep": deep, "noise": rng.normal(size=(n, 3))})
    config = {"backbone": "synthetic", "weights": {"weights": "none"}, "layers": ["deep", "noise"]}
    return str(store.write_cache(folder / "layered.h5", CLASSES, config, splits))


def views_cache(folder: Path, n: int = 80, k: int = 3, seed: int = 0, copies: bool = True, val: bool = False) -> str:
    """Noise features with random labels: nothing to learn. Each training image has ``k`` views that are
    exact copies of it (``copies``), so a view seen in another fold would give away its image's label."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=n)
    X = rng.normal(size=(n, 8))
    splits = {"train": _part(X, y, "train"), "test": _part(rng.normal(size=(n, 8)), rng.integers(0, 2, size=n), "test")}
    if val:
        splits["val"] = _part(rng.normal(size=(n, 8)), rng.integers(0, 2, size=n), "val")
    source = np.repeat(np.arange(n), k)
    views = _part(X[source] if copies else rng.normal(size=(n * k, 8)), y[source], "train")
    views.update(source=source, view=np.tile(np.arange(k), n))
    splits[store.VIEWS] = views
    config = {"backbone": "synthetic", "weights": {"weights": "none"}, "augment_views": {"k": k}}
    return str(store.write_cache(folder / "views.h5", CLASSES, config, splits))


# --------------------------------------------------------------------------- feature sets


@pytest.mark.parametrize("features, dim", [("penultimate", 6), ("deep", 4), ("noise", 3), ("concat", 13)])
def test_heads_learn_from_the_feature_set_asked_for(tmp_path, features, dim):
    cache = layered_cache(tmp_path)
    result = featurecache.fit_head(cache, head=("logreg:C=1;pre=standardize",), features=features)
    meta = json.loads((Path(result.run_dir) / "run.json").read_text())
    assert (meta["features"], meta["feature_dim"]) == (features, dim)
    pipeline, _ = load_head(result.run_dir, "best")
    assert pipeline.n_features_in_ == dim
    X, y, _ = store.load_features(cache, "test", features=features)
    accuracy = float((pipeline.predict(X) == y).mean())
    assert accuracy == pytest.approx(result.leaderboard[0]["metrics"]["test"]["accuracy"])
    # Only the layer that carries the classes separates them.
    assert (accuracy > 0.9) == (features in ("deep", "concat"))


def test_each_feature_set_is_a_run_of_its_own(tmp_path):
    """On a cache with layers the default (auto) fits both sets in one run; each set asked for is a run of its
    own (on a cache without layers auto is the penultimate run: tests/test_features_auto.py)."""
    cache = layered_cache(tmp_path)
    default = featurecache.fit_head(cache, head=("nearest-centroid",))
    assert featurecache.fit_head(cache, head=("nearest-centroid",), features="auto").reused
    assert {e["features"] for e in default.leaderboard} >= {"penultimate", "concat"}
    dirs = {default.run_dir}
    for features in ("penultimate", "concat"):
        other = featurecache.fit_head(cache, head=("nearest-centroid",), features=features)
        assert not other.reused and {e["features"] for e in other.leaderboard} == {features}
        dirs.add(other.run_dir)
    assert len(dirs) == 3


def test_a_feature_set_the_cache_lacks_is_a_one_line_error(tmp_path, cli_runner):
    cache = layered_cache(tmp_path)
    out = run_cli(cli_runner, "fit-head", cache, "--head", "nearest-centroid", "--features", "deeper")
    assert out.exit_code == 2
    assert out.output.strip().splitlines() == [
        "Error: layered.h5 has no features 'deeper': it has penultimate, concat, deep, noise"]
    plain = views_cache(tmp_path)
    with pytest.raises(HeadError, match=r"has no features 'concat': it has penultimate \(extract with --layers"):
        featurecache.fit_head(plain, head=("nearest-centroid",), features="concat")


# --------------------------------------------------------------------------- augmented views


def test_views_of_an_image_stay_in_its_fold(tmp_path):
    """1-NN on noise with views that copy their image: a view in another fold would find its own
    image at distance 0 and score near 1.0; kept in the image's fold, the score stays near chance."""
    cache = views_cache(tmp_path)
    result = featurecache.fit_head(cache, head=("knn:n_neighbors=1",), cv=5)
    entry = result.leaderboard[0]
    assert result.selection_split == "cv"
    assert entry["rows"] == 80 * 4  # the images and their 3 views each
    assert entry["metrics"]["cv"]["n"] == 80  # scored on the images, never on a view
    assert entry["metrics"]["cv"]["accuracy"] < 0.75
    assert entry["metrics"]["train"]["n"] == 80 and entry["metrics"]["test"]["n"] == 80


def test_views_are_used_by_default_and_can_be_left_out(tmp_path, cli_runner):
    cache = views_cache(tmp_path, copies=False, val=True)
    used = featurecache.fit_head(cache, head=("nearest-centroid",))
    assert used.leaderboard[0]["rows"] == 320
    out = run_cli(cli_runner, "fit-head", cache, "--head", "nearest-centroid", "--no-views", "--json")
    left_out = json.loads(out.output)
    assert left_out["leaderboard"][0]["rows"] == 80 and left_out["run_dir"] != used.run_dir
    meta = json.loads((Path(used.run_dir) / "run.json").read_text())
    assert meta["views"] == 240


def test_views_change_what_a_head_learns(tmp_path):
    """The views' labels reach the fit: views that copy their image double its weight, and a head
    that learns from them differs from one that does not."""
    cache = views_cache(tmp_path, copies=False, val=True)
    with_views = featurecache.fit_head(cache, head=("logreg:C=1",), views=True)
    without = featurecache.fit_head(cache, head=("logreg:C=1",), views=False)
    a, _ = load_head(with_views.run_dir, "best")
    b, _ = load_head(without.run_dir, "best")
    assert not np.allclose(a.named_steps["head"].coef_, b.named_steps["head"].coef_)


def test_asking_for_views_of_a_cache_without_them_is_an_error(tmp_path):
    cache = layered_cache(tmp_path)
    with pytest.raises(HeadError, match="has no augmented views: extract with --augment-views K"):
        featurecache.fit_head(cache, head=("nearest-centroid",), views=True)


def test_refits_with_seeds_keep_views_in_their_fold(tmp_path):
    cache = views_cache(tmp_path)
    result = featurecache.fit_head(cache, head=("random-forest:n_estimators=20",), seeds=2)
    forest = result.leaderboard[0]  # deep trees recall every row they saw: a leaked view would be found
    assert forest["metrics"]["cv"]["accuracy"] < 0.75
    assert forest["seeds"]["stochastic"] and forest["seeds"]["accuracy"]["cv"]["mean"] < 0.75


def test_views_on_many_rows_stay_out_of_the_holdout(tmp_path):
    """Above 4,000 training rows selection uses a holdout of train: views of held-out images are not learnt from."""
    cache = views_cache(tmp_path, n=4400, k=1)
    result = featurecache.fit_head(cache, head=("knn:n_neighbors=1",), budget=0)
    entry = result.leaderboard[0]
    assert result.selection_split == "holdout"
    assert entry["metrics"]["holdout"]["accuracy"] < 0.6
    assert entry["rows"] == 2 * (4400 - entry["metrics"]["holdout"]["n"])


# --------------------------------------------------------------------------- from images, end to end


@pytest.mark.slow
@pytest.mark.parametrize("features", ["features.14", "concat"])
def test_predict_and_finetune_rebuild_the_feature_set(tmp_path, image_folder, features):
    """A run whose heads learnt from a layer or from the concatenation predicts images as its head
    predicted their cached features, and fine-tunes through the same feature set."""
    settings = {**FAST, "crop": 32, "resize": 36}
    extracted = featurecache.extract(str(image_folder), **{**settings, "layers": "features.14,features.16"}, tta="flip")
    run = featurecache.fit_head(extracted.cache, head=("logreg:C=1;pre=standardize",), features=features)
    pipeline, head_meta = load_head(run.run_dir, "best")
    X, _, paths = store.load_features(extracted.cache, "val", features=features)
    expected = apply_temperature(pipeline.predict_proba(X), head_temperature(head_meta))  # calibrated by default
    out = featurecache.predict(run.run_dir, [str(image_folder / "val")], workers=0, progress=False)
    got = {Path(p["path"]).relative_to(image_folder).as_posix(): p for p in out["predictions"]}
    for row, path in zip(expected, paths):
        proba = {t["class"]: t["probability"] for t in got[path]["topk"]}
        assert np.abs(np.array([proba["cats"], proba["dogs"]]) - row).max() < 1e-4
    tuned = featurecache.finetune(run.run_dir, head="best", epochs=1, batch_size=4, workers=0, progress=False)
    assert Path(tuned.model).is_file()
    again = featurecache.predict(tuned.output_dir, [str(image_folder / "val")], workers=0, progress=False)
    assert len(again["predictions"]) == len(paths) and again["skipped"] == []
    # The exported TorchScript file traced the layers' hooks and the mirror: it predicts the same.
    exported = featurecache.predict(tuned.model, [str(image_folder / "val")], workers=0, progress=False)
    top = {p["path"]: p["topk"][0] for p in again["predictions"]}
    for p in exported["predictions"]:
        assert p["class"] == top[p["path"]]["class"]
        assert abs(p["topk"][0]["probability"] - top[p["path"]]["probability"]) < 1e-4


def test_the_rungs_and_the_budget_count_the_views_a_fit_learns_from():
    """4,000 images alone are one rung; with 4 views each a fit learns from 20,000 rows, so the sweep
    times and halves the heads as it would on 20,000 images, in samples of images with their views."""
    from featurecache.sweep import halving as scaling

    assert len(scaling.rungs(4000, 22, True, 210.0)) == 1
    with_views = scaling.rungs(4000, 22, True, 210.0, per_image=5)
    assert len(with_views) >= 2 and with_views[-1].rows == 4000
    assert with_views[0].rows * 5 <= 2 * scaling.FIRST_RUNG_ROWS


def test_a_sweep_with_views_halves_the_heads_on_samples_of_images(tmp_path):
    cache = views_cache(tmp_path, n=1200, k=4, copies=False, val=True)
    result = featurecache.fit_head(cache, head=("nearest-centroid", "logreg:C=0.1,1", "knn:n_neighbors=3,9"))
    meta = json.loads((Path(result.run_dir) / "run.json").read_text())
    assert len(meta["rungs"]) >= 2 and meta["rungs"][-1]["rows"] == 1200
    rows = {e["rows"] for e in result.leaderboard}
    assert 1200 * 5 in rows and min(rows) == meta["rungs"][0]["rows"] * 5
