"""fc finetune --from-activations: the last blocks trained from stored block inputs train as from images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import run_cli
from test_finetune import TINY, make_colored_images, tiny_run

import featurecache
from featurecache import store
from featurecache.errors import CacheError, FinetuneError
from featurecache.finetuning import activations, trainer
from featurecache.finetuning.network import Network, load_backbone, load_exported, load_finetuned

# one optimizer step per epoch (3 classes x 8 train images in one batch), no augmentation
STEPS = dict(epochs=5, batch_size=24, workers=0, unfreeze="last:2", augment="none", patience=0, progress=False,
             optimizer="sgd")


@pytest.fixture(scope="module")
def run(tmp_path_factory, real_weights):
    """A run of MobileNetV2 on 3 classes whose head is regularized so much that its losses stay far
    from 0 for 5 steps."""
    base = tmp_path_factory.mktemp("finetune-activations")
    run_dir, cache = tiny_run(base, 3, ["logreg:C=0.0001;pre=standardize"], real_weights)
    return run_dir, cache, str(base / "cache")


def _losses(run, **more) -> tuple[list, list]:
    """Per step (one per epoch), the train and selection losses from images and from stored activations."""
    run_dir, _, cache_dir = run
    live = featurecache.finetune(run_dir, cache_dir=cache_dir, from_activations=False, **STEPS, **more)
    stored = featurecache.finetune(run_dir, cache_dir=cache_dir, from_activations=True, **STEPS, **more)
    assert stored.output_dir != live.output_dir
    steps = [(a["train_loss"], b["train_loss"]) for a, b in zip(live.history[1:], stored.history[1:])]
    val = [(a["val_loss"], b["val_loss"]) for a, b in zip(live.history, stored.history)]
    assert len(steps) == 5 and all(a > 0.3 for a, _ in steps)  # far from 0: the comparison means something
    return steps, val, stored


def test_without_the_float16_rounding_training_from_activations_is_training_from_images(run, monkeypatch):
    """The same batches, inputs, modes and updates: with the maps stored in float32 the losses agree to 1e-5."""
    monkeypatch.setattr(store, "ACTIVATION_DTYPE", np.float32)
    steps, val, _ = _losses(run, lr=0.01)
    assert max(abs(a - b) for a, b in steps + val) < 1e-5, (steps, val)


def test_training_from_stored_activations_follows_training_from_images_step_by_step(run):
    """As stored (float16, relative rounding 2**-11) the losses agree to 1e-4 at the first step and,
    as the rounding's effect on the updates adds up, to 5e-4 over 5 steps."""
    cache = run[1]
    steps, val, stored = _losses(run)
    assert abs(steps[0][0] - steps[0][1]) < 1e-4, steps
    assert max(abs(a - b) for a, b in steps) < 5e-4, steps
    # the selection split, evaluated from its stored activations, gives the same losses as from images
    assert max(abs(a - b) for a, b in val) < 5e-4, val
    # stored once, beside the features: the file holds it and says so
    meta = store.info(cache)
    assert "features.17-160x2x2-float16" in meta["activations"]
    summary = activations.stored_summary(stored.output_dir)
    assert summary["parts"] == {"train": 24, "val": 15} and summary["bytes_per_image"] == 160 * 2 * 2 * 2
    # a normal stage-three folder: the exported network is the whole one, and loads for prediction
    network, info = load_finetuned(stored.output_dir)
    exported, exported_info = load_exported(stored.model)
    assert info["classes"] == exported_info["classes"] == meta["classes"]
    images = torch.randint(0, 256, (3, 3, 56, 56), dtype=torch.uint8)
    with torch.inference_mode():
        assert torch.allclose(network(images), exported(images), atol=1e-5)


def test_the_tail_computes_what_the_whole_backbone_computes(run):
    _, cache, _ = run
    backbone = load_backbone(store.info(cache)["config"])
    block = activations.first_trained_block(backbone.model, "last:4")
    assert block == "features.15"
    x = torch.randn(2, 3, 56, 56)
    with torch.inference_mode():
        maps = activations.block_input(backbone.model, block, x)
        tail = activations.tail(backbone.model, block)
        assert torch.allclose(tail(maps), backbone.model(x), atol=1e-5)
    # the tail shares the backbone's parameters: training it trains the exported network
    shared = {id(p) for p in backbone.model.parameters()}
    assert all(id(p) in shared for p in Network(tail, torch.nn.Identity()).parameters())


def _damage(cache: str, how: str) -> None:
    with h5py.File(cache, "a") as f:
        group = f["activations/features.17-160x2x2-float16"]
        if how == "missing":
            del group["train"]
        else:
            group["val"][...] = np.float16(np.nan)


@pytest.mark.parametrize("how", ["missing", "corrupt"])
def test_a_missing_or_corrupt_activations_dataset_is_named_in_one_line(run, how, tmp_path, cli_runner):
    run_dir, cache, cache_dir = run
    args = dict(STEPS, epochs=1)
    featurecache.finetune(run_dir, cache_dir=cache_dir, from_activations=True, **args)
    _damage(cache, how)
    name = "features.17-160x2x2-float16"
    with pytest.raises(CacheError, match=f"stored activations {name}"):
        store.read_activations(cache, name, "train" if how == "missing" else "val", (24, 160, 2, 2))
    result = run_cli(cli_runner, "finetune", run_dir, "--from-activations", "--unfreeze", "last:2", "--augment",
                     "none", "--epochs", "2", "--batch-size", "24", "--workers", "0", "--cache-dir", cache_dir,
                     "--seed", ["missing", "corrupt"].index(how) + 1)  # a configuration not trained before
    assert result.exit_code == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and name in warnings[0], result.stderr
    assert ("no dataset 'train'" if how == "missing" else "not finite") in warnings[0]
    # stored again, whole
    store.read_activations(cache, name, "train", (24, 160, 2, 2))
    store.read_activations(cache, name, "val", (15, 160, 2, 2))


def test_activations_larger_than_max_memory_or_the_free_disk_are_refused_in_one_line_before_anything_is_written(
        tmp_path, cli_runner, monkeypatch):
    run_dir, cache = tiny_run(tmp_path, 2, ["logreg:pre=standardize"], "none")
    before = Path(cache).stat().st_mtime_ns
    result = run_cli(cli_runner, "finetune", run_dir, "--from-activations", "--unfreeze", "last:2",
                     "--max-memory", "1K", "--workers", "0", "--cache-dir", str(tmp_path / "cache"))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "--max-memory" in lines[0], result.stderr
    assert Path(cache).stat().st_mtime_ns == before
    assert store.info(cache)["activations"] == []
    assert not [p for p in Path(cache).parent.iterdir() if ".tmp-" in p.name]
    usage = shutil.disk_usage
    monkeypatch.setattr(activations.shutil, "disk_usage", lambda path: usage(path)._replace(free=1000))
    with pytest.raises(FinetuneError, match=r"free on .* is not enough"):
        featurecache.finetune(run_dir, from_activations=True, unfreeze="last:2", workers=0, progress=False,
                              cache_dir=str(tmp_path / "cache"))
    assert Path(cache).stat().st_mtime_ns == before
    with pytest.raises(FinetuneError, match="--unfreeze last:N"):
        featurecache.finetune(run_dir, from_activations=True, unfreeze="all", workers=0, progress=False,
                              cache_dir=str(tmp_path / "cache"))


def test_a_killed_store_leaves_the_cache_as_it_was(tmp_path):
    _, cache = tiny_run(tmp_path, 2, ["logreg:pre=standardize"], "none")
    before = Path(cache).read_bytes()

    def fill(put):
        put("train", 0, np.zeros((2, 4, 1, 1)))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.write_activations(cache, "b-4x1x1", {"train": (16, 4, 1, 1)}, {}, fill)
    assert Path(cache).read_bytes() == before
    assert not [p for p in Path(cache).parent.iterdir() if ".tmp-" in p.name]


def test_each_epoch_trains_on_one_stored_view_of_every_image(tmp_path):
    images = make_colored_images(tmp_path / "images", 2)
    res = featurecache.extract(str(images), weights="none", cache_dir=str(tmp_path / "cache"), augment_views=2,
                               **TINY)
    run = featurecache.fit_head(res.cache, head="logreg:pre=standardize", jobs=1, cache_dir=str(tmp_path / "cache"))
    args = dict(STEPS, epochs=2, batch_size=16, augment="light")
    result = featurecache.finetune(run.run_dir, cache_dir=str(tmp_path / "cache"), from_activations=True, **args)
    summary = activations.stored_summary(result.output_dir)
    assert summary["parts"] == {"train": 16, "val": 10, store.VIEWS: 32}
    assert summary["views"]["k"] == 2
    views = store.read_activations(res.cache, summary["name"], store.VIEWS, (32, 160, 2, 2))
    plain = store.read_activations(res.cache, summary["name"], "train", (16, 160, 2, 2))
    assert not np.array_equal(views[:16], plain) and not np.array_equal(views[:16], views[16:])
    assert json.loads((Path(result.output_dir) / "config.json").read_text())["from_activations"] is True


# --------------------------------------------------------------------------- choosing the mode


def _estimate(wins: bool) -> activations.Estimate:
    """What timing a few batches gives: from activations 4x faster per batch, or no faster."""
    tail = 0.05 if wins else 1.0
    return activations.Estimate(epochs=2, batches=100, live=1.0, tail=tail, store=20.0, stored=False)


def test_the_estimate_decides_by_the_whole_run_storing_included():
    win = _estimate(True)
    assert win.from_images == 200.0 and win.from_activations == 30.0 and win.wins
    assert not _estimate(False).wins
    assert not activations.Estimate(epochs=1, batches=2, live=1.0, tail=0.1, store=1.0, stored=False).wins  # 7.8 s
    assert not activations.Estimate(epochs=2, batches=100, live=1.0, tail=0.05, store=20.0, stored=False,
                                    room="more than --max-memory").wins
    assert "training from stored activations, measured faster" in win.sentence()
    assert "training from images (not 1.25x faster)" in _estimate(False).sentence()


def test_without_a_flag_finetune_times_both_modes_says_which_it_chose_and_keeps_it(run, cli_runner, monkeypatch):
    run_dir, cache, cache_dir = run
    args = ["finetune", run_dir, "--unfreeze", "last:2", "--augment", "none", "--epochs", "1", "--batch-size", "8",
            "--workers", "0", "--cache-dir", cache_dir, "--seed", "7", "--json"]
    # measured for real: each mode's seconds a batch; over one epoch, storing costs about what it saves
    first = run_cli(cli_runner, *args)
    assert first.exit_code == 0, first.stderr
    said = [line for line in first.stderr.splitlines() if line.startswith("training from")]
    assert len(said) == 1 and said[0].startswith("training from images ("), first.stderr
    assert "1 epoch of 3 batches: from images about" in said[0] and said[0].endswith("--from-activations forces it")
    folder = Path(json.loads(first.stdout)["output_dir"])
    chosen = json.loads((folder / "config.json").read_text())["mode_chosen"]
    assert chosen["chosen"] == "images" and chosen["batches_per_epoch"] == 3
    assert chosen["seconds_per_batch_from_images"] > chosen["seconds_per_batch_from_activations"] > 0
    # stored by an earlier test of this module, or to be stored (what a batch from images spends beyond the tail)
    assert (chosen["store_seconds"] == 0) == chosen["already_stored"] == store.has_activations(
        cache, "features.17-160x2x2-float16")
    assert json.loads(first.stdout)["trained_from"] == "images"
    # a measured win: the activations are stored and trained from, and a later run keeps that mode untimed
    monkeypatch.setattr(trainer, "_measure", lambda t: _estimate(True))
    args[args.index("7")] = "8"
    second = run_cli(cli_runner, *args)
    assert second.exit_code == 0, second.stderr
    assert "training from stored activations, measured faster" in second.stderr
    out = json.loads(second.stdout)
    assert out["trained_from"] == "activations"
    assert activations.stored_summary(out["output_dir"])["parts"]["train"] == 24

    def untimed(_):
        raise AssertionError("a configuration trained before is not timed again")

    monkeypatch.setattr(trainer, "_measure", untimed)
    again = run_cli(cli_runner, *args)
    assert again.exit_code == 0, again.stderr
    assert json.loads(again.stdout)["output_dir"] == out["output_dir"] and json.loads(again.stdout)["reused"]
    # the flags force either mode, untimed
    forced = run_cli(cli_runner, *args, "--from-images")
    assert forced.exit_code == 0 and json.loads(forced.stdout)["trained_from"] == "images"
    assert "training from" not in forced.stderr


def test_only_last_n_with_a_frozen_part_is_timed(run, monkeypatch):
    run_dir, _, cache_dir = run

    def untimed(_):
        raise AssertionError("timed")

    monkeypatch.setattr(trainer, "_measure", untimed)
    for unfreeze in ("all", "none", "last:40"):
        result = featurecache.finetune(run_dir, cache_dir=cache_dir, **{**STEPS, "epochs": 1, "unfreeze": unfreeze})
        assert result.trained_from == "images"


def test_with_augmentation_and_no_stored_views_it_trains_from_images_and_says_why(run, monkeypatch, capsys):
    run_dir, cache, cache_dir = run
    monkeypatch.setattr(trainer, "_measure", lambda t: _estimate(True))
    args = {**STEPS, "epochs": 1, "augment": "light", "progress": True, "seed": 11}
    assert featurecache.finetune(run_dir, cache_dir=cache_dir, **args).trained_from == "images"
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("training from")]
    assert said == [f"training from images: {Path(cache).name} holds no augmented views (fc extract --augment-views "
                    "K), so from stored activations the epochs would not be augmented; --from-activations forces it"]


def test_a_head_on_the_penultimate_features_of_a_cache_with_stored_layers_trains_from_activations(tmp_path):
    """fc extract stores layers by default; a head fitted on the penultimate features alone reads no layer,
    so its network is the plain backbone and the last blocks train from their stored input."""
    images = make_colored_images(tmp_path / "images", 2)
    res = featurecache.extract(str(images), weights="none", cache_dir=str(tmp_path / "cache"),
                               **{**TINY, "layers": "auto"})
    assert store.info(res.cache)["config"]["layers"]
    run = featurecache.fit_head(res.cache, head="logreg:pre=standardize", features="penultimate", jobs=1,
                                cache_dir=str(tmp_path / "cache"))
    result = featurecache.finetune(run.run_dir, cache_dir=str(tmp_path / "cache"), from_activations=True,
                                   **{**STEPS, "epochs": 1, "batch_size": 16})
    assert result.trained_from == "activations" and result.start_accuracy == result.head_accuracy
    assert activations.stored_summary(result.output_dir)["parts"] == {"train": 16, "val": 10}
