"""``fc curve RUN``: how many labels are enough, scored on the run's selection rows and never on a training row."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import run_cli
from test_feature_sets import layered_cache, views_cache
from test_sweep import digits_cache

import featurecache
from featurecache import store
from featurecache.errors import RunError, UsageError
from featurecache.heads import HeadConfig, make_estimator
from featurecache.heads.mixture import mix
from featurecache.metrics import class_probabilities, mean_interval, paired_difference, proportion_interval
from featurecache.sweep import curve as curves

HEADS = ("logreg:C=0.1;pre=standardize", "nearest-centroid", "knn:n_neighbors=3")


@pytest.fixture(scope="module")
def val_run(tmp_path_factory) -> Path:
    """A run of three heads (and their ensemble) on digits, selected on val: 300 train, 150 val, 150 test."""
    cache = digits_cache(tmp_path_factory.mktemp("curve") / "fc-cache")
    return Path(featurecache.fit_head(cache, head=HEADS, jobs=1).run_dir)


@pytest.fixture(scope="module")
def val_curve(val_run) -> curves.CurveResult:
    return featurecache.curve(val_run, budget=0)


def _random_cache(folder: Path, n: int, splits=("train", "test"), seed=0) -> str:
    """Noise features with random labels: a head that scored a row it learnt from would look far better
    than chance (1 nearest neighbour: perfect), an honest score stays near 1/10."""
    rng = np.random.default_rng(seed)
    data = {s: {"features": rng.normal(size=(n, 8)).astype(np.float32), "labels": rng.integers(0, 10, n),
                "paths": [f"{s}/{i}.png" for i in range(n)], "skipped": []} for s in splits}
    config = {"backbone": "noise", "weights": {"weights": "none"}, "feature_dim": 8, "data": {"root": "noise"}}
    return str(store.write_cache(folder / "noise.h5", [str(c) for c in range(10)], config, data))


def _entry(run_dir: Path, head: str) -> dict:
    return next(e for e in json.loads((run_dir / "leaderboard.json").read_text()) if e["head"] == head)


# --------------------------------------------------------------------------- sizes and subsamples


def test_sizes_double_from_one_per_class_up_to_all_of_them():
    assert curves.sizes([30] * 10) == [1, 2, 4, 8, 16, None]
    assert curves.sizes([1600] * 10) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, None]
    assert curves.sizes([100, 3, 1]) == [1, 2, 4, 8, 16, 32, 64, None]  # up to the largest class
    # all of them must be 1.5 times the largest power at least: 330 images are not a step up from 320
    assert curves.sizes([33] * 10) == [1, 2, 4, 8, 16, None]
    assert curves.sizes([1, 1]) == [None]


def test_subsamples_are_stratified_nested_seeded_and_a_small_class_gives_all_it_has():
    y = np.repeat(np.arange(3), [50, 50, 2])
    pool = np.arange(len(y))
    four = curves.subsample(pool, y, 4, (0, 0, 0))
    assert np.bincount(y[four]).tolist() == [4, 4, 2] and np.all(np.diff(four) > 0)
    eight = curves.subsample(pool, y, 8, (0, 0, 0))
    assert set(four) <= set(eight)  # one seed's sizes are nested
    assert not np.array_equal(four, curves.subsample(pool, y, 4, (0, 0, 1)))  # another seed, another sample
    np.testing.assert_array_equal(four, curves.subsample(pool, y, 4, (0, 0, 0)))
    np.testing.assert_array_equal(curves.subsample(pool[::-1], y, None, (0, 0, 0)), pool)


def test_the_interval_of_a_mean_over_seeds_is_the_proportion_interval_with_one_seed():
    hits = np.random.default_rng(0).random(200) < 0.7
    assert mean_interval(hits.astype(float)) == proportion_interval(hits)
    shares = np.random.default_rng(1).integers(0, 4, 200) / 3
    low, high = mean_interval(shares)
    assert low < shares.mean() < high


# --------------------------------------------------------------------------- the curve of a run


def test_the_curve_of_the_best_head_on_val(val_curve, val_run):
    c = val_curve
    meta = json.loads((val_run / "run.json").read_text())
    assert c.head == meta["best"] and c.selection_split == "val" and c.scored == 150
    assert [p["per_class"] for p in c.points] == [1, 2, 4, 8, 16, None]
    assert [p["images"] for p in c.points] == [10, 20, 40, 80, 160, 300]
    assert [p["seeds"] for p in c.points] == [3, 3, 3, 3, 3, 1]  # all of them is one subsample
    for p in c.points:
        low, high = p["ci"]
        assert low <= p["accuracy"] <= high and len(p["accuracies"]) == p["seeds"]
        assert p["accuracy"] == pytest.approx(np.mean(p["accuracies"])) and p["seconds"] >= 0
    assert c.points[0]["accuracy"] < c.points[-1]["accuracy"]
    # all of them is the run's own fit: its score is the leaderboard's
    assert c.points[-1]["accuracy"] == pytest.approx(_entry(val_run, c.head)["selection_accuracy"])


def test_the_slope_is_that_of_the_last_two_sizes_in_points_per_doubling(val_curve):
    a, b = val_curve.points[-2:]
    expected = (b["accuracy"] - a["accuracy"]) * 100 / np.log2(b["images"] / a["images"])
    assert val_curve.slope["points"] == pytest.approx(expected)
    assert (val_curve.slope["from"], val_curve.slope["to"]) == (160, 300)
    low, high = val_curve.slope["ci"]
    assert low <= expected <= high
    assert val_curve.sentence.startswith(f"doubling the labels would add about {expected:.1f} points (95% interval")
    assert curves.slope_sentence(None).startswith("fewer than two sizes")


def test_the_slope_of_one_seed_each_has_the_interval_of_a_paired_difference():
    rng = np.random.default_rng(0)
    a, b = rng.random(400) < 0.7, rng.random(400) < 0.8
    points = [{"images": 100, "accuracy": a.mean()}, {"images": 400, "accuracy": b.mean()}]
    found = curves.slope(points, [a.astype(float), b.astype(float)])
    gap = paired_difference(b, a)
    assert found["points"] == pytest.approx(50 * gap["difference"])  # two doublings
    assert found["ci"] == pytest.approx([50 * gap["ci"][0], 50 * gap["ci"][1]])
    assert curves.slope(points[:1], [a]) is None and curves.slope(points, [None, b]) is None


def test_a_size_is_the_head_refitted_on_its_subsample(val_run):
    """The point of 4 images per class with one seed: the head's spec fitted on that subsample, with the run's
    seed, scored on val."""
    c = featurecache.curve(val_run, head="logreg:C=0.1;pre=standardize", seeds=1, budget=0)
    cache = json.loads((val_run / "run.json").read_text())["cache"]
    X, y, _ = store.load_features(cache, "train")
    Xv, yv, _ = store.load_features(cache, "val")
    rows = curves.subsample(np.arange(len(y)), y, 4, (0, 0, 0))
    model = make_estimator(HeadConfig.parse("logreg:C=0.1;pre=standardize"), random_state=0).fit(X[rows], y[rows])
    point = next(p for p in c.points if p["per_class"] == 4)
    assert point["accuracy"] == pytest.approx(float((model.predict(Xv) == yv).mean()))


def test_the_ensemble_refits_its_members_and_mixes_them_with_the_saved_weights(val_run):
    head = json.loads((val_run / "heads" / "ensemble" / "head.json").read_text())
    c = featurecache.curve(val_run, head="ensemble", seeds=1, budget=0)
    assert c.head == "ensemble"
    assert c.members == [{k: m[k] for k in ("head", "weight", "temperature")} for m in head["members"]]
    cache = json.loads((val_run / "run.json").read_text())["cache"]
    X, y, _ = store.load_features(cache, "train")
    Xv, yv, _ = store.load_features(cache, "val")
    rows = curves.subsample(np.arange(len(y)), y, 8, (0, 0, 0))
    probas = [class_probabilities(make_estimator(HeadConfig.parse(m["head"]), random_state=0).fit(X[rows], y[rows]),
                                  Xv, 10) for m in head["members"]]
    mixed = mix(probas, [m["weight"] for m in head["members"]], [m["temperature"] for m in head["members"]])
    point = next(p for p in c.points if p["per_class"] == 8)
    assert point["accuracy"] == pytest.approx(float((mixed.argmax(axis=1) == yv).mean()))
    # all of them: the saved mixture, whose score on val is what the saved weights give there
    assert c.points[-1]["accuracy"] == pytest.approx(head["ensemble"]["saved_weights_accuracy"]["val"])


def test_a_size_the_head_cannot_be_fitted_on_says_why(tmp_path):
    cache = digits_cache(tmp_path / "fc-cache")
    run = featurecache.fit_head(cache, head=["knn:n_neighbors=15"], jobs=1)
    c = featurecache.curve(run.run_dir, head="knn:n_neighbors=15", seeds=1, budget=0)
    first, second = c.points[:2]
    assert first["per_class"] == 1 and first["accuracy"] is None and first["ci"] is None
    assert "n_neighbors" in first["error"]  # 15 neighbours among 10 images
    assert second["accuracy"] is not None and c.slope is not None  # 15 among 20 images: fitted
    out = run_cli(CliRunner(), "curve", run.run_dir, "--head", "knn:n_neighbors=15")
    assert out.exit_code == 0 and re.search(r"^1 +10 +3 +.*ValueError", out.output, re.M), out.output


# --------------------------------------------------------------------------- never a training row


@pytest.mark.parametrize("selection", ["holdout", "cv"])
def test_no_score_comes_from_a_row_the_fit_learnt_from(tmp_path, selection):
    """Random labels and one nearest neighbour: on its own training rows it is always right, on others at
    chance. Without val the run selects on a holdout of train (above 4,000 rows) or by cv folds."""
    n = 4200 if selection == "holdout" else 600
    cache = _random_cache(tmp_path / "fc-cache", n)
    run = featurecache.fit_head(cache, head=["knn:n_neighbors=1"], jobs=1, cv=3)
    c = featurecache.curve(run.run_dir, head="knn:n_neighbors=1", seeds=2, budget=0)
    assert c.selection_split == selection
    assert c.scored == (840 if selection == "holdout" else n)  # the holdout is 20% of train; cv scores all of it
    assert all(p["accuracy"] < 0.2 for p in c.points), [p["accuracy"] for p in c.points]
    own = _entry(Path(run.run_dir), "knn:n_neighbors=1")["selection_accuracy"]
    assert c.points[-1]["accuracy"] == pytest.approx(own)


def test_augmented_views_join_their_images_and_are_never_scored(tmp_path):
    """Each training image has 3 views that are copies of it: a view of a scored image among the rows a fit
    learnt from would give its label away to 1 nearest neighbour."""
    cache = views_cache(tmp_path / "fc-cache", n=200)
    run = featurecache.fit_head(cache, head=["knn:n_neighbors=1"], jobs=1, cv=3)
    assert json.loads((Path(run.run_dir) / "run.json").read_text())["views"] == 600
    c = featurecache.curve(run.run_dir, seeds=2, budget=0)
    assert c.selection_split == "cv" and c.scored == 200 and c.points[-1]["images"] == 133  # images, not views
    assert all(p["accuracy"] < 0.7 for p in c.points), [p["accuracy"] for p in c.points]  # 2 classes
    own = _entry(Path(run.run_dir), "knn:n_neighbors=1")["selection_accuracy"]
    assert c.points[-1]["accuracy"] == pytest.approx(own)


def test_the_run_s_feature_set_and_left_out_images_are_those_of_the_curve(tmp_path):
    cache = layered_cache(tmp_path / "fc-cache")  # two classes told apart by the layer deep alone
    listing = tmp_path / "leave-out.txt"
    listing.write_text("# planted\n" + "\n".join([f"train/{i}.png" for i in range(20)]
                                                   + [f"val/{i}.png" for i in range(10)]) + "\n")
    run = featurecache.fit_head(cache, head=["logreg:C=1;pre=standardize"], jobs=1, features="deep",
                                exclude=str(listing))
    c = featurecache.curve(run.run_dir, seeds=1, budget=0)
    assert c.scored == 110 and c.points[-1]["images"] == 100  # 120 val and train images less those left out
    assert c.points[-1]["accuracy"] > 0.9
    assert c.points[-1]["accuracy"] == pytest.approx(_entry(Path(run.run_dir), c.head)["selection_accuracy"])
    listing.write_text("train/0.png\n")
    with pytest.raises(RunError, match="gone or has changed"):
        featurecache.curve(run.run_dir, seeds=2, budget=0)


# --------------------------------------------------------------------------- the budget


def test_the_budget_takes_seeds_from_the_largest_sizes_first():
    clock = curves.Clock(1.0, [(10, 0.5)])  # 0.05 s an image: 2, 4, 8 and 15 s a seed below
    assert clock.estimate(100) == pytest.approx(5.0) and curves.Clock(1.0).estimate(100) is None
    images = [40, 80, 160, 300]
    assert curves.seeds_now(images, 3, None, clock) == 3  # no bound
    assert curves.seeds_now(images, 3, 24, clock) == 3  # 3 seeds of 2 s: no more than a quarter of 24 s
    # the sizes after it lose seeds first: 3 x 2 + 2 x 4 + 1 x 8 (+ all of them, the run's own fit: 0) = 22
    assert curves.seeds_now(images, 3, 23, clock, last_free=True) == 3
    assert curves.seeds_now(images, 3, 17, clock, last_free=True) == 2  # 2 x 2 + 4 + 8
    assert curves.seeds_now(images, 3, 23, clock) == 1  # all of them refitted: 15 s more
    assert curves.seeds_now(images, 3, 0.0, curves.Clock(1.0)) == 3  # nothing timed yet
    assert curves.seeds_now([300], 3, 1e6, clock) == 1  # all of them is one subsample


def test_a_spent_budget_skips_the_sizes_between_the_first_two_and_all_of_them(val_run):
    c = featurecache.curve(val_run, seeds=2, budget=1e-6)  # the first size is not timed: mostly start-up
    assert [p["seeds"] for p in c.points] == [2, 2, 0, 0, 0, 1] and c.budget == 1e-6
    assert all(p["accuracy"] is None and p["error"].startswith("skipped: one seed would take about")
               for p in c.points[2:5])
    assert c.slope["from"] == c.points[1]["images"] and c.slope["to"] == c.points[-1]["images"]


def test_options_are_checked(val_run):
    with pytest.raises(UsageError, match="seeds"):
        featurecache.curve(val_run, seeds=0)
    with pytest.raises(UsageError, match="budget"):
        featurecache.curve(val_run, budget=-1)
    with pytest.raises(RunError, match="no run matches"):
        featurecache.curve("no-such-run")
    with pytest.raises(RunError, match="no head"):
        featurecache.curve(val_run, head="svm")


# --------------------------------------------------------------------------- curve.json, the CLI, the report


def _accuracies(result) -> list:
    return [p["accuracies"] for p in result.points]


def test_curve_json_is_reused_for_the_same_inputs_only(val_run, val_curve):
    first = featurecache.curve(val_run, budget=0)  # the tests above saved other curves of this run
    again = featurecache.curve(val_run, budget=0)
    assert again.reused and again.points == first.points and again.sentence == first.sentence
    assert _accuracies(first) == _accuracies(val_curve)  # seeded: measured again, the same numbers
    saved = json.loads((val_run / curves.CURVE_FILE).read_text())
    assert saved["run_sha256"] and saved["key"] and saved["points"] == first.points
    other = featurecache.curve(val_run, seeds=2, budget=0)  # other inputs: measured again, and saved
    assert not other.reused and json.loads((val_run / curves.CURVE_FILE).read_text())["seeds"] == 2
    assert not featurecache.curve(val_run, budget=0).reused


def test_the_command_prints_the_table_and_the_sentence(val_run, val_curve):
    runner = CliRunner()
    out = run_cli(runner, "curve", val_run, "--budget", "0")
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].startswith(f"{val_run}  ({val_curve.head}; selection on val: 150 images;")
    header = 2 if val_curve.head == "ensemble" else 1  # an ensemble's members come first
    assert re.match(r"per class +images +seeds +accuracy +95% interval +seconds", lines[header])
    assert re.match(r"all +300 +1 +0\.\d{4} +\[0\.\d{3}, [01]\.\d{3}\]", lines[-2])
    assert lines[-1] == val_curve.sentence
    as_json = run_cli(runner, "curve", val_run, "--budget", "0", "--json")
    data = json.loads(as_json.output)
    assert data["reused"] and [p["accuracies"] for p in data["points"]] == _accuracies(val_curve)
    assert data["sentence"] == val_curve.sentence and data["run_dir"] == str(val_run)
    bad = run_cli(runner, "curve", val_run, "--seeds", "0")
    assert bad.exit_code == 2 and bad.output.count("\n") == 1
    missing = run_cli(runner, "curve", "no-such-run")
    assert missing.exit_code == 3 and missing.output.startswith("Error: no run matches")


def test_the_report_draws_the_curve_once_there_is_one(tmp_path):
    cache = digits_cache(tmp_path / "fc-cache")
    run_dir = Path(featurecache.fit_head(cache, head=["nearest-centroid"], jobs=1).run_dir)
    page = featurecache.report(run_dir, samples=0)
    assert not (page.parent / "learning_curve.png").exists()
    assert "How many labels are enough" not in (page.parent / "report.md").read_text()
    c = featurecache.curve(run_dir, seeds=1, budget=0)
    page = featurecache.report(run_dir, samples=0)  # the curve is part of what the report is keyed by
    md = (page.parent / "report.md").read_text()
    assert (page.parent / "learning_curve.png").read_bytes().startswith(b"\x89PNG")
    assert "](learning_curve.png)" in md and "learning_curve" in json.loads((page.parent / "report.json").read_text())[
        "figures"]
    section = md.split("## How many labels are enough\n")[1]
    assert section.lstrip("\n- ").startswith(c.sentence[0].upper() + c.sentence[1:])
    html = page.read_text()
    assert html.count("data:image/png;base64,") == md.count("](") and "How many labels are enough" in html


def test_a_member_that_cannot_be_fitted_on_a_size_is_left_out_of_its_mixture(tmp_path):
    """15 neighbours among 10 images: at 1 image per class the ensemble is its logistic regression alone."""
    cache = digits_cache(tmp_path / "fc-cache")
    grid = ["logreg:C=0.1;pre=standardize", "knn:n_neighbors=15;weights=distance;pre=l2"]
    run_dir = Path(featurecache.fit_head(cache, head=grid, jobs=1).run_dir)
    members = json.loads((run_dir / "heads" / "ensemble" / "head.json").read_text())["members"]
    assert len(members) == 2  # the run's ensemble mixes both
    c = featurecache.curve(run_dir, head="ensemble", seeds=1, budget=0)
    one, two = c.points[:2]
    assert list(one["left_out"]) == ["knn:n_neighbors=15;pre=l2;weights=distance"] and "left_out" not in two
    X, y, _ = store.load_features(cache, "train")
    Xv, yv, _ = store.load_features(cache, "val")
    rows = curves.subsample(np.arange(len(y)), y, 1, (0, 0, 0))
    alone = make_estimator(HeadConfig.parse(grid[0]), random_state=0).fit(X[rows], y[rows])
    assert one["accuracy"] == pytest.approx(float((alone.predict(Xv) == yv).mean()))
    out = run_cli(CliRunner(), "curve", run_dir, "--head", "ensemble", "--seeds", "1", "--budget", "0")
    assert re.search(r"^1 +10 +1 +0\.\d{4} .* without knn:n_neighbors=15;pre=l2;weights=distance$", out.output, re.M)


def test_a_changed_head_file_is_refused(tmp_path):
    cache = digits_cache(tmp_path / "fc-cache")
    run_dir = Path(featurecache.fit_head(cache, head=["nearest-centroid"], jobs=1).run_dir)
    head = run_dir / "heads" / "nearest-centroid" / "head.json"
    head.write_text(head.read_text().replace('"nearest-centroid"', '"knn"', 1))
    with pytest.raises(RunError, match="sha256"):
        featurecache.curve(run_dir)
