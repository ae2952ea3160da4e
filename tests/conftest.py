"""Shared fixtures: tiny generated image folders and the real ants/bees data."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
HYMENOPTERA = REPO.parent / "shared" / "data" / "hymenoptera_data"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# Small, fast settings for tests that only need *some* features: the penultimate ones alone (the default
# --layers auto also stores MobileNetV2's stage ends, and the default sweep then fits every head twice;
# tests/test_features_auto.py tests that).
FAST = dict(backbone="mobilenet_v2", weights="none", resize=48, crop=40, workers=0, batch_size=8, progress=False,
            layers="none")


def _mobilenet_weights_present() -> bool:
    import torch

    return (Path(torch.hub.get_dir()) / "checkpoints" / "mobilenet_v2-b0353104.pth").is_file()


def make_image(path: Path, seed: int, size=(48, 40), mode="RGB", fmt=None) -> Path:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=3)
    arr = np.clip(base + rng.normal(0, 30, size=(size[1], size[0], 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


def make_split_folder(root: Path, splits=(("train", 6), ("val", 4)), classes=("cats", "dogs")) -> Path:
    seed = 0
    for split, n in splits:
        for cls in classes:
            for i in range(n):
                seed += 1
                ext = ".jpg" if i % 2 == 0 else ".png"
                make_image(root / split / cls / f"{cls}_{i}{ext}", seed)
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own cache directory unless it passes one explicitly."""
    monkeypatch.setenv("FC_CACHE_DIR", str(tmp_path / "fc-cache"))
    warnings.filterwarnings("ignore", message=".*random weights.*")


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_split_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def hymenoptera() -> Path:
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"{HYMENOPTERA} is not there")
    return HYMENOPTERA


@pytest.fixture(scope="session")
def real_weights():
    if not _mobilenet_weights_present():
        pytest.skip("MobileNetV2 IMAGENET1K_V1 weights are not in the torch hub cache (make setup puts them there)")
    return "IMAGENET1K_V1"


@pytest.fixture(scope="session")
def hymenoptera_cache(tmp_path_factory, hymenoptera, real_weights) -> str:
    """The real MobileNetV2 features of ants/bees, extracted once per test session."""
    import featurecache

    cache_dir = tmp_path_factory.mktemp("hymenoptera-cache")
    res = featurecache.extract(str(hymenoptera), backbone="mobilenet_v2", weights=real_weights,
                               cache_dir=str(cache_dir), progress=False)
    return res.cache


@pytest.fixture
def cli_runner():
    from click.testing import CliRunner

    # click before 8.2 mixes stderr into the output unless told not to; later ones always keep it apart.
    if "mix_stderr" in inspect.signature(CliRunner).parameters:
        return CliRunner(mix_stderr=False)
    return CliRunner()


def run_cli(runner, *args):
    from featurecache.cli import cli

    return runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


