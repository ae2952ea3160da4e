"""Predict classes of images with an exported model or straight from a stage-two run.

An exported ``model.pt`` (from :func:`featurecache.finetune`) carries its class names and
preprocessing; a run directory gives the backbone of its cache and one of its heads, with no
fine-tuning. Heads that have no torch form (knn, forests, ...) get the backbone's features and
answer with their own ``predict_proba``. Images are decoded exactly as extraction decodes them;
an image that cannot be read is reported in ``skipped`` and the others are still predicted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import runtime
from .data import IMAGE_EXTENSIONS, Dataset, Preprocess, Record
from .errors import DataError
from .finetuning import Exported, assemble, load_exported
from .images import ImageTensors, image_loader, normalize_batch

MODEL_FILE = "model.pt"


def image_paths(paths) -> list[str]:
    """Files as given, and every image (by extension) under each folder, recursively and sorted."""
    found: list[str] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found += sorted(str(p) for p in path.rglob("*")
                            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.exists():
            found.append(str(path))
        else:
            raise DataError(f"no such file or folder: {path}")
    if not found:
        raise DataError("no images found in " + ", ".join(str(p) for p in paths))
    return found


def _exported(path: Path, device: torch.device):
    model, info = load_exported(path, device)

    def probabilities(images: torch.Tensor) -> np.ndarray:
        return model(images).cpu().numpy()

    return probabilities, list(info["classes"]), Preprocess(**info["preprocess"])


def _from_run(run, head: str, device: torch.device, cache_dir):
    parts = assemble(run, head, cache_dir, allow_sklearn=True)
    pre = parts.backbone.preprocess
    if parts.network is not None:
        model = Exported(parts.network, pre).to(device).eval()

        def probabilities(images: torch.Tensor) -> np.ndarray:
            return model(images).cpu().numpy()
    else:
        backbone = parts.backbone.model.to(device).to(memory_format=torch.channels_last).eval()

        def probabilities(images: torch.Tensor) -> np.ndarray:
            features = backbone(normalize_batch(images, pre)).float().cpu().numpy()
            return np.asarray(parts.pipeline.predict_proba(features), dtype=np.float64)

    return probabilities, list(parts.meta["classes"]), pre


def load_predictor(model, head: str = "best", device: str = "auto",
                   cache_dir=None) -> tuple[Callable[[torch.Tensor], np.ndarray], list[str], Preprocess]:
    """``(probabilities(uint8 images) -> N x C, classes, preprocess)`` for a model file, a folder
    holding ``model.pt`` (a fine-tuning output), or a stage-two run (path or run id)."""
    dev = runtime.resolve_device(device)
    path = Path(model)
    if path.is_dir() and (path / MODEL_FILE).is_file():
        path = path / MODEL_FILE
    if path.is_file():
        return _exported(path, dev)
    return _from_run(model, head, dev, cache_dir)


def predict(
    model: str,
    paths,
    topk: int = 5,
    head: str = "best",
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "auto",
    cache_dir: str | None = None,
    progress: bool = True,
) -> dict:
    """Top-k classes of images (files or folders) with an exported model or a stage-two run.

    Returns ``{"predictions": [{"path", "class", "probability", "topk": [{"class",
    "probability"}, ...]}, ...], "skipped": [{"path", "reason"}, ...]}``. ``head`` picks the
    head of a run (``best``, ``best-transferable``, a spec or a slug); an exported model has its own.
    """
    from tqdm.auto import tqdm

    if topk < 1 or batch_size < 1:
        raise DataError("--topk and --batch-size must be at least 1")
    files = image_paths([paths] if isinstance(paths, (str, os.PathLike)) else paths)
    probabilities, classes, pre = load_predictor(model, head, device, cache_dir)
    dev = runtime.resolve_device(device)
    workers = runtime.usable_cores() if workers is None else int(workers)
    dataset = Dataset("", classes, [Record(os.path.abspath(f), -1, "predict") for f in files], "predict")
    loader = image_loader(ImageTensors(dataset, np.arange(len(files)), pre, None), batch_size, workers, dev)
    k = min(topk, len(classes))
    predictions, skipped = [], []
    with torch.inference_mode(), tqdm(total=len(files), unit="img", desc="predict", leave=False,
                                      disable=not progress, dynamic_ncols=True) as bar:
        for index, batch, reasons in loader:
            ok = np.array([not r for r in reasons], dtype=bool)
            skipped += [{"path": files[int(i)], "reason": r} for i, r in zip(index, reasons) if r]
            if ok.any():
                probs = probabilities(batch[torch.from_numpy(ok)].to(dev, non_blocking=True))
                for i, p in zip(index[torch.from_numpy(ok)].tolist(), probs):
                    top = np.argsort(-p, kind="stable")[:k]
                    predictions.append({
                        "path": files[i],
                        "class": classes[top[0]],
                        "probability": float(p[top[0]]),
                        "topk": [{"class": classes[j], "probability": float(p[j])} for j in top],
                    })
            bar.update(len(index))
    return {"predictions": predictions, "skipped": skipped}


def to_csv(result: dict) -> str:
    """``path,class,probability,topk`` with topk as ``class:probability`` pairs joined by ``;``."""
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "class", "probability", "topk"])
    for p in result["predictions"]:
        top = ";".join(f"{t['class']}:{t['probability']:.6f}" for t in p["topk"])
        writer.writerow([p["path"], p["class"], f"{p['probability']:.6f}", top])
    return buffer.getvalue()
