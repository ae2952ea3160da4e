"""The forward pass compiled ahead of time: torch.export with AOTInductor, paid once per machine.

An artifact is a ``.pt2`` package in ``CACHE_DIR/compiled/`` named by the hash of what it
depends on (:func:`artifact_fields`: torch's version, the CPU's instruction sets, the backbone,
its weights and read-out, the batch, the input shape and the precision), with a JSON beside it
that says what the hash holds and how long the compile took. A package is written under a
temporary name and renamed into place, so concurrent runs and a crash never leave half of one;
a package that does not load is removed and compiled again (or the frozen graph runs).

Also what the CPU can do in bf16 (:func:`bf16_capable`) and how close two sets of features are
(:func:`min_cosine`), for the bf16 gate of the stage.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
import uuid
import warnings
from pathlib import Path

import torch

from ..errors import FeatureCacheWarning
from ..files import write_json

FOLDER = "compiled"
FORMAT = 1  # of the artifacts: a new format compiles again
# Before any compile on this machine is recorded, a compile is taken to cost this many seconds
# (MobileNetV2 on 2 AVX-512 cores: 10 to 40 s, depending on the load).
DEFAULT_COMPILE_S = 60.0
# The instruction sets that change what Inductor and oneDNN generate.
_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
          "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def cpu_flags() -> list[str]:
    """The CPU's instruction sets that matter to compiled code (from /proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in _FLAGS if f in have]
    except OSError:
        pass
    return []


def cpu_capability() -> str:
    """torch's name for the CPU's vector width (``AVX512``, ``AVX2``, ``DEFAULT``)."""
    with contextlib.suppress(Exception):
        return str(torch.backends.cpu.get_cpu_capability())
    return "unknown"


def bf16_capable(flags: list[str] | None = None) -> bool:
    """Whether the CPU has bf16 dot products (AVX512-BF16 or AMX): without them bf16 is emulated and slow."""
    flags = cpu_flags() if flags is None else flags
    return "avx512_bf16" in flags or "amx_bf16" in flags


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The lowest cosine between matching rows of ``a`` and ``b``."""
    return float(torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=1, eps=1e-12).min())


def artifact_fields(model_fields: dict, batch: int, shape: tuple[int, ...], precision: str) -> dict:
    """What an artifact depends on: ``model_fields`` (backbone, weights, read-out), the batch,
    the shape of one input and the precision, on this torch and this CPU."""
    return {"format": FORMAT, "torch": torch.__version__, "cpu": cpu_capability(), "flags": cpu_flags(),
            **model_fields, "batch": int(batch), "shape": [int(s) for s in shape], "precision": precision}


def artifact_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


class Artifacts:
    """The folder of compiled forward passes (``CACHE_DIR/compiled``)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.compiles = 0  # compiles this object made (tests count them)

    def package(self, key: str) -> Path:
        return self.folder / f"{key}.pt2"

    def load(self, key: str):
        """The compiled model of ``key``; None when there is none or it does not load (it is then removed)."""
        path = self.package(key)
        if not path.is_file():
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch._inductor.aoti_load_package(str(path))
        except Exception as exc:  # a damaged or foreign package: made again
            warnings.warn(FeatureCacheWarning(f"compiled forward pass {path} does not load ({type(exc).__name__}); "
                                              "removing it"), stacklevel=2)
            self.discard(key)
            return None

    def discard(self, key: str) -> None:
        for path in (self.package(key), self.package(key).with_suffix(".json")):
            path.unlink(missing_ok=True)

    def compile(self, model: torch.nn.Module, example: torch.Tensor, key: str, fields: dict):
        """Export ``model`` on ``example`` (its batch is the artifact's), compile it with AOTInductor
        (batch norm folded, weights frozen) into the folder, and load it: ``(compiled, seconds)``."""
        import torch._inductor.config as inductor

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.package(key)
        tmp = self.folder / f".{key}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp.pt2"  # AOTInductor wants .pt2
        start = time.perf_counter()
        try:
            with (warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad(),
                  inductor.patch(freezing=True)):
                warnings.simplefilter("ignore")
                program = torch.export.export(model, (example.clone(),))  # not an inference tensor
                torch._inductor.aoti_compile_and_package(program, package_path=str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        seconds = time.perf_counter() - start
        self.compiles += 1
        write_json(path.with_suffix(".json"), {**fields, "compile_seconds": round(seconds, 2),
                                               "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
        return self.load(key), seconds

    def compile_seconds(self) -> float:
        """What a compile is expected to cost here: the median of those recorded, else :data:`DEFAULT_COMPILE_S`."""
        recorded = []
        for path in self.folder.glob("*.json") if self.folder.is_dir() else ():
            with contextlib.suppress(Exception):
                recorded.append(float(json.loads(path.read_text())["compile_seconds"]))
        return sorted(recorded)[len(recorded) // 2] if recorded else DEFAULT_COMPILE_S


class Padded:
    """A compiled model tied to its batch: a smaller batch (the last one, or one with unreadable
    images) is padded with zeros to it and the extra rows dropped."""

    def __init__(self, compiled, batch: int):
        self.compiled, self.batch = compiled, batch

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        if n > self.batch:
            return torch.cat([self(x[i:i + self.batch]) for i in range(0, n, self.batch)])
        if n == self.batch:
            return self.compiled(x)
        pad = x.new_zeros((self.batch - n, *x.shape[1:])).contiguous(memory_format=torch.channels_last)
        full = torch.cat([x, pad]).contiguous(memory_format=torch.channels_last)
        return self.compiled(full)[:n]
