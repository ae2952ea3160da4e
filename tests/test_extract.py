"""Stage one: fc extract writes an exact, reusable, self-describing cache."""

from __future__ import annotations

import json
import random

import h5py
import numpy as np
import pytest
from conftest import FAST, make_image, run_cli

import featurecache
from featurecache import store


def test_extract_layout_and_provenance(image_folder, tmp_path):
    res = featurecache.extract(str(image_folder), cache_dir=str(tmp_path / "c"), **FAST)
    assert not res.reused
    assert res.feature_dim == 1280
    assert res.splits == {"train": {"n": 12, "skipped": 0}, "val": {"n": 8, "skipped": 0}}
    with h5py.File(res.cache, "r") as f:  # plain h5py reads it
        assert json.loads(f.attrs["classes"]) == ["cats", "dogs"]
        cfg = json.loads(f.attrs["config"])
        assert f["train/features"].shape == (12, 1280)
        assert f["train/features"].chunks is not None
        assert f["train/labels"].dtype == np.int64
        paths = list(f["train/paths"].asstr()[...])
        assert f["val/skipped"].shape == (0, 2)
    assert paths == sorted(paths) and paths[0] == "train/cats/cats_0.jpg"
    for key in ("backbone", "weights", "preprocess", "layer", "precision", "dtype", "versions", "data", "created"):
        assert key in cfg
    assert cfg["precision"] == "fp32" and cfg["preprocess"]["crop"] == 40
    assert cfg["versions"]["torch"]
    X, y, _ = featurecache.load_features(res.cache, "val")
    assert X.shape == (8, 1280) and X.dtype == np.float32 and list(y) == [0] * 4 + [1] * 4


def test_reuse_and_any_change_makes_a_new_entry(image_folder, tmp_path):
    cache_dir = str(tmp_path / "c")
    first = featurecache.extract(str(image_folder), cache_dir=cache_dir, **FAST)
    again = featurecache.extract(str(image_folder), cache_dir=cache_dir, **FAST)
    assert again.reused and again.cache == first.cache
    assert featurecache.extract(str(image_folder), cache_dir=cache_dir, **{**FAST, "crop": 32}).cache != first.cache
    assert featurecache.extract(str(image_folder), cache_dir=cache_dir, **FAST, dtype="float16").cache != first.cache
    # touching the data (a new image) changes the fingerprint: never a stale read
    make_image(image_folder / "val" / "cats" / "new.jpg", 999)
    changed = featurecache.extract(str(image_folder), cache_dir=cache_dir, **FAST)
    assert changed.cache != first.cache and changed.splits["val"]["n"] == 9


def test_float16_storage(image_folder, tmp_path):
    res = featurecache.extract(str(image_folder), cache_dir=str(tmp_path), dtype="float16", **FAST)
    with h5py.File(res.cache, "r") as f:
        assert f["train/features"].dtype == np.float16
    X, _, _ = featurecache.load_features(res.cache, "train")
    assert X.dtype == np.float32


def test_layer_option_pools_any_module(image_folder, tmp_path):
    res = featurecache.extract(str(image_folder), cache_dir=str(tmp_path), layer="features.4", **FAST)
    assert res.feature_dim == 32  # MobileNetV2 block 4 has 32 channels
    X, _, _ = featurecache.load_features(res.cache, "train")
    assert X.shape == (12, 32)


def test_single_folder_with_split_is_stratified_and_seeded(tmp_path):
    root = tmp_path / "flat"
    for cls in ("a", "b"):
        for i in range(10):
            make_image(root / cls / f"{i}.png", hash((cls, i)) % 1000)
    res = featurecache.extract(str(root), split="train=0.8,val=0.2", cache_dir=str(tmp_path / "c"), **FAST)
    assert res.splits == {"train": {"n": 16, "skipped": 0}, "val": {"n": 4, "skipped": 0}}
    _, y, paths = featurecache.load_features(res.cache, "val")
    assert sorted(y.tolist()) == [0, 0, 1, 1]
    other = featurecache.extract(str(root), split="train=0.8,val=0.2", seed=1, cache_dir=str(tmp_path / "c"), **FAST)
    assert featurecache.load_features(other.cache, "val")[2] != paths


def test_csv_manifest(tmp_path):
    rows = ["path,label,split"]
    for i in range(6):
        make_image(tmp_path / "imgs" / f"{i}.jpg", i)
        rows.append(f"imgs/{i}.jpg,{'zebra' if i % 2 else 'apple'},{'train' if i < 4 else 'test'}")
    manifest = tmp_path / "m.csv"
    manifest.write_text("\n".join(rows) + "\n")
    res = featurecache.extract(str(manifest), cache_dir=str(tmp_path / "c"), **FAST)
    assert res.splits == {"train": {"n": 4, "skipped": 0}, "test": {"n": 2, "skipped": 0}}
    assert store.info(res.cache)["classes"] == ["apple", "zebra"]


def test_json_output_shape(cli_runner, image_folder, tmp_path):
    out = run_cli(cli_runner, "extract", image_folder, "--weights", "none", "--resize", 48, "--crop", 40,
                  "--workers", 0, "--cache-dir", tmp_path, "--json")
    assert out.exit_code == 0, out.output
    obj = json.loads(out.stdout)
    assert set(obj) == {"cache", "reused", "feature_dim", "splits", "images_per_s", "seconds", "missing", "layers",
                        "views"}
    assert obj["layers"] == {"features.6": 32, "features.13": 96, "features.17": 320}  # --layers auto
    assert obj["views"] == 0
    assert obj["splits"]["train"] == {"n": 12, "skipped": 0} and obj["images_per_s"] > 0 and obj["missing"] == 0


def test_cache_list_info_rm(cli_runner, image_folder, tmp_path):
    res = featurecache.extract(str(image_folder), cache_dir=str(tmp_path), **FAST)
    listed = run_cli(cli_runner, "cache", "list", "--cache-dir", tmp_path)
    assert "complete" in listed.stdout and "mobilenet_v2" in listed.stdout
    info = run_cli(cli_runner, "cache", "info", res.key[:10], "--cache-dir", tmp_path, "--json")
    assert json.loads(info.stdout)["splits"]["train"]["n"] == 12
    rm = run_cli(cli_runner, "cache", "rm", res.cache, "--cache-dir", tmp_path)
    assert rm.exit_code == 0 and not (tmp_path / res.cache).exists()
    assert "no caches" in run_cli(cli_runner, "cache", "list", "--cache-dir", tmp_path).stdout


@pytest.mark.slow
def test_matches_plain_torchvision(hymenoptera_cache, hymenoptera):
    """Acceptance: cached rows equal what plain torchvision computes (cosine >= 0.9999 in fp32)."""
    import torch
    import torchvision
    from PIL import Image

    weights = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1
    model = torchvision.models.mobilenet_v2(weights=weights).eval()
    model.classifier = torch.nn.Identity()
    transform = weights.transforms()
    for split in ("train", "val"):
        X, _, paths = featurecache.load_features(hymenoptera_cache, split)
        idx = random.Random(split).sample(range(len(paths)), 12)
        with torch.inference_mode():
            batch = torch.stack([transform(Image.open(hymenoptera / paths[i]).convert("RGB")) for i in idx])
            ref = model(batch).numpy()
        got = X[idx]
        cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
        assert cos.min() >= 0.9999, cos.min()


@pytest.mark.slow
def test_hymenoptera_counts_keep_the_gif_and_the_space(hymenoptera_cache):
    info = store.info(hymenoptera_cache)
    assert info["classes"] == ["ants", "bees"]
    assert info["splits"]["train"]["n"] == 245 and info["splits"]["val"]["n"] == 153
    _, _, paths = featurecache.load_features(hymenoptera_cache, "train")
    assert "train/ants/ant photos.jpg" in paths
    assert "train/ants/imageNotFound.gif" in paths  # a real (palette) GIF: decoded and converted, not dropped


def test_random_weights_warn_in_one_line(cli_runner, image_folder, tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        out = run_cli(cli_runner, "extract", image_folder, "--weights", "none", "--resize", 48, "--crop", 40,
                      "--workers", 0, "--cache-dir", tmp_path)
    assert out.exit_code == 0
    assert "Warning: mobilenet_v2 has random weights" in out.stderr
    assert "UserWarning" not in out.stderr


def test_random_weights_are_seeded_and_leave_the_global_generator_alone(image_folder, tmp_path):
    import torch

    kwargs = {**FAST, "weights": "none"}
    state = torch.random.get_rng_state()
    first = featurecache.extract(str(image_folder), cache_dir=str(tmp_path / "a"), **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(1234)  # another global state does not change the initialization
    second = featurecache.extract(str(image_folder), cache_dir=str(tmp_path / "b"), **kwargs)
    assert not second.reused
    assert store.info(first.cache)["config"]["weights"]["init_seed"] == 0
    X1, _, _ = featurecache.load_features(first.cache, "train")
    X2, _, _ = featurecache.load_features(second.cache, "train")
    np.testing.assert_array_equal(X1, X2)


def test_an_aborted_run_keeps_its_finished_batches(tmp_path):
    from conftest import make_split_folder

    from featurecache.errors import DataError

    data = make_split_folder(tmp_path / "data", splits=(("train", 6), ("val", 4)))
    (data / "val" / "dogs" / "zz_broken.jpg").write_bytes(b"not a jpeg")  # the last image in order
    cache_dir = tmp_path / "c"
    kwargs = {**FAST, "batch_size": 4, "cache_dir": str(cache_dir)}
    with pytest.raises(DataError, match=r"zz_broken\.jpg"):
        featurecache.extract(str(data), strict=True, **kwargs)
    shards = list(cache_dir.glob("*.partial/shard-*.npz"))
    assert shards, "the batches finished before the error are kept"
    kept = sum(len(np.load(s)["indices"]) for s in shards)
    assert kept >= 20  # everything before the last batch
    res = featurecache.extract(str(data), **kwargs)
    assert res.splits["val"] == {"n": 8, "skipped": 1}


# --------------------------------------------------------------------------- keys and progress

# What commit b0733ec (before --decode, --shard and torchrun) named these extractions of
# _fixed_folder: decoding with PIL on the CPU keeps every existing cache valid.
BASE_KEYS = {
    "plain": "1c3ad293203dcc6db4e2f16f4f1feb694a327467c148615456914a83b3ff9195",
    "float16, limit 2": "36bb9f7e48ca6027f5cac1c0b595f56168f0361d046cd50c2e6e408b86cf47a3",
}
_STAMP = 1_700_000_000_000_000_000  # the files' mtime (ns): part of the dataset's fingerprint


def _fixed_folder(root):
    """The same bytes and mtimes on every machine: raw PPM files."""
    import os

    rng = np.random.default_rng(7)
    for split in ("train", "val"):
        for cls in ("ants", "bees"):
            for i in range(3):
                path = root / split / cls / f"{i}.ppm"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"P6 24 20 255\n" + rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8).tobytes())
                os.utime(path, ns=(_STAMP, _STAMP))
    return root


def test_cache_keys_of_cpu_decoding_are_those_of_before(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = str(_fixed_folder(tmp_path / "data"))
    options = {**FAST, "cache_dir": str(tmp_path / "c")}
    plain = featurecache.extract(data, **options)
    assert plain.key == BASE_KEYS["plain"]
    assert plain.cache.endswith("/mobilenet_v2-data-1c3ad293203dcc6d.h5")
    assert featurecache.extract(data, dtype="float16", limit=2, **options).key == BASE_KEYS["float16, limit 2"]
    # how it runs is not part of the key: batch, workers, the decoder by name
    assert featurecache.extract(data, **{**options, "decode": "cpu", "batch_size": 2, "workers": 1}).reused


def test_progress_lines_when_stderr_is_a_log(image_folder, tmp_path, capsys, monkeypatch):
    from functools import partial

    from featurecache.extraction import stage as extractor
    from featurecache.progress import Progress

    monkeypatch.setattr(extractor, "Progress", partial(Progress, every=0.0))  # a line at every batch
    featurecache.extract(str(image_folder), cache_dir=str(tmp_path), **{**FAST, "progress": True})
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("extract: 20/20 images (100%), ") and "images/s" in lines[-1] and "ETA" in lines[-1]
