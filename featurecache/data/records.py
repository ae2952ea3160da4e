"""Records and datasets, the protocol of a data source, and what every source shares: splits,
the names of split files, class numbers from raw labels.

:mod:`featurecache.data.sources` registers the sources; the sources of containers
(:mod:`~featurecache.data.webdataset`, :mod:`~featurecache.data.tables`) build on this module.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol

from PIL import Image

from ..errors import DataError, suggest
from ..names import SPLITS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
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


# --------------------------------------------------------------------------- splits


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
        if name not in SPLITS:
            raise DataError(f"bad --split {spec!r}: {name!r} is not one of {', '.join(SPLITS)}"
                            + suggest(name, SPLITS))
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


def split_rank(split: str) -> int:
    return SPLITS.index(split) if split in SPLITS else len(SPLITS)


def split_order(record: Record) -> tuple:
    """train, val, test, then any other split by name; by path within a split."""
    return (split_rank(record.split), record.split, record.path)


def split_only_order(record: Record) -> tuple:
    """train, val, test, then any other split by name; as listed within a split (containers'
    items, whose paths do not sort in their order: ``FILE#10`` before ``FILE#9``)."""
    return (split_rank(record.split), record.split)


def assign_splits(records: list[Record], spec: str, seed: int, description: dict, order=split_order) -> list[Record]:
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
