"""Write the images of a folder dataset as WebDataset shards, Parquet files and a Hugging Face
``save_to_disk`` dataset, in the folder's record order, for tests and benchmarks."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

from featurecache.data.sources import open_dataset


def subset(source: Path, dest: Path, per_class: int, keep=("imageNotFound.gif", "ant photos.jpg")) -> Path:
    """A copy of ``source`` (split folders of class folders) with ``per_class`` images of each class
    of each split, and the files named in ``keep`` wherever they are."""
    for split_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            files = sorted(p for p in class_dir.iterdir() if p.is_file())
            chosen = files[:per_class] + [p for p in files[per_class:] if p.name in keep]
            for f in chosen:
                target = dest / split_dir.name / class_dir.name / f.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)
    return dest


def items(folder: Path) -> tuple[list[str], list[tuple[str, Path, int]]]:
    """Classes and ``(split, file, label)`` of a folder dataset, in its record order."""
    ds = open_dataset(str(folder))
    return ds.classes, [(r.split, Path(ds.root) / r.path, r.label) for r in ds.records]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, out: Path, per_shard: int = 7, classes_file: bool = True, label: str = "cls") -> Path:
    """``SPLIT-00000N.tar`` shards of at most ``per_shard`` samples: ``KEY.EXT`` and ``KEY.cls``
    (``label="json"``: ``KEY.json`` with the class name in its field ``name``); ``classes.txt``."""
    import json

    classes, records = items(folder)
    out.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list] = {}
    for split, file, lab in records:
        by_split.setdefault(split, []).append((file, lab))
    for split, rows in by_split.items():
        for shard_no, first in enumerate(range(0, len(rows), per_shard)):
            with tarfile.open(out / f"{split}-{shard_no:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
                for i, (file, lab) in enumerate(rows[first:first + per_shard], start=first):
                    key = f"{split}_{i:06d}"
                    _add(tar, f"{key}.{file.suffix[1:].lower()}", file.read_bytes())
                    if label == "cls":
                        _add(tar, f"{key}.cls", str(lab).encode())
                    else:
                        _add(tar, f"{key}.json", json.dumps({"name": classes[lab], "file": file.name}).encode())
    if classes_file:
        (out / "classes.txt").write_text("\n".join(classes) + "\n")
    return out


def write_parquet(folder: Path, out: Path, image: str = "struct", files_per_split: dict | None = None) -> Path:
    """``SPLIT.parquet`` (or ``SPLIT-0000N.parquet`` for ``files_per_split[SPLIT]`` > 1) with an
    ``image`` column (``struct``: {bytes, path}; ``bytes``; ``path``: relative to the file) and a
    ``label`` column of class names; row groups of 5 rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    classes, records = items(folder)
    out.mkdir(parents=True, exist_ok=True)
    by_split: dict[str, list] = {}
    for split, file, lab in records:
        by_split.setdefault(split, []).append((file, classes[lab]))
    for split, rows in by_split.items():
        parts = (files_per_split or {}).get(split, 1)
        size = -(-len(rows) // parts)
        for n, first in enumerate(range(0, len(rows), size)):
            chunk = rows[first:first + size]
            name = f"{split}.parquet" if parts == 1 else f"{split}-{n:05d}-of-{parts:05d}.parquet"
            if image == "path":
                column = [os.path.relpath(f, out) for f, _ in chunk]
            elif image == "bytes":
                column = [f.read_bytes() for f, _ in chunk]
            else:
                column = [{"bytes": f.read_bytes(), "path": f.name} for f, _ in chunk]
            table = pa.table({"image": column, "label": [c for _, c in chunk]})
            pq.write_table(table, out / name, row_group_size=5)
    return out


def write_hf(folder: Path, out: Path) -> Path:
    """A ``DatasetDict`` (train, validation) with an ``Image`` and a ``ClassLabel`` column, saved with save_to_disk."""
    import datasets

    classes, records = items(folder)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    parts = {}
    for split in ("train", "val"):
        rows = [(str(f), lab) for s, f, lab in records if s == split]
        parts["validation" if split == "val" else split] = datasets.Dataset.from_dict(
            {"image": [{"bytes": Path(f).read_bytes(), "path": Path(f).name} for f, _ in rows],
             "label": [lab for _, lab in rows]}, features=features)
    datasets.DatasetDict(parts).save_to_disk(str(out))
    return out


def assert_same_images(cache: str, reference: str) -> None:
    """Classes, split sizes and labels equal; features within 1e-5 relative."""
    import numpy as np

    from featurecache import store

    a, b = store.info(cache), store.info(reference)
    assert a["classes"] == b["classes"]
    assert {s: v["n"] for s, v in a["splits"].items()} == {s: v["n"] for s, v in b["splits"].items()}
    for split in b["splits"]:
        (x, y, _), (x2, y2, _) = (store.load_features(c, split) for c in (cache, reference))
        np.testing.assert_array_equal(y, y2)
        np.testing.assert_allclose(x, x2, rtol=1e-5, atol=1e-6)
