"""Tables of images: Parquet files (``parquet:DIR``) and Hugging Face datasets (``hf:DIR``, ``hf:NAME``).

Both are Arrow tables with an image column and a label column, found by their types (a
Hugging Face ``Image`` feature; bytes or a ``{bytes, path}`` struct; a path string in a column
named like one) or named with ``--image-column`` and ``--label-column``. A ``ClassLabel``
feature (also recorded in the metadata of Parquet files that ``datasets`` wrote) gives the class
names in order; otherwise the labels are class names or numbers, sorted. A record's path is
``FILE#ROW``: the Parquet or Arrow file, relative to the data's root, and the row in it.

Listing reads the label column alone, in row batches; a record's image is read from its file's
row group (Parquet) or its memory-mapped Arrow file (``datasets``), one row group or file at a
time per process. pyarrow and ``datasets`` come with the ``hf`` extra.
"""

from __future__ import annotations

import collections
import functools
import json
import os
from pathlib import Path
from typing import ClassVar

from ..errors import DataError, suggest
from .records import (
    ITEM_SEP,
    Dataset,
    Record,
    SourceOptions,
    assign_splits,
    class_ids,
    split_of,
    split_only_order,
    split_rank,
)

EXTRA = "pip install 'featurecache[hf]'"
#: Column names taken for an image path, or a label, when no column's type says so.
IMAGE_NAMES = ("image", "img", "image_path", "path", "file", "filename", "file_name")
LABEL_NAMES = ("label", "labels", "class", "cls", "category", "target", "fine_label")
BATCH_ROWS = 65536


def _pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"parquet: and hf: data need pyarrow, from the hf extra: {EXTRA}") from None
    return pyarrow


def _datasets():
    _pyarrow()
    try:
        import datasets
    except ImportError:
        raise DataError(f"hf: data need the datasets package, from the hf extra: {EXTRA}") from None
    return datasets


def image_mode(kind) -> str | None:
    """How a column of Arrow type ``kind`` holds images: ``bytes``, ``struct`` ({bytes, path}),
    ``path`` (a string), or None."""
    pa = _pyarrow()
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return "bytes"
    if pa.types.is_struct(kind) and any(kind.field(i).name == "bytes" for i in range(kind.num_fields)):
        return "struct"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "path"
    return None


def _named(given: str | None, columns: list[str], flag: str, where: str) -> str | None:
    if given is not None and given not in columns:
        raise DataError(f"{where} has no column {given!r} ({flag}); it has {', '.join(columns)}"
                        + suggest(given, columns))
    return given


def find_columns(schema, features: dict, options: SourceOptions, where: str) -> tuple[str, str, str, list | None]:
    """``(image column, its image_mode, label column, class names or None)`` of a table."""
    pa = _pyarrow()
    columns = list(schema.names)
    kinds = {name: schema.field(name).type for name in columns}
    image = _named(options.image_column, columns, "--image-column", where)
    if image is None:
        typed = [n for n in columns if (features.get(n) or {}).get("_type") == "Image"]
        held = [n for n in columns if image_mode(kinds[n]) in ("bytes", "struct")]
        paths = [n for n in columns if image_mode(kinds[n]) == "path" and n.lower() in IMAGE_NAMES]
        image = next(iter(typed + held + paths), None)
        if image is None:
            raise DataError(f"{where} has no image column (bytes, a {{bytes, path}} struct, or image paths); "
                            f"name it with --image-column (its columns: {', '.join(columns)})")
    mode = image_mode(kinds[image])
    if mode is None:
        raise DataError(f"column {image!r} of {where} holds {kinds[image]}, not image bytes, a {{bytes, path}} "
                        "struct or image paths")
    label = _named(options.label_column, columns, "--label-column", where)
    if label is None:
        typed = [n for n in columns if (features.get(n) or {}).get("_type") == "ClassLabel" and n != image]
        label = next(iter(typed + [n for n in columns if n.lower() in LABEL_NAMES and n != image]), None)
        if label is None:
            raise DataError(f"{where} has no label column; name it with --label-column (its columns: "
                            f"{', '.join(columns)})")
    kind = kinds[label]
    if not (pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"column {label!r} of {where} holds {kind}, not class names or numbers")
    names = (features.get(label) or {}).get("names") if (features.get(label) or {}).get("_type") == "ClassLabel" \
        else None
    return image, mode, label, names


def _checked_labels(values: list, where: str, first_row: int) -> list:
    if None in values:
        raise DataError(f"{where}{ITEM_SEP}{first_row + values.index(None)}: the row has no label")
    return values


def _stat(root: Path, file: Path) -> list:
    st = file.stat()
    return [Path(os.path.relpath(file, root)).as_posix(), st.st_size, st.st_mtime_ns]


# --------------------------------------------------------------------------- reading one row


def image_bytes(value, base: str) -> bytes:
    """An image cell's bytes: bytes, a ``{bytes, path}`` struct, or a path relative to ``base``."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not value:
        raise FileNotFoundError("no image in this row")
    with open(os.path.join(base, value), "rb") as fh:
        return fh.read()


class _RowGroups:
    """This process's Parquet files, each with the last row group read (extraction reads rows in order)."""

    def __init__(self):
        self.files: collections.OrderedDict = collections.OrderedDict()
        self.pid = os.getpid()

    def cell(self, file: str, column: str, row: int):
        if self.pid != os.getpid():
            self.files, self.pid = collections.OrderedDict(), os.getpid()
        entry = self.files.pop(file, None)
        if entry is None:
            pq = _pyarrow().parquet
            reader = pq.ParquetFile(file)
            bounds = [0]
            for i in range(reader.metadata.num_row_groups):
                bounds.append(bounds[-1] + reader.metadata.row_group(i).num_rows)
            entry = {"reader": reader, "bounds": bounds, "group": -1, "values": None}
            if len(self.files) >= 8:
                self.files.popitem(last=False)
        self.files[file] = entry
        bounds = entry["bounds"]
        if not 0 <= row < bounds[-1]:
            raise FileNotFoundError(f"no row {row} in {os.path.basename(file)}")
        group = next(i for i in range(len(bounds) - 1) if bounds[i + 1] > row)
        if entry["group"] != group:
            entry["values"] = entry["reader"].read_row_group(group, columns=[column]).column(0)
            entry["group"] = group
        return entry["values"][row - bounds[group]].as_py()


_ROW_GROUPS = _RowGroups()


def read_parquet_row(root: str, column: str, path: str) -> bytes:
    """The image of record ``FILE#ROW`` of a Parquet dataset rooted at ``root``."""
    file, _, row = path.rpartition(ITEM_SEP)
    full = os.path.join(root, file)
    return image_bytes(_ROW_GROUPS.cell(full, column, int(row)), os.path.dirname(full))


@functools.lru_cache(maxsize=4)
def _arrow_table(file: str, pid: int):
    pa = _pyarrow()
    with pa.memory_map(file) as source:  # the table keeps the mapping alive
        return pa.ipc.open_stream(source).read_all()


def read_arrow_row(root: str, column: str, path: str) -> bytes:
    """The image of record ``FILE#ROW`` of a ``datasets`` Arrow file under ``root``."""
    file, _, row = path.rpartition(ITEM_SEP)
    full = os.path.join(root, file)
    table = _arrow_table(full, os.getpid())
    if not 0 <= int(row) < table.num_rows:
        raise FileNotFoundError(f"no row {row} in {file}")
    return image_bytes(table.column(column)[int(row)].as_py(), os.path.dirname(full))


# --------------------------------------------------------------------------- the sources


class _Table:
    """What the Parquet and Hugging Face sources share: records ``FILE#ROW`` from labels."""

    accepts: ClassVar[tuple[str, ...]] = ("image_column", "label_column")
    kinds: ClassVar[tuple[str, ...]]
    reader: ClassVar  # read_parquet_row or read_arrow_row
    root: Path
    options: SourceOptions

    @classmethod
    def claims(cls, path: Path) -> bool:
        return False

    @classmethod
    def reopen(cls, data: dict) -> Dataset:
        return Dataset(data["root"], [], [], data["source"],
                       opener=functools.partial(cls.reader, data["root"], data["image_column"]))

    def read(self, path: str) -> bytes:
        return type(self).reader(str(self.root), self.columns[0], path)

    def _dataset(self, parts: list, names: list | None, description: dict, single: bool) -> Dataset:
        """``parts``: ``(split, relative file, raw labels)`` in order."""
        paths = [f"{rel}{ITEM_SEP}{row}" for _, rel, raw in parts for row in range(len(raw))]
        splits = [split for split, _, raw in parts for _ in range(len(raw))]
        raw = [v for _, _, values in parts for v in values]
        if not paths:
            raise DataError(f"{self.root} holds no rows")
        classes, labels = class_ids(raw, names, paths, f"the ClassLabel of column {self.columns[2]!r}")
        del raw
        records = [Record(p, label, s) for p, label, s in zip(paths, labels, splits)]
        del paths, labels, splits
        image, mode, label = self.columns[:3]
        description.update(image_column=image, image_mode=mode, label_column=label)
        if self.options.split:
            if not single:
                raise DataError(f"{self.root} is divided into splits already; drop --split")
            records = assign_splits(records, self.options.split, self.options.seed, description, split_only_order)
        return Dataset(str(self.root), classes, records, f"{self.scheme}:{self.argument}", [],
                       description=description, opener=functools.partial(type(self).reader, str(self.root), image))


class ParquetSource(_Table):
    """``parquet:DIR`` of ``SPLIT.parquet`` or ``SPLIT-*.parquet`` files, or ``parquet:FILE`` (one split)."""

    scheme = "parquet"
    kinds = ("parquet",)
    reader = staticmethod(read_parquet_row)

    def __init__(self, argument: str, options: SourceOptions):
        _pyarrow()
        self.argument, self.options = argument, options
        path = Path(argument).expanduser()
        if path.is_file():
            self.root, self.files, self.single = path.parent, [("train", path)], True
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix == ".parquet" and not p.name.startswith("."))
            if not files:
                raise DataError(f"no .parquet files in {path} (name them train.parquet or train-00000.parquet, "
                                "val..., test...)")
            named = [(split_of(p.name, str(path)), p) for p in files]
            self.root, self.single = path, False
            self.files = sorted(named, key=lambda sp: (split_rank(sp[0]), sp[1].name))
        else:
            raise DataError(f"parquet: {path} is neither a folder of .parquet files nor one")

    def dataset(self) -> Dataset:
        pq = _pyarrow().parquet
        parts, stats, names = [], [], None
        for split, file in self.files:
            where = Path(os.path.relpath(file, self.root)).as_posix()
            try:
                reader = pq.ParquetFile(file)
            except Exception as exc:  # pyarrow raises its own errors for a file that is not Parquet
                raise DataError(f"cannot read {file}: {exc}".splitlines()[0]) from None
            features = _hf_features(reader.schema_arrow)
            self.columns = found = find_columns(reader.schema_arrow, features, self.options, where)
            names = names if names is not None else found[3]
            raw: list = []
            for batch in reader.iter_batches(batch_size=BATCH_ROWS, columns=[found[2]]):
                raw += _checked_labels(batch.column(0).to_pylist(), where, len(raw))
            parts.append((split, where, raw))
            stats.append(_stat(self.root, file))
        return self._dataset(parts, names, {"kind": "parquet", "files": stats}, self.single)


def _hf_features(schema) -> dict:
    """The ``datasets`` features recorded in a Parquet file's metadata (``{}`` without)."""
    meta = (schema.metadata or {}).get(b"huggingface")
    try:
        doc = json.loads(meta) if meta else {}
        return dict((doc.get("info") or {}).get("features") or doc.get("features") or {})
    except (ValueError, TypeError, AttributeError):
        return {}


class HuggingFaceSource(_Table):
    """``hf:DIR`` (a ``Dataset`` or ``DatasetDict`` saved with ``save_to_disk``) or ``hf:NAME``
    (a dataset of the Hugging Face hub, ``load_dataset(NAME)``, downloaded into its cache)."""

    scheme = "hf"
    kinds = ("hf",)
    reader = staticmethod(read_arrow_row)

    def __init__(self, argument: str, options: SourceOptions):
        self.datasets = _datasets()
        self.argument, self.options = argument, options
        self.local = Path(argument).expanduser()
        self.root = self.local

    def _load(self):
        try:
            if self.local.exists():
                return self.datasets.load_from_disk(str(self.local))
            return self.datasets.load_dataset(self.argument)
        except Exception as exc:  # datasets raises anything for a missing or unreadable dataset
            raise DataError(f"cannot load hf:{self.argument}: {exc}".splitlines()[0]) from None

    def _splits(self, loaded) -> list[tuple[str, object]]:
        if isinstance(loaded, self.datasets.Dataset):
            return [("train", loaded)]
        named = [(split_of(name, f"hf:{self.argument}"), part) for name, part in loaded.items()]
        return sorted(named, key=lambda sp: split_rank(sp[0]))

    def dataset(self) -> Dataset:
        loaded = self._load()
        splits = self._splits(loaded)
        files = {split: [c["filename"] for c in part.cache_files] for split, part in splits}
        if not all(files.values()):
            raise DataError(f"hf:{self.argument} is held in memory, not in Arrow files; save it with save_to_disk")
        if not self.local.exists():
            self.root = Path(os.path.commonpath([os.path.dirname(f) for fs in files.values() for f in fs]))
        parts, stats, names = [], [], None
        for split, part in splits:
            where = f"hf:{self.argument} ({split})"
            self.columns = found = find_columns(part.data.schema, part.features.to_dict(), self.options, where)
            names = names if names is not None else found[3]
            raw = _checked_labels(part.data.column(found[2]).to_pylist(), where, 0)
            at = 0
            for file in files[split]:
                rel = Path(os.path.relpath(file, self.root)).as_posix()
                rows = _arrow_table(file, os.getpid()).num_rows
                parts.append((split, rel, raw[at:at + rows]))
                stats.append(_stat(self.root, Path(file)))
                at += rows
        description = {"kind": "hf", "dataset": None if self.local.exists() else self.argument, "files": stats}
        return self._dataset(parts, names, description, len(splits) == 1 and splits[0][0] == "train")

