"""fc audit finds the faults planted in tiny data: leaks, conflicts, label flips, outliers; and acting on it."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
from conftest import FAST, make_split_folder, run_cli

import featurecache
from featurecache import store

CLASSES = ["a", "b", "c"]
D = 128


def _cluster_cache(path, hashes: bool = True, seed: int = 0):
    """A cache of three well-separated classes (D features) with planted faults; returns (path, planted)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1, (3, D)) * 1.5

    def rows(n_per_class, split):
        y = np.repeat(np.arange(3), n_per_class)
        X = centers[y] + rng.normal(0, 1, (len(y), D))
        return X.astype(np.float32), y, [f"{split}/{CLASSES[c]}/{i}.jpg" for i, c in enumerate(y)]

    parts = {s: list(rows(n, s)) for s, n in (("train", 30), ("val", 8), ("test", 8))}
    Xtr, ytr, ptr = parts["train"]
    flips = [3, 35, 70]  # one per class, moved to the next class
    ytr[flips] = (ytr[flips] + 1) % 3
    Xt, yt, pt = parts["test"]
    near = Xt[2] + rng.normal(0, 0.05, D)  # a test image re-encoded into train: cosine about 0.999
    conflict = Xtr[10] + rng.normal(0, 0.05, D)  # a near copy of a train image with another label
    outlier = rng.normal(0, 1, D) * 40  # far from every class
    extra = np.vstack([near, conflict, outlier, Xt[5]]).astype(np.float32)
    extra_y = np.array([yt[2], (ytr[10] + 1) % 3, 0, yt[5]])
    extra_p = ["train/planted/near.jpg", "train/planted/conflict.jpg", "train/planted/outlier.jpg",
               "train/planted/copy.jpg"]
    splits = {}
    for split, (X, y, p) in parts.items():
        if split == "train":
            X, y, p = np.vstack([X, extra]), np.concatenate([y, extra_y]), p + extra_p
        h = [f"h-{split}-{i}" for i in range(len(p))]
        splits[split] = {"features": X, "labels": y, "paths": p, "skipped": []}
        if hashes:
            splits[split]["hashes"] = h
    if hashes:  # the byte copy of test image 5 shares its hash
        splits["train"]["hashes"][-1] = splits["test"]["hashes"][5]
    store.write_cache(path, CLASSES, {"backbone": "synthetic", "data": {"root": "nowhere"}}, splits)
    planted = {"flips": [ptr[i] for i in flips], "near": ("train/planted/near.jpg", pt[2]),
               "copy": ("train/planted/copy.jpg", pt[5]), "conflict": ("train/a/10.jpg", "train/planted/conflict.jpg"),
               "outlier": "train/planted/outlier.jpg"}
    return path, planted


@pytest.fixture
def planted(tmp_path):
    return _cluster_cache(tmp_path / "planted.h5")


def test_audit_finds_the_planted_leaks_conflict_flips_and_outlier(planted):
    cache, truth = planted
    result = featurecache.audit(str(cache))
    leaks = {tuple(line.split("\t")) for line in result.lines("leaks")}
    assert truth["near"] in leaks and truth["copy"] in leaks
    assert result.report["counts"]["leaks"] == {"train-test": 2}
    by_pair = {(p["a"]["path"], p["b"]["path"]): p for p in result.report["pairs"]}
    assert by_pair[truth["copy"]]["found_by"] == "identical bytes"
    assert by_pair[truth["near"]]["found_by"] == "near" and by_pair[truth["near"]]["similarity"] > 0.99
    assert by_pair[truth["conflict"]]["kind"] == "conflict"
    assert set(truth["flips"]) <= set(result.lines("labels"))
    assert set(truth["flips"]) <= set(result.lines("labels", top=6))
    flagged = {i["path"]: i for i in result.report["label_issues"]}
    assert flagged[truth["flips"][0]]["suggested"] == "a" and flagged[truth["flips"][0]]["label"] == "b"
    assert result.lines("outliers", top=1) == [truth["outlier"]]
    assert json.loads(result.json_path.read_text())["counts"] == result.report["counts"]
    summary = {c["class"]: c for c in result.report["classes"]}
    assert summary["a"]["size"]["val"] == 8 and summary["a"]["flagged"] >= 1 and result.report["confused"]


def test_a_higher_threshold_drops_the_near_duplicate_but_not_the_byte_copy(planted):
    cache, truth = planted
    leaks = featurecache.audit(str(cache), threshold=0.99999).lines("leaks")
    assert leaks == ["\t".join(truth["copy"])]


def test_a_cache_without_content_hashes_finds_copies_by_their_features(tmp_path):
    cache, truth = _cluster_cache(tmp_path / "old.h5", hashes=False)
    result = featurecache.audit(str(cache))
    assert not result.report["hashes"]
    by_pair = {(p["a"]["path"], p["b"]["path"]): p for p in result.report["pairs"]}
    assert by_pair[truth["copy"]]["found_by"] == "identical features"


def test_the_approximate_search_finds_the_same_leaks(planted):
    pytest.importorskip("faiss")
    cache, truth = planted
    leaks = featurecache.audit(str(cache), exact_max=10).lines("leaks")
    assert {"\t".join(truth["near"]), "\t".join(truth["copy"])} <= set(leaks)


def test_the_audit_is_reused_and_the_cli_lists_paths(planted, cli_runner):
    cache, truth = planted
    first = featurecache.audit(str(cache))
    assert featurecache.audit(str(cache)).reused and not first.reused
    out = run_cli(cli_runner, "audit", cache, "--list", "leaks")
    assert out.exit_code == 0 and out.stdout.splitlines()[:2] == ["\t".join(truth["copy"]), "\t".join(truth["near"])]
    out = run_cli(cli_runner, "audit", cache, "--list", "labels", "--top", "2")
    assert len(out.stdout.splitlines()) == 2
    out = run_cli(cli_runner, "audit", cache, "--json")
    assert json.loads(out.stdout)["counts"]["leaks"] == {"train-test": 2}
    out = run_cli(cli_runner, "audit", cache)
    assert "leaks: train-test 2" in out.stdout


def test_fit_head_exclude_leaves_rows_out_of_training_and_scores(planted, tmp_path):
    cache, _ = planted
    listing = tmp_path / "leaks.txt"
    listing.write_text("# fc audit: leaks\n" + "\n".join(featurecache.audit(str(cache)).lines("leaks")) + "\n")
    plain = featurecache.fit_head(str(cache), head=["logreg:C=1"], jobs=1)
    excluded = featurecache.fit_head(str(cache), head=["logreg:C=1"], jobs=1, exclude=str(listing))
    assert plain.run_dir != excluded.run_dir
    record = json.loads((tmp_path / excluded.run_dir / "run.json").read_text())["exclude"]
    assert record["train"] == 2 and record["scores"] == {"test": 2} and record["reason"] == "fc audit: leaks"
    assert plain.leaderboard[0]["metrics"]["test"]["n"] == 24
    assert excluded.leaderboard[0]["metrics"]["test"]["n"] == 22
    again = featurecache.fit_head(str(cache), head=["logreg:C=1"], jobs=1)
    assert again.run_dir == plain.run_dir  # without --exclude, the address is unchanged


def test_exclude_with_cross_validation(tmp_path):
    cache, truth = _cluster_cache(tmp_path / "cv.h5")
    listing = tmp_path / "labels.txt"
    listing.write_text("\n".join(truth["flips"]) + "\n")
    with_val = featurecache.fit_head(str(cache), head=["logreg:C=1"], jobs=1, exclude=str(listing))
    assert with_val.leaderboard[0]["metrics"]["train"]["n"] == 94 - 3


def test_exclude_needs_paths_of_the_cache(planted, tmp_path):
    from featurecache.errors import UsageError

    cache, _ = planted
    listing = tmp_path / "other.txt"
    listing.write_text("somewhere/else.jpg\n")
    with pytest.raises(UsageError, match="none of the 1 paths"):
        featurecache.fit_head(str(cache), head=["logreg:C=1"], jobs=1, exclude=str(listing))


@pytest.fixture
def leaky_images(tmp_path):
    """A tiny folder with a test image copied into train byte for byte and a blank placeholder."""
    images = make_split_folder(tmp_path / "images", splits=(("train", 8), ("val", 3), ("test", 3)))
    shutil.copyfile(images / "test" / "cats" / "cats_0.jpg", images / "train" / "dogs" / "copied.jpg")
    return images


def test_extract_records_content_hashes_outside_the_key(leaky_images, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = featurecache.extract(str(leaky_images), cache_dir=str(tmp_path / "c"), **FAST)
    hashes = dict(zip(store.load_paths(res.cache, "train"), store.load_hashes(res.cache, "train")))
    test = dict(zip(store.load_paths(res.cache, "test"), store.load_hashes(res.cache, "test")))
    assert hashes["train/dogs/copied.jpg"] == test["test/cats/cats_0.jpg"]
    assert len(set(hashes.values())) == len(hashes)  # no two train files are identical
    config = store.info(res.cache)["config"]
    assert "hash_seconds" in config and "hashes" not in config  # recorded content, not a part of the key
    result = featurecache.audit(res.cache, threshold=0.99999)
    assert result.lines("leaks") == ["train/dogs/copied.jpg\ttest/cats/cats_0.jpg"]
    assert result.report["pairs"][0]["kind"] == "leak"  # a conflict too (dogs vs cats), across splits: a leak


@pytest.mark.slow
def test_audit_page_renders_its_thumbnails_in_chromium(leaky_images, tmp_path):
    from test_report import render_image_widths

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = featurecache.extract(str(leaky_images), cache_dir=str(tmp_path / "c"), **FAST)
    result = featurecache.audit(res.cache, threshold=0.99999, outliers=3)
    page = result.json_path.parent / "audit.html"
    text = page.read_text()
    assert text.index("Leaks across splits") < text.index("Likely label errors") < text.index("Outliers")
    assert 'id="count-leaks"><b>1</b>' in text
    widths = render_image_widths(page, tmp_path)
    n_labels = min(len(result.report["label_issues"]), 60)
    assert len(widths) == 2 + n_labels + 3 and all(w > 0 for w in widths), widths


def test_report_links_the_audit_and_warns_of_test_leaks(planted, tmp_path):
    cache, _ = planted
    run = featurecache.fit_head(str(cache), head=["logreg:C=1"], jobs=1)
    before = (featurecache.report(run.run_dir, samples=0)).read_text()
    assert "Audit of the cache" not in before
    featurecache.audit(str(cache))
    after = featurecache.report(run.run_dir, samples=0).read_text()
    assert "audit.html" in after and "Warning: fc audit found 2 test images" in after


def test_pipeline_audits_between_extract_and_fit_head(leaky_images, tmp_path):
    pipeline = tmp_path / "p.toml"
    fast = {k: v for k, v in FAST.items() if k != "progress"}
    options = "\n".join(f"{k} = {json.dumps(v)}" for k, v in fast.items())
    pipeline.write_text(f'data = "{leaky_images}"\ncache_dir = "{tmp_path / "c"}"\n[extract]\n{options}\n'
                        '[audit]\nthreshold = 0.99999\nexclude = "leaks"\n'
                        '[fit-head]\nhead = ["logreg:C=1"]\njobs = 1\n')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = featurecache.run(str(pipeline), progress=False)
    stages = out["branches"][0]["stages"]
    assert list(stages) == ["extract", "audit", "fit-head"]
    run = json.loads((tmp_path / stages["fit-head"]["run_dir"] / "run.json").read_text())
    assert run["exclude"]["train"] == 1 and run["exclude"]["scores"] == {"test": 1}


def test_pipeline_refuses_an_unknown_exclude(tmp_path, image_folder):
    from featurecache.errors import PipelineError
    from featurecache.pipeline.run import load

    pipeline = tmp_path / "p.toml"
    pipeline.write_text(f'data = "{image_folder}"\n[extract]\n[audit]\nexclude = "leak"\n[fit-head]\n')
    with pytest.raises(PipelineError, match=r"unknown list 'leak'.*leaks"):
        load(pipeline)
