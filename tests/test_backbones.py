"""Backbones by name: every torchvision classifier, timm as an option, offline weights."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import FASHION_MNIST, run_cli
from torch import nn

import featurecache
from featurecache import store
from featurecache.backbones import models as backbones
from featurecache.data.preprocess import Preprocess
from featurecache.errors import BackboneError

ALL = torchvision.models.list_models(module=torchvision.models)


def _family(name: str) -> str:
    return re.split(r"\d|_", name)[0]


# One small member of each family is built and run for real; all are checked for their feature width.
SMALLEST = {}
for _name in ALL:
    SMALLEST.setdefault(_family(_name), _name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_every_torchvision_model_has_a_penultimate_layer(name):
    with backbones._empty_weights():
        model = torchvision.models.get_model(name)
    classifier, width = backbones.find_classifier(model)
    out = model.get_submodule(classifier)
    assert (out.out_features if hasattr(out, "out_features") else out.out_channels) == 1000
    assert width == backbones.feature_dim(name) > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALLEST.values()))
def test_one_model_per_family_returns_its_features(name):
    net = backbones.build(name, weights="none")
    size = net.preprocess.crop if name.startswith(("vit", "swin", "maxvit")) else 64
    if name.startswith("inception"):
        size = 80
    with torch.inference_mode():
        out = net.model(torch.randn(2, 3, size, size))
    assert out.shape == (2, net.feature_dim)


def test_preprocessing_comes_from_the_weights():
    assert backbones.build("mobilenet_v2", weights="none").preprocess.resize == 232  # DEFAULT = V2 recipe
    inception = backbones.SOURCES[""].default_preprocess("inception_v3", None)
    assert (inception.resize, inception.crop) == (342, 299)


def test_unknown_names_suggest_close_matches():
    with pytest.raises(BackboneError, match="did you mean: mobilenet_v2"):
        backbones.build("mobilenetv2")
    with pytest.raises(BackboneError, match="IMAGENET1K_V1"):
        backbones.build("resnet18", weights="IMAGENET")


def test_timm_backbone_with_random_weights(image_folder, tmp_path):
    pytest.importorskip("timm")
    res = featurecache.extract(str(image_folder), backbone="timm/resnet18", weights="none", resize=48, crop=40,
                               workers=0, progress=False, cache_dir=str(tmp_path))
    assert res.feature_dim == 512 and res.splits["train"]["n"] == 12


def test_timm_preprocessing_and_features_come_from_the_model():
    pytest.importorskip("timm")
    pre = backbones.resolve_preprocess("timm/resnet18", "none")
    assert (pre.resize, pre.crop, pre.interpolation) == (236, 224, "bicubic")  # timm's crop_pct 0.95, not ImageNet's
    # MobileNetV3 has a 1024-wide layer after its 576 pooled channels: the features are what its classifier reads
    net = backbones.build("timm/mobilenetv3_small_100", weights="none")
    assert net.classifier == "classifier" and net.feature_dim == backbones.feature_dim("timm/mobilenetv3_small_100")
    with torch.inference_mode():
        assert net.model(torch.zeros(2, 3, 64, 64)).shape == (2, net.feature_dim) == (2, 1024)


def test_weights_identity_is_what_identifies_the_weights(tmp_path):
    assert backbones.weights_identity("mobilenet_v2", "none") == {"weights": "none", "init_seed": 0}
    named = backbones.weights_identity("mobilenet_v2", "DEFAULT")
    assert named == backbones.weights_identity("mobilenet_v2", "IMAGENET1K_V2")  # DEFAULT is V2: one identity
    assert named["weights"] == "MobileNet_V2_Weights.IMAGENET1K_V2" and named["url"].endswith(".pth")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "w.pth").write_bytes(b"some weights")
    (tmp_path / "b" / "w.pth").write_bytes(b"some weights")
    digest = hashlib.sha256(b"some weights").hexdigest()
    for folder in ("a", "b"):  # the file's content identifies it, not where it lies
        assert backbones.weights_identity("resnet18", weights_file=tmp_path / folder / "w.pth") == {"sha256": digest}
    (tmp_path / "b" / "w.pth").write_bytes(b"other weights!")
    assert backbones.weights_identity("resnet18", weights_file=tmp_path / "b" / "w.pth")["sha256"] != digest
    with pytest.raises(BackboneError, match="weights file not found"):
        backbones.weights_identity("resnet18", weights_file=tmp_path / "missing.pth")


# --------------------------------------------------------------------------- a new source


class ToySource(backbones.BackboneSource):
    """A tiny convolutional network as ``toy/tiny``: its DEFAULT weights are a fixed ramp, no download."""

    prefix = "toy/"

    def names(self):
        return ["toy/tiny"]

    def weight_names(self, name):
        return ["DEFAULT"]

    def weights_identity(self, name, weights):
        if weights != "DEFAULT":
            raise BackboneError(f"unknown weights {weights!r} for {name}; choose one of: DEFAULT, none")
        return {"weights": "toy:DEFAULT"}

    def default_preprocess(self, name, weights):
        return Preprocess(resize=36, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))

    def create(self, name, weights):
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
        if weights == "DEFAULT":
            with torch.no_grad():
                for i, param in enumerate(model.parameters()):
                    param.copy_(torch.linspace(-1, 1, param.numel()).view_as(param) * (i + 1) / 4)
        return model


@pytest.fixture
def toy_source(monkeypatch):
    """``toy/tiny``, registered for one test."""
    monkeypatch.setitem(backbones.SOURCES, ToySource.prefix, ToySource())
    return "toy/tiny"


def _toy_reference(image_folder, paths):
    """What the toy network computes for ``paths``, with plain torchvision transforms."""
    from PIL import Image
    from torchvision import transforms

    model = ToySource().create("toy/tiny", "DEFAULT").eval()
    prepare = transforms.Compose([transforms.Resize(36), transforms.CenterCrop(32), transforms.ToTensor(),
                                  transforms.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))])
    batch = torch.stack([prepare(Image.open(image_folder / p).convert("RGB")) for p in paths])
    with torch.inference_mode():
        return model[:4](batch).numpy()  # everything before its classifier


def test_a_new_source_is_a_class_registered_in_sources(toy_source, image_folder, tmp_path):
    assert toy_source in backbones.list_backbones() and backbones.feature_dim(toy_source) == 8
    res = featurecache.extract(str(image_folder), backbone=toy_source, workers=0, progress=False,
                               cache_dir=str(tmp_path))
    assert res.feature_dim == 8 and res.splits == {"train": {"n": 12, "skipped": 0}, "val": {"n": 8, "skipped": 0}}
    config = store.info(res.cache)["config"]
    assert config["weights"] == {"backbone": "toy/tiny", "weights": "toy:DEFAULT"}
    assert (config["preprocess"]["resize"], config["preprocess"]["crop"]) == (36, 32)  # the source's own
    X, _, paths = featurecache.load_features(res.cache, "train")
    np.testing.assert_allclose(X, _toy_reference(image_folder, paths), rtol=1e-4, atol=1e-5)
    again = featurecache.extract(str(image_folder), backbone=toy_source, workers=0, progress=False,
                                 cache_dir=str(tmp_path))
    assert again.reused and again.cache == res.cache
    seeded = featurecache.extract(str(image_folder), backbone=toy_source, weights="none", workers=0,
                                  progress=False, cache_dir=str(tmp_path))
    assert seeded.cache != res.cache
    assert store.info(seeded.cache)["config"]["weights"]["init_seed"] == 0
    with pytest.raises(BackboneError, match="choose one of: DEFAULT, none"):
        featurecache.extract(str(image_folder), backbone=toy_source, weights="IMAGENET1K_V1", workers=0,
                             progress=False, cache_dir=str(tmp_path))


def test_weights_import_checks_the_hash(cli_runner, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    wrong = tmp_path / "resnet18-f37072fd.pth"
    wrong.write_bytes(b"definitely not resnet18")
    out = run_cli(cli_runner, "weights", "import", wrong, "--backbone", "resnet18", "--weights", "IMAGENET1K_V1")
    assert out.exit_code == 2 and "torchvision expects f37072fd" in out.stderr


@pytest.mark.slow
def test_weights_import_puts_the_file_where_torchvision_looks(cli_runner, tmp_path, monkeypatch, real_weights):
    source = Path(torch.hub.get_dir()) / "checkpoints" / "mobilenet_v2-b0353104.pth"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    out = run_cli(cli_runner, "weights", "import", source, "--backbone", "mobilenet_v2", "--weights", "IMAGENET1K_V1")
    assert out.exit_code == 0, out.output
    dest = tmp_path / "torch-home" / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"
    assert hashlib.sha256(dest.read_bytes()).hexdigest().startswith("b0353104")
    torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")  # loads with no download


def test_missing_weights_offline_say_how_to_import(cli_runner, image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: (_ for _ in ()).throw(OSError("offline")))
    out = run_cli(cli_runner, "extract", image_folder, "--backbone", "resnet18", "--weights", "IMAGENET1K_V1",
                  "--workers", 0, "--cache-dir", tmp_path / "c")
    assert out.exit_code == 2 and "fc weights import" in out.stderr


def test_backbones_command_lists_feature_dims(cli_runner):
    out = run_cli(cli_runner, "backbones")
    assert out.exit_code == 0
    line = next(row for row in out.stdout.splitlines() if row.startswith("mobilenet_v2 "))
    assert "1280" in line and "IMAGENET1K_V1" in line
    assert len([row for row in out.stdout.splitlines() if row.strip()]) == len(ALL) + 2


def test_help_does_not_import_torch():
    code = "import sys; from featurecache.cli import cli; print('torch' in sys.modules, 'h5py' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_torchvision_dataset_from_debian_files(tmp_path):
    res = featurecache.extract("torchvision:FashionMNIST", root=str(FASHION_MNIST), limit=20, resize=32, crop=32,
                               weights="none", workers=0, progress=False, cache_dir=str(tmp_path))
    info = store.info(res.cache)
    assert info["classes"][0] == "Ankle boot" and len(info["classes"]) == 10  # sorted class names
    assert res.splits == {"train": {"n": 20, "skipped": 0}, "test": {"n": 20, "skipped": 0}}
    X, _, paths = featurecache.load_features(res.cache, "test")
    assert X.shape == (20, 1280) and paths[0].startswith("test/")
