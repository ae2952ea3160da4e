"""Features out of the cache, into files that pandas, polars, DuckDB, Spark or numpy read.

:func:`export` writes every split of a cache (and, when asked, each stored layer and the
augmented views) in one of :data:`FORMATS`, reading :data:`BLOCK` rows of the HDF5 file at a
time: the whole matrix is never in memory.

- ``parquet``: one file; a row per image with ``split``, ``row`` (its row in the split),
  ``path``, ``label``, ``class`` and ``features`` (a fixed-size list of floats), then one
  ``layer_NAME`` column per stored layer (``layers``) and ``source`` and ``view`` (``views``:
  rows of split ``train_views``; null elsewhere). One row group per block.
- ``npy``: a folder: ``classes.txt``, and per split ``SPLIT/features.npy``, ``labels.npy``,
  ``paths.txt`` (one per line), ``layers/NAME.npy``, ``source.npy`` and ``view.npy``.
- ``csv``: one file, the columns of ``parquet`` with the features spread over ``f0 ... f{D-1}``
  and a layer's over ``NAME_0 ...``.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import store
from ..errors import UsageError
from ..files import atomic_write

BLOCK = 65536  # rows read from the cache, and written, at a time


def _parts(cache: str, layers: bool, views: bool) -> tuple[dict, list[str], list[str]]:
    """``(info, splits to write, feature sets per row)``."""
    meta = store.info(cache)
    splits = list(meta["splits"])
    if views:
        if not meta["views"]["n"]:
            raise UsageError(f"{Path(cache).name} has no augmented views (extract with --augment-views K)")
        splits.append(store.VIEWS)
    return meta, splits, ["penultimate", *(meta["layers"] if layers else [])]


def _column(name: str) -> str:
    return "features" if name == "penultimate" else f"layer_{name}"


def _blocks(cache: str, splits: list[str], sets: list[str]):
    for split in splits:
        for start, columns in store.iter_blocks(cache, split, sets, BLOCK):
            yield split, start, columns


# --------------------------------------------------------------------------- formats


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise UsageError("--format parquet needs pyarrow, from the hf extra: pip install 'featurecache[hf]'") \
            from None
    return pyarrow


def _schema(pa, meta: dict, sets: list[str], views: bool):
    fields = [pa.field("split", pa.string()), pa.field("row", pa.int64()), pa.field("path", pa.string()),
              pa.field("label", pa.int64()), pa.field("class", pa.string())]
    dims = {"penultimate": store.feature_dim(meta), **meta["layers"]}
    dtype = next(iter(meta["splits"].values()))["dtype"]
    value = pa.float16() if dtype == "float16" else pa.float32()
    fields += [pa.field(_column(s), pa.list_(value, dims[s])) for s in sets]
    if views:
        fields += [pa.field("source", pa.int64()), pa.field("view", pa.int64())]
    info = {"classes": meta["classes"], "key": meta["key"], "backbone": meta["config"].get("backbone")}
    return pa.schema(fields, metadata={"featurecache": json.dumps(info)})


def _parquet(cache: str, out: Path, meta: dict, splits: list[str], sets: list[str]) -> None:
    pa = _pyarrow()
    views = store.VIEWS in splits
    schema = _schema(pa, meta, sets, views)
    classes = np.asarray(meta["classes"], dtype=object)

    def write(tmp: Path) -> None:
        with pa.parquet.ParquetWriter(tmp, schema) as writer:
            for split, start, cols in _blocks(cache, splits, sets):
                n = len(cols["labels"])
                arrays = [pa.array([split] * n, pa.string()), pa.array(np.arange(start, start + n)),
                          pa.array(cols["paths"], pa.string()), pa.array(cols["labels"]),
                          pa.array(classes[cols["labels"]], pa.string())]
                for s in sets:
                    values = np.ascontiguousarray(cols[s])
                    arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1]))
                if views:
                    arrays += [pa.array(cols.get(k), pa.int64()) if k in cols else pa.nulls(n, pa.int64())
                               for k in ("source", "view")]
                writer.write_table(pa.Table.from_arrays(arrays, schema=schema), row_group_size=BLOCK)

    atomic_write(out, write)


def _npy(cache: str, out: Path, meta: dict, splits: list[str], sets: list[str]) -> None:
    from numpy.lib.format import open_memmap

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "classes.txt", "".join(f"{c}\n" for c in meta["classes"]))
    for split in splits:
        n = meta["splits"][split]["n"] if split in meta["splits"] else meta["views"]["n"]
        folder = out / split
        (folder / "layers" if len(sets) > 1 else folder).mkdir(parents=True, exist_ok=True)
        files: dict = {}
        with open(folder / "paths.txt", "w", encoding="utf-8") as paths:
            for start, cols in store.iter_blocks(cache, split, sets, BLOCK):
                for name in [*sets, "labels", "source", "view"]:
                    if name not in cols:
                        continue
                    if name not in files:
                        target = folder / ("features.npy" if name == "penultimate" else
                                           f"{name}.npy" if name in ("labels", "source", "view") else
                                           f"layers/{name}.npy")
                        files[name] = open_memmap(target, "w+", cols[name].dtype, (n, *cols[name].shape[1:]))
                    files[name][start:start + len(cols["labels"])] = cols[name]
                paths.writelines(f"{p}\n" for p in cols["paths"])
        for array in files.values():
            array.flush()
        if not n:  # an empty split still has its files
            np.save(folder / "labels.npy", np.zeros(0, np.int64))


def _csv(cache: str, out: Path, meta: dict, splits: list[str], sets: list[str]) -> None:
    dims = {"penultimate": store.feature_dim(meta), **meta["layers"]}
    views = store.VIEWS in splits
    header = ["split", "row", "path", "label", "class"]
    for s in sets:
        stem = "f" if s == "penultimate" else f"{s}_"
        header += [f"{stem}{i}" for i in range(dims[s])]
    header += ["source", "view"] if views else []

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, lineterminator="\n")
            writer.writerow(header)
            for split, start, cols in _blocks(cache, splits, sets):
                features = np.hstack([cols[s].astype(np.float32) for s in sets])
                extra = (np.stack([cols["source"], cols["view"]], axis=1).tolist() if "source" in cols
                         else [["", ""]] * len(features)) if views else [[]] * len(features)
                for i, (path, label) in enumerate(zip(cols["paths"], cols["labels"].tolist())):
                    writer.writerow([split, start + i, path, label, meta["classes"][label],
                                     *(repr(float(v)) for v in features[i]), *extra[i]])

    atomic_write(out, write)


#: Output formats by ``--format`` name.
FORMATS: dict[str, Callable] = {"parquet": _parquet, "npy": _npy, "csv": _csv}


def export(cache: str, out: str, format: str = "parquet", layers: bool = False, views: bool = False,
           cache_dir: str | None = None) -> dict:
    """Write the features of every split of ``cache`` (a path, file name or key prefix) to ``out``
    as ``format`` (parquet, npy or csv), with each stored layer (``layers``) and the augmented
    training views (``views``) when asked. Returns ``{"out", "format", "rows": {split: n}, "columns"}``."""
    if format not in FORMATS:
        raise UsageError(f"unknown --format {format!r}: choose " + ", ".join(FORMATS))
    path = str(store.resolve(cache, cache_dir))
    meta, splits, sets = _parts(path, layers, views)
    target = Path(out).expanduser()
    if target.parent and not target.parent.exists():
        raise UsageError(f"the folder of {target} does not exist")
    if format != "npy" and target.is_dir():
        raise UsageError(f"{target} is a folder; --format {format} writes one file")
    FORMATS[format](path, target, meta, splits, sets)
    rows = {s: meta["splits"][s]["n"] for s in meta["splits"]}
    if views:
        rows[store.VIEWS] = meta["views"]["n"]
    return {"out": os.fspath(target), "format": format, "rows": rows, "columns": [_column(s) for s in sets]}
