"""Small file helpers every stage shares: write-then-rename, JSON, hashes and versions.

Readers of featurecache's files accept only complete ones, so every file is written
under a temporary name in the same folder and renamed into place
(:func:`atomic_write`); a folder of files is built the same way (:func:`atomic_dir`).
When the machine refuses a write (a full disk, a quota, a read-only file system, no
permission) both remove what they wrote and raise a
:class:`~featurecache.errors.StorageError` that names the path and the free space;
:func:`require_space` refuses a write of known size before it starts.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from .errors import StorageError

# The errors of a write that the machine refused: the user's move is to free space or fix permissions.
REFUSED = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM, errno.EFBIG, errno.EIO})


def _temp_name(path: Path) -> Path:
    """``.<name>.tmp-<pid>-<random>`` beside ``path``: hidden, unique, and on the same file system."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temp_name(path: os.PathLike | str) -> bool:
    """Whether ``path`` is a temporary name of :func:`atomic_write` or :func:`atomic_dir` (left by a crash)."""
    name = Path(path).name
    return name.startswith(".") and ".tmp-" in name


def human_bytes(n: float) -> str:
    """``512 B``, ``3.2 MB``, ``1.5 GB``."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def free_space(path: str | os.PathLike) -> int | None:
    """Bytes free for this user on the file system of ``path`` (or of its nearest existing parent)."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def _space(path: Path) -> str:
    free = free_space(path)
    return "free space unknown" if free is None else f"{human_bytes(free)} free there"


def storage_error(exc: BaseException, path: str | os.PathLike) -> StorageError:
    """The one-line error of a write of ``path`` that failed with ``exc``: the reason, the path, the free space."""
    code = getattr(exc, "errno", None)
    reason = os.strerror(code) if code else str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return StorageError(f"cannot write {path}: {reason} ({_space(Path(path))}); free some space or fix the "
                        "permissions, then run the command again")


def refused_error(exc: OSError) -> StorageError:
    """The one-line error of an OSError the machine raised outside any write that turned it into a
    StorageError (a folder that cannot be read, a lock file that cannot be made): the path, the reason,
    and the free space when space is what is missing."""
    path = exc.filename or "a file"
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return storage_error(exc, path)
    return StorageError(f"{path}: {reason}; check that it can be read and written, then run the command again")


def is_refused(exc: BaseException) -> bool:
    """Whether ``exc`` is a write the machine refused (see :data:`REFUSED`)."""
    return isinstance(exc, OSError) and exc.errno in REFUSED


def require_space(folder: str | os.PathLike, nbytes: int, what: str) -> None:
    """Refuse early, with a StorageError, a write of about ``nbytes`` that ``folder``'s file system cannot hold."""
    free = free_space(folder)
    needed = int(nbytes * 1.05) + (1 << 20)  # the file's own overhead, and a margin
    if free is not None and free < needed:
        raise StorageError(f"{what} needs about {human_bytes(needed)} in {folder}, and {human_bytes(free)} is free "
                           "there; free some space or choose another --cache-dir, then run the command again")


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a refused write (:func:`is_refused`) in the block into a :class:`StorageError` naming ``path``."""
    try:
        yield
    except OSError as exc:
        if not is_refused(exc):
            raise
        raise storage_error(exc, path) from None


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[Path], None], fsync: bool = False) -> Path:
    """Write ``path`` completely under a temporary name, then rename it into place.

    ``data`` is the content (bytes or text) or a function that writes a file at the path
    it is given (``torch.save``, ``h5py``, ...). With ``fsync`` the file reaches the disk
    before the rename. A failure leaves ``path`` as it was and no temporary file behind; a
    write the machine refused is a :class:`StorageError`.
    """
    path = Path(path)
    tmp = _temp_name(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_renamed(path, tmp, data, fsync)
    return path


def _write_renamed(path: Path, tmp: Path, data, fsync: bool) -> None:
    try:
        if callable(data):
            data(tmp)
        elif isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def json_text(obj) -> str:
    """The JSON form of featurecache's files: indented, with anything else as its string."""
    return json.dumps(obj, indent=2, default=str) + "\n"


def write_json(path: str | os.PathLike, obj) -> Path:
    """:func:`atomic_write` of :func:`json_text`."""
    return atomic_write(path, json_text(obj))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder under a temporary name; on success it replaces ``path``.

    Yields the temporary folder. If another writer renamed a folder into ``path`` first,
    :class:`FileExistsError` is raised and that folder is left as it is. On any error the
    temporary folder is removed; a write the machine refused, in the block too, is a
    :class:`StorageError`.
    """
    path = Path(path)
    tmp = _temp_name(path)
    try:
        with writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            yield tmp
            try:
                os.rename(tmp, path)
            except OSError:
                if not path.exists():
                    raise
                raise FileExistsError(path) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# import name -> the name it is recorded under
_PACKAGES = {"torch": "torch", "torchvision": "torchvision", "sklearn": "scikit-learn", "numpy": "numpy",
             "h5py": "h5py", "PIL": "pillow", "matplotlib": "matplotlib", "skops": "skops",
             "safetensors": "safetensors"}


def versions(*packages: str) -> dict:
    """featurecache's, Python's and the given packages' versions (import names, e.g. ``"torch"``), for provenance."""
    import importlib

    from . import __version__

    out = {"featurecache": __version__}
    for name in packages:
        module = importlib.import_module(name)
        out[_PACKAGES.get(name, name)] = getattr(module, "__version__", "unknown")
    out["python"] = platform.python_version()
    return out
