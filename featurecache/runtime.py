"""Device, precision and thread decisions, made in one place for every stage."""

from __future__ import annotations

import contextlib
import os

import torch

from .errors import FeatureCacheError

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA when there is one, else MPS, else the CPU."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FeatureCacheError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise FeatureCacheError(f"device {device} asked for, but CUDA is not available here")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise FeatureCacheError(f"device {device} asked for, but there are {torch.cuda.device_count()} GPUs")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: mixed precision (fp16) on CUDA, fp32 elsewhere (bf16 autocast is slow on most CPUs)."""
    if precision not in PRECISIONS:
        raise FeatureCacheError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """The autocast context for a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[precision])


def set_worker_threads(_worker_id: int = 0) -> None:
    """DataLoader workers decode images; one intra-op thread each keeps the model's cores free."""
    torch.set_num_threads(1)
