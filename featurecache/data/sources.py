"""Where images come from: sources that yield records.

A source turns what the user points at (a root with split folders, one folder
with split fractions, a CSV manifest, a torchvision dataset) into a
:class:`Dataset`: sorted class names and ``(path, label, split)`` records.
Nothing here knows about models.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import json
import os
import random
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import DataError, UsageError, suggest
from ..files import atomic_write
from ..names import SPLITS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".gif", ".tif", ".tiff", ".webp")
TORCHVISION_PREFIX = "torchvision:"


@dataclass(frozen=True)
class Record:
    path: str  # relative to the dataset root (or an item id for torchvision datasets)
    label: int
    split: str


@dataclass
class Dataset:
    """Classes, records and the files that could not be used before decoding."""

    root: str
    classes: list[str]
    records: list[Record]
    source: str
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (split, path, reason)
    loader: Callable[[Record], Image.Image] | None = None
    description: dict = field(default_factory=dict)

    @property
    def splits(self) -> list[str]:
        present = {r.split for r in self.records} | {s for s, _, _ in self.skipped}
        return [s for s in SPLITS if s in present] + sorted(present - set(SPLITS))

    def open(self, record: Record) -> Image.Image:
        if self.loader is not None:
            return self.loader(record)
        return Image.open(os.path.join(self.root, record.path))

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
        if self.loader is not None:
            return ""
        try:
            st = os.stat(os.path.join(self.root, rec.path))
        except OSError:
            return "missing"
        return f"{st.st_size}:{st.st_mtime_ns}"


# --------------------------------------------------------------------------- sources


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


def _split_order(record: Record) -> tuple:
    """train, val, test, then any other split by name; by path within a split."""
    return (SPLITS.index(record.split) if record.split in SPLITS else len(SPLITS), record.split, record.path)


def _assign_splits(records: list[Record], spec: str, seed: int, description: dict) -> list[Record]:
    """``records`` spread over the splits of ``spec`` (``train=0.8,val=0.2``), stratified and
    seeded, in :func:`_split_order`; ``description`` records how."""
    fractions = _parse_split_fractions(spec)
    assigned = stratified_assign([r.label for r in records], fractions, seed)
    description.update(split=fractions, seed=seed)
    return sorted((Record(r.path, r.label, s) for r, s in zip(records, assigned)), key=_split_order)


def _folder_source(root: Path, split: str | None, seed: int) -> Dataset:
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
        records = _assign_splits(records, split, seed, description)
    return Dataset(str(root), classes, records, kind, skipped, description=description)


def _csv_source(path: Path, split: str | None, seed: int) -> Dataset:
    root = path.parent
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read manifest {path}: {exc}") from None
    if not rows:
        raise DataError(f"manifest {path} has no rows")
    columns = set(rows[0])
    if not {"path", "label"} <= columns:
        raise DataError(f"manifest {path} needs a header with path,label[,split]; found {','.join(rows[0])}")
    has_split = "split" in columns
    if has_split and split:
        raise DataError(f"manifest {path} has a split column; drop --split")
    for line, row in enumerate(rows, start=2):
        _check_row(path, line, row, has_split)
    classes = sorted({r["label"] for r in rows})
    index = {c: i for i, c in enumerate(classes)}
    records, skipped = [], []
    for row in rows:
        rel = row["path"].strip()
        rel_path = Path(rel) if Path(rel).is_absolute() else root / rel
        rel = os.path.relpath(rel_path, root) if not Path(rel).is_absolute() else str(rel_path)
        rec_split = (row.get("split") or "train").strip() if has_split else "train"
        if Path(rel).suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append((rec_split, rel, f"not an image file extension ({Path(rel).suffix or 'none'})"))
            continue
        records.append(Record(rel, index[row["label"]], rec_split))
    if not records:
        raise DataError(f"manifest {path} lists no images")
    _check_files_exist(path, root, records)
    description = {"kind": "csv", "manifest": path.name}
    records = _assign_splits(records, split, seed, description) if split else sorted(records, key=_split_order)
    return Dataset(str(root), classes, records, "csv", skipped, description=description)


def _check_row(path: Path, line: int, row: dict, has_split: bool) -> None:
    """A DataError for a manifest row without a path or a label, or with a split that is not train, val or test
    (an empty split cell means train)."""
    where = f"manifest {path}, line {line}"
    if not (row.get("path") or "").strip():
        raise DataError(f"{where}: empty path")
    if not (row.get("label") or "").strip():
        raise DataError(f"{where}: empty label (every image needs its class)")
    split = (row.get("split") or "").strip() if has_split else ""
    if split and split not in SPLITS:
        raise DataError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}" + suggest(split, SPLITS))


def _check_files_exist(path: Path, root: Path, records: list[Record]) -> None:
    """A DataError when no file a split of the manifest lists exists: nothing of that split could be extracted."""
    for split in SPLITS:
        listed = [r for r in records if r.split == split]
        if listed and not any((root / r.path).is_file() for r in listed):
            raise DataError(f"manifest {path}: none of the {len(listed)} files of split {split!r} exists "
                            f"(first: {root / listed[0].path}); paths are relative to the manifest's folder")


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


def _torchvision_source(spec: str, root: str | None, split: str | None, seed: int) -> Dataset:
    import torchvision.datasets as tvd

    name = spec[len(TORCHVISION_PREFIX):]
    available = [n for n in tvd.__all__ if n[0].isupper()]
    cls = getattr(tvd, name, None)
    if name not in available or cls is None:
        raise DataError(f"unknown torchvision dataset {name!r}" + suggest(name, available))
    if not root:
        raise DataError(f"{spec} needs --root, the folder that holds its files")
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise DataError(f"--root {root_path} is not a directory")
    staged = _stage_idx_files(name, root_path)
    parts = _torchvision_parts(cls, spec, root_path, staged)
    classes, records = _torchvision_records(parts)
    files = sorted(p for p in Path(staged).rglob("*") if p.is_file())
    description = {"kind": "torchvision", "dataset": name,
                   "files": [(p.relative_to(staged).as_posix(), p.stat().st_size) for p in files]}
    if split:
        train = [r for r in records if r.split == "train"]
        records = sorted(_assign_splits(train, split, seed, description) + [r for r in records if r.split != "train"],
                         key=_split_order)

    def loader(record: Record) -> Image.Image:
        part, idx = record.path.split("/")
        img, _ = parts[part][int(idx)]
        return img

    return Dataset(str(root_path), classes, records, spec, [], loader=loader, description=description)


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
) -> Dataset:
    """Resolve ``data`` (a folder, a CSV manifest or ``torchvision:NAME``) into a :class:`Dataset`.

    ``limit`` keeps at most that many images per split (a stratified, seeded sample).
    """
    data = str(data)
    if data.startswith(TORCHVISION_PREFIX):
        dataset = _torchvision_source(data, root, split, seed)
    else:
        path = Path(data).expanduser()
        if not path.exists():
            raise DataError(f"data path does not exist: {path}")
        if path.is_file():
            if path.suffix.lower() != ".csv":
                raise DataError(f"{path} is a file; pass a folder of images or a CSV manifest (path,label[,split])")
            dataset = _csv_source(path, split, seed)
        elif not any(path.iterdir()):
            raise DataError(f"data folder is empty: {path}")
        else:
            dataset = _folder_source(path, split, seed)
    return dataset if limit is None else limit_records(dataset, limit, seed)
