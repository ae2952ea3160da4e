"""WebDataset tar shards: ``webdataset:DIR`` and ``webdataset:'DIR/NAME-{000000..000127}.tar'``.

A sample is the members of a shard that share a key (the member name up to the first dot of
its base name, as the ``webdataset`` library splits it): an image (``jpg``, ``jpeg``, ``png``,
``webp``, or another image extension) and a label, ``cls`` (a class number) or a field of its
``json`` (``--label-key json:FIELD``). ``classes.txt`` beside the shards names class i on line i.

The shards are read with plain seeks, not with the ``webdataset`` library, which streams
shards from the start: to address rows (torchrun ranks, ``--shard I/N``, a resume) each shard
is scanned once (memory-mapped), header by header, into an index of its samples' member offsets, kept under
the cache directory (``datasets/webdataset/``) and valid while the shard's size and mtime
stay. The index's digest is part of the data's fingerprint. Reading a record is then one
``pread`` of its image member.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import mmap
import os
import re
from pathlib import Path
from typing import ClassVar

from ..errors import DataError, UsageError
from ..files import atomic_write
from .records import (
    IMAGE_EXTENSIONS,
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

#: Image members, in the order one is chosen when a sample has several.
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", *(e[1:] for e in IMAGE_EXTENSIONS if e[1:] not in ("jpg", "jpeg",
                                                                                                "png", "webp")))
LABEL_KEYS = ("cls", "json")  # members read into the index (when at most INLINE_MAX bytes)
INLINE_MAX = 1 << 16
INDEX_VERSION = 1
CLASSES_FILE = "classes.txt"
_BLOCK = 512
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar a-001.tar a-002.tar``; ``{x,y}`` lists too."""
    match = _BRACE.search(pattern)
    if not match:
        return [pattern]
    body = match.group(1)
    if ".." in body:
        low, _, high = body.partition("..")
        if not (low.isdigit() and high.isdigit()) or int(low) > int(high):
            raise DataError(f"bad range {{{body}}} in {pattern}: write it as {{000000..000127}}")
        items = [f"{i:0{len(low)}d}" for i in range(int(low), int(high) + 1)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(pattern[:match.start()] + item + pattern[match.end():])]


# --------------------------------------------------------------------------- reading a tar file


def _number(field: bytes, where: str) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256, for members of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.strip(b" \0") or b"0", 8)
    except ValueError:
        raise DataError(f"{where}: not a tar header (the file is damaged, or not a tar file)") from None


def _pax_path(payload: bytes) -> bytes | None:
    """The ``path`` record of a pax extended header."""
    for line in payload.split(b"\n"):
        _, _, record = line.partition(b" ")
        key, sep, value = record.partition(b"=")
        if sep and key == b"path":
            return value
    return None


def _checked_header(header: bytes, where: str) -> None:
    if sum(header[:148]) + 256 + sum(header[156:]) != _number(header[148:156], where):
        raise DataError(f"{where}: not a tar header (the file is damaged, or not a tar file)")


def _members(data, name: str):
    """``(member name, data offset, size)`` of every regular file of a tar file (``data``: its bytes,
    memory-mapped), header by header; the contents are skipped (GNU long names and pax paths are
    read). A header's checksum is checked for the first one and for any without the ustar magic."""
    pos, long_name, end = 0, None, len(data)
    while True:
        header = data[pos:pos + _BLOCK]
        if len(header) < _BLOCK or not header[0]:  # the end: zero blocks (a name never starts with one)
            if header.strip(b"\0"):
                raise DataError(f"{name} is cut short at byte {pos}")
            return
        if pos == 0 or header[257:262] != b"ustar":
            _checked_header(header, f"{name} at byte {pos}")
        size, flag, start = _number(header[124:136], f"{name} at byte {pos}"), header[156:157], pos + _BLOCK
        pos = start + ((size + _BLOCK - 1) & ~(_BLOCK - 1))
        if pos > end + _BLOCK:
            raise DataError(f"{name} is cut short at byte {end}")
        if flag in (b"L", b"x"):
            payload = data[start:start + size]
            long_name = payload.rstrip(b"\0") if flag == b"L" else (_pax_path(payload) or long_name)
            continue
        if flag not in (b"0", b"\0", b"7"):  # directories, links, global headers: no member
            long_name = None if flag != b"g" else long_name
            continue
        member = long_name or header[:100].split(b"\0", 1)[0]
        if long_name is None and header[345] and header[257:262] == b"ustar":
            member = header[345:500].split(b"\0", 1)[0] + b"/" + member
        long_name = None
        yield member.decode("utf-8", "surrogateescape"), start, size


def split_key(member: str) -> tuple[str, str]:
    """``dir/key.ext.more`` -> ``("dir/key", "ext.more")``: the sample key and its member's extension."""
    folder, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def scan_shard(path: Path) -> list[list]:
    """The samples of one shard in order: ``[key, image extension or None, offset, size, cls text,
    json text]`` (the texts None when absent)."""
    samples: dict[str, dict] = {}
    try:
        with open(path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                return []
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
                for member, offset, size in _members(data, path.name):
                    key, ext = split_key(member)
                    entry = samples.setdefault(key, {})
                    if ext in LABEL_KEYS and size <= INLINE_MAX:
                        entry[ext] = data[offset:offset + size].decode("utf-8", "replace")
                    elif ext in IMAGE_KEYS:
                        entry[ext] = (offset, size)
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    rows = []
    for key, entry in samples.items():
        ext = next((e for e in IMAGE_KEYS if e in entry), None)
        offset, size = entry[ext] if ext else (0, 0)
        rows.append([key, ext, offset, size, entry.get("cls"), entry.get("json")])
    return rows


class ShardIndex:
    """A shard's samples (:func:`scan_shard`) and their digest."""

    def __init__(self, samples: list[list], digest: str):
        self.samples, self.digest = samples, digest

    @functools.cached_property
    def offsets(self) -> dict[str, tuple[int, int]]:
        return {s[0]: (s[2], s[3]) for s in self.samples if s[1]}


def _index_file(path: str) -> Path:
    from ..store import default_cache_dir

    digest = hashlib.sha256(path.encode()).hexdigest()[:16]
    return default_cache_dir() / "datasets" / "webdataset" / f"{Path(path).stem[:40]}-{digest}.json"


@functools.lru_cache(maxsize=16)
def _load_index(path: str, size: int, mtime_ns: int) -> ShardIndex:
    """The index of the shard at ``path`` (absolute) with that size and mtime: read from the cache
    directory, or built by one scan and stored there."""
    file = _index_file(path)
    try:
        doc = json.loads(file.read_text())
        if doc["version"] == INDEX_VERSION and doc["size"] == size and doc["mtime_ns"] == mtime_ns:
            return ShardIndex(doc["samples"], doc["digest"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    samples = scan_shard(Path(path))
    digest = hashlib.sha256(json.dumps(samples, separators=(",", ":")).encode()).hexdigest()
    doc = {"version": INDEX_VERSION, "size": size, "mtime_ns": mtime_ns, "digest": digest, "samples": samples}
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(file, json.dumps(doc, separators=(",", ":")))
    except OSError:
        pass  # a read-only cache directory: the index is built again next time
    return ShardIndex(samples, digest)


def shard_index(path: Path) -> ShardIndex:
    """The index of one shard (built on first use, kept while its size and mtime stay)."""
    path = Path(os.path.abspath(path))
    try:
        st = path.stat()
    except OSError:
        raise DataError(f"shard not found: {path}") from None
    return _load_index(str(path), st.st_size, st.st_mtime_ns)


class _Descriptors:
    """Open shard files of this process (a DataLoader worker opens its own), at most ``keep``."""

    def __init__(self, keep: int = 64):
        self.keep, self.open, self.pid = keep, collections.OrderedDict(), os.getpid()

    def get(self, path: str) -> int:
        if self.pid != os.getpid():  # a forked worker: its own descriptors
            self.open, self.pid = collections.OrderedDict(), os.getpid()
        fd = self.open.pop(path, None)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            if len(self.open) >= self.keep:
                os.close(self.open.popitem(last=False)[1])
        self.open[path] = fd
        return fd


_DESCRIPTORS = _Descriptors()


def read_member(shard: str | os.PathLike, key: str) -> bytes:
    """The image bytes of sample ``key`` of ``shard``: one read at its indexed offset."""
    path = os.path.abspath(shard)
    st = os.stat(path)
    offsets = _load_index(path, st.st_size, st.st_mtime_ns).offsets
    if key not in offsets:
        raise FileNotFoundError(f"no sample {key!r} with an image in {os.path.basename(path)}")
    offset, size = offsets[key]
    return os.pread(_DESCRIPTORS.get(path), size, offset)


def is_member_path(path: str) -> bool:
    """Whether ``path`` is ``SHARD.tar#KEY``."""
    container, sep, _ = str(path).rpartition(ITEM_SEP)
    return bool(sep) and container.endswith(".tar") and os.path.isfile(container)


def read_file_or_member(path: str) -> bytes:
    """The bytes of a file, or of a shard's sample for ``SHARD.tar#KEY``."""
    if is_member_path(path):
        shard, _, key = path.rpartition(ITEM_SEP)
        return read_member(shard, key)
    with open(path, "rb") as fh:
        return fh.read()


def read_under(root: str, path: str) -> bytes:
    """Bytes of record ``SHARD.tar#KEY`` of a dataset rooted at ``root``."""
    shard, _, key = path.rpartition(ITEM_SEP)
    return read_member(os.path.join(root, shard), key)


# --------------------------------------------------------------------------- the source


def _label_key(spec: str | None) -> tuple[str, str | None]:
    if spec in (None, "", "cls"):
        return "cls", None
    kind, sep, name = str(spec).partition(":")
    if kind != "json" or not sep or not name:
        raise UsageError(f"--label-key must be cls or json:FIELD, not {spec!r}")
    return "json", name


class WebDatasetSource:
    """Tar shards named by split (``train-000000.tar``, ``val-...``, ``test-...``) in a folder,
    or the shards of a brace pattern (one split, divided with ``--split``)."""

    scheme = "webdataset"
    kinds = ("webdataset",)
    accepts: ClassVar[tuple[str, ...]] = ("label_key",)

    def __init__(self, argument: str, options: SourceOptions):
        self.options, self.label_key = options, _label_key(options.label_key)
        path = Path(argument).expanduser()
        if "{" in argument or path.suffix == ".tar":
            shards = [Path(p).expanduser() for p in expand_braces(argument)]
            missing = [p for p in shards if not p.is_file()]
            if missing:
                raise DataError(f"{len(missing)} of {len(shards)} shards of {argument} are missing, "
                                f"e.g. {missing[0]}")
            self.root = Path(os.path.commonpath([os.path.abspath(p.parent) for p in shards]))
            self.shards, self.pattern = [("train", p) for p in shards], True
        elif path.is_dir():
            self.root, self.pattern = path, False
            tars = sorted(p for p in path.iterdir() if p.suffix == ".tar" and not p.name.startswith("."))
            if not tars:
                raise DataError(f"no .tar shards in {path} (name them train-000000.tar, val-000000.tar, ...)")
            named = [(split_of(p.name, str(path)), p) for p in tars]
            self.shards = sorted(named, key=lambda sp: (split_rank(sp[0]), sp[1].name))
        else:
            raise DataError(f"webdataset: {path} is neither a folder of shards nor a .tar file")

    @classmethod
    def claims(cls, path: Path) -> bool:
        return False

    def read(self, path: str) -> bytes:
        return read_under(str(self.root), path)

    @classmethod
    def reopen(cls, data: dict) -> Dataset:
        return Dataset(data["root"], [], [], data["source"], opener=functools.partial(read_under, data["root"]))

    def dataset(self) -> Dataset:
        if self.options.split and not self.pattern:
            raise DataError(f"the shards of {self.root} are named by split already; drop --split")
        names = self._class_names()
        splits, paths, raw, shards = [], [], [], []
        for split, shard in self.shards:
            index = shard_index(shard)
            rel = Path(os.path.relpath(os.path.abspath(shard), self.root)).as_posix()
            st = shard.stat()
            shards.append([rel, st.st_size, st.st_mtime_ns, index.digest])
            for key, ext, _, _, cls, text in index.samples:
                where = f"{rel}{ITEM_SEP}{key}"
                if ext is None:
                    raise DataError(f"{where}: the sample has no image member ({', '.join(IMAGE_KEYS[:4])}, ...)")
                splits.append(split)
                paths.append(where)
                raw.append(self._label(where, cls, text))
        if not paths:
            raise DataError(f"the shards of {self.root} hold no samples")
        classes, labels = class_ids(raw, names, paths, CLASSES_FILE)
        del raw
        records = [Record(p, label, s) for p, label, s in zip(paths, labels, splits)]
        del paths, labels, splits
        description = {"kind": "webdataset", "label_key": ":".join(k for k in self.label_key if k),
                       "shards": shards, "classes_file": names}
        if self.options.split:
            records = assign_splits(records, self.options.split, self.options.seed, description, split_only_order)
        source = f"{self.scheme}:{self.root}"
        return Dataset(str(self.root), classes, records, source, [], description=description,
                       opener=functools.partial(read_under, str(self.root)))

    def _class_names(self) -> list[str] | None:
        file = self.root / CLASSES_FILE
        if not file.is_file():
            return None
        lines = file.read_text(encoding="utf-8").splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        return [line.strip() for line in lines]

    def _label(self, where: str, cls: str | None, text: str | None):
        kind, field = self.label_key
        if kind == "cls":
            if cls is None:
                raise DataError(f"{where}: the sample has no label (a .cls member; or name a field of its "
                                ".json with --label-key json:FIELD)")
            try:
                return int(cls.strip())
            except ValueError:
                raise DataError(f"{where}: its .cls holds {cls.strip()[:40]!r}, not a class number") from None
        if text is None:
            raise DataError(f"{where}: the sample has no .json member for --label-key json:{field}")
        try:
            value = json.loads(text)[field]
        except (ValueError, TypeError):
            raise DataError(f"{where}: its .json is not a JSON object") from None
        except KeyError:
            raise DataError(f"{where}: its .json has no field {field!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise DataError(f"{where}: its .json field {field!r} holds {value!r}, not a class name or number")
        return value


