"""The feature set is part of the sweep: ``fc extract`` stores the backbone's stage ends by default,
and ``fit-head --features auto`` (the default) fits every head on ``concat`` and on the penultimate
features alone, through a column-selecting first step (``cols=START:STOP``), and selects among them
like any other choice. A cache without layers gets the run it always had."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import FAST as SMALL
from conftest import run_cli
from test_sweep import digits_cache

import featurecache
from featurecache import store
from featurecache.cli import cli
from featurecache.errors import HeadError
from featurecache.extraction import stage as extractor
from featurecache.heads import HeadConfig, make_estimator, parse_grid
from featurecache.heads.chunked import RowChunks, fit_chunked
from featurecache.heads.convert import to_torch
from featurecache.heads.preprocessing import FeatureColumns
from featurecache.sweep import runs

FAST = {k: v for k, v in SMALL.items() if k != "layers"}  # the default --layers
STAGE_ENDS = {"features.6": 32, "features.13": 96, "features.17": 320}
HEADS = ("logreg:C=0.1;pre=standardize", "nearest-centroid:pre=l2", "linear:epochs=5;lr=0.01;pre=standardize")


@pytest.fixture
def layered(tmp_path) -> str:
    plain = digits_cache(tmp_path / "plain")
    rng = np.random.default_rng(3)
    mixes = {"edges": rng.normal(size=(64, 16)).astype(np.float32),
             "blocks": rng.normal(size=(64, 24)).astype(np.float32)}
    splits = {}
    for split in ("train", "val", "test"):
        X, y, paths = store.load_features(plain, split)
        splits[split] = {"features": X, "labels": y, "paths": list(paths), "skipped": [],
                         "layers": {name: np.maximum(X @ mix, 0) for name, mix in mixes.items()}}
    config = {"backbone": "digits", "weights": {"weights": "none"}, "feature_dim": 64, "data": {"root": "digits"},
              "layers": list(mixes)}
    return str(store.write_cache(tmp_path / "layered.h5", [str(c) for c in range(10)], config, splits))


# --------------------------------------------------------------------------- stage one: the stage ends by default


def test_extract_stores_the_stage_ends_by_default(image_folder, tmp_path):
    res = featurecache.extract(str(image_folder), cache_dir=str(tmp_path / "c"), **FAST)
    assert res.layers == STAGE_ENDS and store.info(res.cache)["config"]["layers"] == list(STAGE_ENDS)
    named = featurecache.extract(str(image_folder), cache_dir=str(tmp_path / "c"),
                                 layers="features.6,features.13,features.17", **FAST)
    assert named.reused and named.key == res.key  # auto is the same extraction as naming them
    none = featurecache.extract(str(image_folder), cache_dir=str(tmp_path / "c"), layers="none", **FAST)
    assert not none.reused and none.layers == {} and "layers" not in store.info(none.cache)["config"]
    main = [store.load_features(c, "train")[0] for c in (res.cache, none.cache)]
    np.testing.assert_allclose(main[0], main[1], rtol=1e-4, atol=1e-5)  # the same main features


def test_a_backbone_without_known_stage_ends_and_a_layer_store_none(monkeypatch):
    monkeypatch.setattr(extractor, "_launch", lambda job: job)
    options = {**FAST, "data": "unused"}
    assert extractor._check_tricks(extractor.ExtractOptions(**{**options, "backbone": "resnet18"}))[0] == []
    assert extractor._check_tricks(extractor.ExtractOptions(**{**options, "layer": "features.4"}))[0] == []
    assert extractor._check_tricks(extractor.ExtractOptions(**options))[0] == list(STAGE_ENDS)


def test_cli_layers_none_and_its_help(cli_runner, image_folder, tmp_path):
    out = run_cli(cli_runner, "extract", image_folder, "--weights", "none", "--resize", "48", "--crop", "40",
                  "--workers", "0", "--layers", "none", "--json", "--cache-dir", tmp_path / "c")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["layers"] == {}
    helped = run_cli(cli_runner, "extract", "--help")
    assert "auto: the ends of the backbone's stages" in " ".join(helped.output.split())


# --------------------------------------------------------------------------- the column-selecting step


def test_cols_is_a_reserved_parameter_of_every_head():
    cfg = HeadConfig.parse("logreg:C=1;cols=0:64;pre=standardize")
    assert cfg.cols == (0, 64) and cfg.spec == "logreg:C=1;cols=0:64;pre=standardize"
    assert HeadConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert [c.cols for c in parse_grid("knn:cols=0:8,8:16")] == [(0, 8), (8, 16)]
    assert list(make_estimator(cfg).named_steps) == ["cols", "pre", "head"]
    assert list(make_estimator(HeadConfig.parse("logreg:C=1")).named_steps) == ["pre", "head"]
    for bad, message in (("4", "START:STOP"), ("8:4", "0 <= START < STOP"), ("a:b", "START:STOP")):
        with pytest.raises(HeadError, match=message):
            HeadConfig.parse(f"logreg:cols={bad}")


def test_feature_columns_select_and_check_the_width():
    X = np.arange(24, dtype=np.float32).reshape(3, 8)
    step = FeatureColumns(2, 5).fit(X)
    np.testing.assert_array_equal(step.transform(X), X[:, 2:5])
    with pytest.raises(HeadError, match="outside the 8 feature columns"):
        FeatureColumns(4, 9).fit(X)
    with pytest.raises(ValueError):
        step.transform(X[:, :6])  # fitted on 8 columns


def test_feature_columns_pass_the_estimator_checks():
    from sklearn.utils.estimator_checks import check_estimator

    check_estimator(FeatureColumns(0, 1))


@pytest.mark.parametrize("spec", HEADS)
def test_a_head_on_some_columns_is_the_head_fitted_on_those_columns(layered, spec):
    X, y, _ = store.load_features(layered, "train", features="concat")
    Xv = store.read_rows(layered, "val", features="concat")
    sliced = make_estimator(HeadConfig.parse(spec + ";cols=0:64")).fit(X, y)
    alone = make_estimator(HeadConfig.parse(spec)).fit(X[:, :64], y)
    np.testing.assert_allclose(sliced.predict_proba(Xv), alone.predict_proba(Xv[:, :64]), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the layer stage three starts from reads the same columns
        logits = to_torch(sliced)(torch.from_numpy(Xv))
    np.testing.assert_allclose(torch.softmax(logits, 1).numpy(), sliced.predict_proba(Xv), atol=1e-4)


def test_a_head_on_some_columns_learns_from_row_chunks(layered):
    X, y, _ = store.load_features(layered, "train", features="concat")
    cfg = HeadConfig.parse("nearest-centroid:cols=64:80")
    chunks = RowChunks(lambda rows: X[rows], np.arange(len(y)), y, X.shape[1], chunk_rows=64)
    chunked = fit_chunked(cfg, chunks)
    whole = make_estimator(cfg).fit(X, y)
    assert list(chunked.named_steps) == ["cols", "pre", "head"]
    np.testing.assert_allclose(chunked.predict_proba(X), whole.predict_proba(X), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- fit-head --features auto


def test_auto_on_a_cache_without_layers_is_todays_run(tmp_path):
    cache = digits_cache(tmp_path / "c")
    auto = featurecache.fit_head(cache, head=HEADS, jobs=1)
    today = featurecache.fit_head(cache, head=HEADS, features="penultimate", jobs=1)
    assert today.reused and today.run_dir == auto.run_dir
    assert {e["features"] for e in auto.leaderboard} == {"penultimate"}
    assert not any("cols=" in e["head"] for e in auto.leaderboard)
    assert runs.load_run(auto.run_dir).meta["features"] == "penultimate"


def test_auto_fits_every_head_on_concat_and_on_penultimate(layered):
    res = featurecache.fit_head(layered, head=HEADS, jobs=1, seed=0)
    singles = [e for e in res.leaderboard if e["head"] != "ensemble"]
    assert len(singles) == 2 * len(HEADS)
    by_set = {e["head"]: e["features"] for e in singles}
    assert sorted(by_set.values()) == ["concat"] * 3 + ["penultimate"] * 3
    for spec in HEADS:
        assert by_set[spec] == "concat"
        assert by_set[HeadConfig.parse(spec + ";cols=0:64").spec] == "penultimate"
    run = runs.load_run(res.run_dir)
    assert run.meta["features"] == "concat" and run.meta["feature_dim"] == 64 + 16 + 24
    # a head on the penultimate columns loads and predicts from the run's rows, as fit on them alone
    spec = HeadConfig.parse(HEADS[0] + ";cols=0:64").spec
    pipeline, meta = runs.load_head(res.run_dir, spec)
    assert meta["cols"] == [0, 64] and list(pipeline.named_steps) == ["cols", "pre", "head"]
    X = store.read_rows(layered, "test", features="concat")
    alone = featurecache.fit_head(layered, head=(HEADS[0],), features="penultimate", jobs=1, calibrate="none",
                                  ensemble=False)
    single, _ = runs.load_head(alone.run_dir, HEADS[0])
    np.testing.assert_allclose(pipeline.predict_proba(X), single.predict_proba(X[:, :64]), rtol=1e-5, atol=1e-6)
    # explicit feature sets keep their runs: concat alone has no cols entries
    concat = featurecache.fit_head(layered, head=HEADS, features="concat", jobs=1)
    assert {e["features"] for e in concat.leaderboard if e["head"] != "ensemble"} == {"concat"}
    assert concat.run_dir != res.run_dir


def test_the_leaderboard_shows_the_feature_set(layered, cli_runner):
    out = run_cli(cli_runner, "fit-head", layered, "--head", HEADS[0], "--head", HEADS[1], "--jobs", "1")
    assert out.exit_code == 0, out.output
    header = next(line for line in out.stdout.splitlines() if line.lstrip().startswith("#"))
    assert "features" in header.split()
    rows = [line for line in out.stdout.splitlines() if "cols=0:64" in line and not line.startswith("ensemble:")]
    assert rows and all(" penultimate " in f" {line} " for line in rows)
    bad = cli_runner.invoke(cli, ["fit-head", layered, "--features", "nope"])
    assert bad.exit_code != 0 and "it has penultimate, concat, edges, blocks" in bad.output


# --------------------------------------------------------------------------- stage three from an auto run


def test_stage_three_from_a_penultimate_head_of_an_auto_run_needs_no_stored_layer(tmp_path):
    from test_finetune import TINY, make_colored_images, split_batch

    from featurecache.errors import FinetuneError
    from featurecache.finetuning.network import Exported, assemble

    images = make_colored_images(tmp_path / "images", 2)
    cache_dir = str(tmp_path / "cache")
    res = featurecache.extract(str(images), weights="none", cache_dir=cache_dir,
                               **{k: v for k, v in TINY.items() if k != "layers"})
    assert res.layers == STAGE_ENDS
    run = featurecache.fit_head(res.cache, head=("logreg:pre=standardize",), jobs=1, ensemble=False,
                                cache_dir=cache_dir)
    spec = HeadConfig.parse("logreg:pre=standardize;cols=0:1280").spec
    parts = assemble(run.run_dir, spec)
    assert parts.backbone.parts == [("penultimate", 1280)] and list(parts.pipeline.named_steps) == ["pre", "head"]
    whole, _ = runs.load_head(run.run_dir, spec)
    X, _, _ = store.load_features(res.cache, "val", features="concat")
    with torch.inference_mode():
        got = Exported(parts.network, parts.backbone.preprocess).eval()(split_batch(res.cache, "val",
                                                                                    parts.backbone.preprocess))
    assert np.abs(got.numpy() - whole.predict_proba(X)).max() < 1e-4
    steps = dict(epochs=1, unfreeze="last:2", workers=0, progress=False, augment="none", cache_dir=cache_dir)
    tuned = featurecache.finetune(run.run_dir, head=spec, from_activations=True, **steps)
    assert tuned.head == spec and len(tuned.history) == 2
    with pytest.raises(FinetuneError, match=r"head logreg:pre=standardize reads concat"):
        featurecache.finetune(run.run_dir, head="logreg:pre=standardize", from_activations=True, **steps)
