"""Device, precision and thread decisions, made in one place for every stage."""

from __future__ import annotations

import contextlib
import os

import torch

from .errors import UsageError, plural

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)


def resolve_workers(workers: int | None = None) -> int:
    """DataLoader worker processes that decode images: the usable cores when not given."""
    if workers is None:
        return usable_cores()
    if int(workers) < 0:
        raise UsageError(f"--workers must be 0 (decode in the main process) or more, not {workers}")
    return int(workers)


# Device types by name, with whether this machine has one.
_DEVICE_TYPES = {
    "cpu": lambda: True,
    "cuda": lambda: torch.cuda.is_available(),
    "mps": lambda: torch.backends.mps.is_available(),
}


def resolve_device(device: str | None = "auto") -> torch.device:
    """``auto`` picks CUDA when there is one, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` and
    ``mps`` name one. A UsageError for any other name or a device this machine lacks."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in _DEVICE_TYPES:
        raise UsageError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    if not _DEVICE_TYPES[dev.type]():
        raise UsageError(f"device {device} asked for, but this machine has no {dev.type.upper()} device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"device {device} asked for, but this machine has {plural(torch.cuda.device_count(), 'GPU')}")
    return dev


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: mixed precision (fp16) on CUDA, fp32 elsewhere (bf16 autocast is slow on most CPUs)."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
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


# How far a compiled model may drift from eager mode on the first batch before it is
# rejected: folding batch norm into convolutions reorders float arithmetic (~1e-5).
_COMPILE_TOLERANCE = 1e-3
# A compiled model is kept only when it is at least this much faster than eager mode.
_COMPILE_GAIN = 1.1


def default_batch_size(device: torch.device) -> int:
    """Images per forward pass when none is given: 64 on a GPU; 4 on a CPU, where small
    batches stay in cache (MobileNetV2 on 2 cores: 1.7x the images/s of batch 32)."""
    return 64 if device.type == "cuda" else 4


def model_threads(device: torch.device, workers: int, mode: str) -> int:
    """Intra-op threads for the model while ``workers`` processes decode images.

    A frozen graph on a CPU gets half the cores and leaves the rest to the decoders: its
    OpenMP pool stalls at every barrier when it shares cores with them (MobileNetV2 on 2
    cores with 2 workers: 1.15x the images/s of 2 threads). Otherwise torch's setting stays.
    """
    if device.type != "cpu" or workers == 0 or mode != "torchscript-frozen":
        return torch.get_num_threads()
    return max(1, usable_cores() // 2)


@contextlib.contextmanager
def num_threads(n: int | None = None):
    """Restore torch's intra-op thread count on the way out (set it to ``n`` first if given)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _seconds(fn, x: torch.Tensor) -> float:
    import time

    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def inference_model(model: torch.nn.Module, device: torch.device, precision: str, example: torch.Tensor):
    """``(callable, mode)``: the faster of eager mode and a frozen TorchScript graph.

    On the CPU in fp32 the model is traced and frozen, which folds batch norm into the
    convolutions and fuses oneDNN kernels (MobileNetV2: about 2.5x at batch 4; ResNet-50:
    1.2x; EfficientNet-B0 is slower frozen). The frozen graph is kept only if its output on
    ``example`` matches eager mode (relative error under 1e-3), it is not tied to the batch
    size, and a timed pass of ``example`` is at least 10% faster; otherwise, for models
    TorchScript cannot trace, on CUDA and under autocast, the eager model is used.
    ``mode`` is ``"torchscript-frozen"`` or ``"eager"``, for the provenance.
    """
    import warnings

    if device.type != "cpu" or precision != "fp32":
        return model, "eager"
    with torch.inference_mode():
        expected = model(example)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(model, example, check_trace=False)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
            with torch.inference_mode():
                got = frozen(example)
                one = frozen(example[:1])  # the graph must not be tied to the batch size
    except Exception:  # any model TorchScript cannot take runs in eager mode
        return model, "eager"
    scale = float(expected.abs().max()) or 1.0
    for out, ref in ((got, expected), (one, expected[:1])):
        if out.shape != ref.shape or not float((out.float() - ref.float()).abs().max()) <= _COMPILE_TOLERANCE * scale:
            return model, "eager"
    with torch.inference_mode():
        if _seconds(model, example) < _COMPILE_GAIN * _seconds(frozen, example):
            return model, "eager"
    return frozen, "torchscript-frozen"
