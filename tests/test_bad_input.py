"""Bad input: one-line errors for unusable requests, recorded skips for single bad images."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, make_image, make_split_folder, run_cli
from PIL import Image

import featurecache
from featurecache import store
from featurecache.errors import FeatureCacheError

FAST_ARGS = ["--weights", "none", "--resize", 48, "--crop", 40, "--workers", 0]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def write_bomb(path: Path, side: int = 30000) -> None:
    """A tiny PNG that claims side x side pixels: a decompression bomb."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\0" * (side + 1) * 4)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b""))


@pytest.fixture
def corpus(tmp_path) -> Path:
    """Every kind of bad and unusual file, next to good ones."""
    root = make_split_folder(tmp_path / "corpus", splits=(("train", 3), ("val", 2)))
    bad = root / "train" / "cats"
    (bad / "zero.jpg").write_bytes(b"")
    full = (bad / "cats_0.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (bad / "text.jpg").write_text("this is not an image\n")
    (bad / "notes.txt").write_text("a stray file\n")
    write_bomb(bad / "bomb.png")
    good = root / "train" / "dogs"
    make_image(good / "cmyk.jpg", 1, mode="CMYK")
    make_image(good / "rgba.png", 2, mode="RGBA")
    make_image(good / "palette.png", 3, mode="P")
    pal = Image.open(good / "palette.png")
    pal.save(good / "palette_transparent.png", transparency=0)
    make_image(good / "gray.png", 4, mode="L")
    make_image(good / "bw.png", 5, mode="1")
    make_image(good / "anim.gif", 6, mode="P")
    Image.fromarray(np.full((40, 48), 40000, dtype=np.uint16)).save(good / "deep16.png")
    return root


def test_bad_images_are_skipped_and_recorded(corpus, tmp_path):
    res = featurecache.extract(str(corpus), cache_dir=str(tmp_path / "c"), **FAST)
    skipped = dict(store.load_skipped(res.cache, "train"))
    assert set(skipped) == {f"train/cats/{n}" for n in ("zero.jpg", "truncated.jpg", "text.jpg", "notes.txt", "bomb.png")}
    assert "empty file" in skipped["train/cats/zero.jpg"]
    assert "truncated" in skipped["train/cats/truncated.jpg"]
    assert "not an image" in skipped["train/cats/text.jpg"]
    assert "extension" in skipped["train/cats/notes.txt"]
    assert "decompression bomb" in skipped["train/cats/bomb.png"]
    _, _, paths = featurecache.load_features(res.cache, "train")
    converted = {"cmyk.jpg", "rgba.png", "palette.png", "palette_transparent.png", "gray.png", "bw.png", "anim.gif", "deep16.png"}
    assert converted <= {Path(p).name for p in paths}
    assert res.splits["train"] == {"n": 6 + len(converted), "skipped": 5}


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    from featurecache.data import Dataset, Record
    from featurecache.images import load_rgb

    Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16)).save(tmp_path / "a.png")
    rgb = load_rgb(Dataset(str(tmp_path), ["x"], [], "t"), Record("a.png", 0, "train"))
    assert rgb.mode == "RGB" and np.asarray(rgb)[0, 0].tolist() == [128, 128, 128]


def test_strict_fails_on_the_first_bad_image(cli_runner, corpus, tmp_path):
    out = run_cli(cli_runner, "extract", corpus, *FAST_ARGS, "--cache-dir", tmp_path, "--strict")
    assert out.exit_code != 0
    assert out.stderr.startswith("Error: ") and len(out.stderr.strip().splitlines()) == 1
    assert "--strict" in out.stderr


def _empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _no_images(tmp_path):
    (tmp_path / "txt" / "cls").mkdir(parents=True)
    (tmp_path / "txt" / "cls" / "a.txt").write_text("x")
    return tmp_path / "txt"


def _all_corrupt(tmp_path):
    (tmp_path / "bad" / "cls").mkdir(parents=True)
    (tmp_path / "bad" / "cls" / "a.jpg").write_text("x")
    return tmp_path / "bad"


@pytest.mark.parametrize(
    "make_data, extra, message",
    [
        (lambda t: t / "missing", [], "does not exist"),
        (_empty, [], "empty"),
        (_no_images, [], "no images"),
        (lambda t: make_split_folder(t / "ok"), ["--backbone", "resnet5"], "did you mean: resnet50"),
        (lambda t: make_split_folder(t / "ok"), ["--weights", "IMAGENET1K_V9"], "unknown weights"),
        (lambda t: make_split_folder(t / "ok"), ["--layer", "features.99"], "unknown layer"),
        (lambda t: make_split_folder(t / "ok") / "train", ["--split", "train=0.5,val=0.2"], "sum to 1"),
        (lambda t: make_split_folder(t / "ok"), ["--split", "train=0.8,val=0.2"], "drop --split"),
        (lambda t: t, ["--device", "cuda:3"] if not __import__("torch").cuda.is_available() else ["--device", "tpu"], "device"),
        (lambda t: "torchvision:FashionMNST", [], "did you mean: FashionMNIST"),
    ],
    ids=["missing", "empty", "no-images", "unknown-backbone", "unknown-weights", "unknown-layer",
         "bad-split", "split-on-split-folders", "bad-device", "unknown-dataset"],
)
def test_bad_requests_get_one_line_errors(cli_runner, tmp_path, make_data, extra, message):
    data = make_data(tmp_path)
    args = ["extract", data, "--resize", 48, "--crop", 40, "--workers", 0, "--cache-dir", tmp_path / "c", *extra]
    if "--weights" not in extra:
        args += ["--weights", "none"]
    out = run_cli(cli_runner, *args)
    assert out.exit_code != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), out.stderr
    assert message in lines[0]


def test_weights_file_needs_preprocessing(cli_runner, image_folder, tmp_path):
    (tmp_path / "w.pth").write_bytes(b"")
    out = run_cli(cli_runner, "extract", image_folder, "--backbone", "resnet18", "--weights-file", tmp_path / "w.pth")
    assert out.exit_code != 0 and "needs its preprocessing stated" in out.stderr


def test_all_images_unreadable_still_writes_an_honest_cache(tmp_path):
    res = featurecache.extract(str(_all_corrupt(tmp_path)), cache_dir=str(tmp_path / "c"), **FAST)
    assert res.splits["train"] == {"n": 0, "skipped": 1}


def test_weights_file_roundtrip_and_mismatch(image_folder, tmp_path):
    import torch
    import torchvision

    model = torchvision.models.resnet18(weights=None, num_classes=3)  # another head size still loads
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    res = featurecache.extract(str(image_folder), backbone="resnet18", weights_file=str(tmp_path / "r18.pth"),
                               resize=48, crop=40, workers=0, progress=False, cache_dir=str(tmp_path / "c"))
    cfg = store.info(res.cache)["config"]
    assert res.feature_dim == 512 and len(cfg["weights"]["sha256"]) == 64
    with pytest.raises(FeatureCacheError, match="does not fit"):
        featurecache.extract(str(image_folder), backbone="resnet34", weights_file=str(tmp_path / "r18.pth"),
                             resize=48, crop=40, workers=0, progress=False, cache_dir=str(tmp_path / "c"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(FeatureCacheError, match="cannot read weights file"):
        featurecache.extract(str(image_folder), backbone="resnet18", weights_file=str(tmp_path / "junk.pth"),
                             resize=48, crop=40, workers=0, progress=False, cache_dir=str(tmp_path / "c"))
