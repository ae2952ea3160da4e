"""Run directories that cannot run code: skops and safetensors files, checked against run.json.

A run directory is something people share. Loading one must never execute what it
holds: pickles of the first run format are refused unless the caller trusts them,
every file is checked against the sha256 run.json records, and a skops file may hold
only the types the registered heads produce.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from pathlib import Path

import joblib
import numpy as np
import pytest
import skops.io
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer
from test_sweep import digits_cache

import featurecache
from featurecache import files, store
from featurecache.errors import RunError
from featurecache.heads import list_heads
from featurecache.sweep import engine, runs

KNN, LINEAR = "knn:n_neighbors=3", "linear:epochs=5"  # the heads of the run_dir fixture

# Small budgets: every head fits 300 digits in well under a second.
FAST = {
    "linear": "epochs=10;lr=0.01",
    "mlp": "epochs=10;hidden=16;batch_norm=true;dropout=0.2",
    "random-forest": "n_estimators=10",
    "hgb": "max_iter=10",
    "sklearn.ensemble.ExtraTreesClassifier": "n_estimators=10",
}


@pytest.fixture
def cache(tmp_path) -> str:
    return digits_cache(tmp_path / "fc-cache")


@pytest.fixture
def run_dir(cache) -> Path:
    """A run with a scikit-learn head and a torch head."""
    return Path(featurecache.fit_head(cache, head=(KNN, LINEAR), jobs=1).run_dir)


def _spec(name: str, pre: str) -> str:
    return f"{name}:{FAST[name]};pre={pre}" if name in FAST else f"{name}:pre={pre}"


def _rewrite_run_json(run: Path, **changes) -> None:
    meta = json.loads((run / "run.json").read_text())
    meta.update(changes)
    files.write_json(run / "run.json", {k: v for k, v in meta.items() if v is not None})


def _record(run: Path, path: Path) -> None:
    """Record ``path``'s current sha256 in run.json, as someone who rewrites both files would."""
    sha256 = json.loads((run / "run.json").read_text())["sha256"]
    _rewrite_run_json(run, sha256={**sha256, path.relative_to(run).as_posix(): files.sha256_file(path)})


def _one_line_run_error(call) -> str:
    with pytest.raises(RunError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- (d) every head round-trips


@pytest.mark.parametrize("name", [*list_heads(), "sklearn.ensemble.ExtraTreesClassifier"])
def test_every_head_type_round_trips_exactly(cache, name, monkeypatch):
    saved = {}
    real = engine.dump_head

    def spy(pipeline, cfg):
        saved[cfg.spec] = pipeline
        return real(pipeline, cfg)

    monkeypatch.setattr(engine, "dump_head", spy)
    specs = [_spec(name, pre) for pre in ("standardize", "l2", "pca:8")]
    res = featurecache.fit_head(cache, head=specs, jobs=1)
    assert res.failed == [] and set(saved) == {e["head"] for e in res.leaderboard} - {"ensemble"}
    X, _, _ = store.load_features(cache, "test")
    for spec, fitted in saved.items():
        pipeline, head_meta = runs.load_head(res.run_dir, spec)
        assert head_meta["head"] == spec and type(pipeline.named_steps["head"]) is type(fitted.named_steps["head"])
        assert np.array_equal(pipeline.predict_proba(X), fitted.predict_proba(X))
        assert not list((Path(res.run_dir) / "heads" / runs.slug(spec)).glob("*.joblib"))


def test_torch_heads_are_rebuilt_from_json_and_safetensors(run_dir):
    pipeline, head_meta = runs.load_head(run_dir, LINEAR)
    head = pipeline.named_steps["head"]
    assert head_meta["estimator"]["class"] == "featurecache.heads.torch_heads.TorchLinearClassifier"
    assert head.get_params() == head_meta["estimator"]["params"]
    assert head.classes_.tolist() == list(range(10)) and head.n_features_in_ == 64
    assert not head.module_.training


# --------------------------------------------------------------------------- (b) tampered files


@pytest.mark.parametrize("relative", [
    "heads/knn-n_neighbors=3/pipeline.skops",
    "heads/linear-epochs=5/module.safetensors",
    "heads/linear-epochs=5/head.json",
])
def test_a_tampered_head_file_is_refused(run_dir, relative):
    head = relative.split("/")[1]
    path = run_dir / relative
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    message = _one_line_run_error(lambda: runs.load_head(run_dir, head))
    assert str(path) in message and "sha256 mismatch" in message
    other = "linear-epochs=5" if head.startswith("knn") else "knn-n_neighbors=3"
    assert runs.load_head(run_dir, other)[1]["head"]  # the other head is untouched and loads


def test_a_missing_or_unrecorded_head_file_is_refused(run_dir):
    folder = run_dir / "heads" / "knn-n_neighbors=3"
    (folder / "extra.skops").write_bytes((folder / "pipeline.skops").read_bytes())
    assert "is not one of the files run.json records" in _one_line_run_error(lambda: runs.load_head(run_dir, KNN))
    (folder / "extra.skops").unlink()
    (folder / "pipeline.skops").unlink()
    assert "is missing" in _one_line_run_error(lambda: runs.load_head(run_dir, KNN))


# --------------------------------------------------------------------------- (c) types outside the allow-list


def test_a_skops_file_with_an_untrusted_type_is_refused_even_with_a_matching_hash(run_dir, monkeypatch):
    path = run_dir / "heads" / "knn-n_neighbors=3" / "pipeline.skops"
    good = skops.io.load(path, trusted=skops.io.get_untrusted_types(file=path))
    skops.io.dump(Pipeline([("pre", FunctionTransformer(os.system)), ("head", good.named_steps["head"])]), path)
    _record(run_dir, path)  # the hash matches: only the allow-list stands in the way
    loads = []
    monkeypatch.setattr(skops.io, "load", lambda *args, **kwargs: loads.append(args))
    message = _one_line_run_error(lambda: runs.load_head(run_dir, KNN))
    assert "posix.system" in message and str(path) in message and "refused" in message
    assert loads == []  # refused before skops builds a single object


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_a_head_whose_file_would_hold_an_untrusted_type_is_not_saved(cache):
    # scikit-learn's MLPClassifier keeps its optimizer object, a type no registered head holds
    res = featurecache.fit_head(cache, head=("sklearn.neural_network.MLPClassifier:max_iter=20", "knn"), jobs=1)
    [failed] = res.failed
    assert failed["head"].startswith("sklearn.neural_network.MLPClassifier") and "AdamOptimizer" in failed["error"]
    assert [e["head"] for e in res.leaderboard if e["head"] != "ensemble" and "transfer_of" not in e] == ["knn"]
    saved = {p.name for p in (Path(res.run_dir) / "heads").iterdir()}
    assert saved == {runs.slug(e["head"]) for e in res.leaderboard} and not any(n.startswith("sklearn") for n in saved)


# --------------------------------------------------------------------------- (a) runs of the pickle format


class _Payload:
    """Unpickling this creates a marker file: what a malicious model.joblib would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _as_pickle_run(run: Path) -> Path:
    """Turn a run into the first format: heads pickled in model.joblib, no format and no sha256 in run.json."""
    for folder in (run / "heads").iterdir():
        pipeline, _ = runs.load_head(run, folder.name)
        for path in folder.iterdir():
            if path.name != "head.json":
                path.unlink()
        joblib.dump(pipeline, folder / "model.joblib")
    _rewrite_run_json(run, format=None, sha256=None)
    return run


def test_a_planted_pickle_is_refused_and_never_runs(run_dir, tmp_path):
    run = _as_pickle_run(run_dir)
    marker = tmp_path / "pwned"
    joblib.dump(_Payload(marker), run / "heads" / "knn-n_neighbors=3" / "model.joblib")
    for head in (KNN, "best", LINEAR):
        message = _one_line_run_error(lambda h=head: runs.load_head(run, h))
        assert "model.joblib is a pickle" in message and "can run any code" in message
        assert "--trust" in message and "re-run fc fit-head" in message
    assert not marker.exists()
    runs.load_head(run, KNN, trust=True)  # the payload is real: trusting it runs it
    assert marker.exists()


def test_a_pickle_run_loads_when_trusted(run_dir, cache):
    X, _, _ = store.load_features(cache, "test")
    expected = {h: runs.load_head(run_dir, h)[0].predict_proba(X) for h in (KNN, LINEAR)}
    run = _as_pickle_run(run_dir)
    assert runs.load_run(run).format == "featurecache-run/1"
    for head, proba in expected.items():
        pipeline, head_meta = runs.load_head(run, head, trust=True)
        assert head_meta["head"] == head
        assert np.array_equal(pipeline.predict_proba(X), proba)


def test_a_new_fit_never_reuses_a_pickle_run(cache, run_dir):
    specs = (KNN, LINEAR)
    # where the first format kept a run of these inputs: its id hashed them without a format
    payload = json.dumps({"cache_key": store.info(cache)["key"], "heads": sorted(specs), "seed": 0, "cv": None,
                          "class_weight": None}, sort_keys=True)
    old = run_dir.with_name(f"digits-{hashlib.sha256(payload.encode()).hexdigest()[:12]}")
    _as_pickle_run(run_dir).rename(old)
    _rewrite_run_json(old, run_id=old.name)
    fresh = featurecache.fit_head(cache, head=specs, jobs=1)
    assert not fresh.reused and Path(fresh.run_dir) == run_dir  # a fresh run under this format's id
    assert Path(fresh.run_dir) != old and runs.load_run(fresh.run_dir).format == "featurecache-run/2"
    assert (old / "heads" / "knn-n_neighbors=3" / "model.joblib").is_file()  # the old run is left as it was


def test_a_run_of_an_unknown_format_is_refused(run_dir):
    _rewrite_run_json(run_dir, format="featurecache-run/99")
    message = _one_line_run_error(lambda: runs.load_run(run_dir))
    assert "featurecache-run/99" in message and "upgrade featurecache" in message


def test_the_cli_refuses_a_pickle_run_in_one_line_and_loads_it_with_trust(run_dir, tmp_path):
    from click.testing import CliRunner

    from featurecache.cli import cli

    run = _as_pickle_run(run_dir)
    marker = tmp_path / "pwned"
    joblib.dump(_Payload(marker), run / "heads" / "knn-n_neighbors=3" / "model.joblib")
    refused = CliRunner().invoke(cli, ["report", str(run), "--head", KNN, "--samples", "0"])
    assert refused.exit_code == 3
    assert refused.stderr.strip().count("\n") == 0 and "--trust" in refused.stderr
    assert not marker.exists()
    trusted = CliRunner().invoke(cli, ["report", str(run), "--head", LINEAR, "--samples", "0", "--trust"])
    assert trusted.exit_code == 0, trusted.output
    assert Path(trusted.stdout.strip()).name == "report.html" and not marker.exists()
