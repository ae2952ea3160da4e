"""Where images come from: sources that yield records.

A source turns what the user points at into a :class:`Dataset`: class names and
``(path, label, split)`` records, a fingerprint of their content for the cache key, and a
way to read one record's bytes. Sources are classes that follow :class:`DataSource`,
registered in :data:`SOURCES` by scheme: ``DATA`` is ``SCHEME:ARGUMENT`` (``torchvision:NAME``,
``webdataset:DIR``, ``hf:DIR``, ``parquet:DIR``), or a plain path, which the first source
that claims it reads (a folder tree, a CSV manifest). Nothing here knows about models.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import gc
import gzip
import hashlib
import io
import os
import shutil
from pathlib import Path
from typing import ClassVar

from PIL import Image

from ..errors import DataError, UsageError, suggest
from ..files import atomic_write
from ..names import SPLITS
from .records import (
    IMAGE_EXTENSIONS,
    ITEM_SEP,
    SOURCE_FLAGS,
    SPLIT_ALIASES,
    Dataset,
    DataSource,
    Record,
    SourceOptions,
    assign_splits,
    class_ids,
    split_of,
    split_only_order,
    split_order,
    stratified_assign,
)
from .tables import HuggingFaceSource, ParquetSource
from .webdataset import WebDatasetSource

__all__ = ["IMAGE_EXTENSIONS", "ITEM_SEP", "SOURCES", "SPLIT_ALIASES", "TORCHVISION_PREFIX", "DataSource", "Dataset",
           "Record", "SourceOptions", "assign_splits", "class_ids", "open_dataset", "register_source", "reopen",
           "split_of", "split_only_order", "split_order", "stratified_assign"]

TORCHVISION_PREFIX = "torchvision:"


class _Files:
    """What the sources of plain files share: bytes by path under the root, read again by root."""

    accepts: ClassVar[tuple[str, ...]] = ()
    root: Path

    @classmethod
    def claims(cls, path: Path) -> bool:
        return False

    def read(self, path: str) -> bytes:
        with open(self.root / path, "rb") as fh:
            return fh.read()

    @classmethod
    def reopen(cls, data: dict) -> Dataset:
        return Dataset(data.get("root", ""), [], [], data.get("source", ""))


# --------------------------------------------------------------------------- folders and manifests


def _is_hidden(name: str) -> bool:
    return name.startswith((".", "__"))


def _scan_class_folder(root: Path, folder: Path, split: str):
    """Yield ``(relative path, class, reason or None)`` for every file under ``folder``/CLASS/."""
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name)):
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
            for fname in sorted(filenames):
                if _is_hidden(fname):
                    continue
                full = Path(dirpath) / fname
                rel = full.relative_to(root).as_posix()
                ext = full.suffix.lower()
                reason = None if ext in IMAGE_EXTENSIONS else f"not an image file extension ({ext or 'none'})"
                yield rel, class_dir.name, reason


def _records_from_scan(entries):
    entries = list(entries)
    classes = sorted({cls for _, _, cls, _ in entries})
    index = {c: i for i, c in enumerate(classes)}
    records, skipped = [], []
    for split, rel, cls, reason in entries:
        if reason:
            skipped.append((split, rel, reason))
        else:
            records.append(Record(rel, index[cls], split))
    return classes, records, skipped


class FolderSource(_Files):
    """A folder with ``train/ val/ test/`` of class folders, or one folder of class folders (``--split``)."""

    scheme = "folder"
    kinds = ("split-folders", "folder")

    def __init__(self, argument: str, options: SourceOptions):
        self.root, self.options = Path(argument).expanduser(), options
        if not self.root.is_dir():
            raise DataError(f"data folder does not exist: {self.root}")
        if not any(self.root.iterdir()):
            raise DataError(f"data folder is empty: {self.root}")

    @classmethod
    def claims(cls, path: Path) -> bool:
        return path.is_dir()

    def dataset(self) -> Dataset:
        root, split = self.root, self.options.split
        split_dirs = [s for s in SPLITS if (root / s).is_dir()]
        if split_dirs:
            if split:
                raise DataError(f"{root} already has split folders ({', '.join(split_dirs)}); drop --split")
            entries = [(s, *e) for s in split_dirs for e in _scan_class_folder(root, root / s, s)]
            kind = "split-folders"
        else:
            entries = [("train", *e) for e in _scan_class_folder(root, root, "train")]
            kind = "folder"
        if not entries:
            raise DataError(f"no images found in {root} (expected CLASS/ subfolders, or train/ val/ test/ of them)")
        classes, records, skipped = _records_from_scan(entries)
        if not records:
            raise DataError(f"no images found in {root}: {len(skipped)} files, none with an image extension")
        description = {"kind": kind}
        if kind == "folder" and split:
            records = assign_splits(records, split, self.options.seed, description)
        return Dataset(str(root), classes, records, kind, skipped, description=description)


def _csv_rows(path: Path):
    """``(line, path, label, split or None)`` of every row of a manifest, streamed."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            first = next((row for row in reader if row), None)
            if header is None or first is None:
                raise DataError(f"manifest {path} has no rows")
            columns = {name: i for i, name in enumerate(header)}  # the last of a repeated name, as csv.DictReader
            if not {"path", "label"} <= set(columns):
                raise DataError(f"manifest {path} needs a header with path,label[,split]; found {','.join(header)}")
            at_path, at_label, at_split = columns["path"], columns["label"], columns.get("split")
            rows = (row for row in _chain(first, reader) if row)  # csv.DictReader skips empty lines too
            for line, row in enumerate(rows, start=2):
                row = row + [""] * (len(header) - len(row))
                yield line, row[at_path], row[at_label], None if at_split is None else row[at_split]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read manifest {path}: {exc}") from None


def _chain(first, rest):
    yield first
    yield from rest


class CsvSource(_Files):
    """A manifest ``path,label[,split]``, paths relative to the CSV file; read as a stream."""

    scheme = "csv"
    kinds = ("csv",)

    def __init__(self, argument: str, options: SourceOptions):
        self.path, self.options = Path(argument).expanduser(), options
        self.root = self.path.parent
        if not self.path.is_file():
            raise DataError(f"manifest not found: {self.path}")

    @classmethod
    def claims(cls, path: Path) -> bool:
        return path.is_file() and path.suffix.lower() == ".csv"

    def dataset(self) -> Dataset:
        path, root, split = self.path, self.root, self.options.split
        rows, labels, has_split = [], {}, None
        for line, rel, label, rec_split in _csv_rows(path):
            if has_split is None:
                has_split = rec_split is not None
                if has_split and split:
                    raise DataError(f"manifest {path} has a split column; drop --split")
            _check_row(f"manifest {path}, line {line}", label, rec_split)
            label = labels.setdefault(label, label)  # one string per class, however many rows
            rows.append(self._entry(line, rel.strip(), label, rec_split))
        classes, records, skipped = _records_from_scan(rows)
        del rows
        if not records:
            raise DataError(f"manifest {path} lists no images")
        _check_files_exist(path, root, records)
        description = {"kind": "csv", "manifest": path.name}
        records = assign_splits(records, split, self.options.seed, description) if split else sorted(
            records, key=split_order)
        return Dataset(str(root), classes, records, "csv", skipped, description=description)

    def _entry(self, line: int, rel: str, label: str, rec_split: str | None) -> tuple:
        """``(split, path, label, reason to skip or None)`` of one row, as :func:`_records_from_scan` takes it."""
        if not rel:
            raise DataError(f"manifest {self.path}, line {line}: empty path")
        rel = str(Path(rel)) if os.path.isabs(rel) else os.path.relpath(self.root / rel, self.root)
        rec_split = (rec_split or "train").strip() if rec_split is not None else "train"
        suffix = Path(rel).suffix
        if suffix.lower() not in IMAGE_EXTENSIONS:
            return rec_split, rel, label, f"not an image file extension ({suffix or 'none'})"
        return rec_split, rel, label, None


def _check_row(where: str, label: str, split: str | None) -> None:
    """A DataError for a manifest row without a label, or with a split that is not train, val or test
    (an empty split cell means train)."""
    if not label.strip():
        raise DataError(f"{where}: empty label (every image needs its class)")
    split = (split or "").strip()
    if split and split not in SPLITS:
        raise DataError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}" + suggest(split, SPLITS))


def _check_files_exist(path: Path, root: Path, records: list[Record]) -> None:
    """A DataError when no file a split of the manifest lists exists: nothing of that split could be extracted."""
    for split in SPLITS:
        first = next((r for r in records if r.split == split), None)
        if first is not None and not any((root / r.path).is_file() for r in records if r.split == split):
            listed = sum(r.split == split for r in records)
            raise DataError(f"manifest {path}: none of the {listed} files of split {split!r} exists "
                            f"(first: {root / first.path}); paths are relative to the manifest's folder")


# --------------------------------------------------------------------------- torchvision datasets


def _gunzip(src: Path, dest: Path) -> None:
    with gzip.open(src, "rb") as fin, open(dest, "wb") as fout:
        shutil.copyfileobj(fin, fout)


def _stage_idx_files(name: str, root: Path) -> Path:
    """Make a Debian-style folder of ``*-idx?-ubyte.gz`` files readable by torchvision's MNIST classes.

    torchvision looks for uncompressed files in ``ROOT/NAME/raw``. When ``root`` holds the gzipped
    files directly (``/usr/share/datasets/fashion-mnist``), they are unpacked once into a staging
    folder under the cache directory and that folder is used as the root.
    """
    gz = sorted(root.glob("*-idx?-ubyte.gz"))
    if not gz or (root / name / "raw").is_dir():
        return root
    from ..store import default_cache_dir

    stage = default_cache_dir() / "datasets" / f"{name}-{hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]}"
    raw = stage / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for src in gz:
        dest = raw / src.name[:-3]
        if not dest.exists() or dest.stat().st_mtime < src.stat().st_mtime:
            atomic_write(dest, functools.partial(_gunzip, src))
    return stage


def _torchvision_parts(cls, spec: str, root: Path, staged: Path) -> dict:
    """The train and test parts of a torchvision dataset class, whichever way it names them."""
    parts = {}
    for split_name, kwargs in (("train", {"train": True}), ("test", {"train": False})):
        try:
            try:
                parts[split_name] = cls(str(staged), download=False, **kwargs)
            except TypeError:
                parts[split_name] = cls(str(staged), download=False, split=split_name)
        except Exception as exc:  # dataset classes raise anything
            raise DataError(f"cannot open {spec} in {root}: {exc}".splitlines()[0]) from None
    return parts


def _torchvision_records(parts: dict) -> tuple[list[str], list[Record]]:
    """Sorted class names and records ``SPLIT/INDEX`` whose labels index them."""
    classes = list(getattr(parts["train"], "classes", []))
    targets = {s: [int(t) for t in ds.targets] for s, ds in parts.items()}
    if not classes:
        classes = [str(i) for i in sorted({t for ts in targets.values() for t in ts})]
    order = sorted(range(len(classes)), key=lambda i: classes[i])
    remap = {old: new for new, old in enumerate(order)}
    records = []
    for split_name, ts in targets.items():
        width = len(str(len(ts)))
        records += [Record(f"{split_name}/{i:0{width}d}", remap[t], split_name) for i, t in enumerate(ts)]
    return [classes[i] for i in order], records


class TorchvisionSource:
    """``torchvision:NAME``: a dataset class of ``torchvision.datasets`` over the files in ``--root``."""

    scheme = "torchvision"
    kinds = ("torchvision",)
    accepts: ClassVar[tuple[str, ...]] = ()

    def __init__(self, argument: str, options: SourceOptions):
        import torchvision.datasets as tvd

        self.spec, self.name, self.options = TORCHVISION_PREFIX + argument, argument, options
        available = [n for n in tvd.__all__ if n[0].isupper()]
        self.cls = getattr(tvd, argument, None)
        if argument not in available or self.cls is None:
            raise DataError(f"unknown torchvision dataset {argument!r}" + suggest(argument, available))
        if not options.root:
            raise DataError(f"{self.spec} needs --root, the folder that holds its files")
        self.root = Path(options.root).expanduser()
        if not self.root.is_dir():
            raise DataError(f"--root {self.root} is not a directory")
        self.parts: dict = {}

    @classmethod
    def claims(cls, path: Path) -> bool:
        return False

    def dataset(self) -> Dataset:
        staged = _stage_idx_files(self.name, self.root)
        self.parts = _torchvision_parts(self.cls, self.spec, self.root, staged)
        classes, records = _torchvision_records(self.parts)
        files = sorted(p for p in Path(staged).rglob("*") if p.is_file())
        description = {"kind": "torchvision", "dataset": self.name,
                       "files": [(p.relative_to(staged).as_posix(), p.stat().st_size) for p in files]}
        if self.options.split:
            train = [r for r in records if r.split == "train"]
            records = sorted(assign_splits(train, self.options.split, self.options.seed, description)
                             + [r for r in records if r.split != "train"], key=split_order)
        return Dataset(str(self.root), classes, records, self.spec, [], loader=self.load, description=description)

    def load(self, record: Record) -> Image.Image:
        part, idx = record.path.split("/")
        img, _ = self.parts[part][int(idx)]
        return img

    def read(self, path: str) -> bytes:
        buffer = io.BytesIO()
        self.load(Record(path, -1, "")).save(buffer, format="PNG")
        return buffer.getvalue()

    @classmethod
    def reopen(cls, data: dict) -> Dataset:
        return open_dataset(data["source"], root=data["root"])


# --------------------------------------------------------------------------- the registry


#: Data sources by scheme (``SCHEME:ARGUMENT``); plain paths go to the first that claims them.
SOURCES: dict[str, type[DataSource]] = {
    "folder": FolderSource,
    "csv": CsvSource,
    "torchvision": TorchvisionSource,
    "webdataset": WebDatasetSource,
    "hf": HuggingFaceSource,
    "parquet": ParquetSource,
}


def register_source(source: type[DataSource]) -> type[DataSource]:
    """Add ``source`` to :data:`SOURCES` under its scheme (usable as a class decorator)."""
    SOURCES[source.scheme] = source
    return source


def is_source_name(data: str) -> bool:
    """Whether ``data`` is ``SCHEME:ARGUMENT`` of a registered source (not a path)."""
    scheme, sep, _ = str(data).partition(":")
    return bool(sep) and scheme in SOURCES


def resolve_source(data: str | os.PathLike, options: SourceOptions | None = None) -> DataSource:
    """The source of ``data``: ``SCHEME:ARGUMENT`` (also ``SCHEME/ARGUMENT`` when no such path
    exists), else the first source that claims the path."""
    options = options or SourceOptions()
    data = str(data)
    scheme, sep, argument = data.partition(":")
    if not (sep and scheme in SOURCES):
        scheme, sep, argument = data.partition("/")
        if not (sep and scheme in SOURCES and not os.path.exists(data)):
            return _by_path(data, options)
    return _checked(SOURCES[scheme], options)(argument, options)


def _by_path(data: str, options: SourceOptions) -> DataSource:
    path = Path(data).expanduser()
    if not path.exists():
        word, sep, _ = data.partition(":")
        hint = suggest(word, list(SOURCES)) if sep and "/" not in word else ""
        raise DataError(f"data path does not exist: {path}" + hint.replace("?)", ":...?)"))
    for source in SOURCES.values():
        if source.claims(path):
            return _checked(source, options)(str(path), options)
    raise DataError(f"{path} is a file; pass a folder of images or a CSV manifest (path,label[,split]), or "
                    + ", ".join(f"{s}:..." for s in SOURCES if s not in ("folder", "csv")))


def _checked(source: type[DataSource], options: SourceOptions) -> type[DataSource]:
    for name, flag in SOURCE_FLAGS.items():
        if getattr(options, name) and name not in source.accepts:
            takers = [s for s, cls in SOURCES.items() if name in cls.accepts]
            raise UsageError(f"{flag} is for {', '.join(t + ':' for t in takers)} data, not {source.scheme} data")
    return source


def reopen(data: dict) -> Dataset:
    """Where the paths a cache recorded can be read again, from its record of the data
    (``config["data"]``): the source whose kinds include ``data["kind"]`` reopens it."""
    kind = data.get("kind", "")
    for source in SOURCES.values():
        if kind in source.kinds:
            return source.reopen(data)
    return Dataset(data.get("root", ""), [], [], data.get("source", ""))


def limit_records(dataset: Dataset, limit: int, seed: int) -> Dataset:
    """Keep at most ``limit`` records per split, a stratified sample, in the original order."""
    if limit < 1:
        raise UsageError(f"--limit must be at least 1, not {limit}")
    keep: set[int] = set()
    for split in dataset.splits:
        idx = [i for i, r in enumerate(dataset.records) if r.split == split]
        if len(idx) <= limit:
            keep.update(idx)
            continue
        frac = limit / len(idx)
        chosen = stratified_assign([dataset.records[i].label for i in idx], {"keep": frac, "drop": 1 - frac}, seed)
        keep.update(i for i, c in zip(idx, chosen) if c == "keep")
    dataset.records = [r for i, r in enumerate(dataset.records) if i in keep]
    dataset.description = {**dataset.description, "limit": limit, "limit_seed": seed}
    return dataset


@contextlib.contextmanager
def _collector_paused():
    """The cyclic garbage collector off while a listing builds its records (it halves the time
    of a million); as it was afterwards."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def open_dataset(
    data: str | os.PathLike,
    split: str | None = None,
    root: str | None = None,
    seed: int = 0,
    limit: int | None = None,
    **options,
) -> Dataset:
    """Resolve ``data`` (a folder, a CSV manifest, or ``SCHEME:ARGUMENT`` of :data:`SOURCES`) into
    a :class:`Dataset`. ``options``: the other fields of :class:`SourceOptions` (``label_key``,
    ``image_column``, ``label_column``).

    ``limit`` keeps at most that many images per split (a stratified, seeded sample).
    """
    source = resolve_source(data, SourceOptions(split=split, root=root, seed=seed, **options))
    with _collector_paused():  # a million records make no cycles; the collector would scan them all again and again
        dataset = source.dataset()
    return dataset if limit is None else limit_records(dataset, limit, seed)

