"""Bad input: one-line errors for unusable requests, recorded skips for single bad images."""

from __future__ import annotations

import itertools
import re
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, make_image, make_split_folder, run_cli
from PIL import Image

import featurecache
from featurecache import store
from featurecache.errors import DataError, FeatureCacheError

FAST_ARGS = ["--weights", "none", "--resize", 48, "--crop", 40, "--workers", 0]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)


def write_bomb(path: Path, side: int = 30000) -> None:
    """A tiny PNG that claims side x side pixels: a decompression bomb."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\0" * (side + 1) * 4)
    chunks = _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


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
    bad = ("zero.jpg", "truncated.jpg", "text.jpg", "notes.txt", "bomb.png")
    assert set(skipped) == {f"train/cats/{n}" for n in bad}
    assert "empty file" in skipped["train/cats/zero.jpg"]
    assert "truncated" in skipped["train/cats/truncated.jpg"]
    assert "not an image" in skipped["train/cats/text.jpg"]
    assert "extension" in skipped["train/cats/notes.txt"]
    assert "decompression bomb" in skipped["train/cats/bomb.png"]
    _, _, paths = featurecache.load_features(res.cache, "train")
    converted = {"cmyk.jpg", "rgba.png", "palette.png", "palette_transparent.png", "gray.png", "bw.png", "anim.gif",
                 "deep16.png"}
    assert converted <= {Path(p).name for p in paths}
    assert res.splits["train"] == {"n": 6 + len(converted), "skipped": 5}


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    from featurecache.data.images import load_rgb
    from featurecache.data.sources import Dataset, Record

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
        (lambda t: t, ["--device", "tpu"], "unknown device 'tpu'"),
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
    assert_error(run_cli(cli_runner, *args), 2, message)


def assert_error(out, code: int, message: str) -> None:
    """The command failed with ``code`` and said why in one line, ``Error: ...``."""
    assert out.exit_code == code, out.output
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), out.stderr
    assert message in lines[0], lines[0]


# --------------------------------------------------------------------------- exit codes of unusable options


# The API says what is wrong with a value; the CLI refuses most numbers out of range itself
# (click's message names the option), so both are checked.
API_LIMITS = [
    (dict(batch_size=0), "--batch-size must be at least 1, not 0"),
    (dict(checkpoint_every=0), "--checkpoint-every must be at least 1, not 0"),
    (dict(max_image_pixels=0), "--max-image-pixels must be at least 1"),
    (dict(limit=0), "--limit must be at least 1, not 0"),
    (dict(limit=-3), "--limit must be at least 1, not -3"),
    (dict(workers=-1), "--workers must be 0"),
    (dict(lock_timeout=-1), "--lock-timeout must be 0 or more"),
]


@pytest.mark.parametrize("options, message", API_LIMITS, ids=lambda v: str(v) if isinstance(v, dict) else None)
def test_unusable_extract_values_are_usage_errors(image_folder, tmp_path, options, message):
    from featurecache.errors import UsageError

    with pytest.raises(UsageError, match=re.escape(message)):
        featurecache.extract(str(image_folder), **{**FAST, "cache_dir": str(tmp_path / "c"), **options})
    assert not list((tmp_path / "c").glob("*.h5")), "nothing was extracted"


@pytest.mark.parametrize(
    "extra, message",
    [
        *[(list(itertools.chain.from_iterable(("--" + k.replace("_", "-"), v) for k, v in options.items())),
           message.split()[0]) for options, message in API_LIMITS],
        (["--device", "cuda:x"], "unknown device 'cuda:x'"),
        (["--device", "meta"], "unknown device 'meta'"),
        (["--backbone", "timm/no_such_model"], "unknown backbone"),
    ],
    ids=lambda v: " ".join(map(str, v)) if isinstance(v, list) else None,
)
def test_unusable_extract_options_exit_2(cli_runner, image_folder, tmp_path, extra, message):
    out = run_cli(cli_runner, "extract", image_folder, *FAST_ARGS, "--cache-dir", tmp_path / "c", *extra)
    assert_error(out, 2, message)
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").glob("*.h5")), "nothing was extracted"


def test_a_cuda_device_without_cuda_exits_2(cli_runner, image_folder, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine, as one without a GPU
    for device in ("cuda", "cuda:0"):
        out = run_cli(cli_runner, "extract", image_folder, *FAST_ARGS, "--device", device, "--cache-dir", tmp_path)
        assert_error(out, 2, f"device {device} asked for, but this machine has no CUDA device")


@pytest.mark.parametrize("option, value", [("--dtype", "float64"), ("--precision", "fp8"),
                                           ("--interpolation", "lanczos"), ("--batch-size", "many")])
def test_option_values_the_command_line_rejects_exit_2(cli_runner, image_folder, tmp_path, option, value):
    out = run_cli(cli_runner, "extract", image_folder, *FAST_ARGS, option, value, "--cache-dir", tmp_path)
    assert out.exit_code == 2
    assert out.stderr.strip().splitlines()[-1].startswith(f"Error: Invalid value for '{option}'"), out.stderr


@pytest.mark.parametrize("options, message", [
    (dict(dtype="float64"), "unknown dtype 'float64'"),
    (dict(precision="fp8"), "unknown precision 'fp8'"),
    (dict(device="tpu"), "unknown device 'tpu'"),
    (dict(batch_size=0), "--batch-size must be at least 1"),
])
def test_the_api_raises_usage_errors_for_what_the_cli_rejects(image_folder, tmp_path, options, message):
    from featurecache.errors import UsageError

    with pytest.raises(UsageError, match=re.escape(message)):
        featurecache.extract(str(image_folder), cache_dir=str(tmp_path), **{**FAST, **options})


@pytest.fixture
def two_caches(image_folder, tmp_path):
    cache_dir = tmp_path / "caches"
    for crop in (40, 32):
        featurecache.extract(str(image_folder), cache_dir=str(cache_dir), **{**FAST, "crop": crop})
    return cache_dir


@pytest.mark.parametrize("command", ["info", "rm"])
def test_cache_commands_on_missing_or_ambiguous_caches_exit_3(cli_runner, two_caches, tmp_path, command):
    assert_error(run_cli(cli_runner, "cache", command, "nope", "--cache-dir", two_caches), 3, "no cache matches 'nope'")
    assert_error(run_cli(cli_runner, "cache", command, "mobilenet_v2", "--cache-dir", two_caches), 3,
                 "'mobilenet_v2' matches 2 caches")
    assert len(list(two_caches.glob("*.h5"))) == 2, "nothing was removed"


def test_cache_info_on_files_that_are_not_complete_caches_exits_3(cli_runner, tmp_path):
    import h5py

    (tmp_path / "notes.h5").write_text("not HDF5\n")
    assert_error(run_cli(cli_runner, "cache", "info", tmp_path / "notes.h5"), 3, "is not a readable HDF5 cache")
    with h5py.File(tmp_path / "half.h5", "w") as f:  # what a writer had not marked complete
        f.attrs["format"] = store.FORMAT
        f.attrs["complete"] = False
    assert_error(run_cli(cli_runner, "cache", "info", tmp_path / "half.h5"), 3, "is not a complete featurecache file")


def test_backbones_command_options(cli_runner, monkeypatch):
    out = run_cli(cli_runner, "backbones", "--widths")
    last = out.stderr.strip().splitlines()[-1]
    assert out.exit_code == 2 and last.startswith("Error: No such option") and "--widths" in last
    monkeypatch.setitem(sys.modules, "timm", None)  # as on a machine without timm
    assert_error(run_cli(cli_runner, "backbones", "--timm", "--no-dims"), 2, "timm backbones need timm: pip install")


@pytest.mark.parametrize("args, message", [
    (["missing.pth", "--backbone", "resnet18"], "weights file not found: missing.pth"),
    (["w.pth", "--backbone", "resnet5"], "unknown backbone 'resnet5' (did you mean: resnet50"),
    (["w.pth", "--backbone", "resnet18", "--weights", "IMAGENET1K_V9"], "unknown weights 'IMAGENET1K_V9' for resnet18"),
    (["w.pth", "--backbone", "timm/resnet18"], "fc weights import handles torchvision weights"),
])
def test_weights_import_of_what_it_cannot_import_exits_2(cli_runner, tmp_path, monkeypatch, args, message):
    if "timm/" in args[2]:
        pytest.importorskip("timm")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    (tmp_path / "w.pth").write_bytes(b"weights")
    assert_error(run_cli(cli_runner, "weights", "import", *args), 2, message)
    assert not (tmp_path / "torch-home").exists(), "nothing was imported"


@pytest.mark.parametrize("stated", [[], ["--resize", 48], ["--crop", 40, "--mean", "0.5,0.5,0.5"]])
def test_weights_file_needs_preprocessing(cli_runner, image_folder, tmp_path, stated):
    (tmp_path / "w.pth").write_bytes(b"")
    out = run_cli(cli_runner, "extract", image_folder, "--backbone", "resnet18", "--weights-file", tmp_path / "w.pth",
                  *stated)
    assert_error(out, 2, "a weights file needs its preprocessing stated: pass --resize and --crop")


def test_a_split_without_one_readable_image_is_refused_and_no_cache_written(tmp_path):
    with pytest.raises(DataError, match=r"no image of split 'train' .* could be read: 1 file skipped \(first: "):
        featurecache.extract(str(_all_corrupt(tmp_path)), cache_dir=str(tmp_path / "c"), **FAST)
    assert list((tmp_path / "c").glob("*.h5")) == []


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
