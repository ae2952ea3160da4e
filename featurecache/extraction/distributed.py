"""Stage one in several processes: torchrun ranks and ``--shard I/N`` slices.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) every rank joins the job's
process group (``torch.distributed``: NCCL on GPUs, gloo on CPUs) and a gloo group of its
own for the few small messages stage one sends: the settings every rank checks, the rows
left to do, errors and the result. The first rank holds the cache entry's lock for the
job, the ranks share the rows left between them, and after a barrier the first rank
writes the cache.

``--shard I/N`` is for schedulers without torchrun (Slurm job arrays, Kubernetes indexed
jobs): process I takes rows ``[I*n/N, (I+1)*n/N)`` of the records and coordinates through
the file system alone (the shards, keyed by row range, and the entry's lock).

Without either, stage one is a single process.

Stage three joins the same groups under torchrun (:mod:`featurecache.finetuning.parallel`): it uses
:class:`Group`'s torchrun mode, its messages and :func:`sigterm_exits`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import FeatureCacheError, UsageError

# The ranks but the first wait for it while it waits for the entry's lock, which takes as
# long as another run of the same cache does: as long as a single run would wait.
CONTROL_TIMEOUT = datetime.timedelta(days=7)
_PREFIX_WORD = {"torchrun": "rank", "shard": "shard"}  # of the progress lines, by mode


def parse_shard(spec: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``; a UsageError otherwise."""
    index, sep, count = str(spec).partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = -1
    if not sep or not 0 <= i < n:
        raise UsageError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4), not {spec!r}")
    return i, n


def is_primary() -> bool:
    """Whether this process speaks for the job: not a torchrun rank other than the first."""
    return os.environ.get("RANK", "0") == "0"


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass
class Group:
    """This process's part of a stage-one job: ``mode`` is single, torchrun or shard."""

    mode: str = "single"
    rank: int = 0
    world: int = 1
    local_rank: int | None = None
    local_world: int = 1
    control: object = None  # the gloo group of the ranks' messages
    created: bool = False  # whether this process started torch.distributed (and ends it)

    @classmethod
    def from_environment(cls, shard: str | None = None) -> Group:
        """torchrun's variables, or ``--shard I/N``, or a single process."""
        world = _env_int("WORLD_SIZE", 1)
        if world > 1:
            if shard is not None:
                raise UsageError("--shard is for launches without torchrun; under torchrun every rank takes "
                                 "its part by itself")
            return cls("torchrun", _env_int("RANK", 0), world, _env_int("LOCAL_RANK", 0),
                       _env_int("LOCAL_WORLD_SIZE", 1))
        if shard is not None:
            return cls("shard", *parse_shard(shard))
        return cls()

    @property
    def prefix(self) -> str:
        """What starts this process's progress lines: ``[rank R/W] `` or ``[shard I/N] ``."""
        word = _PREFIX_WORD.get(self.mode)
        return f"[{word} {self.rank}/{self.world}] " if word else ""

    def connect(self, device) -> None:
        """Join the job's process group (NCCL on a GPU, gloo on a CPU) and the gloo group for messages."""
        if self.mode != "torchrun":
            return
        import torch.distributed as dist

        if not dist.is_initialized():
            if device.type == "cuda":
                import torch

                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=CONTROL_TIMEOUT)
            self.created = True
        self.control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)

    def close(self) -> None:
        if self.control is None:
            return
        import torch.distributed as dist

        dist.destroy_process_group(self.control)
        self.control = None
        if self.created:
            dist.destroy_process_group()

    # ---------------------------------------------------------------- who does which rows

    def rows(self, n: int) -> np.ndarray:
        """This process's slice of ``n`` records: contiguous, the same for any run with this I/N."""
        return np.arange(self.rank * n // self.world, (self.rank + 1) * n // self.world, dtype=np.int64)

    def share(self, pending: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of the rows left (every rank is given the same ``pending``)."""
        m = len(pending)
        return pending[self.rank * m // self.world:(self.rank + 1) * m // self.world]

    # ---------------------------------------------------------------- messages between ranks

    def gather(self, value) -> list:
        """``value`` of every rank, in rank order (``[value]`` outside torchrun)."""
        if self.control is None:
            return [value]
        import torch.distributed as dist

        out: list = [None] * self.world
        dist.all_gather_object(out, value, group=self.control)
        return out

    def agree(self, settings: dict) -> None:
        """Every rank raises the same one-line UsageError when the ranks' ``settings`` differ."""
        every = self.gather(settings)
        for rank, other in enumerate(every):
            differ = sorted(k for k in set(other) | set(every[0]) if other.get(k) != every[0].get(k))
            if differ:
                name = differ[0]
                raise UsageError(f"the ranks were started with different settings ({', '.join(differ)}): rank {rank} "
                                 f"has {name} {_short(other.get(name))}, rank 0 {_short(every[0].get(name))}; "
                                 "start every rank with the same options")

    def lead(self, work: Callable[[], object]):
        """The first rank runs ``work``; every rank gets its result, or raises its error.

        Outside torchrun, ``work()``. An error of featurecache's on the first rank is raised
        on every rank with the same class and message.
        """
        if self.control is None:
            return work()
        import torch.distributed as dist

        box: list = [None]
        failure = None
        if self.rank == 0:
            try:
                box[0] = ("ok", work())
            except FeatureCacheError as exc:
                failure = exc
                box[0] = ("error", type(exc), str(exc))
        dist.broadcast_object_list(box, src=0, group=self.control)
        if failure is not None:
            raise failure
        if box[0][0] == "error":
            raise box[0][1](box[0][2]) from None
        return box[0][1]


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """Turn SIGTERM into ``SystemExit`` while the block runs, so that its ``finally`` and
    ``__exit__`` steps run: torchrun stops a job's other ranks with SIGTERM when one of them
    fails, and a scheduler does the same before it kills a job. Only the main thread can."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
