"""Small file helpers every stage shares: write-then-rename, JSON, hashes and versions.

Readers of featurecache's files accept only complete ones, so every file is written
under a temporary name in the same folder and renamed into place
(:func:`atomic_write`); a folder of files is built the same way (:func:`atomic_dir`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path


def _temp_name(path: Path) -> Path:
    """``.<name>.tmp-<pid>-<random>`` beside ``path``: hidden, unique, and on the same file system."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def is_temp_name(path: os.PathLike | str) -> bool:
    """Whether ``path`` is a temporary name of :func:`atomic_write` or :func:`atomic_dir` (left by a crash)."""
    name = Path(path).name
    return name.startswith(".") and ".tmp-" in name


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[Path], None], fsync: bool = False) -> Path:
    """Write ``path`` completely under a temporary name, then rename it into place.

    ``data`` is the content (bytes or text) or a function that writes a file at the path
    it is given (``torch.save``, ``h5py``, ...). With ``fsync`` the file reaches the disk
    before the rename. A failure leaves ``path`` as it was and no temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
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
    return path


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
    temporary folder is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path)
    tmp.mkdir()
    try:
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
