"""The feature store: the only module that touches h5py.

Layout of one cache file (one per backbone configuration and dataset)::

    /                     attrs: format, key, complete, classes (JSON), config (JSON)
    /<split>/features     float32|float16, N x D, chunked by rows
    /<split>/labels       int64, N
    /<split>/paths        UTF-8 strings, N, relative to the data root (SHARD.tar#KEY, FILE#ROW:
                          an item of a container), in chunks of 65,536
    /<split>/hashes       UTF-8 strings, N: BLAKE2b-128 of each image file's bytes (caches written
                          before it have none; ``fc audit`` then finds duplicates by their features)
    /<split>/skipped      UTF-8 strings, K x 2: (path, reason)
    /<split>/layers/<L>   N x D_L: the pooled output of layer L (``fc extract --layers``)
    /train_views/...      K augmented views of each train image (``--augment-views K``):
                          features, labels, paths, layers/<L> as above, plus ``source``
                          (int64, the row of /train it is a view of) and ``view`` (0..K-1)
    /activations/<name>/<part>   float16, N x C x H x W: the input of one backbone block for the
                          rows of a split or of the views (``fc finetune --from-activations``);
                          ``<name>`` is ``BLOCK-CxHxW-float16``, the group's attrs say ``complete``

Which features a reader gets is a *feature set*: ``penultimate`` (``/<split>/features``,
the features ``--layer`` chose), one stored layer's name, or ``concat``: all of them side by
side, ``features`` first, then the layers in the order ``--layers`` named them.

While an extraction runs, finished batches are written as small ``.npz`` shards into
``<name>.partial/`` (each one written under a temporary name, then renamed, with
:func:`featurecache.files.atomic_write`). A killed run leaves only whole shards behind,
and a rerun computes the missing rows alone. When every row is there, the HDF5 file is
written under a temporary name, marked ``complete``, flushed to the disk and renamed into
place: a reader never sees a half-written cache. The temporary files a killed run leaves
are removed by the next run of the same entry.

Every numeric dataset (features, layers, labels, sources, views) carries HDF5's per-chunk
Fletcher-32 checksum, which the HDF5 library checks on every read: a damaged chunk is a
:class:`CacheError` naming the cache, never numbers. :func:`verify` reads a cache end to end.
The checksum is a property of the file, not of the features: it is not part of the cache
key. Caches written before it have no checksums; they are read as before, and
:func:`verify` says that their numbers cannot be checked.

A write the machine refuses (a full disk, ...) is a :class:`StorageError`: the file size is
checked against the free space before the HDF5 file is written, and HDF5 writes through
:class:`_GuardedFile`, so that a failing disk never reaches the HDF5 library (which crashes
the process when a write fails while it closes a file).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from .errors import CacheError, CacheLockedError
from .files import atomic_write, is_temp_name, require_space, storage_error, writing
from .names import FEATURE_SETS

FORMAT = "featurecache/1"
VIEWS = "train_views"  # the group of augmented training views: not a split
ACTIVATIONS = "activations"  # the group of stored block inputs: not a split
ACTIVATION_DTYPE = np.float16  # how they are stored
NOT_SPLITS = (VIEWS, ACTIVATIONS)
CACHE_ENV = "FC_CACHE_DIR"
SUFFIX = ".h5"
CHECKSUM = True  # Fletcher-32 on every numeric dataset written (bench/checksums.py turns it off to compare)


def h5py_version() -> str:
    """The version of the HDF5 library binding the caches are written with, for provenance."""
    return h5py.__version__


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return Path(cache_dir or os.environ.get(CACHE_ENV) or "cache").expanduser()


def cache_key(config: dict) -> str:
    """Hash of the parts of a configuration that change the features."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in text)
    return keep.strip("-.")[:60] or "data"


@dataclass(frozen=True)
class Entry:
    """Where one cache key lives on disk."""

    path: Path  # the final HDF5 file

    @classmethod
    def locate(cls, cache_dir: Path, label: str, key: str) -> Entry:
        return cls(Path(cache_dir) / f"{_slug(label)}-{key[:16]}{SUFFIX}")

    @property
    def partial(self) -> Path:
        return self.path.with_suffix(".partial")

    @property
    def lock_path(self) -> Path:
        return self.path.with_name("." + self.path.name + ".lock")

    def temp_files(self) -> list[Path]:
        """Temporary cache files of this entry that a killed run left behind."""
        return [p for p in self.path.parent.glob(f".{self.path.name}.tmp-*") if is_temp_name(p)]


# --------------------------------------------------------------------------- locking


def _holder(fd: int) -> str:
    return os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"


def _try_flock(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return False
    return True


@contextlib.contextmanager
def locked(entry: Entry, wait: float | None = None, on_wait=None, shared: bool = False) -> Iterator[None]:
    """Hold a lock on ``entry``. ``wait``: seconds to wait (None: forever, 0: fail at once).

    The lock is an ``flock`` on a side file: the kernel releases it when the holder dies,
    even by SIGKILL, so a crashed run never blocks the next one. A run that writes the
    cache holds it exclusively; the slices of ``--shard I/N`` hold it ``shared``, so that
    they run side by side while a plain run waits for them (and they for it).
    """
    with writing(entry.lock_path):
        entry.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(entry.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = None if wait is None else time.monotonic() + wait
        told = False
        while not _try_flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX):
            if deadline is not None and time.monotonic() >= deadline:
                raise CacheLockedError(
                    f"another process (pid {_holder(fd)}) is writing {entry.path.name}; try again when it is done"
                )
            if not told and on_wait:
                on_wait(_holder(fd))
                told = True
            time.sleep(0.2)
        with writing(entry.lock_path):
            os.pwrite(fd, f"{os.getpid():<12d}".encode(), 0)  # fixed width: sharing holders overwrite it whole
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


# --------------------------------------------------------------------------- shards


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.npz"))


def rows_done(folder: Path, n_records: int) -> np.ndarray:
    """Boolean mask of the records that the shards in ``folder`` (an entry's ``partial``) hold."""
    mask = np.zeros(n_records, dtype=bool)
    for shard in _shards(folder):
        with contextlib.suppress(FileNotFoundError), np.load(shard) as z:  # vanished: the cache was just written
            mask[z["indices"]] = True
    return mask


class ShardWriter:
    """Collects finished batches as atomic ``.npz`` shards under ``entry.partial``.

    A shard is named by the first and last record (row) it holds, never by the process
    that wrote it: any number of processes, of this run or of an earlier one with another
    world size, add shards side by side, and :meth:`done` tells every one of them which
    rows are left.
    """

    def __init__(self, entry: Entry, n_records: int, manifest: dict, owner: bool = True):
        """Open ``entry``'s shards. The ``owner`` holds the entry's lock alone: it drops the shards
        of another ``manifest`` and what killed runs were writing. The others (ranks but the
        first, ``--shard`` slices) only add shards, and refuse those of another manifest."""
        self.dir = entry.partial
        self.n = n_records
        meta = self.dir / "manifest.json"
        text = json.dumps(manifest, sort_keys=True)
        if meta.is_file() and meta.read_text() != text:  # same key, different records: start over
            if not owner:
                raise CacheError(f"{self.dir} holds the shards of other records; a plain fc extract starts it over")
            shutil.rmtree(self.dir)
        with writing(self.dir):
            self.dir.mkdir(parents=True, exist_ok=True)
        if not meta.is_file():
            atomic_write(meta, text)
        if owner:  # what a killed run was writing: shards and cache files under temporary names
            for stale in [p for p in self.dir.iterdir() if is_temp_name(p)] + entry.temp_files():
                stale.unlink(missing_ok=True)

    def done(self) -> np.ndarray:
        """Boolean mask of the record indices already written."""
        return rows_done(self.dir, self.n)

    def write(self, indices: np.ndarray, features: np.ndarray, ok: np.ndarray, reasons: list[str],
              tags: dict[str, str] | None = None) -> None:
        """Store one batch: ``features`` holds rows for the ``ok`` images only; ``tags`` say how it
        was computed (the graph, the split of the cores), for the provenance."""
        indices = np.asarray(indices, dtype=np.int64)
        name = f"shard-{int(indices.min()):012d}-{int(indices.max()):012d}-{uuid.uuid4().hex[:8]}.npz"
        labels = {f"tag_{k}": np.asarray(v) for k, v in (tags or {}).items()}

        def save(tmp: Path) -> None:
            with open(tmp, "wb") as fh:  # a file object: np.savez would add .npz to a temporary name
                np.savez(fh, indices=indices, features=features, ok=np.asarray(ok, bool),
                         reasons=np.asarray(reasons, dtype=str), **labels)

        atomic_write(self.dir / name, save)

    def collect(self, dim: int | None, dtype: str):
        """Assemble all shards into ``(features, ok, reasons, tags)`` indexed by record; ``tags``: each
        tag's values over the shards (processes, ranks and slices choose for themselves)."""
        ok = np.zeros(self.n, dtype=bool)
        seen = np.zeros(self.n, dtype=bool)
        reasons = [""] * self.n
        rows: list[tuple[np.ndarray, np.ndarray]] = []  # (records, their feature rows) of each shard
        tags: dict[str, set[str]] = {}
        for shard in _shards(self.dir):
            with np.load(shard) as z:
                idx, feats, good, why = z["indices"], z["features"], z["ok"], z["reasons"]
                for name in (n for n in z.files if n.startswith("tag_")):
                    tags.setdefault(name[4:], set()).add(str(z[name]))
            if seen[idx].any():  # a duplicate batch from an interrupted rename: keep the first
                keep = ~seen[idx]
                feats = feats[keep[good]]
                idx, good, why = idx[keep], good[keep], why[keep]
            seen[idx] = True
            ok[idx] = good
            for i, r in zip(idx[~good], why[~good]):
                reasons[int(i)] = str(r)
            if len(feats):
                rows.append((idx[good], feats))
            if dim is None and len(feats):
                dim = feats.shape[1]
        if not seen.all():
            raise CacheError(f"{(~seen).sum()} images of {self.n} have no features yet")
        features = np.zeros((int(ok.sum()), dim or 0), dtype=dtype)
        out_row = np.cumsum(ok) - 1  # the row of each good record in the result
        for idx, feats in rows:
            features[out_row[idx]] = feats
        return features, ok, reasons, tags

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- writing


def _str_dataset(group, name: str, values, shape=None):
    data = np.asarray(values, dtype=object)
    if shape is not None:
        data = data.reshape(shape)
    return group.create_dataset(name, data=data, dtype=h5py.string_dtype("utf-8"))


#: Rows of variable-length strings per chunk of a ``paths`` dataset, and per write.
STRING_CHUNK = 65536


def _str_column(group, name: str, values: list[str]):
    """A column of UTF-8 strings of any length, stored in chunks and written a chunk at a time:
    a million paths never become one array of Python objects."""
    n = len(values)
    column = group.create_dataset(name, shape=(n,), dtype=h5py.string_dtype("utf-8"),
                                  chunks=(max(1, min(STRING_CHUNK, n)),) if n else None)
    for start in range(0, n, STRING_CHUNK):
        column[start:start + STRING_CHUNK] = np.asarray(values[start:start + STRING_CHUNK], dtype=object)
    return column


def write_cache(
    path: str | os.PathLike,
    classes: list[str],
    config: dict,
    splits: dict[str, dict],
    key: str | None = None,
    chunk_rows: int = 1024,
) -> Path:
    """Write a complete cache atomically.

    ``splits`` maps a split name to ``{"features": N x D, "labels": N, "paths": N,
    "skipped": [(path, reason), ...]}``, with ``"layers": {name: N x D_name}`` when more
    layers were pooled. The entry :data:`VIEWS` holds the augmented training views: the same
    keys and ``"source"`` (row of train) and ``"view"`` (its number) per row.

    A file system without room for it is refused before writing (a :class:`StorageError`);
    so is a write that fails on the way, with no temporary file left behind.
    """
    path = Path(path)
    require_space(path.parent, _size(splits), f"the cache {path.name}")

    def write(tmp: Path) -> None:
        with open(tmp, "wb+") as raw:
            guarded = _GuardedFile(raw)
            with h5py.File(guarded, "w") as f:
                f.attrs["format"] = FORMAT
                f.attrs["key"] = key or cache_key(config)
                f.attrs["classes"] = json.dumps(list(classes))
                f.attrs["config"] = json.dumps(config, sort_keys=True)
                f.attrs["complete"] = False
                for name, part in splits.items():
                    _write_split(f.create_group(name), part, chunk_rows)
                f.attrs["complete"] = True
            guarded.flush()
        if guarded.error is not None:
            raise storage_error(guarded.error, path)

    return atomic_write(path, write, fsync=True)


def _size(splits: dict[str, dict]) -> int:
    """About the bytes of a cache file holding ``splits``."""
    total = 0
    for part in splits.values():
        arrays = [part["features"], part["labels"], *part.get("layers", {}).values(),
                  *(part[k] for k in ("source", "view") if k in part)]
        total += sum(np.asarray(a).nbytes for a in arrays)
        total += sum(len(str(p).encode()) + 32 for p in part["paths"])
        total += sum(len(str(a).encode()) + len(str(b).encode()) + 64 for a, b in part.get("skipped", []))
    return total


class _GuardedFile(io.RawIOBase):
    """The file HDF5 writes a cache through, which never reports a failed write to HDF5.

    The HDF5 library does not survive a write that fails while it closes a file: the process
    dies of a segmentation fault. So the first failure is kept in :attr:`error`, the rest of
    the file is written nowhere (reads of it give zeros) and HDF5 finishes as if all went
    well; :func:`write_cache` then raises the error and the temporary file is removed.
    """

    def __init__(self, raw):
        super().__init__()
        self.raw, self.error, self.pos, self.size = raw, None, 0, 0

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == io.SEEK_SET else self.pos + pos if whence == io.SEEK_CUR else self.size + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        self.raw.seek(self.pos)
        n = self.raw.readinto(view) or 0
        view[n:] = bytes(len(view) - n)
        self.pos += len(view)
        return len(view)

    def _guard(self, action) -> None:
        if self.error is None:
            try:
                action()
            except OSError as exc:
                self.error = exc

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        position = self.pos
        self._guard(lambda: (self.raw.seek(position), self.raw.write(view)))
        self.pos += len(view)
        self.size = max(self.size, self.pos)
        return len(view)

    def truncate(self, size: int | None = None) -> int:
        size = self.pos if size is None else size
        self._guard(lambda: self.raw.truncate(size))
        self.size = size
        return size

    def flush(self) -> None:
        if not self.raw.closed:
            self._guard(self.raw.flush)


def _matrix(group, name: str, values, chunk_rows: int) -> None:
    """An N x D dataset chunked by rows, each chunk with its Fletcher-32 checksum."""
    values = np.asarray(values)
    n = values.shape[0]
    if not (n and values.shape[1]):
        group.create_dataset(name, data=values)  # nothing to check: HDF5 filters need chunks
        return
    group.create_dataset(name, data=values, chunks=(max(1, min(chunk_rows, n)), values.shape[1]), fletcher32=CHECKSUM)


def _vector(group, name: str, values) -> None:
    """An int64 dataset of N values (labels, sources, views), checksummed as :func:`_matrix`."""
    values = np.asarray(values, dtype=np.int64)
    group.create_dataset(name, data=values, **({"chunks": (min(len(values), 1 << 16),), "fletcher32": CHECKSUM}
                                                 if len(values) else {}))


def _write_split(group, part: dict, chunk_rows: int) -> None:
    """One split (or the views group): ``features``, ``labels``, ``paths``, ``skipped``, and
    optionally ``layers`` ({name: N x D}), ``source`` and ``view`` (views only)."""
    _matrix(group, "features", part["features"], chunk_rows)
    _vector(group, "labels", part["labels"])
    for name in ("source", "view"):
        if name in part:
            _vector(group, name, part[name])
    if part.get("layers"):
        layers = group.create_group("layers")
        for name, values in part["layers"].items():
            _matrix(layers, name, values, chunk_rows)
    _str_column(group, "paths", list(part["paths"]))
    if part.get("hashes") is not None:
        _str_column(group, "hashes", list(part["hashes"]))
    skipped = list(part.get("skipped", []))
    _str_dataset(group, "skipped", [x for pair in skipped for x in pair], shape=(len(skipped), 2))


# --------------------------------------------------------------------------- reading


def _open(path: str | os.PathLike) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise CacheError(f"no cache at {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CacheError(f"{path} is not a readable HDF5 cache ({exc})") from None
    if f.attrs.get("format") != FORMAT or not bool(f.attrs.get("complete", False)):
        f.close()
        raise CacheError(f"{path} is not a complete featurecache file; re-run fc extract")
    return f


def _damaged(path, exc: BaseException) -> CacheError:
    name = Path(path).name
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return CacheError(f"{path} is damaged: its stored numbers fail their checksum or cannot be read ({reason}); "
                      f"run fc extract again with the same options, which rebuilds it (fc cache info {name} shows "
                      "its data and backbone)")


@contextlib.contextmanager
def _reading(path: str | os.PathLike) -> Iterator[h5py.File]:
    """A complete cache open for reading; a chunk that fails its checksum (an OSError of HDF5) is a CacheError."""
    f = _open(path)
    try:
        yield f
    except OSError as exc:
        raise _damaged(path, exc) from None
    finally:
        f.close()


def is_complete(path: str | os.PathLike) -> bool:
    try:
        _open(path).close()
    except CacheError:
        return False
    return True


def _layer_names(f) -> list[str]:
    """The stored layers, in the order the config names them."""
    config = json.loads(f.attrs["config"])
    return list(config.get("layers") or [])


def info(path: str | os.PathLike) -> dict:
    """Classes, config, key and per-split counts of a complete cache; ``layers``: the width of
    every stored layer; ``views``: rows and views per image of :data:`VIEWS` (0 without)."""
    with _reading(path) as f:
        splits = {}
        for name, g in f.items():
            if name in NOT_SPLITS:
                continue
            splits[name] = {
                "n": int(g["features"].shape[0]),
                "skipped": int(g["skipped"].shape[0]),
                "dim": int(g["features"].shape[1]),
                "dtype": str(g["features"].dtype),
            }
        first = next((g for name, g in f.items() if name not in NOT_SPLITS), None)
        layers = {name: int(first["layers"][name].shape[1]) for name in _layer_names(f)} if first else {}
        views = f[VIEWS] if VIEWS in f else None
        per_image = int(views["view"][...].max()) + 1 if views is not None and views["view"].shape[0] else 0
        return {
            "path": str(Path(path)),
            "key": str(f.attrs["key"]),
            "classes": json.loads(f.attrs["classes"]),
            "config": json.loads(f.attrs["config"]),
            "splits": splits,
            "layers": layers,
            "views": {"n": int(views["features"].shape[0]) if views is not None else 0, "per_image": per_image},
            "activations": sorted(f[ACTIVATIONS]) if ACTIVATIONS in f else [],
            "bytes": Path(path).stat().st_size,
        }


def feature_sets(meta: dict) -> list[str]:
    """The feature sets a cache offers, from its :func:`info`: ``penultimate``, and with stored
    layers ``concat`` and each layer."""
    layers = list(meta.get("layers", {}))
    return ["penultimate", *(["concat", *layers] if layers else [])]


def feature_dim(meta: dict, features: str = "penultimate") -> int:
    """The width of feature set ``features`` of a cache, from its :func:`info`."""
    dim = next(iter(meta["splits"].values()))["dim"]
    parts = {"penultimate": dim, **meta.get("layers", {})}
    if features == "concat":
        return sum(parts.values())
    if features not in parts:
        raise CacheError(f"{Path(meta['path']).name} has no features {features!r}: it has "
                         + ", ".join(feature_sets(meta)))
    return parts[features]


def load_features(path: str | os.PathLike, split: str = "train", dtype=np.float32, features: str = "penultimate"):
    """Return ``(X, y, paths)`` for one split of a complete cache (``features``: a feature set)."""
    with _reading(path) as f:
        g = _split_group(f, path, split)
        X = _read_all(f, g, features, dtype)
        y = g["labels"][...]
        paths = list(g["paths"].asstr()[...])
    return X, y, paths


def load_hashes(path: str | os.PathLike, split: str) -> list[str] | None:
    """The content hash of each row of one split, or None for a cache written before they were recorded."""
    with _open(path) as f:
        g = _split_group(f, path, split)
        return list(g["hashes"].asstr()[...]) if "hashes" in g else None


def load_paths(path: str | os.PathLike, split: str) -> list[str]:
    """The paths of one split's rows, without reading their features."""
    with _open(path) as f:
        return list(_split_group(f, path, split)["paths"].asstr()[...])


def load_skipped(path: str | os.PathLike, split: str) -> list[tuple[str, str]]:
    with _reading(path) as f:
        return [tuple(row) for row in f[split]["skipped"].asstr()[...].tolist()]


def _numeric(f) -> list:
    """Every numeric dataset of a cache file, by name (features, layers, labels, sources, views)."""
    found = []
    f.visititems(lambda name, obj: found.append(obj) if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "fiu"
                 else None)
    return found


def verify(path: str | os.PathLike, block: int = 8192) -> dict:
    """Read every number of a complete cache, which checks every chunk's checksum.

    Returns ``{"cache", "datasets", "values", "checksums", "unchecked"}``: ``checksums`` is
    whether every non-empty numeric dataset carries one, ``unchecked`` the names of those
    that do not (a cache written before featurecache checksummed its files: it is read, but
    damage to its numbers cannot be told). A damaged cache is a :class:`CacheError`.
    """
    with _reading(path) as f:
        datasets = _numeric(f)
        values = 0
        for d in datasets:
            for start in range(0, d.shape[0] if d.ndim else 1, block):
                values += d[start:start + block].size if d.ndim else d[()].size
        unchecked = [d.name for d in datasets if d.size and not d.fletcher32]
    return {"cache": str(Path(path)), "datasets": len(datasets), "values": int(values), "checksums": not unchecked,
            "unchecked": unchecked}


def is_sound(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete cache whose numbers all pass their checksums (see :func:`verify`)."""
    try:
        verify(path)
    except CacheError:
        return False
    return True


def verify_cache(cache: str, cache_dir: str | os.PathLike | None = None) -> dict:
    """:func:`verify` of a cache given by path, file name or unique key prefix (``fc cache verify``)."""
    return verify(resolve(cache, cache_dir))


def list_caches(cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """Every cache file in ``cache_dir``: complete ones with their info, others marked incomplete."""
    root = default_cache_dir(cache_dir)
    out = []
    if not root.is_dir():
        return out
    for path in sorted(root.glob(f"*{SUFFIX}")):
        try:
            out.append({"complete": True, **info(path)})
        except CacheError:
            out.append({"complete": False, "path": str(path), "bytes": path.stat().st_size})
    for partial in sorted(root.glob("*.partial")):
        size = sum(p.stat().st_size for p in partial.iterdir())
        out.append({"complete": False, "path": str(partial), "bytes": size})
    return out


def resolve(ref: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A cache by path, file name, or unique key prefix."""
    path = Path(ref)
    if path.exists():
        return path
    root = default_cache_dir(cache_dir)
    matches = [p for p in root.glob(f"*{SUFFIX}") if p.name == str(ref) or str(ref) in p.stem]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise CacheError(f"no cache matches {ref!r} in {root}")
    raise CacheError(f"{ref!r} matches {len(matches)} caches in {root}: " + ", ".join(p.name for p in matches))


def clear_leftovers(entry: Entry) -> None:
    """Remove the shards and temporary files of a complete cache's entry: what a run killed
    after its cache was complete left. Nothing is touched while another process holds the entry."""
    if not (entry.partial.exists() or entry.temp_files()):
        return
    with contextlib.suppress(CacheLockedError), locked(entry, wait=0):
        if is_complete(entry.path):
            shutil.rmtree(entry.partial, ignore_errors=True)
            for stale in entry.temp_files():
                stale.unlink(missing_ok=True)


def remove(path: str | os.PathLike) -> list[str]:
    """Delete a cache file with its partial shards, temporary files and lock file."""
    entry = Entry(Path(path))
    removed = []
    for p in (entry.path, entry.partial, *entry.temp_files(), entry.lock_path):
        if p.is_dir():
            shutil.rmtree(p)
            removed.append(str(p))
        elif p.exists():
            p.unlink()
            removed.append(str(p))
    return removed


# --------------------------------------------------------------------------- reading in chunks


def _split_group(f, path, split: str):
    if split not in f:
        raise CacheError(f"{Path(path).name} has no {'views' if split == VIEWS else 'split ' + repr(split)}; "
                         f"it has {', '.join(k for k in f.keys() if k not in NOT_SPLITS)}"
                         + (" (extract with --augment-views K)" if split == VIEWS else ""))
    return f[split]


def _datasets(f, group, features: str) -> list:
    """The HDF5 datasets of feature set ``features`` in ``group``, side by side."""
    layers = _layer_names(f)
    if features == "penultimate":
        return [group["features"]]
    if features == "concat":
        return [group["features"], *(group["layers"][name] for name in layers)]
    if features in layers:
        return [group["layers"][features]]
    raise CacheError(f"{Path(f.filename).name} has no features {features!r}: it has "
                     + ", ".join([*FEATURE_SETS, *layers]) + (" (extract with --layers)" if not layers else ""))


def _read_all(f, group, features: str, dtype) -> np.ndarray:
    parts = [d[...].astype(dtype, copy=False) for d in _datasets(f, group, features)]
    return parts[0] if len(parts) == 1 else np.hstack(parts)


def view_sources(path: str | os.PathLike) -> np.ndarray:
    """For every row of :data:`VIEWS`, the row of train it is a view of."""
    with _reading(path) as f:
        return _split_group(f, path, VIEWS)["source"][...]


def load_labels(path: str | os.PathLike, split: str) -> np.ndarray:
    """The labels of one split, without reading its features."""
    with _reading(path) as f:
        return _split_group(f, path, split)["labels"][...]


def _read_sorted(datasets: list, rows: np.ndarray, block: int, dtype) -> np.ndarray:
    """``hstack(datasets)[rows]`` for increasing ``rows``, reading spans of at most ``block`` rows at a time."""
    widths = np.cumsum([0, *(d.shape[1] for d in datasets)])
    out = np.empty((len(rows), widths[-1]), dtype=dtype)
    start = 0
    while start < len(rows):
        first = int(rows[start])
        stop = int(np.searchsorted(rows, first + block, side="left"))
        for d, left, right in zip(datasets, widths[:-1], widths[1:]):
            span = d[first:int(rows[stop - 1]) + 1]
            out[start:stop, left:right] = span[rows[start:stop] - first]
        start = stop
    return out


def read_rows(path: str | os.PathLike, split: str, rows=None, dtype=np.float32, block: int = 4096,
              features: str = "penultimate") -> np.ndarray:
    """The features (feature set ``features``) of ``rows`` (row indices, any order; None: all) of one
    split or of :data:`VIEWS`, read ``block`` rows at a time so that no more than the result and one
    block are in memory."""
    with _reading(path) as f:
        group = _split_group(f, path, split)
        if rows is None:
            return _read_all(f, group, features, dtype)
        datasets = _datasets(f, group, features)
        rows = np.asarray(rows, dtype=np.int64)
        if np.all(rows[1:] >= rows[:-1]):
            return _read_sorted(datasets, rows, block, dtype)
        order = np.argsort(rows, kind="stable")
        out = np.empty((len(rows), sum(d.shape[1] for d in datasets)), dtype=dtype)
        out[order] = _read_sorted(datasets, rows[order], block, dtype)
        return out


def iter_blocks(path: str | os.PathLike, split: str, sets: list[str] | tuple[str, ...] = ("penultimate",),
                block: int = 65536):
    """The rows of one split (or of :data:`VIEWS`), ``block`` at a time: ``(first row, columns)``
    with ``labels``, ``paths``, ``source`` and ``view`` (those of the views only) and each feature
    set of ``sets`` (as stored: float32 or float16). No more than one block is in memory."""
    with _open(path) as f:
        group = _split_group(f, path, split)
        datasets = {name: _datasets(f, group, name) for name in sets}
        n = int(group["labels"].shape[0])
        for start in range(0, n, block):
            stop = min(n, start + block)
            columns = {"labels": group["labels"][start:stop], "paths": list(group["paths"].asstr()[start:stop])}
            for name in ("source", "view"):
                if name in group:
                    columns[name] = group[name][start:stop]
            for name, parts in datasets.items():
                values = [d[start:stop] for d in parts]
                columns[name] = values[0] if len(values) == 1 else np.hstack(values)
            yield start, columns


# --------------------------------------------------------------------------- stored activations


def activation_bytes(shape: tuple[int, ...], rows: int) -> int:
    """Bytes of ``rows`` stored activations of ``shape`` (C x H x W)."""
    return int(rows) * int(np.prod(shape)) * np.dtype(ACTIVATION_DTYPE).itemsize


def has_activations(path: str | os.PathLike, name: str) -> bool:
    """Whether the cache holds the activations ``name`` (complete or not)."""
    with _open(path) as f:
        return ACTIVATIONS in f and name in f[ACTIVATIONS]


def write_activations(path: str | os.PathLike, name: str, parts: dict[str, tuple[int, ...]], attrs: dict,
                      fill) -> None:
    """Add the activations ``name`` to a complete cache, never half-written: the file is copied under
    a temporary name, ``fill(write)`` writes every part with ``write(part, start_row, array)``,
    the group is marked complete and the copy renamed into place, all under the entry's lock.

    ``parts`` maps a part (a split, or :data:`VIEWS`) to its shape, rows first. ``attrs`` (which
    ``fill`` may add to) is stored as the group's JSON ``meta`` (:func:`activation_meta`). A group
    of the same name (damaged) is replaced.
    """
    path = Path(path)
    _open(path).close()

    def write(tmp: Path) -> None:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "a") as f:
            parent = f.require_group(ACTIVATIONS)
            if name in parent:
                del parent[name]
            group = parent.create_group(name)
            group.attrs["complete"] = False
            for part, shape in parts.items():
                group.create_dataset(part, shape=shape, dtype=ACTIVATION_DTYPE,
                                     chunks=(max(1, min(64, shape[0])), *shape[1:]) if shape[0] else None)

            def put(part: str, start: int, values: np.ndarray) -> None:
                group[part][start:start + len(values)] = values.astype(ACTIVATION_DTYPE, copy=False)

            fill(put)
            group.attrs["meta"] = json.dumps(attrs, sort_keys=True)
            group.attrs["complete"] = True

    with locked(Entry(path)):
        atomic_write(path, write, fsync=True)


def activation_meta(path: str | os.PathLike, name: str) -> dict:
    """The ``meta`` of the stored activations ``name`` ({} when there are none or it is unreadable)."""
    with _open(path) as f:
        group = f[ACTIVATIONS].get(name) if ACTIVATIONS in f else None
        try:
            return json.loads(group.attrs["meta"]) if group is not None else {}
        except (KeyError, ValueError):
            return {}


def read_activations(path: str | os.PathLike, name: str, part: str, shape: tuple[int, ...]) -> np.ndarray:
    """The stored activations ``name`` of one part, or a one-line CacheError when they are missing,
    incomplete, of another shape or unreadable."""
    with _open(path) as f:
        where = f"{Path(path).name}: stored activations {name}"
        group = f[ACTIVATIONS].get(name) if ACTIVATIONS in f else None
        if group is None or not bool(group.attrs.get("complete", False)):
            raise CacheError(f"{where} are missing or incomplete")
        if part not in group:
            raise CacheError(f"{where} have no dataset {part!r}")
        data = group[part]
        want = np.dtype(ACTIVATION_DTYPE)
        if tuple(data.shape) != tuple(shape) or data.dtype != want:
            raise CacheError(f"{where}: dataset {part!r} is {data.dtype} {tuple(data.shape)}, "
                             f"not {want} {tuple(shape)}")
        try:
            values = data[...]
        except (OSError, ValueError) as exc:
            raise CacheError(f"{where}: dataset {part!r} cannot be read ({exc})".splitlines()[0]) from None
    if not np.isfinite(values).all():
        raise CacheError(f"{where}: dataset {part!r} holds values that are not finite")
    return values
