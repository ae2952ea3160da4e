"""Stage one's three options: ``--layers`` (more pooled modules, from the same forward pass),
``--tta flip`` (the mean over the image and its mirror) and ``--augment-views K`` (seeded
augmented views of the train images, as extra rows of the loop)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import FAST, make_image, make_split_folder, run_cli
from PIL import Image, ImageOps

import featurecache
from featurecache import runtime, store
from featurecache.backbones import models as backbones
from featurecache.backbones import taps
from featurecache.data.images import AUGMENTS, ImageTensors, Views, augment_seed
from featurecache.data.preprocess import Preprocess
from featurecache.errors import BackboneError, UsageError
from featurecache.extraction import distributed
from featurecache.extraction import stage as extractor
from featurecache.pipeline import run as pipeline

# MobileNetV2's blocks and their channels: what a pooled layer's width must be.
CHANNELS = {"features.4": 32, "features.14": 160, "features.17": 320}
PRE = Preprocess(resize=48, crop=40)


def _assert_close(actual, expected, tol: float = 1e-5, err_msg: str = "") -> None:
    """Equal within ``tol`` times the largest magnitude of ``expected``: features of random weights
    are tiny (1e-8), those of real ones near 1, and a fixed tolerance would say nothing of the first."""
    scale = float(np.abs(expected).max()) or 1.0
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale, err_msg=err_msg)


def _rows_differ(a, b) -> bool:
    """Whether every row of ``a`` differs from the same row of ``b`` by more than 1% of their scale."""
    scale = float(max(np.abs(a).max(), np.abs(b).max()))
    return bool((np.abs(a - b).max(axis=1) > 1e-2 * scale).all())


def _groups(cache: str) -> dict[str, dict[str, np.ndarray]]:
    """Every dataset of a cache file, by group: ``{"train": {"features": ..., "layers/features.14": ...}}``."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with h5py.File(cache, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                group, _, rest = name.partition("/")
                value = obj.asstr()[...] if h5py.check_string_dtype(obj.dtype) else obj[...]
                out.setdefault(group, {})[rest] = value
        f.visititems(visit)
    return out


def _assert_same_file(a: str, b: str) -> None:
    """The same key, groups and datasets; features within 1e-5, everything else exactly."""
    assert store.info(a)["key"] == store.info(b)["key"]
    ga, gb = _groups(a), _groups(b)
    assert {g: sorted(d) for g, d in ga.items()} == {g: sorted(d) for g, d in gb.items()}
    for group, datasets in ga.items():
        for name, value in datasets.items():
            if value.dtype.kind == "f":
                _assert_close(value, gb[group][name], err_msg=f"{group}/{name}")
            else:
                np.testing.assert_array_equal(value, gb[group][name], err_msg=f"{group}/{name}")


# --------------------------------------------------------------------------- the backbone


def _no_hooks(model: torch.nn.Module) -> bool:
    return not any(m._forward_hooks for m in model.modules())


def test_layers_are_pooled_from_the_same_pass_after_the_main_features():
    net = backbones.build("mobilenet_v2", weights="none", preprocess=PRE, layers="features.17,features.14")
    assert net.feature_dim == 1280 and net.layer == "penultimate"
    assert net.parts == [("penultimate", 1280), ("features.17", 320), ("features.14", 160)]
    plain = backbones.build("mobilenet_v2", weights="none", preprocess=PRE)
    assert plain.parts == [("penultimate", 1280)]
    x = torch.randn(3, 3, 40, 40)
    calls = []
    block = net.model.model.get_submodule("features.0")
    block.register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.inference_mode():
        out = net.model(x)
        expected = [plain.model(x), *(taps.LayerTap(plain.model, n)(x) for n in ("features.17", "features.14"))]
    assert calls == [1], "one forward pass for the main features and every layer"
    assert out.shape == (3, 1760)
    for got, want in zip(out.split([1280, 320, 160], dim=1), expected):
        _assert_close(got.numpy(), want.numpy())
    block._forward_pre_hooks.clear()
    assert _no_hooks(net.model), "the hooks live only while a call runs"


def test_a_layer_as_main_features_with_more_layers_and_tta():
    net = backbones.build("mobilenet_v2", weights="none", preprocess=PRE, layer="features.4", layers=["features.14"],
                          tta="flip")
    assert net.feature_dim == 32 and net.parts == [("features.4", 32), ("features.14", 160)]
    x = torch.randn(2, 3, 40, 40)
    with torch.inference_mode():
        out = net.model(x)
        inner = net.model.model  # FlipMean(Taps)
        expected = (inner(x) + inner(x.flip(-1))) / 2
    assert out.shape == (2, 192)
    _assert_close(out.numpy(), expected.numpy())


@pytest.mark.parametrize("options", [dict(layers="features.14,features.17"), dict(tta="flip"),
                                     dict(layers=["features.14"], tta="flip"), dict(layer="features.4", tta="flip"),
                                     dict(layer="features.4", layers=["features.17"])],
                         ids=["layers", "tta", "layers+tta", "layer+tta", "layer+layers"])
def test_the_model_traces_freezes_and_trains(options):
    net = backbones.build("mobilenet_v2", weights="none", preprocess=PRE, **options)
    width = sum(dim for _, dim in net.parts)
    model = net.model.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 40, 40).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = model(x)
    assert expected.shape == (4, width)
    with torch.no_grad():  # the frozen graph of runtime.inference_model
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, x, check_trace=False)))
    with torch.inference_mode():
        for batch in (x, x[:1]):
            _assert_close(frozen(batch).numpy(), expected[:len(batch)].numpy(), 1e-4)
        chosen, mode = runtime.inference_model(model, torch.device("cpu"), "fp32", x)
        assert mode in ("eager", "torchscript-frozen")
        _assert_close(chosen(x).numpy(), expected.numpy(), 1e-4)
    assert _no_hooks(model)
    model.train().requires_grad_(True)  # stage three fine-tunes through it
    model(torch.randn(2, 3, 40, 40)).square().sum().backward()
    first = next(p for name, p in model.named_parameters() if "features.0" in name)
    assert first.grad is not None and float(first.grad.abs().sum()) > 0
    assert _no_hooks(model)


def test_hooks_are_removed_when_the_forward_fails():
    net = backbones.build("mobilenet_v2", weights="none", preprocess=PRE, layers="features.14")
    with pytest.raises(RuntimeError):
        net.model(torch.randn(2, 5, 40, 40))  # five channels: the first convolution fails
    assert _no_hooks(net.model)


@pytest.mark.parametrize("layers, error, pattern", [
    ("features.99", BackboneError, r"unknown layer 'features.99' for mobilenet_v2 in --layers \(did you mean: "),
    ("features.14,penultimate", UsageError, r"'penultimate' names a set of the cache's features"),
    (["concat"], UsageError, r"'concat' names a set of the cache's features"),
    ("features.14,features.14", UsageError, r"--layers names features.14 twice"),
    ("features.14,,features.17", UsageError, r"--layers takes module names separated by commas"),
    ("classifier.1", BackboneError, r"the classifier of mobilenet_v2"),
])
def test_bad_layers_fail_before_any_work(image_folder, tmp_path, layers, error, pattern):
    with pytest.raises(error, match=pattern):
        featurecache.extract(str(image_folder), cache_dir=str(tmp_path / "c"), **{**FAST, "layers": layers})
    assert not (tmp_path / "c").exists(), "nothing is written for options that cannot be used"


def test_bad_tta_and_views_values(image_folder, tmp_path):
    for options, pattern in ((dict(tta="mirror"), r"unknown --tta 'mirror': choose none or flip"),
                             (dict(augment_views=-1), r"--augment-views must be a whole number, 0 or more, not -1"),
                             (dict(augment_views=1.5), r"not 1.5"),
                             (dict(layer="features.4", layers="features.4"), r"already reads as the main features")):
        with pytest.raises(featurecache.FeatureCacheError, match=pattern):
            featurecache.extract(str(image_folder), cache_dir=str(tmp_path / "c"), **{**FAST, **options})
    only_val = make_split_folder(tmp_path / "val-only", splits=(("val", 2),))
    with pytest.raises(UsageError, match=r"--augment-views makes views of the train split.*\(splits: val\)"):
        featurecache.extract(str(only_val), cache_dir=str(tmp_path / "c"), augment_views=2, **FAST)


# --------------------------------------------------------------------------- the cache key


@pytest.fixture
def key_of(monkeypatch):
    """``key_of(data, **options)``: the key and key config extract computes, without extracting."""
    monkeypatch.setattr(extractor, "_launch", lambda job: job)

    def key_of(data, **options):
        job = featurecache.extract(str(data), **{**FAST, **options})
        return job.key, job.key_config

    return key_of


def test_keys_without_the_options_are_those_of_before(image_folder, key_of):
    key, config = key_of(image_folder)
    options = extractor.ExtractOptions(data=str(image_folder), **FAST)
    run = extractor._settings(options, distributed.Group(), None)
    pre = backbones.resolve_preprocess("mobilenet_v2", "none", None, False, resize=48, crop=40)
    job = extractor._Job(backbone={}, dataset=extractor._open_data(options), pre=pre, run=run,
                         group=distributed.Group(), lock_timeout=None, started=0.0)
    before = extractor._key_config(options, job)
    assert config == before and key == store.cache_key(before)
    assert not {"layers", "tta", "augment_views"} & set(config)
    assert key_of(image_folder, layers=None, tta="none", augment_views=0)[0] == key
    assert key_of(image_folder, layers="", tta=None)[0] == key


def test_each_option_changes_the_key_by_its_own_entry(image_folder, key_of):
    key, base = key_of(image_folder)
    cases = [
        (dict(layers="features.14,features.17"), {"layers": ["features.14", "features.17"]}),
        (dict(layers="auto"), {"layers": ["features.6", "features.13", "features.17"]}),  # the default
        (dict(layers=["features.17", "features.14"]), {"layers": ["features.17", "features.14"]}),
        (dict(tta="flip"), {"tta": "flip"}),
        (dict(augment_views=2), {"augment_views": {"k": 2, "policy": "light", "seed": 0}}),
        (dict(augment_views=3), {"augment_views": {"k": 3, "policy": "light", "seed": 0}}),
        (dict(augment_views=2, seed=5), {"augment_views": {"k": 2, "policy": "light", "seed": 5}}),
    ]
    keys = {key}
    for options, entries in cases:
        new_key, config = key_of(image_folder, **options)
        assert config == {**base, **entries} and new_key == store.cache_key(config)
        keys.add(new_key)
    assert len(keys) == len(cases) + 1
    assert key_of(image_folder, seed=5)[0] == key  # split folders: the seed only matters for the views


# --------------------------------------------------------------------------- --layers


def test_layers_are_stored_with_their_channel_counts(image_folder, tmp_path):
    res = featurecache.extract(str(image_folder), cache_dir=str(tmp_path / "c"),
                               **{**FAST, "layers": "features.17,features.4"})
    assert res.feature_dim == 1280 and res.layers == {"features.17": 320, "features.4": 32} and res.views == 0
    meta = store.info(res.cache)
    assert meta["layers"] == {"features.17": CHANNELS["features.17"], "features.4": CHANNELS["features.4"]}
    assert list(meta["layers"]) == meta["config"]["layers"] == ["features.17", "features.4"]
    assert meta["splits"]["train"]["dim"] == 1280 and meta["views"] == {"n": 0, "per_image": 0}
    plain = featurecache.extract(str(image_folder), cache_dir=str(tmp_path / "plain"), **FAST)
    alone = featurecache.extract(str(image_folder), cache_dir=str(tmp_path / "alone"), layer="features.4", **FAST)
    for split, n in (("train", 12), ("val", 8)):
        main, y, paths = store.load_features(res.cache, split)
        parts = [main, *(store.read_rows(res.cache, split, features=name) for name in ("features.17", "features.4"))]
        assert [p.shape for p in parts] == [(n, 1280), (n, 320), (n, 32)]
        np.testing.assert_array_equal(store.read_rows(res.cache, split, features="concat"), np.hstack(parts))
        x, y2, paths2 = store.load_features(plain.cache, split)
        assert paths == paths2 and list(y) == list(y2)
        _assert_close(main, x)  # the main features are those of a plain run
        _assert_close(parts[2], store.load_features(alone.cache, split)[0])  # features.4 as --layer pools it


# --------------------------------------------------------------------------- --tta flip


def _mirrored(folder: Path, dest: Path) -> Path:
    """A copy of an image folder with every image mirrored, saved losslessly under the same name."""
    for path in sorted(folder.rglob("*.*")):
        out = dest / path.relative_to(folder)
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as img:
            ImageOps.mirror(img.convert("RGB")).save(out, format="PNG")
    return dest


@pytest.mark.slow
def test_tta_is_the_mean_over_the_image_and_its_mirror(tmp_path):
    # 80 x 60 images, resized to 64 x 48 and cropped to 40: resizing and cropping commute with mirroring.
    folder = tmp_path / "images"
    for i, (split, cls) in enumerate((s, c) for s in ("train", "val") for c in ("a", "b") for _ in range(3)):
        make_image(folder / split / cls / f"{cls}_{i}.jpg", i, size=(80, 60))
    mirrored = _mirrored(folder, tmp_path / "mirrored")
    options = {**FAST, "layers": "features.14"}
    tta = featurecache.extract(str(folder), cache_dir=str(tmp_path / "tta"), tta="flip", **options)
    plain = featurecache.extract(str(folder), cache_dir=str(tmp_path / "plain"), **options)
    mirror = featurecache.extract(str(mirrored), cache_dir=str(tmp_path / "mirror"), **options)
    assert store.info(tta.cache)["config"]["tta"] == "flip" and "tta" not in store.info(plain.cache)["config"]
    for split in ("train", "val"):
        got, a, b = (store.read_rows(c.cache, split, features="concat") for c in (tta, plain, mirror))
        assert got.shape == (6, 1280 + 160)
        assert store.load_features(tta.cache, split)[2] == store.load_features(mirror.cache, split)[2]
        for part in (slice(0, 1280), slice(1280, None)):  # the main features, then the layer's
            _assert_close(got[:, part], (a[:, part] + b[:, part]) / 2, 1e-4)
            assert _rows_differ(a[:, part], b[:, part]), "an image and its mirror have different features"


def test_tta_halves_the_default_batch_not_a_given_one():
    def batch(size, tta):
        options = extractor.ExtractOptions(data="", device="cpu", batch_size=size, workers=0, progress=False)
        return extractor._settings(options, distributed.Group(), tta).batch_size

    assert (batch(None, None), batch(None, "flip"), batch(8, "flip")) == (4, 2, 8)


# --------------------------------------------------------------------------- --augment-views K


def test_each_view_is_seeded_by_the_seed_the_record_and_the_view(image_folder):
    dataset = extractor._open_data(extractor.ExtractOptions(data=str(image_folder)))
    n = len(dataset.records)
    train = tuple(i for i, r in enumerate(dataset.records) if r.split == "train")
    views = Views(first=n, records=train, k=2, seed=7)
    images = ImageTensors(dataset, np.arange(n + views.rows), PRE, None, views)
    row = n + len(train) + 3  # view 1 of the fourth train record
    assert views.locate(row) == (train[3], 1) and views.seed_of(train[3], 1) == augment_seed(7, 1, train[3])
    view, reason = images.decode(row)
    assert reason == "" and view.shape == (3, 40, 40)
    torch.manual_seed(augment_seed(7, 1, train[3]))  # fine-tuning's light policy, drawn from that seed
    with Image.open(image_folder / dataset.records[train[3]].path) as img:
        expected = torch.from_numpy(np.asarray(AUGMENTS["light"](PRE)(img.convert("RGB")))).permute(2, 0, 1)
    assert torch.equal(view, expected)
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(images.decode(row)[0], view), "the same view every time"
    assert torch.equal(torch.rand(1), before), "decoding leaves the caller's random state alone"
    assert not torch.equal(images.decode(row - len(train))[0], view), "another view of the same image differs"
    assert torch.equal(images.decode(train[3])[0], ImageTensors(dataset, np.arange(n), PRE, None).decode(train[3])[0])


@pytest.mark.slow
def test_views_rows_sources_and_labels_the_same_with_any_number_of_workers(image_folder, tmp_path):
    runs = [featurecache.extract(str(image_folder), cache_dir=str(tmp_path / f"w{workers}"),
                                 **{**FAST, "workers": workers, "layers": "features.14"}, augment_views=2)
            for workers in (0, 2)]
    res = runs[0]
    assert res.views == 24 and res.splits["train"] == {"n": 12, "skipped": 0} and res.layers == {"features.14": 160}
    meta = store.info(res.cache)
    assert meta["views"] == {"n": 24, "per_image": 2} and set(meta["splits"]) == {"train", "val"}
    groups = _groups(res.cache)
    views, train = groups[store.VIEWS], groups["train"]
    np.testing.assert_array_equal(views["source"], np.tile(np.arange(12), 2))
    np.testing.assert_array_equal(views["view"], np.repeat([0, 1], 12))
    np.testing.assert_array_equal(views["labels"], train["labels"][views["source"]])
    np.testing.assert_array_equal(views["paths"], train["paths"][views["source"]])
    assert views["skipped"].shape == (0, 2) and views["layers/features.14"].shape == (24, 160)
    assert _rows_differ(views["features"][:12], views["features"][12:]), "the views of an image differ"
    assert _rows_differ(views["features"][:12], train["features"]), "a view is not the image"
    np.testing.assert_array_equal(store.view_sources(res.cache), views["source"])
    np.testing.assert_array_equal(store.read_rows(res.cache, store.VIEWS, features="concat"),
                                  np.hstack([views["features"], views["layers/features.14"]]))
    _assert_same_file(runs[1].cache, res.cache)  # 2 decoding workers: the same views
    plain = featurecache.extract(str(image_folder), cache_dir=str(tmp_path / "plain"), **FAST)
    _assert_close(train["features"], store.load_features(plain.cache, "train")[0])


@pytest.mark.slow
def test_an_unreadable_train_image_has_no_views(image_folder, tmp_path):
    broken = image_folder / "train" / "cats" / "cats_1.png"
    broken.write_bytes(b"not an image")
    res = featurecache.extract(str(image_folder), cache_dir=str(tmp_path / "c"), augment_views=2, **FAST)
    assert res.splits["train"] == {"n": 11, "skipped": 1} and res.views == 22
    groups = _groups(res.cache)
    views, train = groups[store.VIEWS], groups["train"]
    np.testing.assert_array_equal(views["source"], np.tile(np.arange(11), 2))
    np.testing.assert_array_equal(views["paths"], train["paths"][views["source"]])
    assert "train/cats/cats_1.png" not in set(views["paths"])
    assert [s for s, *_ in res.skipped] == ["train"]


# --------------------------------------------------------------------------- resume, slices, ranks

TRICKS = ["--augment-views", "2", "--layers", "features.14", "--tta", "flip"]


@pytest.mark.slow
def test_a_killed_run_with_views_resumes_to_the_uninterrupted_file(tmp_path):
    from test_crash import _fc, _finish, _kill, _shards, _wait_stopped

    data = make_split_folder(tmp_path / "data", splits=(("train", 8), ("val", 4)))  # 24 records + 32 views
    reference, _ = _finish(_fc(data, tmp_path / "ref", *TRICKS))
    assert reference["views"] == 32 and reference["layers"] == {"features.14": 160}
    cache_dir = tmp_path / "killed"
    killed = _fc(data, cache_dir, *TRICKS, stop="replace|shard-|9")  # 8 shards of 4 rows: records and 2 views rows
    _wait_stopped(killed)
    _kill(killed)
    rows = np.concatenate([np.load(p)["indices"] for p in _shards(cache_dir)])
    assert sorted(rows.tolist()) == list(range(32)), "the killed run wrote the records and some views"
    rerun = _fc(data, cache_dir, *TRICKS, stop="rmtree|.partial|1")  # paused before it removes the shards
    _wait_stopped(rerun)
    rows = sorted(np.concatenate([np.load(p)["indices"] for p in _shards(cache_dir)]).tolist())
    assert rows == list(range(24 + 32)), "the rerun computes the views that are missing, once"
    rerun.send_signal(signal.SIGCONT)
    result, _ = _finish(rerun)
    assert result["reused"] is False and result["views"] == 32
    _assert_same_file(result["cache"], reference["cache"])


def test_two_shard_slices_with_views_write_the_single_run_file(image_folder, tmp_path):
    options = {**FAST, "augment_views": 2, "layers": "features.14", "tta": "flip"}
    single = featurecache.extract(str(image_folder), cache_dir=str(tmp_path / "single"), **options)
    first = featurecache.extract(str(image_folder), cache_dir=str(tmp_path / "sliced"), shard="0/2", **options)
    assert first.missing == 22 and not Path(first.cache).exists()  # 20 records + 24 views: half each
    last = featurecache.extract(str(image_folder), cache_dir=str(tmp_path / "sliced"), shard="1/2", **options)
    assert last.missing == 0 and last.views == 24 and last.layers == {"features.14": 160}
    _assert_same_file(last.cache, single.cache)


@pytest.mark.slow
def test_torchrun_ranks_with_views_write_the_single_process_file(tmp_path):
    from test_crash import _fc, _finish
    from test_torchrun import _torchrun

    data = make_split_folder(tmp_path / "data", splits=(("train", 4), ("val", 2)))
    single, _ = _finish(_fc(data, tmp_path / "single", *TRICKS))
    proc = _torchrun(["-m", "featurecache"], data, tmp_path / "ranks", *TRICKS)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    ranks = json.loads(out)
    assert ranks["views"] == 16 and not ranks["reused"]
    _assert_same_file(ranks["cache"], single["cache"])


# --------------------------------------------------------------------------- the CLI and pipelines


def test_cli_options_json_text_and_cache_info(cli_runner, image_folder, tmp_path):
    args = ["extract", image_folder, "--weights", "none", "--resize", 48, "--crop", 40, "--workers", 0,
            "--cache-dir", tmp_path, "--layers", "features.14,features.17", "--augment-views", 1]
    out = run_cli(cli_runner, *args, "--json")
    assert out.exit_code == 0, out.output
    obj = json.loads(out.stdout)
    assert obj["layers"] == {"features.14": 160, "features.17": 320} and obj["views"] == 12
    assert obj["feature_dim"] == 1280
    text = run_cli(cli_runner, *args)
    assert "(reused, " in text.stdout and "layers: features.14 (160), features.17 (320)" in text.stdout
    assert "train views (1 per image)  12" in text.stdout
    info = run_cli(cli_runner, "cache", "info", obj["cache"])
    assert "layers    features.14 (160), features.17 (320)" in info.stdout
    assert "views     12 rows: 1 per train image (light augmentation, seed 0)" in info.stdout
    assert json.loads(run_cli(cli_runner, "cache", "info", obj["cache"], "--json").stdout)["views"]["n"] == 12


def test_pipelines_take_the_options_by_name(tmp_path):
    data = make_split_folder(tmp_path / "images", splits=(("train", 2), ("val", 1)))
    path = tmp_path / "p.toml"
    path.write_text(f'data = "{data}"\ncache_dir = "{tmp_path / "cache"}"\n[extract]\nweights = "none"\n'
                    'resize = 48\ncrop = 40\nworkers = 0\nlayers = ["features.14", "features.17"]\ntta = "flip"\n'
                    'augment-views = 1\n')
    plan = pipeline.load(path)
    assert plan.branches == [{"extract": {"weights": "none", "resize": 48, "crop": 40, "workers": 0,
                                          "layers": ["features.14", "features.17"], "tta": "flip",
                                          "augment_views": 1}}]
    assert len(pipeline.load(path, ["extract.layers=[['features.14'], ['features.17']]"]).branches) == 2
    out = pipeline.run(path, progress=False)["branches"][0]["stages"]["extract"]
    assert out["layers"] == {"features.14": 160, "features.17": 320} and out["views"] == 4
    assert store.info(out["cache"])["config"]["tta"] == "flip"
    with pytest.raises(featurecache.FeatureCacheError, match=r"augment.views"):
        pipeline.load(path, ["extract.augment_views='many'"])
