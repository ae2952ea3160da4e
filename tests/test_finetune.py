"""Stage three: the network built from a run starts exactly where its head was, trains, resumes and exports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import REPO, run_cli
from PIL import Image

import featurecache
from featurecache import finetuning, store
from featurecache.errors import FinetuneError
from featurecache.heads import HEADS
from featurecache.images import ImageTensors
from featurecache.sweep import load_head

TRANSFERABLE = [name for name, head in HEADS.items() if head.transferable]
# a preprocessing per head type, so that every kind of fold (standardize, pca, l2) is exercised
PRE = {"linear": "standardize", "mlp": "l2", "logreg": "pca:6", "linear-svm": "standardize"}
TINY = dict(backbone="mobilenet_v2", resize=64, crop=56, workers=0, batch_size=16, progress=False)
RESULT_KEYS = {"model", "head", "head_accuracy", "start_accuracy", "best_accuracy", "epochs", "split"}
# acceptance on ants/bees: the documented command, every layer trained on the whole train split
HYMENOPTERA_FINETUNE = ["--epochs", "2"]


def spec(name: str) -> str:
    return f"{name}:pre={PRE[name]}" if name in PRE else name


def make_colored_images(root: Path, n_classes: int, per_split=(("train", 8), ("val", 5))) -> Path:
    """Class k has its own mean color plus noise: small, learnable, and decodes in microseconds."""
    rng = np.random.default_rng(n_classes)
    colors = rng.integers(40, 215, size=(n_classes, 3))
    for split, n in per_split:
        for k in range(n_classes):
            for i in range(n):
                arr = np.clip(colors[k] + rng.normal(0, 60, size=(40, 48, 3)), 0, 255).astype(np.uint8)
                path = root / split / f"class{k}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr, "RGB").save(path)
    return root


def tiny_run(base: Path, n_classes: int, heads: list[str], weights: str, per_split=(("train", 8), ("val", 5)),
             images: Path | None = None):
    """(run dir, cache) of a real MobileNetV2 cache of tiny images and the given heads (reused when present)."""
    images = images or base / f"images-{n_classes}"
    if not images.is_dir():
        make_colored_images(images, n_classes, per_split)
    res = featurecache.extract(str(images), weights=weights, cache_dir=str(base / "cache"), **TINY)
    run = featurecache.fit_head(res.cache, head=heads, jobs=1, cache_dir=str(base / "cache"))
    return run.run_dir, res.cache


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, real_weights):
    base = tmp_path_factory.mktemp("finetune-tiny")
    heads = [spec(n) for n in TRANSFERABLE] + ["knn"]
    return {n: tiny_run(base, n, heads, real_weights) for n in (2, 3)}


# --------------------------------------------------------------------------- assembling


@pytest.mark.slow
@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("name", TRANSFERABLE)
def test_network_at_step_0_predicts_what_the_head_predicted(tiny_runs, name, n_classes):
    run_dir, cache = tiny_runs[n_classes]
    parts = finetuning.assemble(run_dir, spec(name))
    X, _, paths = featurecache.load_features(cache, "val")
    expected = parts.pipeline.predict_proba(X)

    data, labels = finetuning.cache_images(store.info(cache), "val")
    assert [r.path for r in data.records] == paths
    images = ImageTensors(data, np.arange(len(labels)), parts.backbone.preprocess, None)
    batch = torch.stack([images[i][1] for i in range(len(images))])
    with torch.inference_mode():
        got = finetuning.Exported(parts.network, parts.backbone.preprocess).eval()(batch).numpy()
    assert got.shape == expected.shape == (len(paths), n_classes)
    assert (got.argmax(1) == expected.argmax(1)).all()
    assert np.abs(got - expected).max() < 1e-4


@pytest.mark.slow
def test_a_head_that_cannot_be_a_layer_names_the_best_one_that_can(tiny_runs, cli_runner):
    run_dir, _ = tiny_runs[3]
    ranking = json.loads((Path(run_dir) / "leaderboard.json").read_text())
    best = next(e["head"] for e in ranking if HEADS[e["head"].partition(":")[0]].transferable)
    with pytest.raises(FinetuneError, match=f"head knn cannot become a layer.*the best head that can is {best}"):
        featurecache.finetune(run_dir, head="knn")
    result = run_cli(cli_runner, "finetune", run_dir, "--head", "knn")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and best in lines[0]


@pytest.mark.slow
def test_best_transferable_picks_the_top_head_that_can_be_a_layer(tiny_runs):
    run_dir, _ = tiny_runs[3]
    ranking = json.loads((Path(run_dir) / "leaderboard.json").read_text())
    best = next(e["head"] for e in ranking if HEADS[e["head"].partition(":")[0]].transferable)
    parts = finetuning.assemble(run_dir, "best-transferable")
    assert parts.head_meta["head"] == best
    assert parts.network is not None


def test_a_random_weights_cache_rebuilds_its_backbone(tmp_path):
    """weights=none is a seeded initialization: the rebuilt network computes the cached features."""
    run_dir, cache = tiny_run(tmp_path, 2, ["logreg:pre=standardize"], "none")
    parts = finetuning.assemble(run_dir, "best-transferable")
    X, _, _ = featurecache.load_features(cache, "val")
    data, labels = finetuning.cache_images(store.info(cache), "val")
    images = ImageTensors(data, np.arange(len(labels)), parts.backbone.preprocess, None)
    batch = torch.stack([images[i][1] for i in range(len(images))])
    with torch.inference_mode():
        got = finetuning.Exported(parts.network, parts.backbone.preprocess).eval()(batch).numpy()
    assert np.abs(got - parts.pipeline.predict_proba(X)).max() < 1e-4


def test_unfreeze_selects_the_last_blocks_and_bn_stays_frozen():
    with torch.device("meta"):
        model = torchvision.models.mobilenet_v2()
    blocks = finetuning.parameter_blocks(model)
    assert len(blocks) == 20  # features.0 .. features.18 and the classifier
    net = finetuning.Network(model.features, torch.nn.Linear(1280, 2))
    backbone_params = finetuning.prepare(net, "last:2", "frozen")
    names = {n for n, p in net.backbone.named_parameters() if p.requires_grad}
    assert names and {n.split(".")[0] for n in names} == {"17", "18"}
    bn_params = {id(p) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()}
    assert not any(id(p) in bn_params for p in backbone_params)  # BN scales and shifts stay as pretrained
    assert len(backbone_params) == len(names) and all(p.requires_grad for p in net.head.parameters())
    finetuning.train_mode(net, "frozen")
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and net.head.training
    finetuning.prepare(net, "none", "train")
    assert not any(p.requires_grad for p in net.backbone.parameters())
    finetuning.prepare(net, "all", "train")
    assert all(p.requires_grad for p in net.backbone.parameters())
    with torch.device("meta"):
        resnet = torchvision.models.resnet18()
    groups = finetuning.parameter_blocks(resnet)
    assert [len(g) for g in groups[:2]] == [1, 2] and len(groups) == 2 + 8 + 1  # conv1, bn1, 8 BasicBlocks, fc


@pytest.mark.parametrize("options, message", [
    (dict(unfreeze="last"), "last:N"),
    (dict(unfreeze="half"), "unknown --unfreeze"),
    (dict(optimizer="adam"), "did you mean: adamw"),
    (dict(bn="fixed"), "unknown --bn"),
    (dict(augment="heavy"), "unknown --augment"),
    (dict(epochs=0), "--epochs must be at least 1"),
])
def test_bad_options_are_one_line_errors(tmp_path, options, message):
    with pytest.raises(FinetuneError, match=message):
        featurecache.finetune(str(tmp_path / "no-run"), **options)


# --------------------------------------------------------------------------- training and export


@pytest.mark.slow
def test_finetune_trains_exports_and_is_reused(tiny_runs, cli_runner, tmp_path):
    run_dir, cache = tiny_runs[3]
    result = featurecache.finetune(run_dir, head="logreg:pre=pca:6", epochs=2, batch_size=4, workers=0,
                                   checkpoint_every=2, progress=False)
    _, head_meta = load_head(run_dir, "logreg:pre=pca:6")
    assert set(result.to_dict()) == RESULT_KEYS
    assert result.split == "val" and result.head == "logreg:pre=pca:6"
    assert result.head_accuracy == head_meta["metrics"]["val"]["accuracy"] == result.start_accuracy
    assert result.best_accuracy >= result.start_accuracy and result.epochs == 2
    out = Path(result.output_dir)
    assert out.parent == Path(run_dir) / "finetune"
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]
    for h in history[1:]:
        assert {"train_loss", "val_loss", "val_accuracy", "seconds", "lr"} <= set(h) and h["train_loss"] > 0
    assert history[result.best_epoch]["val_accuracy"] == result.best_accuracy
    assert result.metrics["finetuned"]["val"]["accuracy"] == result.best_accuracy
    assert result.metrics["head"]["val"]["accuracy"] == result.head_accuracy

    # the export needs torch only, and holds class names and preprocessing
    script = (
        "import sys, json, torch; sys.modules['featurecache'] = None\n"
        "files = {'featurecache.json': ''}\n"
        f"model = torch.jit.load({result.model!r}, _extra_files=files)\n"
        "info = json.loads(files['featurecache.json'])\n"
        "p = model(torch.zeros(3, 3, info['preprocess']['crop'], info['preprocess']['crop'], dtype=torch.uint8))\n"
        "print(json.dumps({'classes': info['classes'], 'preprocess': info['preprocess'], 'shape': list(p.shape),"
        " 'sum': float(p.sum())}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    exported = json.loads(done.stdout)
    assert exported["classes"] == ["class0", "class1", "class2"]
    assert exported["preprocess"] == store.info(cache)["config"]["preprocess"]
    assert exported["shape"] == [3, 3] and abs(exported["sum"] - 3.0) < 1e-4

    # the same request again is a lookup; the CLI prints exactly the documented keys
    again = run_cli(cli_runner, "finetune", run_dir, "--head", "logreg:pre=pca:6", "--epochs", "2",
                    "--batch-size", "4", "--workers", "0", "--checkpoint-every", "2", "--json")
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout) == result.to_dict()


def _checkpoint_state(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)["state"]


@pytest.mark.slow
def test_resume_after_sigkill_mid_epoch(tmp_path_factory, real_weights):
    per_split = (("train", 16), ("val", 4))
    base_killed, base_clean = tmp_path_factory.mktemp("killed"), tmp_path_factory.mktemp("clean")
    run_dir, _ = tiny_run(base_killed, 2, ["logreg"], real_weights, per_split)
    args = dict(epochs=2, batch_size=2, workers=0, checkpoint_every=3, augment="light", progress=False)
    cli_args = ["--epochs", "2", "--batch-size", "2", "--workers", "0", "--checkpoint-every", "3"]
    n_batches = 16  # 32 training images in batches of 2

    log = base_killed / "finetune.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "featurecache", "finetune", run_dir, *cli_args, "--json"],
                                cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, env=os.environ.copy())
    last = None
    deadline = time.monotonic() + 300
    seen_mtime = None
    while time.monotonic() < deadline and proc.poll() is None:
        found = list((Path(run_dir) / "finetune").glob("*/last.pt"))
        if found and found[0].stat().st_mtime_ns != seen_mtime:
            seen_mtime = found[0].stat().st_mtime_ns
            if _checkpoint_state(found[0])["batch"] > 0:  # the first mid-epoch checkpoint
                proc.send_signal(signal.SIGKILL)
                last = found[0]
                break
        time.sleep(0.01)
    proc.wait()
    assert last is not None, log.read_text()[-2000:]
    assert proc.returncode == -signal.SIGKILL
    saved = _checkpoint_state(last)
    assert saved["epoch"] == 0 and 0 < saved["batch"] < n_batches and saved["batch"] % 3 == 0
    assert not (last.parent / "result.json").exists()

    resumed = featurecache.finetune(run_dir, resume=True, **args)
    assert resumed.resumed_from == {"epoch": saved["epoch"], "batch": saved["batch"], "step": saved["step"]}
    assert resumed.epochs == 2 and Path(resumed.model).is_file()
    assert resumed.start_accuracy == resumed.head_accuracy

    # the same images, cache key and run in another cache folder, trained without interruption: the same numbers
    clean_dir, _ = tiny_run(base_clean, 2, ["logreg"], real_weights, per_split, images=base_killed / "images-2")
    assert Path(clean_dir).name == Path(run_dir).name
    clean = featurecache.finetune(clean_dir, **args)
    assert Path(clean.output_dir).name == Path(resumed.output_dir).name
    for a, b in zip(resumed.history, clean.history, strict=True):
        assert a["val_accuracy"] == b["val_accuracy"]
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4, abs=1e-6)
        if a["train_loss"] is not None:
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4, abs=1e-6)


# --------------------------------------------------------------------------- acceptance on ants and bees


def finetune_hymenoptera(runner, cache: str) -> dict:
    """``fc finetune RUN --epochs 2`` from a logreg run on the real ants/bees cache (reused once done)."""
    run = featurecache.fit_head(cache, head=["logreg"], cache_dir=str(Path(cache).parent))
    result = run_cli(runner, "finetune", run.run_dir, *HYMENOPTERA_FINETUNE, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.slow
def test_hymenoptera_logreg_finetune_starts_at_the_head_and_does_not_lose(hymenoptera_cache, cli_runner):
    out = finetune_hymenoptera(cli_runner, hymenoptera_cache)
    assert set(out) == RESULT_KEYS
    assert out["head"] == "logreg" and out["split"] == "val" and out["epochs"] == 2
    assert out["start_accuracy"] == out["head_accuracy"]
    assert out["best_accuracy"] >= out["head_accuracy"]
    history = json.loads((Path(out["model"]).parent / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2] and all(h["train_loss"] > 0 for h in history[1:])
    config = json.loads((Path(out["model"]).parent / "config.json").read_text())
    assert config["unfreeze"] == "all" and config["epochs"] == 2
    print(json.dumps({**out, "history": [{k: h[k] for k in ("epoch", "train_loss", "val_accuracy", "seconds")}
                                         for h in history]}, indent=1))
