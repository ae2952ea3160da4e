"""fc predict: exported models and stage-two runs classify folders of images; bad images are skipped."""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, make_split_folder, run_cli
from test_finetune import finetune_hymenoptera, tiny_run

import featurecache
from featurecache.data.images import normalize_batch
from featurecache.errors import DataError, FinetuneError, UsageError
from featurecache.finetuning.prediction import image_paths
from featurecache.sweep.calibration import apply_temperature, head_temperature
from featurecache.sweep.runs import load_head

PREDICTION_KEYS = {"path", "class", "probability", "topk"}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, real_weights):
    base = tmp_path_factory.mktemp("predict")
    run_dir, cache = tiny_run(base, 3, ["logreg:pre=standardize", "knn"], real_weights)
    return run_dir, cache, base / "images-3"


def _proba(prediction: dict, classes: list[str]) -> np.ndarray:
    by_class = {t["class"]: t["probability"] for t in prediction["topk"]}
    return np.array([by_class[c] for c in classes])


@pytest.mark.slow
@pytest.mark.parametrize("head", ["logreg:pre=standardize", "knn"])
def test_a_run_predicts_what_its_head_predicted_on_the_cache(small_run, head):
    run_dir, cache, images = small_run
    pipeline, head_meta = load_head(run_dir, head)
    X, _, paths = featurecache.load_features(cache, "val")
    expected = apply_temperature(pipeline.predict_proba(X), head_temperature(head_meta))  # calibrated by default
    classes = ["class0", "class1", "class2"]

    out = featurecache.predict(run_dir, [str(images / "val")], head=head, workers=0, progress=False)
    assert out["skipped"] == []
    got = {Path(p["path"]).relative_to(images).as_posix(): p for p in out["predictions"]}
    assert sorted(got) == sorted(paths)
    for row, path in zip(expected, paths):
        prediction = got[path]
        assert prediction["class"] == classes[int(np.argmax(row))]
        assert np.abs(_proba(prediction, classes) - row).max() < 1e-4
        assert [t["probability"] for t in prediction["topk"]] == sorted(
            (t["probability"] for t in prediction["topk"]), reverse=True)


@pytest.mark.slow
def test_a_corrupt_image_is_reported_and_skipped(small_run, cli_runner, tmp_path):
    run_dir, _, images = small_run
    folder = tmp_path / "mixed"
    shutil.copytree(images / "val" / "class1", folder / "nested")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image, not picked up from a folder")
    good = sorted(str(p) for p in (folder / "nested").iterdir())

    out = run_cli(cli_runner, "predict", run_dir, folder, "--topk", "2", "--workers", "0")
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert list(rows[0]) == ["path", "class", "probability", "topk"]
    assert [r["path"] for r in rows] == good
    for r in rows:
        top = [pair.rsplit(":", 1) for pair in r["topk"].split(";")]
        assert len(top) == 2 and top[0][0] == r["class"] and float(top[0][1]) == pytest.approx(float(r["probability"]))
    skipped = sorted(line for line in out.stderr.splitlines() if line.startswith("skipped "))
    assert len(skipped) == 2 and "broken.jpg" in skipped[0] and "empty.png" in skipped[1]

    out = run_cli(cli_runner, "predict", run_dir, folder, "--json", "--workers", "0")
    result = json.loads(out.stdout)
    assert [p["path"] for p in result["predictions"]] == good
    assert all(set(p) == PREDICTION_KEYS and len(p["topk"]) == 3 for p in result["predictions"])
    assert sorted(Path(s["path"]).name for s in result["skipped"]) == ["broken.jpg", "empty.png"]


def test_a_calibrated_run_predicts_tempered_probabilities(tmp_path):
    from featurecache.sweep.calibration import apply_temperature

    data = make_split_folder(tmp_path / "images", splits=(("train", 6), ("val", 3)), classes=("a", "b", "c"))
    cache_dir = str(tmp_path / "cache")
    # random-weight MobileNetV2 features are all but zero; random ResNet-18 ones tell the images apart
    cache = featurecache.extract(str(data), **{**FAST, "backbone": "resnet18"}, cache_dir=cache_dir).cache
    heads = ("logreg:C=10", "knn:n_neighbors=3")  # a layer of the network, and features into scikit-learn
    run = featurecache.fit_head(cache, head=heads, jobs=1, calibrate="temperature", cache_dir=cache_dir)
    X, _, paths = featurecache.load_features(cache, "val")
    for head in heads:
        pipeline, head_meta = load_head(run.run_dir, head)
        temperature = head_meta["calibration"]["temperature"]
        expected = apply_temperature(pipeline.predict_proba(X), temperature)
        out = featurecache.predict(run.run_dir, [str(data / "val")], head=head, topk=3, workers=0, progress=False)
        got = {Path(p["path"]).relative_to(data).as_posix(): _proba(p, ["a", "b", "c"]) for p in out["predictions"]}
        assert np.abs(np.array([got[p] for p in paths]) - expected).max() < 1e-4, head
    assert abs(load_head(run.run_dir, "logreg:C=10")[1]["calibration"]["temperature"] - 1) > 0.01


def test_the_exported_model_divides_its_logits_by_the_temperature(tmp_path):
    import torch
    from torch import nn

    from featurecache.data.preprocess import Preprocess
    from featurecache.finetuning import network as model

    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    network, pre = model.Network(backbone, nn.Linear(4, 3)), Preprocess(resize=12, crop=8)
    path = model.export(network, pre, ["a", "b", "c"], tmp_path / "model.pt", {}, temperature=2.5)
    exported, info = model.load_exported(path)
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        logits = network(normalize_batch(images, pre))
        plain = model.Exported(network, pre).eval()(images)
        assert info["temperature"] == 2.5
        torch.testing.assert_close(exported(images), torch.softmax(logits / 2.5, dim=1))
        torch.testing.assert_close(plain, torch.softmax(logits, dim=1))


def test_paths_are_walked_recursively_by_extension(tmp_path):
    for name in ("b/x.JPG", "a/y.png", "a/deep/z.webp", "a/readme.md", ".hidden/h.png", "c.jpeg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = image_paths([tmp_path / "a", tmp_path / "b", tmp_path / "a" / "readme.md"])
    assert found == [str(tmp_path / p) for p in ("a/deep/z.webp", "a/y.png", "b/x.JPG", "a/readme.md")]
    assert image_paths([tmp_path]) == [str(tmp_path / p) for p in ("a/deep/z.webp", "a/y.png", "b/x.JPG", "c.jpeg")]
    with pytest.raises(DataError, match="no such file or folder"):
        image_paths([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        image_paths([tmp_path / "empty"])


def test_bad_models_and_paths_are_one_line_errors(tmp_path, cli_runner):
    fake = tmp_path / "model.pt"
    fake.write_bytes(b"not torchscript")
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(FinetuneError, match="not an exported featurecache model"):
        featurecache.predict(str(fake), [str(tmp_path / "x.png")], progress=False)
    for args, message, code in (([fake, tmp_path / "missing"], "no such file or folder", 2),
                                ([fake, tmp_path / "x.png"], "not an exported featurecache model", 2),
                                ([tmp_path / "no-run", tmp_path / "x.png"], "no run matches", 3)):
        out = run_cli(cli_runner, "predict", *args)
        lines = out.stderr.strip().splitlines()
        assert out.exit_code == code and len(lines) == 1 and message in lines[0], out.stderr


@pytest.mark.parametrize("options, message", [
    (dict(topk=0), "--topk and --batch-size must be at least 1"),
    (dict(batch_size=0), "--topk and --batch-size must be at least 1"),
    (dict(workers=-1), "--workers must be 0"),
])
def test_bad_option_values_are_usage_errors(tmp_path, options, message, cli_runner):
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(UsageError, match=message):
        featurecache.predict(str(tmp_path / "no-run"), [str(tmp_path / "x.png")], progress=False, **options)
    (name, value), = options.items()
    out = run_cli(cli_runner, "predict", tmp_path / "no-run", tmp_path / "x.png", f"--{name.replace('_', '-')}", value)
    assert out.exit_code == 2 and out.stderr.strip().splitlines()[-1].startswith("Error: "), out.stderr


@pytest.mark.slow
def test_predict_with_the_exported_model_reproduces_the_val_accuracy(hymenoptera_cache, hymenoptera, cli_runner):
    finetuned = finetune_hymenoptera(cli_runner, hymenoptera_cache)
    val = hymenoptera / "val"
    out = run_cli(cli_runner, "predict", finetuned["model"], val, "--json")
    assert out.exit_code == 0, out.output
    predictions = json.loads(out.stdout)["predictions"]
    assert len(predictions) == sum(1 for p in val.rglob("*") if p.is_file())
    correct = [p["class"] == Path(p["path"]).parent.name for p in predictions]
    accuracy = sum(correct) / len(correct)
    print(f"fc predict on {val}: accuracy {accuracy:.4f} ({sum(correct)}/{len(correct)}); "
          f"fc finetune reported {finetuned['best_accuracy']:.4f}")
    assert accuracy == finetuned["best_accuracy"]
    # the fine-tuning folder itself is accepted as MODEL: its safetensors weights give the same probabilities
    again = featurecache.predict(str(Path(finetuned["model"]).parent), [str(val / "ants")], progress=False)
    by_path = {p["path"]: p for p in predictions}
    for p in again["predictions"]:
        assert p["class"] == by_path[p["path"]]["class"]
        assert p["probability"] == pytest.approx(by_path[p["path"]]["probability"], abs=1e-5)
