"""Where images come from: sources that yield records.

A source turns what the user points at into a :class:`Dataset`: class names and
``(path, label, split)`` records, a fingerprint of their content for the cache key, and a
way to read one record's bytes. Sources are classes that follow :class:`DataSource`,
registered in :data:`SOURCES` by scheme: ``DATA`` is ``SCHEME:ARGUMENT`` (``torchvision:NAME``,
``webdataset:DIR``, ``hf:DIR``, ``parquet:DIR``), or a plain path, which the first source
that claims it reads (a folder tree, a CSV manifest). Nothing here knows about models.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import json
import os
import random
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from PIL import Image

from ..errors import DataError, UsageError, suggest
from ..files import atomic_write
from ..names import SPLITS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TORCHVISION_PREFIX = "torchvision:"
#: Split names other tools use, and the split they are here (Hugging Face calls val ``validation``).
SPLIT_ALIASES = {"validation": "val", "valid": "val"}
#: What separates a record's container (a tar shard, a Parquet or Arrow file) from the item in it.
ITEM_SEP = "#"


@dataclass(frozen=True, slots=True)
class Record:
    path: str  # relative to the dataset root (or an item id: SPLIT/INDEX, SHARD.tar#KEY, FILE#ROW)
    label: int
    split: str


@dataclass
class Dataset:
    """Classes, records and the files that could not be used before decoding.

    ``loader`` opens a record as an image (torchvision datasets); ``opener`` reads a record's
    bytes by its path (the sources of containers: tar shards, Parquet and Arrow files); with
    neither, a record's path is a file under ``root``.
    """

    root: str
    classes: list[str]
    records: list[Record]
    source: str
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (split, path, reason)
    loader: Callable[[Record], Image.Image] | None = None
    description: dict = field(default_factory=dict)
    opener: Callable[[str], bytes] | None = None

    @property
    def splits(self) -> list[str]:
        present = {r.split for r in self.records} | {s for s, _, _ in self.skipped}
        return [s for s in SPLITS if s in present] + sorted(present - set(SPLITS))

    def open(self, record: Record) -> Image.Image:
        if self.loader is not None:
            return self.loader(record)
        if self.opener is not None:
            return Image.open(io.BytesIO(self.opener(record.path)))
        return Image.open(os.path.join(self.root, record.path))

    def read_bytes(self, record: Record) -> bytes | None:
        """The record's encoded bytes; None for a dataset that holds decoded images."""
        if self.loader is not None:
            return None
        if self.opener is not None:
            return self.opener(record.path)
        with open(os.path.join(self.root, record.path), "rb") as fh:
            return fh.read()

    def fingerprint(self) -> str:
        """Hash of relative paths, sizes, mtimes, labels and splits: any change gives a new cache."""
        digest = hashlib.sha256()
        digest.update(json.dumps({"classes": self.classes, "source": self.description}, sort_keys=True).encode())
        for rec in self.records:
            digest.update(f"{rec.split}\0{rec.path}\0{rec.label}\0{self._stat(rec)}\n".encode())
        for split, path, reason in self.skipped:
            digest.update(f"skip\0{split}\0{path}\0{reason}\n".encode())
        return digest.hexdigest()

    def _stat(self, rec: Record) -> str:
        if self.loader is not None or self.opener is not None:
            return ""  # the containers' sizes, times and indexes are in the description
        try:
            st = os.stat(os.path.join(self.root, rec.path))
        except OSError:
            return "missing"
        return f"{st.st_size}:{st.st_mtime_ns}"


@dataclass(frozen=True)
class SourceOptions:
    """How to read the data, besides where it is: ``fc extract``'s data options."""

    split: str | None = None  # fractions for data without splits: train=0.8,val=0.2
    root: str | None = None  # the files of a torchvision dataset
    seed: int = 0
    label_key: str | None = None  # webdataset: cls (default) or json:FIELD
    image_column: str | None = None  # hf, parquet: found when not given
    label_column: str | None = None


#: The options only some sources take, and the flag that sets each.
SOURCE_FLAGS = {"label_key": "--label-key", "image_column": "--image-column", "label_column": "--label-column"}


class DataSource(Protocol):
    """A kind of data, registered in :data:`SOURCES` under its ``scheme``.

    The constructor resolves the argument (what follows ``SCHEME:``, or a path the source
    :meth:`claims`) with the :class:`SourceOptions`, raising :class:`DataError` for what cannot
    be read. :meth:`dataset` lists the records; their :meth:`Dataset.fingerprint` (the classes,
    the ``description`` and every record) is the data's part of the cache key; :meth:`read`
    returns one record's bytes. :meth:`reopen` gives, from what a cache recorded of its data,
    a dataset that reads the cached paths again (reports, fine-tuning).
    """

    scheme: ClassVar[str]
    kinds: ClassVar[tuple[str, ...]]  # the description["kind"] values of its datasets
    accepts: ClassVar[tuple[str, ...]]  # names of SOURCE_FLAGS it takes

    def __init__(self, argument: str, options: SourceOptions) -> None: ...

    @classmethod
    def claims(cls, path: Path) -> bool:
        """Whether a plain path (no scheme) is data of this source."""
        ...

    def dataset(self) -> Dataset: ...

    def read(self, path: str) -> bytes: ...

    @classmethod
    def reopen(cls, data: dict) -> Dataset: ...


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


# --------------------------------------------------------------------------- splits


def _is_hidden(name: str) -> bool:
    return name.startswith((".", "__"))


def _parse_split_fractions(spec: str) -> dict[str, float]:
    fractions = {}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        try:
            fractions[name] = float(value)
        except ValueError:
            raise DataError(f"bad --split {spec!r}: write it as train=0.8,val=0.2") from None
        if not sep or not name or fractions[name] < 0:
            raise DataError(f"bad --split {spec!r}: write it as train=0.8,val=0.2")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise DataError(f"--split fractions must sum to 1, not {total:g}")
    return fractions


def stratified_assign(labels: list[int], fractions: dict[str, float], seed: int) -> list[str]:
    """Assign each item to a split so that every class is split by the same fractions."""
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, label in enumerate(labels):
        by_class[label].append(i)
    out = [""] * len(labels)
    rng = random.Random(seed)
    names = list(fractions)
    for label in sorted(by_class):
        items = by_class[label]
        rng.shuffle(items)
        n = len(items)
        bounds, acc = [], 0.0
        for name in names:
            acc += fractions[name]
            bounds.append(round(acc * n))
        start = 0
        for name, end in zip(names, bounds):
            for i in items[start:end]:
                out[i] = name
            start = end
    return out


def _split_rank(split: str) -> int:
    return SPLITS.index(split) if split in SPLITS else len(SPLITS)


def _split_order(record: Record) -> tuple:
    """train, val, test, then any other split by name; by path within a split."""
    return (_split_rank(record.split), record.split, record.path)


def split_only_order(record: Record) -> tuple:
    """train, val, test, then any other split by name; as listed within a split (containers'
    items, whose paths do not sort in their order: ``FILE#10`` before ``FILE#9``)."""
    return (_split_rank(record.split), record.split)


def _assign_splits(records: list[Record], spec: str, seed: int, description: dict, order=_split_order) -> list[Record]:
    """``records`` spread over the splits of ``spec`` (``train=0.8,val=0.2``), stratified and
    seeded, sorted by ``order``; ``description`` records how."""
    fractions = _parse_split_fractions(spec)
    assigned = stratified_assign([r.label for r in records], fractions, seed)
    description.update(split=fractions, seed=seed)
    return sorted((Record(r.path, r.label, s) for r, s in zip(records, assigned)), key=order)


def split_of(name: str, where: str) -> str:
    """The split a file or shard name begins with (``train``, ``val-000001``, ``validation-...``);
    a DataError naming the file for any other word."""
    word = name.split("-", 1)[0].split(".", 1)[0].split("_", 1)[0]
    split = SPLIT_ALIASES.get(word.lower(), word.lower())
    if split not in SPLITS:
        raise DataError(f"{where}: {name} does not begin with a split name ({', '.join(SPLITS)}, then - or .), "
                        f"it begins with {word!r}" + suggest(word.lower(), [*SPLITS, *SPLIT_ALIASES]))
    return split


# --------------------------------------------------------------------------- folders and manifests


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
            records = _assign_splits(records, split, self.options.seed, description)
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
            label = labels.setdefault(label, label)  # one string per class, however many rows
            rows.append(self._entry(line, rel.strip(), label, rec_split))
        classes = sorted(labels)
        index = {c: i for i, c in enumerate(classes)}
        records, skipped = [], []
        for rel, label, rec_split, reason in rows:
            if reason:
                skipped.append((rec_split, rel, reason))
            else:
                records.append(Record(rel, index[label], rec_split))
        del rows
        if not records:
            raise DataError(f"manifest {path} lists no images")
        description = {"kind": "csv", "manifest": path.name}
        records = _assign_splits(records, split, self.options.seed, description) if split else sorted(
            records, key=_split_order)
        return Dataset(str(root), classes, records, "csv", skipped, description=description)

    def _entry(self, line: int, rel: str, label: str, rec_split: str | None) -> tuple:
        """``(path, label, split, reason to skip or None)`` of one row."""
        if not rel:
            raise DataError(f"manifest {self.path}, line {line}: empty path")
        rel = str(Path(rel)) if os.path.isabs(rel) else os.path.relpath(self.root / rel, self.root)
        rec_split = (rec_split or "train").strip() if rec_split is not None else "train"
        suffix = Path(rel).suffix
        if suffix.lower() not in IMAGE_EXTENSIONS:
            return rel, label, rec_split, f"not an image file extension ({suffix or 'none'})"
        return rel, label, rec_split, None


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
            records = sorted(_assign_splits(train, self.options.split, self.options.seed, description)
                             + [r for r in records if r.split != "train"], key=_split_order)
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


def class_ids(raw: list, names: list[str] | None, paths: list[str], names_from: str) -> tuple[list[str], list[int]]:
    """Class names and each item's class number, from raw labels (numbers or names) and, when
    given, the names of the classes in order (``names_from`` says where they come from).

    With names, a number is the class's line and a name must be one of them; without, the
    classes are the distinct values, sorted (numbers as numbers)."""
    kinds = {type(v) for v in raw}
    if len(kinds) > 1:
        at = next(i for i, v in enumerate(raw) if type(v) is not type(raw[0]))
        raise DataError(f"{paths[at]}: label {raw[at]!r} mixes class names and numbers ({raw[0]!r} at {paths[0]})")
    numbers = kinds == {int}
    if names is None:
        values = sorted(set(raw))
        names = [str(v) for v in values]
        index = {v: i for i, v in enumerate(values)}
    elif numbers:
        bad = next((i for i, v in enumerate(raw) if not 0 <= v < len(names)), None)
        if bad is not None:
            raise DataError(f"{paths[bad]}: class {raw[bad]} has no entry in {names_from}, which names "
                            f"{len(names)} classes (0 to {len(names) - 1})")
        return names, raw
    else:
        index = {n: i for i, n in enumerate(names)}
        bad = next((i for i, v in enumerate(raw) if v not in index), None)
        if bad is not None:
            raise DataError(f"{paths[bad]}: class {raw[bad]!r} is not named in {names_from}")
    return names, [index[v] for v in raw]


# --------------------------------------------------------------------------- the registry


#: Data sources by scheme (``SCHEME:ARGUMENT``); plain paths go to the first that claims them.
SOURCES: dict[str, type[DataSource]] = {
    "folder": FolderSource,
    "csv": CsvSource,
    "torchvision": TorchvisionSource,
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
    dataset = source.dataset()
    return dataset if limit is None else limit_records(dataset, limit, seed)


# The sources of containers register themselves; they import this module's names.
from . import tables, webdataset  # noqa: E402, F401
