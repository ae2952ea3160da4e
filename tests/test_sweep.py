"""Stage two: grids, honest selection, run directories, reuse, the CLI and its errors."""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

import featurecache
from featurecache import store
from featurecache.errors import HeadError, RunError
from featurecache.heads import grids, make_estimator, parse_grid
from featurecache.metrics import classification_metrics
from featurecache.sweep import engine, runs
from featurecache.sweep import stage as sweep
from featurecache.sweep.leaderboard import selection_key

GRID = (
    "logreg:C=0.1,1;pre=standardize",
    "knn:n_neighbors=3",
    "nearest-centroid",
    "linear:lr=0.01,0.1;weight_decay=0,0.001;epochs=10;pre=standardize",
    "mlp:hidden=32;epochs=10;pre=standardize",
)
ENTRY_KEYS = {"head", "params", "selection_split", "selection_accuracy", "metrics", "fit_seconds", "status", "reason",
              "rows", "tied", "gap"}


def entry_keys(entry: dict) -> set:
    """The keys of a leaderboard entry of a default (calibrated) sweep: a head's, or the ensemble's."""
    extra = {"members", "transferable", "ensemble"} if entry["head"] == "ensemble" else set()
    return ENTRY_KEYS | {"calibration", "features"} | extra


def grid_heads(leaderboard: list[dict]) -> set:
    """The specs of the heads a grid asked for: not the ensemble, nor a transferable form fitted beside them."""
    return {e["head"] for e in leaderboard if e["head"] != "ensemble" and "transfer_of" not in e}


def digits_cache(folder: Path, sizes=(("train", 300), ("val", 150), ("test", 150)), name="digits", seed=0,
                 labels=None, tag="digits") -> str:
    """A complete cache of scikit-learn's 8x8 digits (64 features), one row per image."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    X, y = X[order].astype(np.float32), y[order]
    splits, start = {}, 0
    for split, n in sizes:
        part_y = y[start:start + n] if labels is None else labels[split]
        splits[split] = {"features": X[start:start + n], "labels": part_y,
                         "paths": [f"{split}/{i}.png" for i in range(n)], "skipped": []}
        start += n
    config = {"backbone": tag, "weights": {"weights": "none"}, "feature_dim": 64, "data": {"root": "digits"}}
    return str(store.write_cache(folder / f"{name}.h5", [str(c) for c in range(10)], config, splits))


@pytest.fixture
def cache(tmp_path) -> str:
    return digits_cache(tmp_path / "fc-cache")


def _without_times(leaderboard):
    return [{k: v for k, v in e.items() if k != "fit_seconds"} for e in leaderboard]


# --------------------------------------------------------------------------- selection and results


def test_val_selection_leaderboard_and_run_layout(cache):
    res = featurecache.fit_head(cache, head=GRID, jobs=1)
    board = res.leaderboard
    assert len(board) == 2 + 1 + 1 + 4 + 1 + 1  # the heads of the grid and their ensemble
    assert set(res.to_dict()) == {"run_dir", "best", "leaderboard", "failed"}
    assert all(set(e) == entry_keys(e) for e in board)
    assert all(e["selection_split"] == "val" and list(e["metrics"]) == ["val", "test", "train"] for e in board)
    assert board == sorted(board, key=selection_key)  # the tied heads first, by log-loss; then by accuracy
    assert res.best == board[0]["head"] and board[0]["selection_accuracy"] > 0.9
    assert all(e["selection_accuracy"] == e["metrics"]["val"]["accuracy"] for e in board)

    run = Path(res.run_dir)
    assert run.parent == Path(cache).parent / "runs"
    assert re.fullmatch(r"digits-[0-9a-f]{12}", run.name)
    meta = json.loads((run / "run.json").read_text())
    assert meta["cache"] == str(Path(cache).resolve()) and meta["cache_key"] == store.info(cache)["key"]
    assert meta["selection_split"] == "val" and meta["final_split"] == "test" and meta["best"] == res.best
    assert {"run_id", "classes", "config", "seed", "heads", "created", "versions"} <= set(meta)
    assert meta["format"] == "featurecache-run/2"
    assert json.loads((run / "leaderboard.json").read_text()) == board
    csv_lines = (run / "leaderboard.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(board)
    assert csv_lines[0].startswith("rank,head,selection_split,selection_accuracy,tied,val_accuracy")
    assert csv_lines[0].endswith(",fit_seconds,status,rows")
    assert (run / "best").read_text().strip() == runs.slug(res.best)
    for entry in board:
        folder = run / "heads" / runs.slug(entry["head"])
        head_meta = json.loads((folder / "head.json").read_text())
        assert head_meta["head"] == entry["head"] and head_meta["metrics"] == entry["metrics"]
        names = {"head.json"} if head_meta["kind"] == "ensemble" else {"head.json", "pipeline.skops"}
        names |= {"module.safetensors"} if head_meta["kind"] == "torch" else set()
        assert {p.name for p in folder.iterdir()} == names  # no pickle
        for name in names:
            digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
            assert meta["sha256"][f"heads/{folder.name}/{name}"] == digest
    assert len(meta["sha256"]) == sum(1 if e["head"] == "ensemble" else 2 + e["head"].startswith(("linear:", "mlp:"))
                                      for e in board)
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert runs.slug("logreg:C=0.1;pre=standardize") == "logreg-C=0.1-pre=standardize"


def test_saved_head_reproduces_its_metrics(cache):
    res = featurecache.fit_head(cache, head=GRID, jobs=1)
    X, y, _ = store.load_features(cache, "test")
    for ref in ("best", "linear:epochs=10;lr=0.1;pre=standardize;weight_decay=0.001",
                "mlp-epochs=10-hidden=32-pre=standardize"):
        pipeline, head_meta = runs.load_head(res.run_dir, ref)
        metrics = classification_metrics(y, pipeline.predict_proba(X), [str(c) for c in range(10)])
        assert metrics["accuracy"] == head_meta["metrics"]["test"]["accuracy"]
    assert runs.load_head(res.run_dir)[1]["head"] == res.best


def test_cross_validation_when_there_is_no_val_split(tmp_path):
    cache = digits_cache(tmp_path, sizes=(("train", 300), ("test", 150)))
    res = featurecache.fit_head(cache, head=("logreg:C=0.1;pre=standardize", "knn"), cv=3, jobs=1)
    assert res.selection_split == "cv" and res.final_split == "test"
    for e in res.leaderboard:
        assert e["selection_split"] == "cv" and list(e["metrics"]) == ["cv", "test", "train"]
        assert e["metrics"]["cv"]["n"] == 300 and e["selection_accuracy"] == e["metrics"]["cv"]["accuracy"]
    meta = runs.load_run(res.run_dir).meta
    assert meta["cv"] == 3 and meta["final_split"] == "test"
    # the refit on all of train is what gets saved and scored on test
    pipeline, head_meta = runs.load_head(res.run_dir, "knn")
    X, y, _ = store.load_features(cache, "test")
    assert head_meta["metrics"]["test"]["accuracy"] == float((pipeline.predict(X) == y).mean())


def test_without_held_out_split_the_output_says_so(tmp_path, cli_runner):
    cache = digits_cache(tmp_path, sizes=(("train", 200), ("val", 100)))
    out = run_cli(cli_runner, "fit-head", cache, "--head", "knn", "--jobs", 1)
    assert out.exit_code == 0, out.output
    assert "selected on val; there is no test split" in out.output and "not a held-out estimate" in out.output
    cache = digits_cache(tmp_path, name="with-test")
    out = run_cli(cli_runner, "fit-head", cache, "--head", "knn", "--jobs", 1)
    assert "selected on val; test is held out" in out.output and "test acc" in out.output


def test_a_head_that_cannot_fit_these_data_is_reported_and_the_sweep_goes_on(tmp_path, cli_runner):
    # 40 training rows: 64 principal components and 50 neighbours cannot be fitted
    cache = digits_cache(tmp_path, sizes=(("train", 40), ("val", 150)))
    grid = ("logreg:C=1;pre=pca:64", "knn:n_neighbors=3,50", "nearest-centroid")
    res = featurecache.fit_head(cache, head=grid, jobs=1)
    assert {f["head"] for f in res.failed} == {"logreg:C=1;pre=pca:64", "knn:n_neighbors=50"}
    assert all("ValueError" in f["error"] for f in res.failed)
    assert grid_heads(res.leaderboard) == {"knn:n_neighbors=3", "nearest-centroid"}
    assert sorted(p.name for p in (Path(res.run_dir) / "heads").iterdir()) == \
        sorted(runs.slug(e["head"]) for e in res.leaderboard)
    assert runs.load_run(res.run_dir).meta["failed"] == res.failed
    out = run_cli(cli_runner, "fit-head", cache, *(arg for g in grid for arg in ("--head", g)), "--jobs", 1)
    assert out.exit_code == 0
    assert "not fitted: knn:n_neighbors=50: ValueError" in out.stderr
    # nothing fits: a one-line error
    with pytest.raises(HeadError, match=r"no head could be fitted.*knn:n_neighbors=50"):
        featurecache.fit_head(cache, head="knn:n_neighbors=50", jobs=1)


def test_same_seed_same_leaderboard(tmp_path):
    grid = (*GRID, "random-forest:n_estimators=20", "mlp:hidden=16,32;dropout=0.5;epochs=10")
    first = featurecache.fit_head(digits_cache(tmp_path / "a"), head=grid, jobs=2, seed=3)
    second = featurecache.fit_head(digits_cache(tmp_path / "b"), head=grid, jobs=2, seed=3)
    assert not second.reused and first.run_dir != second.run_dir
    assert Path(first.run_dir).name == Path(second.run_dir).name  # the same inputs, the same id
    assert _without_times(first.leaderboard) == _without_times(second.leaderboard)


def test_parallel_jobs_give_the_serial_leaderboard(tmp_path):
    grid = ("logreg:C=0.01,0.1,1;pre=standardize", "random-forest:n_estimators=20", "knn:n_neighbors=3,7")
    serial = featurecache.fit_head(digits_cache(tmp_path / "a"), head=grid, jobs=1)
    parallel = featurecache.fit_head(digits_cache(tmp_path / "b"), head=grid, jobs=2)
    # thread counts differ (2 vs 1 per fit), which may move the last digits of a float: compare decisions
    def decisions(board):
        return [(e["head"], {s: m["accuracy"] for s, m in e["metrics"].items()}) for e in board]

    assert decisions(serial.leaderboard) == decisions(parallel.leaderboard)


def test_rerun_is_a_lookup(cache, monkeypatch):
    first = featurecache.fit_head(cache, head=("knn", "logreg:C=1"), jobs=1)
    monkeypatch.setitem(engine.FITTERS, "single", None)  # any fit now would fail
    again = featurecache.fit_head(cache, head=("logreg:C=1", "knn"), jobs=1)  # order does not matter
    assert again.reused and again.run_dir == first.run_dir and again.leaderboard == first.leaderboard
    monkeypatch.undo()
    assert featurecache.fit_head(cache, head=("knn", "logreg:C=1"), jobs=1, seed=1).run_dir != first.run_dir


def test_linear_grid_trains_in_one_batched_call(cache, monkeypatch):
    calls = []
    real = engine.fit_linear_grid

    def spy(X, y, configs, **kwargs):
        calls.append([c.spec for c in configs])
        return real(X, y, configs, **kwargs)

    monkeypatch.setattr(engine, "fit_linear_grid", spy)
    res = featurecache.fit_head(cache, head=("linear:lr=0.01,0.1;weight_decay=0,0.01;epochs=5", "knn"), jobs=1)
    assert len(calls) == 1 and len(calls[0]) == 4
    assert sum(e["head"].startswith("linear:") for e in res.leaderboard) == 4


@pytest.mark.parametrize("grid", ["logreg:C=0.01,0.1,1;pre=standardize", "random-forest:n_estimators=10,30"])
def test_warm_start_paths_match_cold_fits(cache, grid):
    res = featurecache.fit_head(cache, head=(grid,), jobs=1)
    X, y, _ = store.load_features(cache, "train")
    Xv, yv, _ = store.load_features(cache, "val")
    by_head = {e["head"]: e for e in res.leaderboard}
    for cfg in parse_grid(grid):
        cold = make_estimator(cfg, random_state=0).fit(X, y)
        warm, _ = runs.load_head(res.run_dir, cfg.spec)
        assert warm.named_steps["head"].warm_start is False
        # the same optimum up to the solver's tolerance (exactly the same forest)
        gap = np.abs(warm.predict_proba(Xv) - cold.predict_proba(Xv))
        assert gap.max() < 0.05 and gap.mean() < 0.002
        assert (warm.predict(Xv) == cold.predict(Xv)).mean() >= 0.98
        assert by_head[cfg.spec]["selection_accuracy"] == pytest.approx(float(cold.score(Xv, yv)), abs=2 / len(yv))
    assert [g for g, _ in sweep._groups(parse_grid(grid))] == ["warm-path"]


def test_balanced_class_weight(tmp_path):
    rng = np.random.default_rng(0)
    labels = {"train": np.where(rng.random(300) < 0.85, 0, rng.integers(1, 10, 300)), "val": None}
    labels["val"] = np.where(rng.random(150) < 0.85, 0, rng.integers(1, 10, 150))
    cache = digits_cache(tmp_path, sizes=(("train", 300), ("val", 150)), labels=labels)
    grid = ("logreg:C=1;pre=standardize", "knn")
    plain = featurecache.fit_head(cache, head=grid, jobs=1)
    balanced = featurecache.fit_head(cache, head=grid, jobs=1, class_weight="balanced")
    assert plain.run_dir != balanced.run_dir
    weighted = "logreg:C=1;class_weight=balanced;pre=standardize"
    heads = {e["head"]: e for e in balanced.leaderboard}
    assert grid_heads(balanced.leaderboard) == {weighted, "knn"}  # knn cannot weight classes
    assert heads[weighted]["params"]["class_weight"] == "balanced"
    pipeline, _ = runs.load_head(balanced.run_dir, weighted)
    assert pipeline.named_steps["head"].class_weight == "balanced"
    with pytest.raises(HeadError, match="class_weight"):
        featurecache.fit_head(cache, head=("knn",), class_weight="heavy")


# --------------------------------------------------------------------------- sweep files


def test_sweep_file_grid(tmp_path, cache):
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text(
        '[[head]]\nname = "logreg"\nC = [0.1, 1]\npre = "standardize"\n\n'
        '[[head]]\nname = "mlp"\nhidden = [16, [16, 8]]\ndropout = 0.0\nbatch_norm = true\nepochs = 3\n\n'
        '[[head]]\nname = "nearest-centroid"\n'
    )
    specs = grids.read_sweep_file(sweep_file)
    assert specs == ["logreg:C=0.1,1;pre=standardize", "mlp:hidden=16,16x8;dropout=0.0;batch_norm=true;epochs=3",
                     "nearest-centroid"]
    res = featurecache.fit_head(cache, sweep_file=str(sweep_file), head=("knn",), jobs=1)
    assert grid_heads(res.leaderboard) == {
        "knn", "logreg:C=0.1;pre=standardize", "logreg:C=1;pre=standardize", "nearest-centroid",
        "mlp:batch_norm=true;dropout=0.0;epochs=3;hidden=16", "mlp:batch_norm=true;dropout=0.0;epochs=3;hidden=16x8"}


@pytest.mark.parametrize("text, message", [
    ('[[heads]]\nname = "knn"\n', "did you mean: head"),
    ('title = "x"\n', "unknown key 'title'"),
    ("", "declares no heads"),
    ('[[head]]\nC = [1]\n', "has no name"),
    ('[[head]]\nname = "logreg"\nC = []\n', "has no values"),
    ("[[head]\n", "not valid TOML"),
])
def test_bad_sweep_files(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(HeadError, match=re.escape(message)):
        grids.build_grid(sweep_file=path)


def test_default_sweep_runs_without_a_grid(monkeypatch):
    monkeypatch.setattr(grids, "DEFAULT_SWEEP", ["knn:n_neighbors=1,3", "nearest-centroid"])
    assert [c.spec for c in grids.build_grid()] == ["knn:n_neighbors=1", "knn:n_neighbors=3", "nearest-centroid"]


# --------------------------------------------------------------------------- runs and their caches


def test_load_refuses_a_head_trained_on_other_features(tmp_path):
    folder = tmp_path / "fc-cache"
    cache = digits_cache(folder)
    res = featurecache.fit_head(cache, head=("knn",), jobs=1)
    digits_cache(folder, seed=1, tag="another-backbone")  # same file, other features
    for load in (runs.load_run, runs.load_head):
        with pytest.raises(RunError, match=r"was trained on features .* but .* now holds .*; re-run fc fit-head"):
            load(res.run_dir)
    Path(cache).unlink()
    with pytest.raises(RunError, match="no longer exists"):
        runs.load_head(res.run_dir)


def test_resolve_run_by_path_id_and_prefix(cache):
    res = featurecache.fit_head(cache, head=("knn",), jobs=1)
    run = Path(res.run_dir)
    folder = Path(cache).parent
    assert runs.resolve_run(run) == run
    assert runs.resolve_run(run.name, folder) == run
    assert runs.resolve_run(run.name.rpartition("-")[2][:6], folder) == run
    assert runs.load_run(run.name, folder).best == res.best
    with pytest.raises(RunError, match="no run matches"):
        runs.resolve_run("nope", folder)
    with pytest.raises(RunError, match=r"no head 'knm'.*did you mean: knn"):
        runs.load_head(run, "knm")


# --------------------------------------------------------------------------- CLI


def test_cli_json_is_the_result_object(cache, cli_runner):
    out = run_cli(cli_runner, "fit-head", cache, "--head", "logreg:C=1", "--head", "knn", "--jobs", 1, "--json")
    assert out.exit_code == 0, out.output
    obj = json.loads(out.stdout)
    assert set(obj) == {"run_dir", "best", "leaderboard", "failed"} and obj["best"] == obj["leaderboard"][0]["head"]
    assert obj["failed"] == []
    assert [e["head"] for e in obj["leaderboard"]] == [e["head"] for e in runs.load_run(obj["run_dir"]).leaderboard]
    assert all(set(e) == entry_keys(e) for e in obj["leaderboard"])


def test_cli_table_heads_and_show(cache, cli_runner):
    out = run_cli(cli_runner, "fit-head", cache, "--head", "logreg:C=1", "--head", "knn", "--jobs", 1)
    assert out.exit_code == 0, out.output
    assert "val acc (selection)" in out.output and "best: " in out.output
    run_dir = out.output.split()[0]
    listing = run_cli(cli_runner, "heads")
    assert listing.exit_code == 0
    from featurecache.heads import list_heads

    assert all(re.search(rf"^{re.escape(name)}\s", listing.output, re.M) for name in list_heads())
    assert [r["name"] for r in json.loads(run_cli(cli_runner, "heads", "--json").stdout)] == list_heads()
    shown = run_cli(cli_runner, "heads", "show", Path(run_dir).name, "--cache-dir", Path(cache).parent)
    assert shown.exit_code == 0, shown.output
    assert "logreg:C=1" in shown.output and "per" not in shown.stderr and "precision" in shown.output
    shown_json = json.loads(run_cli(cli_runner, "heads", "show", run_dir, "--json").stdout)
    assert shown_json["run_dir"] == run_dir and shown_json["leaderboard"][0]["head"] == shown_json["best"]


def test_cli_options_match_the_api():
    from featurecache.cli import cli

    api = set(inspect.signature(sweep.fit_head).parameters)
    options = {p.name for p in cli.commands["fit-head"].params} - {"as_json"}
    assert options <= api and api - options == {"progress"}


def _incomplete(tmp_path):
    import h5py

    path = digits_cache(tmp_path / "half")
    with h5py.File(path, "r+") as f:
        f.attrs["complete"] = False
    return path


def _one_class(tmp_path):
    labels = {"train": np.full(300, 4), "val": np.arange(150) % 10}
    return digits_cache(tmp_path / "one", sizes=(("train", 300), ("val", 150)), labels=labels)


def _empty_sweep_file(tmp_path):
    (tmp_path / "empty.toml").write_text("# nothing yet\n")
    return ["--sweep-file", tmp_path / "empty.toml"]


@pytest.mark.parametrize("case, args, message", [
    ("missing cache", lambda t, c: [t / "nope.h5"], "no cache matches"),
    ("incomplete cache", lambda t, c: [_incomplete(t)], "not a complete featurecache file"),
    ("unknown head", lambda t, c: [c, "--head", "logreg2:C=1"], "did you mean: logreg"),
    ("unknown parameter", lambda t, c: [c, "--head", "logreg:c=1"], "did you mean: C"),
    ("one class", lambda t, c: [_one_class(t), "--head", "knn"], "split 'train' has only one class (4)"),
    ("empty values", lambda t, c: [c, "--head", "logreg:C="], "has no values"),
    ("empty head", lambda t, c: [c, "--head", " "], "empty head spec"),
    ("empty sweep file", lambda t, c: [c, *_empty_sweep_file(t)], "declares no heads"),
    ("too many folds", lambda t, c: [digits_cache(t / "cv", sizes=(("train", 30),)), "--head", "knn", "--cv", 10],
     "for 10-fold cross-validation"),
])
def test_cli_bad_input_is_one_line(tmp_path, cache, cli_runner, case, args, message):
    out = run_cli(cli_runner, "fit-head", *args(tmp_path, cache), "--jobs", 1)
    assert out.exit_code != 0, case
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), out.stderr
    assert message in lines[0], lines[0]


def test_cli_show_unknown_run(tmp_path, cli_runner):
    out = run_cli(cli_runner, "heads", "show", "nothing-here", "--cache-dir", tmp_path)
    assert out.exit_code != 0 and out.stderr.startswith("Error: no run matches")


# --------------------------------------------------------------------------- real features


@pytest.mark.slow
def test_default_sweep_on_hymenoptera_reaches_094(hymenoptera_cache):
    res = featurecache.fit_head(hymenoptera_cache)
    assert len(res.leaderboard) >= 20
    assert len({e["head"].partition(":")[0] for e in res.leaderboard}) >= 5
    assert res.leaderboard[0]["selection_split"] == "val"
    assert res.leaderboard[0]["metrics"]["val"]["accuracy"] >= 0.94


# --------------------------------------------------------------------------- registering a head


@pytest.fixture
def register():
    """``register(name, factory, **facts)``: one register_head call, undone after the test."""
    from featurecache.heads import HEADS, register_head

    names = []

    def add(name, factory, **facts):
        names.append(name)
        return register_head(name, factory, **facts)

    yield add
    for name in names:
        HEADS.pop(name, None)


def _lda(*, solver="svd", shrinkage=None):
    """Linear discriminant analysis."""
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    return LinearDiscriminantAnalysis(solver=solver, shrinkage=shrinkage)


def test_a_head_registered_in_one_call_is_swept_saved_listed_and_transferable(cache, register):
    import torch

    from featurecache.heads import coef_module, to_torch

    htype = register("lda", _lda, family="linear", simplicity=1, cost=2, to_module=coef_module)
    assert htype.transferable and htype.defaults == {"solver": "svd", "shrinkage": None}
    row = next(r for r in sweep.list_head_types() if r["name"] == "lda")
    assert row == {**row, "family": "linear", "transferable": True, "simplicity": 1, "cost": 2, "warm_path": None,
                   "description": "Linear discriminant analysis."}
    res = featurecache.fit_head(cache, head=("lda:solver=svd,lsqr;pre=standardize", "knn"), jobs=1)
    assert grid_heads(res.leaderboard) == {"lda:pre=standardize;solver=svd", "lda:pre=standardize;solver=lsqr", "knn"}
    assert runs.best_transferable(res.leaderboard).startswith("lda:")
    pipeline, head_meta = runs.load_head(res.run_dir, "best-transferable")
    assert head_meta["name"] == "lda" and head_meta["transferable"]
    X, _, _ = store.load_features(cache, "test")
    with torch.no_grad():
        logits = to_torch(pipeline, "lda")(torch.from_numpy(X)).double()
    np.testing.assert_allclose(torch.softmax(logits, dim=1).numpy(), pipeline.predict_proba(X), atol=1e-4)


@pytest.mark.parametrize("simplicity, first", [(-1, "twin-centroid"), (9, "nearest-centroid")])
def test_a_registered_simplicity_breaks_leaderboard_ties(cache, register, simplicity, first):
    from featurecache.heads.sklearn_heads import SoftmaxNearestCentroid

    def twin():
        """Nearest centroid under another name."""
        return SoftmaxNearestCentroid()

    register("twin-centroid", twin, family="neighbors", simplicity=simplicity,
             trusted=["featurecache.heads.sklearn_heads.SoftmaxNearestCentroid"])
    board = featurecache.fit_head(cache, head=("nearest-centroid", "twin-centroid"), jobs=1, ensemble=False).leaderboard
    assert board[0]["metrics"] == board[1]["metrics"]  # a tie on every number
    assert board[0]["head"] == first


def test_a_registered_warm_path_is_fitted_as_a_path(cache, register, monkeypatch):
    from sklearn.ensemble import ExtraTreesClassifier

    def extra_trees(*, n_estimators=100, random_state=None):
        """Extremely randomized trees."""
        return ExtraTreesClassifier(n_estimators=n_estimators, random_state=random_state)

    register("extra-trees", extra_trees, family="trees", warm_path="n_estimators", cost=3,
             trusted=["sklearn.tree._tree.Tree"])
    paths = []
    real = engine.FITTERS["warm-path"]

    def spy(configs, *args):
        paths.append([c.spec for c in configs])
        return real(configs, *args)

    monkeypatch.setitem(engine.FITTERS, "warm-path", spy)
    res = featurecache.fit_head(cache, head=("extra-trees:n_estimators=20,10", "knn"), jobs=1)
    assert paths == [["extra-trees:n_estimators=10", "extra-trees:n_estimators=20"]]  # ascending, one path
    assert grid_heads(res.leaderboard) == {"extra-trees:n_estimators=10", "extra-trees:n_estimators=20", "knn"}
    assert runs.load_head(res.run_dir, "extra-trees:n_estimators=20")[0].named_steps["head"].warm_start is False


def test_a_concurrent_identical_run_that_finished_first_is_kept(cache, monkeypatch):
    first = featurecache.fit_head(cache, head=("knn",), jobs=1)
    run_json = Path(first.run_dir) / "run.json"
    before = (run_json.stat().st_ino, run_json.read_text())
    monkeypatch.setattr(sweep, "_reused", lambda plan, started: None)  # the other run finished after our lookup
    second = featurecache.fit_head(cache, head=("knn",), jobs=1)
    assert second.run_dir == first.run_dir and not second.reused and second.best == first.best
    assert (run_json.stat().st_ino, run_json.read_text()) == before
    assert [p.name for p in Path(first.run_dir).parent.iterdir()] == [Path(first.run_dir).name]  # nothing left over
