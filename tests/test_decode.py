"""Where JPEGs are decoded (``--decode auto|cpu|gpu``).

This machine may have no GPU, so the GPU decoder runs here as its CPU twin: the same
batched ``torchvision.io.decode_jpeg`` and the same tensor resize, crop and normalization,
on the CPU. Its features must match the PIL path's (cosine >= 0.999).
"""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import torch
from conftest import FAST, REPO, make_image, run_cli
from PIL import Image

import featurecache
from featurecache import store
from featurecache.backbones import models as backbones
from featurecache.data.images import DECODERS, JpegFiles, normalize_batch
from featurecache.data.sources import open_dataset
from featurecache.extraction import stage as extractor

sys.path.insert(0, str(REPO / "bench"))
from device_check import write_photos

CPU = torch.device("cpu")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _features_both_ways(data, weights: str, n: int = 12):
    """Features of the first ``n`` images decoded by PIL and by the GPU decoder's code on the CPU."""
    dataset = open_dataset(str(data))
    net = backbones.build("mobilenet_v2", weights=weights)
    rows = np.arange(min(n, len(dataset.records)))
    out = []
    for decoder in DECODERS.values():
        images = decoder(dataset, rows, net.preprocess, None)
        indices, payload, reasons = images.collate([images[i] for i in range(len(rows))])
        batch, reasons = images.to_batch(indices, payload, reasons, CPU)
        assert not any(reasons)
        with torch.inference_mode():
            out.append(net.model(normalize_batch(batch, net.preprocess)).numpy())
    return out


def test_the_gpu_decoder_on_the_cpu_matches_pil(tmp_path):
    pil, tensors = _features_both_ways(write_photos(tmp_path / "photos", 10, size=(200, 150)), "none")
    assert _cosines(pil, tensors).min() >= 0.999


@pytest.mark.slow
def test_the_gpu_decoder_on_the_cpu_matches_pil_on_photos(hymenoptera, real_weights):
    pil, tensors = _features_both_ways(hymenoptera, real_weights, n=24)
    assert _cosines(pil, tensors).min() >= 0.999


def test_decode_gpu_without_cuda_is_one_line(cli_runner, image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = run_cli(cli_runner, "extract", image_folder, "--weights", "none", "--decode", "gpu", "--cache-dir", tmp_path)
    lines = out.stderr.strip().splitlines()
    assert out.exit_code == 2 and len(lines) == 1, out.stderr
    assert lines[0] == "Error: --decode gpu needs a CUDA device that decodes JPEGs (no CUDA device); " \
                       "use --decode cpu or auto"


def test_auto_decodes_with_pil_on_a_cpu(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    auto = featurecache.extract(str(image_folder), cache_dir=str(tmp_path), decode="auto", **FAST)
    cpu = featurecache.extract(str(image_folder), cache_dir=str(tmp_path), decode="cpu", **FAST)
    assert cpu.reused and cpu.key == auto.key
    config = store.info(auto.cache)["config"]
    assert config["decode"] == "cpu"


def _mixed_folder(root):
    """Photos, a PNG, a grayscale and a CMYK JPEG, a truncated and a broken one."""
    write_photos(root, 10, size=(120, 90))
    make_image(root / "train" / "a" / "z-png.png", 1, size=(100, 80))
    make_image(root / "train" / "b" / "z-gray.jpg", 2, size=(100, 80), mode="L")
    make_image(root / "val" / "a" / "z-cmyk.jpg", 3, size=(100, 80), mode="CMYK")
    whole = (root / "train" / "b" / "00001.jpg").read_bytes()
    (root / "val" / "b" / "z-truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "val" / "b" / "z-broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    return root


def test_gpu_decoding_end_to_end_on_the_cpu(tmp_path, monkeypatch):
    """The whole --decode gpu path (workers send bytes, batched decode, PIL for the rest), on the CPU:
    the same images used and skipped, features within cosine 0.999, and its own cache key."""
    data = _mixed_folder(tmp_path / "mixed")
    options = {**FAST, "workers": 1, "batch_size": 4}
    pil = featurecache.extract(str(data), cache_dir=str(tmp_path / "c"), **options)
    monkeypatch.setattr(extractor, "resolve_decode", lambda decode, device, draft: "gpu")
    tensors = featurecache.extract(str(data), cache_dir=str(tmp_path / "c"), **options)
    assert tensors.key != pil.key and store.info(tensors.cache)["config"]["decode"] == "gpu"
    assert sorted(tensors.skipped) == sorted(pil.skipped)
    assert {p.rsplit("/", 1)[-1] for _, p, _ in pil.skipped} == {"z-truncated.jpg", "z-broken.jpg"}
    for split in ("train", "val"):
        (x, y, paths), (x2, y2, paths2) = (featurecache.load_features(r.cache, split) for r in (pil, tensors))
        assert paths == paths2 and list(y) == list(y2)
        assert _cosines(x, x2).min() >= 0.999


def test_only_plain_jpegs_go_to_the_device(tmp_path):
    data = _mixed_folder(tmp_path / "mixed")
    dataset = open_dataset(str(data))
    pre = backbones.resolve_preprocess("mobilenet_v2", "none", resize=48, crop=40)
    files = JpegFiles(dataset, np.arange(len(dataset.records)), pre, None)
    as_bytes = {r.path.rsplit("/", 1)[-1] for i, r in enumerate(dataset.records) if files.jpeg_bytes(i) is not None}
    assert "z-gray.jpg" in as_bytes and "00001.jpg" in as_bytes and "z-truncated.jpg" in as_bytes
    assert not as_bytes & {"z-png.png", "z-cmyk.jpg", "z-broken.jpg"}
    limited = JpegFiles(dataset, np.arange(len(dataset.records)), pre, max_pixels=100)
    assert all(limited.jpeg_bytes(i) is None for i in range(len(dataset.records)))  # too big: PIL says why
    with Image.open(io.BytesIO((data / "train" / "b" / "00001.jpg").read_bytes())) as img:
        assert img.format == "JPEG"
