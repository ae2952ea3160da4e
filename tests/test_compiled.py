"""Stage one's forward forms: AOTInductor artifacts cached on disk, and the bf16 gate of --precision auto."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import FAST, make_split_folder

import featurecache as fc
from featurecache import store
from featurecache.errors import FeatureCacheWarning, UsageError
from featurecache.extraction import compiled, stage


@pytest.fixture
def images(tmp_path):
    return make_split_folder(tmp_path / "images", splits=(("train", 6), ("val", 3)))


def _config(res) -> dict:
    return store.info(res.cache)["config"]


def test_artifact_fields_name_what_the_compile_depends_on():
    fields = compiled.artifact_fields({"backbone": "b", "weights": {"weights": "none"}}, 8, (3, 40, 40), "fp32")
    assert {"torch", "cpu", "flags", "backbone", "weights", "batch", "shape", "precision", "format"} <= set(fields)
    assert fields["torch"] == torch.__version__ and fields["batch"] == 8 and fields["shape"] == [3, 40, 40]
    key = compiled.artifact_key(fields)
    assert key == compiled.artifact_key(dict(fields))
    for change in ({"batch": 4}, {"shape": [3, 32, 32]}, {"precision": "bf16"}, {"flags": []}, {"torch": "0"},
                   {"weights": {"sha256": "x"}}):
        assert compiled.artifact_key({**fields, **change}) != key


def test_a_damaged_artifact_is_removed_not_raised(tmp_path):
    artifacts = compiled.Artifacts(tmp_path / "compiled")
    artifacts.folder.mkdir()
    artifacts.package("k").write_bytes(b"not a package")
    artifacts.package("k").with_suffix(".json").write_text("{}")
    with pytest.warns(FeatureCacheWarning, match="does not load"):
        assert artifacts.load("k") is None
    assert not list(artifacts.folder.iterdir())
    assert artifacts.load("missing") is None


def test_compile_cost_estimate(tmp_path):
    artifacts = compiled.Artifacts(tmp_path / "compiled")
    assert artifacts.compile_seconds() == compiled.DEFAULT_COMPILE_S
    artifacts.folder.mkdir()
    for i, s in enumerate((10, 30, 20)):
        (artifacts.folder / f"{i}.json").write_text(json.dumps({"compile_seconds": s}))
    (artifacts.folder / "bad.json").write_text("{")
    assert artifacts.compile_seconds() == 20


def test_padded_runs_smaller_and_larger_batches():
    calls = []

    def model(x):
        calls.append(len(x))
        return x.flatten(1)[:, :2] * 2

    padded = compiled.Padded(model, 4)
    x = torch.arange(3 * 2 * 2 * 2, dtype=torch.float32).reshape(3, 2, 2, 2)
    assert torch.equal(padded(x), x.flatten(1)[:, :2] * 2)
    big = torch.ones(6, 2, 2, 2)
    assert padded(big).shape == (6, 2) and calls == [4, 4, 4]


def test_unknown_aoti_is_a_usage_error(images):
    with pytest.raises(UsageError, match="--aoti"):
        fc.extract(str(images), **FAST, aoti="sometimes")


@pytest.mark.slow
def test_artifact_compiled_once_then_reused_and_keys_unchanged(tmp_path, images, monkeypatch):
    """--aoti on compiles once; a second job of the same shape loads the artifact (no compile); the
    cache key is the one of a run without it."""
    cache = tmp_path / "cache"
    compiles = []
    real = compiled.Artifacts.compile
    monkeypatch.setattr(compiled.Artifacts, "compile", lambda self, *a: compiles.append(1) or real(self, *a))
    plain = fc.extract(str(images), **FAST, aoti="off", cache_dir=str(tmp_path / "plain"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = fc.extract(str(images), **FAST, aoti="on", cache_dir=str(cache))
    assert first.key == plain.key and len(compiles) == 1
    config = _config(first)
    assert config["graph"] == "aot-inductor" and "compiled in" in config["compiled"]
    packages = sorted((cache / "compiled").glob("*.pt2"))
    assert len(packages) == 1
    fields = json.loads(packages[0].with_suffix(".json").read_text())
    assert fields["batch"] == FAST["batch_size"] and fields["shape"] == [3, 40, 40] and fields["precision"] == "fp32"
    assert fields["backbone"] == "mobilenet_v2" and fields["compile_seconds"] > 0
    other = make_split_folder(tmp_path / "other", splits=(("train", 5),))
    second = fc.extract(str(other), **FAST, aoti="on", cache_dir=str(cache))
    assert len(compiles) == 1 and _config(second)["compiled"].endswith("cached")
    assert fc.load_features(second.cache, "train")[0].shape[0] == 10  # 10 rows at batch 8: the last one padded
    reference = fc.extract(str(other), **FAST, aoti="off", cache_dir=str(tmp_path / "plain"))
    torch.testing.assert_close(torch.from_numpy(fc.load_features(second.cache, "train")[0]),
                               torch.from_numpy(fc.load_features(reference.cache, "train")[0]), atol=1e-3, rtol=1e-3)


def _gate(monkeypatch, capable: bool, cosine: float = 1.0, gain: float = 2.0):
    monkeypatch.setattr(stage, "FREEZE_MIN_IMAGES", 4)
    monkeypatch.setattr(compiled, "bf16_capable", lambda flags=None: capable)
    monkeypatch.setattr(compiled, "min_cosine", lambda a, b: cosine)
    monkeypatch.setattr(stage.runtime, "speedup", lambda *a, **k: gain)


@pytest.mark.parametrize("capable, cosine, gain, used", [
    (False, 1.0, 2.0, False),  # no bf16 dot products: not measured
    (True, 0.998, 2.0, False),  # features too far from fp32's
    (True, 1.0, 1.05, False),  # not faster enough
    (True, 1.0, 2.0, True),
])
def test_bf16_gate(tmp_path, images, monkeypatch, capable, cosine, gain, used):
    _gate(monkeypatch, capable, cosine, gain)
    fp32 = fc.extract(str(images), **FAST, precision="fp32", aoti="off", cache_dir=str(tmp_path / "fp32"))
    res = fc.extract(str(images), **FAST, aoti="off", cache_dir=str(tmp_path / "auto"))
    config = _config(res)
    assert config["bf16"]["used"] is used
    assert config["precision"] == ("bf16" if used else "fp32")
    assert (res.key == fp32.key) is (not used)  # bf16 enters the key only when used
    if capable:
        assert config["bf16"]["cosine"] == cosine
    if used:
        explicit = fc.extract(str(images), **FAST, precision="bf16", aoti="off", cache_dir=str(tmp_path / "auto"))
        assert explicit.reused and explicit.key == res.key


def test_bf16_gate_reuses_a_cache_without_measuring(tmp_path, images, monkeypatch):
    _gate(monkeypatch, True, 1.0, 2.0)
    fc.extract(str(images), **FAST, precision="fp32", cache_dir=str(tmp_path))
    monkeypatch.setattr(stage, "_measure_bf16", lambda *a: pytest.fail("measured"))
    again = fc.extract(str(images), **FAST, cache_dir=str(tmp_path))
    assert again.reused
