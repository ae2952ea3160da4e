"""Stage three under torchrun: DistributedDataParallel that trains as one process would.

``torchrun --nproc-per-node N -m featurecache finetune RUN`` starts N ranks that join the
job's process group through :class:`featurecache.extraction.distributed.Group` (NCCL on GPUs,
gloo on CPUs, and a gloo group of its own for the small messages). What makes N ranks train
the network one process trains:

- ``--batch-size`` is the global batch. Every epoch has the one seeded order of the train
  images; each global batch of it is split into N contiguous shares (:func:`share`: sizes
  differ by at most one, a short last batch may leave a rank with none), and each rank
  decodes, augments and runs its share only. Augmentation is seeded per image (seed, epoch,
  index), so an image gets the same pixels on whichever rank takes it.
- The loss of a share is its sum of cross-entropies times ``N / total``, ``total`` being the
  images of the global batch that decoded on all ranks (:func:`total`); DistributedDataParallel
  averages the gradients over the N ranks, which makes the gradient the mean over the global
  batch: the gradient of one process. So the learning rate needs no change with N.
- A rank whose share is empty still runs the forward and backward pass (on no rows), since
  every rank must take part in the gradients' all-reduce.
- The selection split is evaluated in N contiguous shares; the probabilities are summed over
  the ranks (:func:`all_sum`: each rank's rows and zeros elsewhere, so the sum is exact), and
  every rank computes the same metrics from the same array, so the best epoch and early stopping
  are decided alike everywhere.
- The first rank alone writes: ``config.json``, checkpoints, ``history.json`` and, in the end,
  the export and ``result.json``, which it hands to the other ranks (``Group.lead``: its errors
  too, raised on every rank). Checkpoints hold the unwrapped network (no ``module.`` prefix) and
  the loop's place in global batches and optimizer steps, so any world size resumes them.
- What the train loss sums is folded onto the first rank before each checkpoint
  (:func:`fold`), so that a checkpoint holds the epoch's global sums.
- Every ``nn.Dropout`` (MobileNetV2's classifier has one, the ``mlp`` head may) draws the mask of
  the whole global batch from the random state the ranks share and applies the rank's rows
  (:func:`global_dropout`): one process's masks, and the ranks' random states stay equal, which is
  what a checkpoint of the first rank's needs to resume on any rank.

Not equal to one process: ``--bn train`` (each rank normalizes with the statistics of its share;
the running statistics follow the first rank's) and other dropout layers (``Dropout2d``, ...).
With the default ``--bn frozen``, N ranks give one process's weights up to the order of
floating-point sums (tests/test_finetune_torchrun.py measures it: 6e-8 relative for 2 ranks).
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch
from torch import nn

from ..errors import UsageError
from ..extraction.distributed import Group


def check_batch(batch_size: int, group: Group) -> None:
    """A UsageError when the global batch has fewer images than there are ranks."""
    if batch_size < group.world:
        raise UsageError(f"--batch-size {batch_size} is the global batch, split across the {group.world} processes: "
                         f"give at least {group.world}")


def span(n: int, group: Group) -> tuple[int, int]:
    """``(start, stop)`` of this rank's contiguous share of ``n`` rows."""
    return group.rank * n // group.world, (group.rank + 1) * n // group.world


def share(batch: list[int], group: Group) -> list[int]:
    """This rank's contiguous share of one global batch."""
    start, stop = span(len(batch), group)
    return batch[start:stop]


def wrap(module: nn.Module, device: torch.device, group: Group, bn: str) -> nn.Module:
    """``module`` under DistributedDataParallel when there are several ranks; itself otherwise.

    Buffers (batch norm statistics) are broadcast from the first rank only with ``--bn train``:
    frozen, they never change."""
    if group.control is None:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=bn == "train")


def syncing(module: nn.Module, sync: bool):
    """A context for one forward and backward pass: without the gradients' all-reduce unless ``sync``
    (the last batch of an optimizer step under ``--accumulate``)."""
    if sync or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def _reduce(values: torch.Tensor, group: Group) -> torch.Tensor:
    if group.control is not None:
        import torch.distributed as dist

        dist.all_reduce(values, group=group.control)
    return values


def place(count: int, group: Group) -> tuple[int, int]:
    """``(start, total)``: where this rank's ``count`` rows start among all ranks' rows, and how many
    rows all ranks have (the global batch's)."""
    counts = torch.zeros(group.world, dtype=torch.int64)
    counts[group.rank] = count
    counts = _reduce(counts, group)
    return int(counts[:group.rank].sum()), int(counts.sum())


@contextlib.contextmanager
def global_dropout(module: nn.Module, start: int, count: int, total: int):
    """While the block runs, every ``nn.Dropout`` of ``module`` in training draws the mask of the whole
    global batch (``total`` rows, from the random state all ranks share) and applies this rank's
    ``count`` rows from ``start`` on: one process's masks, split across the ranks, and the ranks'
    random states stay equal. A layer that sees other rows than the images (a network that runs each
    image with its flip, ``--tta``) draws a mask of its own input instead, per rank."""
    layers = [m for m in module.modules() if type(m) is nn.Dropout]
    for layer in layers:
        layer.forward = functools.partial(_dropout, layer, start, count, total)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


def _dropout(layer: nn.Dropout, start: int, count: int, total: int, x: torch.Tensor) -> torch.Tensor:
    if not layer.training or layer.p == 0:
        return x
    if len(x) != count:
        return nn.functional.dropout(x, layer.p, training=True)
    keep = torch.empty((total, *x.shape[1:]), dtype=x.dtype, device=x.device).bernoulli_(1 - layer.p)
    return x * keep[start:start + len(x)] / (1 - layer.p)


def all_sum(array: np.ndarray, group: Group) -> np.ndarray:
    """``array`` summed over the ranks (on the CPU, through the gloo group)."""
    if group.control is None:
        return array
    return _reduce(torch.from_numpy(np.ascontiguousarray(array)), group).numpy()


def fold(loss_sum: float, seen: int, group: Group) -> tuple[float, int]:
    """The train loss's sum and count over the ranks, for the first rank to hold; 0 for the others, so
    that the ranks' values still add up to the global ones."""
    summed = _reduce(torch.tensor([loss_sum, float(seen)], dtype=torch.float64), group)
    return (float(summed[0]), int(summed[1])) if group.rank == 0 else (0.0, 0)
