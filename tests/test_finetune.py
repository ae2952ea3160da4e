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
from featurecache import store
from featurecache.data.images import ImageTensors, normalize_batch
from featurecache.data.preprocess import Preprocess
from featurecache.errors import FinetuneError, RunError, UsageError
from featurecache.files import sha256_file
from featurecache.finetuning import network as model
from featurecache.finetuning import trainer as finetuning
from featurecache.heads import HEADS
from featurecache.metrics import classification_metrics
from featurecache.sweep.runs import load_head

TRANSFERABLE = [name for name, head in HEADS.items() if head.transferable]
# a preprocessing per head type, so that every kind of fold (standardize, pca, l2) is exercised
PRE = {"linear": "standardize", "mlp": "l2", "logreg": "pca:6", "linear-svm": "standardize"}
# the penultimate features alone (fine-tuning a run of the default stage ends: tests/test_features_auto.py)
TINY = dict(backbone="mobilenet_v2", resize=64, crop=56, workers=0, batch_size=16, progress=False, layers="none")
RESULT_KEYS = {"model", "head", "head_accuracy", "start_accuracy", "best_accuracy", "epochs", "split", "output_dir",
               "trained_from", "reused"}
# acceptance on ants/bees: the documented command, every layer trained on the whole train split
HYMENOPTERA_FINETUNE = ["--epochs", "2"]
# a held-out test split besides the val split that selects heads and epochs
WITH_TEST = (("train", 8), ("val", 5), ("test", 4))


def can_become_a_layer(entry: dict) -> bool:
    """A leaderboard entry's head is transferable (an ensemble: every member is)."""
    if entry["head"] == "ensemble":
        return entry["transferable"]
    return HEADS[entry["head"].partition(":")[0]].transferable


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
    return {n: tiny_run(base, n, heads, real_weights, WITH_TEST) for n in (2, 3)}


def split_batch(cache: str, split: str, pre: Preprocess) -> torch.Tensor:
    """The uint8 images of one split of a cache, in cache order, as the exported models take them."""
    data, labels = finetuning.cache_images(store.info(cache), split)
    images = ImageTensors(data, np.arange(len(labels)), pre, None)
    return torch.stack([images[i][1] for i in range(len(images))])


def folder_probabilities(predictions: list[dict], classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(labels from the class folder names, N x C probabilities) of ``predict`` output with topk = C."""
    labels = np.array([classes.index(Path(p["path"]).parent.name) for p in predictions])
    proba = np.array([[{t["class"]: t["probability"] for t in p["topk"]}[c] for c in classes] for p in predictions])
    return labels, proba


# --------------------------------------------------------------------------- assembling


@pytest.mark.slow
@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("name", TRANSFERABLE)
def test_network_at_step_0_predicts_what_the_head_predicted(tiny_runs, name, n_classes):
    run_dir, cache = tiny_runs[n_classes]
    parts = model.assemble(run_dir, spec(name))
    X, _, paths = featurecache.load_features(cache, "val")
    expected = parts.pipeline.predict_proba(X)

    data, _ = finetuning.cache_images(store.info(cache), "val")
    assert [r.path for r in data.records] == paths
    batch = split_batch(cache, "val", parts.backbone.preprocess)
    with torch.inference_mode():
        got = model.Exported(parts.network, parts.backbone.preprocess).eval()(batch).numpy()
    assert got.shape == expected.shape == (len(paths), n_classes)
    assert (got.argmax(1) == expected.argmax(1)).all()
    assert np.abs(got - expected).max() < 1e-4


@pytest.mark.slow
def test_a_head_that_cannot_be_a_layer_names_the_best_one_that_can(tiny_runs, cli_runner):
    run_dir, _ = tiny_runs[3]
    ranking = json.loads((Path(run_dir) / "leaderboard.json").read_text())
    best = next(e["head"] for e in ranking if can_become_a_layer(e))
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
    best = next(e["head"] for e in ranking if can_become_a_layer(e))  # no head here has a form fitted beside it
    assert not any("transfer_of" in e for e in ranking)
    parts = model.assemble(run_dir, "best-transferable")
    assert parts.head_meta["head"] == best
    assert parts.network is not None


def test_a_random_weights_cache_rebuilds_its_backbone(tmp_path):
    """weights=none is a seeded initialization: the rebuilt network computes the cached features."""
    run_dir, cache = tiny_run(tmp_path, 2, ["logreg:pre=standardize"], "none")
    parts = model.assemble(run_dir, "best-transferable")
    X, _, _ = featurecache.load_features(cache, "val", features=parts.meta["features"])
    batch = split_batch(cache, "val", parts.backbone.preprocess)
    with torch.inference_mode():
        got = model.Exported(parts.network, parts.backbone.preprocess).eval()(batch).numpy()
    assert np.abs(got - parts.pipeline.predict_proba(X)).max() < 1e-4


def test_unfreeze_selects_the_last_blocks_and_bn_stays_frozen():
    with torch.device("meta"):
        mobilenet = torchvision.models.mobilenet_v2()
    blocks = finetuning.parameter_blocks(mobilenet)
    assert len(blocks) == 20  # features.0 .. features.18 and the classifier
    net = model.Network(mobilenet.features, torch.nn.Linear(1280, 2))
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
    (dict(checkpoint_every=0), "--checkpoint-every must be at least 1"),
    (dict(workers=-1), "--workers must be 0"),
    (dict(lr=-0.1), "cannot be negative"),
])
def test_bad_options_are_usage_errors(tmp_path, options, message, cli_runner):
    """Checked before the run is looked up: the message names the option, not the missing run."""
    with pytest.raises(UsageError, match=message) as caught:
        featurecache.finetune(str(tmp_path / "no-run"), **options)
    assert "\n" not in str(caught.value)
    (name, value), = options.items()
    option = f"--{name.replace('_', '-')}"
    out = run_cli(cli_runner, "finetune", tmp_path / "no-run", option, value)
    last = out.stderr.strip().splitlines()[-1]
    assert out.exit_code == 2 and last.startswith("Error: ") and option in last, out.stderr


def test_under_torchrun_the_global_batch_must_give_every_rank_an_image(tmp_path, monkeypatch):
    """--batch-size is the global batch (tests/test_finetune_torchrun.py): refused in one line, before any
    process group is joined, when it is smaller than the world."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UsageError, match=r"^--batch-size 2 is the global batch, split across the 4 processes: "
                                         r"give at least 4$"):
        featurecache.finetune(str(tmp_path / "no-run"), batch_size=2, device="cpu")


# --------------------------------------------------------------------------- training and export


@pytest.mark.slow
def test_finetune_trains_exports_and_is_reused(tiny_runs, cli_runner, tmp_path):
    run_dir, cache = tiny_runs[3]
    result = featurecache.finetune(run_dir, head="logreg:pre=pca:6", epochs=2, batch_size=4, workers=0,
                                   checkpoint_every=2, progress=False)
    _, head_meta = load_head(run_dir, "logreg:pre=pca:6")
    assert set(result.to_dict()) == RESULT_KEYS
    assert result.split == "val" and result.head == "logreg:pre=pca:6" and result.epochs == 2
    # step 0 is the head itself: the network reproduces the head's val accuracy from stage two
    assert result.head_accuracy == head_meta["metrics"]["val"]["accuracy"] == result.start_accuracy
    out = Path(result.output_dir)
    assert out.parent == Path(run_dir) / "finetune"
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2]
    for h in history[1:]:
        assert {"train_loss", "val_loss", "val_accuracy", "seconds", "lr"} <= set(h) and h["train_loss"] > 0
    assert history[result.best_epoch]["val_accuracy"] == result.best_accuracy == max(h["val_accuracy"] for h in history)
    assert result.metrics["finetuned"]["val"]["accuracy"] == result.best_accuracy

    # the held-out test split: the recorded metrics are those of the saved network, recomputed from its files
    classes = ["class0", "class1", "class2"]
    root = Path(store.info(cache)["config"]["data"]["root"])
    predicted = featurecache.predict(result.output_dir, [str(root / "test")], topk=3, workers=0, progress=False)
    labels, proba = folder_probabilities(predicted["predictions"], classes)
    recomputed, recorded = classification_metrics(labels, proba, classes), result.metrics["finetuned"]["test"]
    assert len(labels) == recorded["n"] == 12
    assert recomputed["confusion_matrix"] == recorded["confusion_matrix"]
    assert recomputed["accuracy"] == recorded["accuracy"]
    assert recomputed["log_loss"] == pytest.approx(recorded["log_loss"], rel=1e-4)

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
    assert json.loads(again.stdout) == {**result.to_dict(), "reused": True}


def test_safetensors_weights_round_trip_and_a_changed_file_is_refused(tmp_path, cli_runner):
    """A fine-tuning folder predicts from model.safetensors, exactly as model.pt and the best epoch did."""
    run_dir, cache = tiny_run(tmp_path, 2, ["logreg:pre=standardize"], "none", (("train", 6), ("val", 3), ("test", 3)))
    result = featurecache.finetune(run_dir, epochs=1, batch_size=4, workers=0, augment="none", progress=False)
    out = Path(result.output_dir)
    weights = out / "model.safetensors"
    recorded = json.loads((out / "result.json").read_text())["weights"]
    assert recorded == result.weights == {"file": "model.safetensors", "sha256": sha256_file(weights)}

    # plain tensors, equal to the best epoch's state dict
    from safetensors.torch import load_file

    tensors, best = load_file(weights), torch.load(out / "best.pt", weights_only=True)["model"]
    assert tensors.keys() == best.keys() and all(torch.equal(tensors[k], best[k]) for k in best)

    # the network rebuilt from the run with these weights, the TorchScript export, and the best epoch agree
    from_weights, info = model.load_finetuned(out)
    scripted, scripted_info = model.load_exported(out / "model.pt")
    assert info == {k: scripted_info[k] for k in ("classes", "preprocess")}
    parts = model.assemble(run_dir, result.head)
    parts.network.load_state_dict(best)
    in_memory = model.Exported(parts.network, parts.backbone.preprocess, scripted_info["temperature"]).eval()
    batch = split_batch(cache, "test", Preprocess(**info["preprocess"]))
    with torch.inference_mode():
        a, b, c = (m(batch).numpy() for m in (from_weights, scripted, in_memory))
    assert a.shape == (6, 2) and np.abs(a - b).max() < 1e-5 and np.abs(a - c).max() < 1e-5

    # predict on the folder needs no model.pt
    root = Path(store.info(cache)["config"]["data"]["root"])
    test_images = str(root / "test")
    (out / "model.pt").unlink()
    predicted = featurecache.predict(str(out), [test_images], workers=0, progress=False)
    by_path = {Path(p["path"]).relative_to(root).as_posix(): p for p in predicted["predictions"]}
    _, paths = featurecache.load_features(cache, "test")[1:]
    _, proba = folder_probabilities([by_path[p] for p in paths], info["classes"])
    assert np.abs(proba - a).max() < 1e-5

    # one changed byte in the tensors: refused before anything is loaded
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0x01
    weights.write_bytes(bytes(raw))
    with pytest.raises(RunError, match="does not match the sha256 recorded in") as caught:
        model.load_finetuned(out)
    assert "\n" not in str(caught.value)
    refused = run_cli(cli_runner, "predict", out, test_images)
    lines = refused.stderr.strip().splitlines()
    assert refused.exit_code == 3 and len(lines) == 1 and "model.safetensors does not match" in lines[0], refused.stderr


@pytest.mark.slow
def test_a_calibrated_head_gives_a_network_with_its_own_temperature(tmp_path):
    """--calibrate temperature: the fine-tuned network fits its own T on the selection split, and every
    way of loading it (model.pt, model.safetensors) divides the logits by it."""
    images = make_colored_images(tmp_path / "images", 2, (("train", 6), ("val", 4)))
    res = featurecache.extract(str(images), weights="none", cache_dir=str(tmp_path / "cache"), **TINY)
    run = featurecache.fit_head(res.cache, head=["logreg:pre=standardize"], calibrate="temperature", jobs=1)
    result = featurecache.finetune(run.run_dir, epochs=1, batch_size=4, workers=0, augment="none", progress=False)
    out = Path(result.output_dir)
    assert json.loads((out / "result.json").read_text())["temperature"] == result.temperature
    assert result.temperature != 1.0  # fitted, not the default

    parts = model.assemble(run.run_dir, result.head)
    parts.network.load_state_dict(torch.load(out / "best.pt", weights_only=True)["model"])
    batch = split_batch(res.cache, "val", parts.backbone.preprocess)
    with torch.inference_mode():
        logits = parts.network.eval()(normalize_batch(batch, parts.backbone.preprocess))
        expected = torch.softmax(logits / result.temperature, dim=1).numpy()
        from_weights = model.load_finetuned(out)[0](batch).numpy()
        scripted = model.load_exported(out / "model.pt")[0](batch).numpy()
    assert np.abs(from_weights - expected).max() < 1e-5 and np.abs(scripted - expected).max() < 1e-5


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
    """``fc finetune RUN --epochs 2`` from a logreg run on the real ants/bees cache (reused once done): one head,
    on the penultimate features (with --features auto its twin on concat and their ensemble would come first)."""
    run = featurecache.fit_head(cache, head=["logreg"], features="penultimate", cache_dir=str(Path(cache).parent))
    result = run_cli(runner, "finetune", run.run_dir, *HYMENOPTERA_FINETUNE, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.slow
def test_hymenoptera_logreg_finetune_starts_at_the_head_and_keeps_the_best_epoch(hymenoptera_cache, cli_runner):
    out = finetune_hymenoptera(cli_runner, hymenoptera_cache)
    assert set(out) == RESULT_KEYS
    assert out["head"] == "logreg" and out["split"] == "val" and out["epochs"] == 2
    assert out["start_accuracy"] == out["head_accuracy"]
    history = json.loads((Path(out["model"]).parent / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2] and all(h["train_loss"] > 0 for h in history[1:])
    # the best epoch is the one with the highest val accuracy; epoch 0 is the head's own val accuracy
    assert history[0]["val_accuracy"] == out["head_accuracy"]
    assert out["best_accuracy"] == max(h["val_accuracy"] for h in history)
    config = json.loads((Path(out["model"]).parent / "config.json").read_text())
    assert config["unfreeze"] == "all" and config["epochs"] == 2
    print(json.dumps({**out, "history": [{k: h[k] for k in ("epoch", "train_loss", "val_accuracy", "seconds")}
                                         for h in history]}, indent=1))
