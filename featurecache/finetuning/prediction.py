"""Predict classes of images with a fine-tuned model or straight from a stage-two run.

MODEL is one of:

- a fine-tuning folder (``RUN/finetune/<hash>``, from :func:`featurecache.finetune`): the
  network is rebuilt from the run it lives in and its weights are read from
  ``model.safetensors`` once their sha256 matches the one ``result.json`` records;
- an exported ``model.pt`` (TorchScript), which carries its class names and preprocessing;
- an exported ``model.pt`` (TorchScript) in a fine-tuning folder is loaded once its sha256
  matches the one ``result.json`` records;
- a run directory or run id: the backbone of its cache and one of its heads, with no
  fine-tuning, even when the run has fine-tuned models (the model a command uses is the one
  it names; stderr says which it is, and which fine-tuned models the run has). Heads that
  have no torch form (knn, forests, ...) get the backbone's features and answer with their
  own ``predict_proba``. A head fitted with ``calibrate="temperature"`` has its
  probabilities tempered as its leaderboard entry says, in both forms.

Images are decoded exactly as extraction decodes them; an image that cannot be read is
reported in ``skipped`` and the others are still predicted.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .. import runtime
from ..data.images import ImageTensors, image_loader, normalize_batch
from ..data.preprocess import Preprocess
from ..data.sources import IMAGE_EXTENSIONS, Dataset, Record
from ..data.webdataset import is_member_path, read_file_or_member
from ..errors import DataError, RunError, UsageError, plural
from ..progress import Progress
from ..sweep.calibration import apply_temperature, head_temperature
from .network import (
    FINETUNE_DIR,
    MODEL_FILE,
    RESULT_FILE,
    Exported,
    assemble,
    is_finetune_dir,
    load_exported,
    load_finetuned,
)

Probabilities = Callable[[torch.Tensor], np.ndarray]


def image_paths(paths) -> list[str]:
    """Files as given (``SHARD.tar#KEY`` for a sample of a WebDataset shard), and every image (by
    extension) under each folder, recursively and sorted."""
    found: list[str] = []
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found += sorted(str(p) for p in path.rglob("*")
                            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.exists() or is_member_path(str(given)):  # a file, or a shard's sample SHARD.tar#KEY
            found.append(str(given) if is_member_path(str(given)) else str(path))
        else:
            raise DataError(f"no such file or folder: {path}")
    if not found:
        raise DataError("no images found in " + ", ".join(str(p) for p in paths))
    return found


def _module_probabilities(model: torch.nn.Module) -> Probabilities:
    def probabilities(images: torch.Tensor) -> np.ndarray:
        return model(images).cpu().numpy()

    return probabilities


def _loaded(model: torch.nn.Module, info: dict):
    return _module_probabilities(model), list(info["classes"]), Preprocess(**info["preprocess"])


def _run_model(run_dir: Path, head: str) -> str:
    """Which model of a run predicts, and the fine-tuned ones it has, for stderr."""
    tuned = sorted(p.parent for p in run_dir.glob(f"{FINETUNE_DIR}/*/{RESULT_FILE}"))
    said = f"head {head} of run {run_dir.name}, without fine-tuning"
    if tuned:
        said += (f"; the run has {plural(len(tuned), 'fine-tuned model')}: fc predict {tuned[-1]} uses "
                 + ("it" if len(tuned) == 1 else "one"))
    return said


def _from_run(run, head: str, device: torch.device, cache_dir, trust: bool):
    parts = assemble(run, head, cache_dir, allow_sklearn=True, trust=trust)
    pre, temperature = parts.backbone.preprocess, head_temperature(parts.head_meta)
    said = _run_model(parts.run_dir, parts.head_meta["head"])
    if parts.network is not None:
        exported = Exported(parts.network, pre, temperature).to(device).eval()
        return _module_probabilities(exported), list(parts.meta["classes"]), pre, said
    backbone = parts.backbone.model.to(device).to(memory_format=torch.channels_last).eval()

    def probabilities(images: torch.Tensor) -> np.ndarray:
        features = backbone(normalize_batch(images, pre)).float().cpu().numpy()
        return apply_temperature(parts.pipeline.predict_proba(features), temperature)

    return probabilities, list(parts.meta["classes"]), pre, said


def load_predictor(model, head: str = "best", device: str = "auto", cache_dir=None,
                   trust: bool = False) -> tuple[Probabilities, list[str], Preprocess, str]:
    """``(probabilities(uint8 images) -> N x C, classes, preprocess, which model it is)`` for a
    fine-tuning folder (its safetensors weights), a ``model.pt`` file or a folder holding one, or a
    stage-two run (path or run id)."""
    dev = runtime.resolve_device(device)
    path = Path(model)
    if is_finetune_dir(path):
        return (*_loaded(*load_finetuned(path, dev, trust)), f"the fine-tuned network of {path}")
    if path.is_dir() and (path / MODEL_FILE).is_file():
        path = path / MODEL_FILE
    if path.is_file():
        return (*_loaded(*load_exported(path, dev)), f"the exported model {path}")
    if path.is_dir() and path.parent.name == FINETUNE_DIR:
        raise RunError(f"{path} is an unfinished fine-tuning (it has no {RESULT_FILE}): run the fc finetune that "
                       "started it again; --resume continues from its last checkpoint")
    return _from_run(model, head, dev, cache_dir, trust)


def _prediction(path: str, p: np.ndarray, classes: list[str], k: int) -> dict:
    top = np.argsort(-p, kind="stable")[:k]
    return {
        "path": path,
        "class": classes[top[0]],
        "probability": float(p[top[0]]),
        "topk": [{"class": classes[j], "probability": float(p[j])} for j in top],
    }


def predict(
    model: str,
    paths,
    topk: int = 5,
    head: str = "best",
    batch_size: int = 32,
    workers: int | None = None,
    device: str = "auto",
    trust: bool = False,
    cache_dir: str | None = None,
    progress: bool = True,
) -> dict:
    """Top-k classes of images (files or folders) with a fine-tuned model or a stage-two run.

    Returns ``{"predictions": [{"path", "class", "probability", "topk": [{"class",
    "probability"}, ...]}, ...], "skipped": [{"path", "reason"}, ...]}``. ``head`` picks the
    head of a run (``best``, ``best-transferable``, a spec or a slug); a fine-tuned model has its own.
    ``trust`` also loads a run saved in the old pickle format, which can run code when loaded.
    """
    if topk < 1 or batch_size < 1:
        raise UsageError("--topk and --batch-size must be at least 1")
    files = image_paths([paths] if isinstance(paths, (str, os.PathLike)) else paths)
    workers = runtime.resolve_workers(workers)
    probabilities, classes, pre, said = load_predictor(model, head, device, cache_dir, trust)
    dev = runtime.resolve_device(device)
    dataset = Dataset("", classes, [Record(os.path.abspath(f), -1, "predict") for f in files], "predict",
                      opener=read_file_or_member)
    loader = image_loader(ImageTensors(dataset, np.arange(len(files)), pre, None), batch_size, workers, dev)
    k = min(topk, len(classes))
    predictions, skipped = [], []
    with torch.inference_mode(), Progress(len(files), "predict", unit="images", enabled=progress) as bar:
        for index, batch, reasons in loader:
            ok = torch.tensor([not r for r in reasons], dtype=torch.bool)
            skipped += [{"path": files[int(i)], "reason": r} for i, r in zip(index, reasons) if r]
            if ok.any():
                probs = probabilities(batch[ok].to(dev, non_blocking=True))
                predictions += [_prediction(files[i], p, classes, k) for i, p in zip(index[ok].tolist(), probs)]
            bar.update(len(index))
    if not predictions:
        first = skipped[0]
        raise DataError(f"none of the {plural(len(files), 'file')} given could be read as an image "
                        f"(first: {first['path']}: {first['reason']})")
    if progress:
        print(f"model: {said}", file=sys.stderr, flush=True)
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
