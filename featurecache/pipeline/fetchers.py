"""Fetchers: what puts a pipeline's data where it expects them.

A pipeline's ``fetch`` key names one of :data:`FETCHERS` (``sklearn:digits`` writes
scikit-learn's digits as a folder of images, offline) or an ``https://`` zip archive
(:func:`fetch_zip`). Each writes under a temporary name and renames when complete, so a
half-written folder is never taken for data.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from ..errors import PipelineError
from ..files import atomic_dir

DIGITS_SPLIT = {"train": 0.6, "val": 0.2, "test": 0.2}
DIGITS_SIZE = 32
DIGITS_COMPLETE = ".complete"


def write_digits(dest: str | os.PathLike, size: int = DIGITS_SIZE, seed: int = 0) -> Path:
    """Write scikit-learn's 1,797 8x8 digits as ``dest/<split>/<digit>/<index>.png``.

    The images are ``size`` x ``size`` grayscale, laid out as the PyTorch transfer-learning
    tutorial expects, with a seeded stratified 60/20/20 split: the same seed gives the same
    files. The folder is built under a temporary name and renamed when complete; a complete
    ``dest`` is returned as it is, so its fingerprint, and the cache made from it, stay valid.
    """
    dest = Path(dest)
    if (dest / DIGITS_COMPLETE).exists():
        return dest
    if dest.exists() and any(dest.iterdir()):
        raise PipelineError(f"{dest} exists but is not a complete digits folder; remove it or choose another path")
    try:
        with atomic_dir(dest) as tmp:
            _write_digit_images(tmp, size, seed)
    except FileExistsError:
        if (dest / DIGITS_COMPLETE).exists():  # another process wrote the same digits first
            return dest
        raise PipelineError(f"{dest} appeared while the digits were written; remove it or use another path") from None
    return dest


def _write_digit_images(folder: Path, size: int, seed: int) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    from ..data.sources import stratified_assign

    digits = load_digits()
    labels = [int(t) for t in digits.target]
    splits = stratified_assign(labels, DIGITS_SPLIT, seed)
    pixels = np.clip(digits.images * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)
    for i, (img, label, split) in enumerate(zip(pixels, labels, splits)):
        (folder / split / str(label)).mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(img, "L").resize((size, size), Image.Resampling.BILINEAR)
        image.save(folder / split / str(label) / f"{i:04d}.png")
    (folder / DIGITS_COMPLETE).write_text(f"sklearn digits, {len(labels)} images, {size}x{size}, seed {seed}\n")


def fetch_zip(url: str, dest: str | os.PathLike) -> Path:
    """Download a zip archive and unpack it as ``dest`` (its single top folder, if it has one)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.download-", dir=dest.parent) as work, \
            atomic_dir(dest) as tmp:
        archive = Path(work) / "archive.zip"
        _download(url, archive)
        _unpack(url, archive, Path(work) / "unpacked", tmp)
    return dest


def _download(url: str, archive: Path) -> None:
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as fh:
            shutil.copyfileobj(response, fh)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise PipelineError(f"cannot download {url}: {getattr(exc, 'reason', exc)}") from None


def _unpack(url: str, archive: Path, unpacked: Path, dest: Path) -> None:
    """Unpack into ``unpacked``, then move the archive's single top folder (or all of it) into ``dest``."""
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(unpacked)  # zipfile drops absolute paths and '..' components
    except zipfile.BadZipFile as exc:
        raise PipelineError(f"{url} is not a zip file: {exc}") from None
    top = [p for p in unpacked.iterdir() if not p.name.startswith((".", "__MACOSX"))]
    source = top[0] if len(top) == 1 and top[0].is_dir() else unpacked
    for item in source.iterdir():
        os.replace(item, dest / item.name)


FETCHERS = {"sklearn:digits": write_digits}
