"""Device, precision and thread decisions, made in one place for every stage."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable

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


def resolve_device(device: str | None = "auto", local_rank: int | None = None) -> torch.device:
    """``auto`` picks CUDA when there is one, else the CPU; ``cpu``, ``cuda``, ``cuda:N`` and
    ``mps`` name one. A UsageError for any other name or a device this machine lacks.

    ``local_rank``: the process's rank on its node, under torchrun; ``auto`` and ``cuda``
    then mean that rank's GPU (``cuda:LOCAL_RANK``).
    """
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in _DEVICE_TYPES:
        raise UsageError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    if not _DEVICE_TYPES[dev.type]():
        raise UsageError(f"device {device} asked for, but this machine has no {dev.type.upper()} device")
    gpus = plural(torch.cuda.device_count(), "GPU") if dev.type == "cuda" else ""
    if dev.type == "cuda" and dev.index is None and local_rank is not None:
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"local rank {local_rank} has no GPU of its own: this machine has {gpus}; start at most "
                             "one process per GPU (torchrun --nproc-per-node)")
        dev = torch.device("cuda", local_rank)
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"device {device} asked for, but this machine has {gpus}")
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


def cores_per_process(processes: int = 1) -> int:
    """This process's share of the usable cores when ``processes`` run on the node (torchrun)."""
    return max(1, usable_cores() // max(1, processes))


def split_cores(device: torch.device, cores: int, workers: int | None, decode_s: float,
                forward_s: Callable[[int], float]) -> tuple[int, int]:
    """``(decode workers, forward threads)`` for a process with ``cores`` cores.

    On a CPU, unless ``workers`` is given, the split comes from measured costs: ``decode_s``,
    the seconds one core takes to decode an image, and ``forward_s(threads)``, the seconds per
    image of the forward pass on that many threads (measured with all cores and with one;
    other counts follow Amdahl's law). Decoding in the process itself (0 workers) costs
    ``decode + forward(cores)`` per image; ``w`` workers give ``min(w / decode, 1 /
    forward(cores - w))`` images per second. The best estimate wins: tiny images (Fashion-MNIST)
    leave every core to the forward pass, photos get workers. On a GPU every core decodes.
    A thread count that shares a core with a worker stalls the OpenMP pool, so the threads
    are the cores the workers leave.
    """
    if device.type != "cpu":
        return (cores if workers is None else workers), torch.get_num_threads()
    if workers is not None:
        return workers, max(1, cores - workers) if workers else cores
    if cores == 1:
        return 0, 1
    rounds = [(forward_s(cores), forward_s(1)) for _ in range(2)]  # interleaved: a busy moment spoils one of each
    full, one = min(r[0] for r in rounds), min(r[1] for r in rounds)
    serial = min(1.0, max(0.0, (full / one - 1 / cores) / (1 - 1 / cores)))

    def forward(threads: int) -> float:
        return one * (serial + (1 - serial) / threads)

    decode_s = max(decode_s, 1e-9)
    rates = {0: 1 / (decode_s + full)} | {w: min(w / decode_s, 1 / forward(cores - w)) for w in range(1, cores)}
    best = max(rates, key=rates.__getitem__)
    return best, (cores - best) if best else cores


def forward_seconds(model, x: torch.Tensor, threads: int, repeats: int = 2) -> float:
    """Seconds per image of ``model`` on batch ``x`` with ``threads`` intra-op threads (the best of ``repeats``)."""
    with num_threads(threads), torch.inference_mode():
        model(x)  # a new thread count starts its pool on the first pass
        return min(_seconds(model, x) for _ in range(repeats)) / len(x)


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


def matches(model, reference, example: torch.Tensor) -> bool:
    """Whether ``model``'s output on ``example`` and on its first image matches ``reference``'s
    (relative error under 1e-3, the tolerance of every compiled form)."""
    with torch.inference_mode():
        expected = reference(example)
        got, one = model(example), model(example[:1])
    scale = float(expected.abs().max()) or 1.0
    return all(out.shape == ref.shape and float((out.float() - ref.float()).abs().max()) <= _COMPILE_TOLERANCE * scale
               for out, ref in ((got, expected), (one, expected[:1])))


def speedup(model, baseline, example: torch.Tensor, rounds: int = 3) -> float:
    """How many times faster ``model`` runs ``example`` than ``baseline``: the best of ``rounds``
    interleaved passes of each (a busy moment spoils one pass, not one side), after a warm-up."""
    with torch.inference_mode():
        model(example), baseline(example)
        mine, theirs = [], []
        for _ in range(rounds):
            mine.append(_seconds(model, example))
            theirs.append(_seconds(baseline, example))
    return min(theirs) / max(min(mine), 1e-12)


def faster(model, baseline, example: torch.Tensor) -> bool:
    """Whether ``model`` is measured faster than ``baseline`` on ``example``."""
    return speedup(model, baseline, example) > 1.0
