"""The demo: scikit-learn's digits as a folder of images, and ``fc demo``.

:func:`write_digits` turns the 1,797 8x8 digits into grayscale PNGs laid out as the
PyTorch transfer-learning tutorial expects (``train/ val/ test/``, one folder per
class), with a seeded stratified split. The same seed gives the same files; an
existing complete folder is left untouched, so its fingerprint, and the feature
cache made from it, stay valid.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from .errors import PipelineError

DEMO_PIPELINE = Path(__file__).resolve().parent.parent / "pipelines" / "demo.toml"
SPLIT = {"train": 0.6, "val": 0.2, "test": 0.2}
SIZE = 32
COMPLETE = ".complete"


def write_digits(dest: str | os.PathLike, size: int = SIZE, seed: int = 0) -> Path:
    """Write the digits as ``dest/<split>/<digit>/<index>.png`` (``size`` x ``size`` grayscale).

    Returns ``dest``. The folder is written under a temporary name and renamed when
    complete; if ``dest`` is already complete it is returned as it is.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    from .data import stratified_assign

    dest = Path(dest)
    if (dest / COMPLETE).exists():
        return dest
    if dest.exists() and any(dest.iterdir()):
        raise PipelineError(f"{dest} exists but is not a complete digits folder; remove it or choose another path")
    digits = load_digits()
    labels = [int(t) for t in digits.target]
    splits = stratified_assign(labels, SPLIT, seed)
    pixels = np.clip(digits.images * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        for i, (img, label, split) in enumerate(zip(pixels, labels, splits)):
            folder = tmp / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img, "L").resize((size, size), Image.Resampling.BILINEAR).save(folder / f"{i:04d}.png")
        (tmp / COMPLETE).write_text(f"sklearn digits, {len(labels)} images, {size}x{size}, seed {seed}\n")
        if dest.exists():
            dest.rmdir()
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def demo(set: tuple[str, ...] = (), progress: bool = True) -> dict:
    """Run the demo pipeline (``pipelines/demo.toml``): what ``fc demo`` does."""
    from .pipeline import run

    if not DEMO_PIPELINE.is_file():
        raise PipelineError(f"the demo pipeline is missing: {DEMO_PIPELINE} (run from a checkout of featurecache)")
    return run(DEMO_PIPELINE, set=set, progress=progress)
