"""Data sources: WebDataset shards, Parquet files and Hugging Face datasets give the cache of the
same images in a folder; the keys of folders and manifests stay what they were; a new source is
one registered class; bad input is one line."""

from __future__ import annotations

import io
import json
import os
import re
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, HYMENOPTERA, make_image, make_split_folder, run_cli
from formats import assert_same_images, subset, write_hf, write_parquet, write_shards
from PIL import Image

import featurecache
from featurecache import store
from featurecache.data import sources
from featurecache.data.images import load_rgb
from featurecache.data.sources import Dataset, Record, open_dataset

pytest.importorskip("pyarrow")


@pytest.fixture(scope="module")
def hym(tmp_path_factory) -> Path:
    """Four images of each class of each split of ants/bees, the GIF and the name with a space."""
    if not HYMENOPTERA.is_dir():
        pytest.skip(f"{HYMENOPTERA} is not there")
    return subset(HYMENOPTERA, tmp_path_factory.mktemp("hym") / "hymenoptera", 4)


@pytest.fixture(scope="module")
def formats(hym, tmp_path_factory) -> dict[str, str]:
    """The same images in every format, as fc extract's DATA."""
    out = tmp_path_factory.mktemp("formats")
    found = {
        "webdataset": f"webdataset:{write_shards(hym, out / 'wds', per_shard=5)}",
        "parquet": f"parquet:{write_parquet(hym, out / 'pq', files_per_split={'train': 2})}",
        "parquet-bytes": f"parquet:{write_parquet(hym, out / 'pqb', image='bytes')}",
        "parquet-paths": f"parquet:{write_parquet(hym, out / 'pqp', image='path')}",
    }
    if _has_datasets():
        found["hf"] = f"hf:{write_hf(hym, out / 'hf')}"
    return found


def _has_datasets() -> bool:
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def folder_cache(hym, tmp_path_factory) -> str:
    return featurecache.extract(str(hym), cache_dir=str(tmp_path_factory.mktemp("folder-cache")), **FAST).cache


# --------------------------------------------------------------------------- the new sources


@pytest.mark.parametrize("kind", ["webdataset", "parquet", "parquet-bytes", "parquet-paths", "hf"])
def test_each_source_gives_the_cache_of_the_folder(kind, formats, folder_cache):
    if kind not in formats:
        pytest.skip("datasets is not installed")
    res = featurecache.extract(formats[kind], **FAST)
    assert_same_images(res.cache, folder_cache)
    assert res.skipped == [] and sum(s["n"] for s in res.splits.values()) == 18  # the GIF too
    paths = store.load_features(res.cache, "train")[2]
    assert all("#" in p for p in paths)
    again = featurecache.extract(formats[kind], **FAST)
    assert again.reused and again.key == res.key


def test_webdataset_paths_point_at_the_sample_and_the_index_is_in_the_key(formats, hym):
    ds = open_dataset(formats["webdataset"])
    assert ds.records[0].path == "train-000000.tar#train_000000"
    assert ds.description["shards"][0][0] == "train-000000.tar" and len(ds.description["shards"][0][3]) == 64
    at = next(i for i, r in enumerate(open_dataset(str(hym)).records) if r.path.endswith(".gif"))
    assert ds.records[at].path == f"train-{at // 5:06d}.tar#train_{at:06d}"
    assert load_rgb(ds, ds.records[at]).size == (300, 300)  # the GIF, from its shard


def test_a_brace_pattern_is_one_split_divided_with_split(hym, tmp_path):
    shards = write_shards(hym, tmp_path / "wds", per_shard=4)
    data = f"webdataset:{shards}/train-{{000000..000002}}.tar"
    ds = open_dataset(data, split="train=0.5,val=0.5")
    assert len(ds.records) == 10 and {r.split for r in ds.records} == {"train", "val"}
    with pytest.raises(featurecache.FeatureCacheError, match=r"1 of 4 shards .* are missing"):
        open_dataset(f"webdataset:{shards}/train-{{000000..000003}}.tar")


def test_json_labels_without_classes_file(hym, tmp_path):
    shards = write_shards(hym, tmp_path / "wds", classes_file=False, label="json")
    ds = open_dataset(f"webdataset:{shards}", label_key="json:name")
    assert ds.classes == ["ants", "bees"] and ds.description["label_key"] == "json:name"
    folder = open_dataset(str(hym))
    assert [r.label for r in ds.records] == [r.label for r in folder.records]


def test_class_numbers_without_classes_file_name_the_classes(hym, tmp_path):
    shards = write_shards(hym, tmp_path / "wds", classes_file=False)
    assert open_dataset(f"webdataset:{shards}").classes == ["0", "1"]


def test_hf_source_reads_an_unsplit_dataset_with_split(hym, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [(str(p), p.parent.name) for p in sorted((hym / "train").rglob("*.*"))]
    ds = datasets.Dataset.from_dict({"picture": [{"bytes": Path(f).read_bytes(), "path": None} for f, _ in rows],
                                     "kind": [c for _, c in rows]},
                                    features=datasets.Features({"picture": datasets.Image(),
                                                                "kind": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "one"))
    opened = open_dataset(f"hf:{tmp_path / 'one'}", split="train=0.5,val=0.5", label_column="kind")
    assert opened.classes == ["ants", "bees"] and opened.description["image_column"] == "picture"
    assert len(opened.records) == 10 and {r.split for r in opened.records} == {"train", "val"}


def test_hf_hub_names_are_loaded_with_load_dataset(monkeypatch, hym, tmp_path):
    """``hf:NAME`` (no such folder) goes to datasets.load_dataset; a local copy stands in for the hub."""
    datasets = pytest.importorskip("datasets")
    saved = write_hf(hym, tmp_path / "hub-copy")
    asked = []

    def load_dataset(name, *args, **kwargs):
        asked.append(name)
        return datasets.load_from_disk(str(saved))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    ds = open_dataset("hf:someone/ants-and-bees")
    assert asked == ["someone/ants-and-bees"] and ds.description["dataset"] == "someone/ants-and-bees"
    assert len(ds.records) == 18 and Path(ds.root) == saved
    assert load_rgb(ds, ds.records[0]).size[0] > 0


def test_parquet_is_read_in_row_batches(formats, monkeypatch):
    import pyarrow.parquet as pq

    sizes = []
    batches = pq.ParquetFile.iter_batches

    def iter_batches(self, *args, **kwargs):
        sizes.append((kwargs.get("batch_size"), kwargs.get("columns")))
        return batches(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", iter_batches)
    open_dataset(formats["parquet"])
    assert sizes and all(columns == ["label"] for _, columns in sizes)  # the labels alone


def test_stage_two_predict_and_report_work_on_each_source(formats, tmp_path, cli_runner):
    for kind in ("webdataset", "parquet", "hf"):
        if kind not in formats:
            continue
        res = featurecache.extract(formats[kind], **FAST)
        run = featurecache.fit_head(res.cache, head=["logreg:C=1", "nearest-centroid"], jobs=1, cv=2)
        paths = store.load_features(res.cache, "val")[2]
        config = store.info(res.cache)["config"]
        reopened = sources.reopen(config["data"])
        assert load_rgb(reopened, Record(paths[0], 0, "val")).size[0] > 0  # report and finetune read them again
        page = featurecache.report(run.run_dir, samples=4)
        assert page.is_file() and (page.parent / "samples.png").is_file()
    shard = Path(formats["webdataset"][len("webdataset:"):]) / "val-000000.tar"
    member = f"{shard}#val_000001"
    for given in ([member], [str(HYMENOPTERA / "val" / "ants")]):
        out = featurecache.predict(run.run_dir, given, workers=0, progress=False)
        assert out["predictions"] and not out["skipped"]
    assert featurecache.predict(run.run_dir, [member], workers=0, progress=False)["predictions"][0]["path"] == member
    result = run_cli(cli_runner, "predict", run.run_dir, member)
    assert result.exit_code == 0 and member in result.output


# --------------------------------------------------------------------------- keys and names


def _pinned_data(root: Path) -> tuple[Path, Path]:
    """A folder and a CSV manifest with fixed contents and times."""
    data = make_split_folder(root / "images", splits=(("train", 2), ("val", 1)))
    files = sorted(p for p in data.rglob("*") if p.is_file())
    csv = data / "labels.csv"
    csv.write_text("path,label,split\n" + "".join(f"{p.relative_to(data).as_posix()},{p.parent.name},{p.parts[-3]}\n"
                                                  for p in files))
    for p in [*files, csv]:
        os.utime(p, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    return data, csv


# The fingerprints and cache keys main's code gave these data: a change of them orphans every cache.
PINNED = {
    "folder": ("0ed5c0a2339808c99a6a6b2c81d0284b4504cb285bc87656928b401f88b7b675",
               "b3d1b2ab2b4272c32a6e23a7687235c2f33d400a8aa16fcb87968aa844a95e0d"),
    "csv": ("08a351c04799fc61efa57fb8de92a9077f44982d704c54bccccb644c9a88b8fe",
            "e1e8dd296ba6c2d6245deb1a498866554c8132f25a7a9be558f941d1179afa6e"),
}


def test_the_keys_of_folders_and_manifests_do_not_change(tmp_path):
    folder, csv = _pinned_data(tmp_path)
    for name, data in (("folder", folder), ("csv", csv)):
        fingerprint, key = PINNED[name]
        assert open_dataset(str(data)).fingerprint() == fingerprint
        assert featurecache.extract(str(data), **FAST).key == key


def test_one_grammar_scheme_colon_name(monkeypatch):
    from featurecache.backbones import models

    assert models.canonical_name("timm:resnet18") == "timm/resnet18" == models.canonical_name("timm/resnet18")
    assert models.canonical_name("mobilenet_v2") == "mobilenet_v2"
    opened = []

    class Fake(sources.TorchvisionSource):
        def __init__(self, argument, options):
            opened.append(argument)

    monkeypatch.setitem(sources.SOURCES, "torchvision", Fake)
    sources.resolve_source("torchvision:FashionMNIST")
    sources.resolve_source("torchvision/FashionMNIST")  # the other form: no such path
    assert opened == ["FashionMNIST", "FashionMNIST"]


# --------------------------------------------------------------------------- a new source


class ToySource:
    """``toy:N``: N generated images of each of two classes, made in memory."""

    scheme = "toy"
    kinds = ("toy",)
    accepts = ()

    def __init__(self, argument: str, options: sources.SourceOptions):
        if not argument.isdigit():
            raise featurecache.FeatureCacheError(f"toy:N needs a number, not {argument!r}")
        self.n, self.options = int(argument), options

    @classmethod
    def claims(cls, path: Path) -> bool:
        return False

    def dataset(self) -> Dataset:
        records = [Record(f"{c}/{i}", c, "train") for c in (0, 1) for i in range(self.n)]
        description = {"kind": "toy", "n": self.n}
        if self.options.split:
            records = sources.assign_splits(records, self.options.split, self.options.seed, description)
        return Dataset("", ["dark", "light"], records, f"toy:{self.n}", description=description,
                       opener=self.read)

    def read(self, path: str) -> bytes:
        label, index = (int(x) for x in path.split("/"))
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (40 + 150 * label + index, 60, 90)).save(buffer, format="PNG")
        return buffer.getvalue()

    @classmethod
    def reopen(cls, data: dict) -> Dataset:
        return Dataset("", [], [], data["source"], opener=cls(data["source"][4:], sources.SourceOptions()).read)


def test_a_new_source_is_a_class_registered_in_sources(monkeypatch, tmp_path):
    monkeypatch.setitem(sources.SOURCES, "toy", ToySource)
    res = featurecache.extract("toy:6", split="train=0.5,val=0.5", **FAST)
    assert res.splits == {"train": {"n": 6, "skipped": 0}, "val": {"n": 6, "skipped": 0}}
    assert featurecache.extract("toy:6", split="train=0.5,val=0.5", **FAST).reused
    X, y, paths = featurecache.load_features(res.cache, "train")
    assert X.shape == (6, 1280) and sorted(set(y.tolist())) == [0, 1]
    data = store.info(res.cache)["config"]["data"]
    assert data["kind"] == "toy" and load_rgb(sources.reopen(data), Record(paths[0], 0, "train")).size == (32, 32)


# --------------------------------------------------------------------------- bad input


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _jpeg(seed: int) -> bytes:
    return make_image(Path(f"/tmp/fc-test-{os.getpid()}-{seed}.jpg"), seed).read_bytes()


def _parquet(path: Path, columns: dict) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def _bad_inputs(tmp: Path) -> dict[str, tuple[list[str], str]]:
    jpg = _jpeg(1)
    _tar(tmp / "noimage" / "train-000000.tar", {"a.jpg": jpg, "a.cls": b"0", "b.cls": b"1"})
    _tar(tmp / "nolabel" / "train-000000.tar", {"a.jpg": jpg, "a.cls": b"0", "b.jpg": jpg})
    _tar(tmp / "classes" / "train-000000.tar", {"a.jpg": jpg, "a.cls": b"0", "b.jpg": jpg, "b.cls": b"5"})
    (tmp / "classes" / "classes.txt").write_text("ants\nbees\n")
    _tar(tmp / "split" / "vall-000000.tar", {"a.jpg": jpg, "a.cls": b"0"})
    (tmp / "damaged").mkdir()
    (tmp / "damaged" / "train-000000.tar").write_bytes(b"not a tar file at all" * 40)
    _parquet(tmp / "pq" / "train.parquet", {"image": [jpg], "label": ["ants"]})
    _parquet(tmp / "noimage-pq" / "train.parquet", {"size": [3], "label": ["ants"]})
    _parquet(tmp / "pqsplit" / "training.parquet", {"image": [jpg], "label": ["ants"]})
    return {
        "no image": ([f"webdataset:{tmp / 'noimage'}"], r"train-000000.tar#b: the sample has no image member"),
        "no label": ([f"webdataset:{tmp / 'nolabel'}"], r"train-000000.tar#b: the sample has no label"),
        "classes.txt": ([f"webdataset:{tmp / 'classes'}"], r"class 5 has no entry in classes.txt, which names 2"),
        "split": ([f"webdataset:{tmp / 'split'}"], r"vall-000000.tar does not begin with a split name.*val"),
        "damaged": ([f"webdataset:{tmp / 'damaged'}"], r"train-000000.tar at byte 0: not a tar header"),
        "column": ([f"parquet:{tmp / 'pq'}", "--label-column", "labl"], r"has no column 'labl'.*did you mean: label"),
        "no image column": ([f"parquet:{tmp / 'noimage-pq'}"], r"has no image column"),
        "parquet split": ([f"parquet:{tmp / 'pqsplit'}"], r"training.parquet does not begin with a split name"),
        "json key": ([f"webdataset:{tmp / 'classes'}", "--label-key", "json"], r"--label-key must be cls or json"),
        "flag": ([str(tmp / "classes"), "--image-column", "x"], r"--image-column is for"),
        "scheme": (["webdatset:x"], r"did you mean: webdataset:\.\.\.\?"),
    }


def test_bad_input_is_one_line_and_exit_2(cli_runner, tmp_path):
    for name, (args, pattern) in _bad_inputs(tmp_path).items():
        result = run_cli(cli_runner, "extract", *args, "--weights", "none")
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1, (name, result.stderr)
        assert re.search(pattern, lines[0]), (name, lines[0])


def test_a_corrupt_member_is_skipped_and_recorded(tmp_path):
    members = {f"{k}.jpg": _jpeg(i) for i, k in enumerate("abcd")}
    members.update({f"{k}.cls": str(i % 2).encode() for i, k in enumerate("abcd")})
    members["c.jpg"] = b"\xff\xd8\xff" + b"garbage" * 20
    _tar(tmp_path / "wds" / "train-000000.tar", members)
    res = featurecache.extract(f"webdataset:{tmp_path / 'wds'}", **FAST)
    assert res.splits["train"] == {"n": 3, "skipped": 1}
    assert [(s, p) for s, p, _ in res.skipped] == [("train", "train-000000.tar#c")]
    assert store.load_skipped(res.cache, "train")[0][0] == "train-000000.tar#c"


def test_without_the_hf_extra_the_error_names_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    for data in (f"parquet:{tmp_path}", f"hf:{tmp_path}"):
        with pytest.raises(featurecache.FeatureCacheError, match=r"pip install 'featurecache\[hf\]'"):
            open_dataset(data)


# --------------------------------------------------------------------------- export


def test_export_round_trip_with_pandas(image_folder, tmp_path, cli_runner):
    pd = pytest.importorskip("pandas")
    res = featurecache.extract(str(image_folder), **{**FAST, "layers": "features.14"})
    out = featurecache.export(res.cache, str(tmp_path / "features.parquet"), layers=True)
    assert out["rows"] == {"train": 12, "val": 8} and out["columns"] == ["features", "layer_features.14"]
    df = pd.read_parquet(tmp_path / "features.parquet")
    classes = store.info(res.cache)["classes"]
    for split in ("train", "val"):
        X, y, paths = featurecache.load_features(res.cache, split)
        part = df[df["split"] == split]
        np.testing.assert_array_equal(np.stack(part["features"].to_numpy()), X)
        np.testing.assert_array_equal(part["label"].to_numpy(), y)
        assert list(part["path"]) == paths and list(part["class"]) == [classes[i] for i in y]
        layer = featurecache.load_features(res.cache, split, features="features.14")[0]
        np.testing.assert_array_equal(np.stack(part["layer_features.14"].to_numpy()), layer)
    result = run_cli(cli_runner, "export", res.cache, tmp_path / "npy", "--format", "npy")
    assert result.exit_code == 0
    X = featurecache.load_features(res.cache, "val")[0]
    np.testing.assert_array_equal(np.load(tmp_path / "npy" / "val" / "features.npy"), X)
    assert (tmp_path / "npy" / "classes.txt").read_text().split() == classes
    run_cli(cli_runner, "export", res.cache, tmp_path / "f.csv", "--format", "csv")
    table = pd.read_csv(tmp_path / "f.csv")
    np.testing.assert_allclose(table[table["split"] == "val"][[f"f{i}" for i in range(X.shape[1])]].to_numpy(), X,
                               rtol=1e-6)


def test_export_writes_parquet_in_row_groups(image_folder, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from featurecache.extraction import export as exporter

    monkeypatch.setattr(exporter, "BLOCK", 5)
    res = featurecache.extract(str(image_folder), augment_views=2, **FAST)
    featurecache.export(res.cache, str(tmp_path / "f.parquet"), views=True)
    meta = pq.ParquetFile(tmp_path / "f.parquet").metadata
    assert meta.num_rows == 20 + 24 and meta.num_row_groups == 3 + 2 + 5  # blocks of 5 per split
    table = pq.read_table(tmp_path / "f.parquet").to_pandas()
    views = table[table["split"] == "train_views"]
    np.testing.assert_array_equal(views["source"].to_numpy(), store.view_sources(res.cache))
    assert json.loads(pq.read_schema(tmp_path / "f.parquet").metadata[b"featurecache"])["classes"] == ["cats", "dogs"]


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_shards_of_every_tar_format_are_indexed(tmp_path, fmt):
    """Long member names (GNU long-name headers, pax paths, ustar prefixes) and directories."""
    from featurecache.data.webdataset import read_member, scan_shard

    folder = "d" * 90 + "/" + "e" * 60  # a ustar prefix
    long_key = "k" * 120 if fmt != tarfile.USTAR_FORMAT else "short"
    path = tmp_path / "train-000000.tar"
    with tarfile.open(path, "w", format=fmt) as tar:
        directory = tarfile.TarInfo(folder)
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for key, data in ((f"{folder}/{long_key}", b"image-bytes"), ("plain", b"other")):
            for ext, payload in (("jpg", data), ("cls", b"1")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    rows = scan_shard(path)
    assert [r[0] for r in rows] == [f"{folder}/{long_key}", "plain"]
    assert [r[4] for r in rows] == ["1", "1"] and read_member(path, f"{folder}/{long_key}") == b"image-bytes"
