"""Stage three from stored activations: train the last blocks without decoding an image again.

With ``unfreeze=last:N`` every block before the N trained ones is frozen, so what it gives
each image is the same on every epoch. ``fc finetune --from-activations`` computes it once:
the input of the first trained block (the spatial map, float16) for every train and selection
image, and for each of the ``--augment-views`` views the cache holds, stored in the cache file
as ``/activations/BLOCK-CxHxW-float16/<part>`` (:func:`featurecache.store.write_activations`: the file
is rewritten under a temporary name, so a killed run leaves the cache as it was). Epochs then
run the trained blocks and the head (the backbone's tail, split off with ``torch.fx``) on those
maps; the network, checkpoints and export are the whole network, as without the option.

- Augmentation: with ``--augment`` other than ``none`` and a cache extracted with
  ``--augment-views K``, each epoch takes one of the K stored views of every train image,
  drawn by ``(seed, epoch)``; the views are drawn with the cache's policy, seed and K (the
  same kind of views as the stored view features, not the same pixels). Without views in the
  cache the train images are used as they are, and a warning says so.
- Batch norm: the frozen blocks' batch norm is frozen by construction (their output is
  stored). In the trained blocks ``--bn`` applies as without the option: ``frozen`` keeps the
  pretrained statistics and scales, ``train`` updates them from the batches of stored maps.
- Precision: the maps are multiplied by a power of two (recorded in the group's ``meta``) that
  brings them into float16's range whatever their magnitude, and divided by it when read.
- Memory and disk: the maps of every part are held in memory while training. A run refuses
  in one line, before computing anything, when they would exceed ``max_memory`` (default:
  half the available memory) or the free disk space (the cache file's size plus theirs).
- A dataset of the stored activations that is missing, of another shape or unreadable is
  named in one warning line, and the activations are stored again.
- Choosing the mode: without ``--from-activations`` or ``--from-images``, ``fc finetune
  --unfreeze last:N`` times a few batches both ways (:class:`Estimate`) and trains from stored
  activations when the whole run, storing included, is measured to take at most 1/:data:`WIN` of
  the time from images and to save at least :data:`WORTH` seconds; it says which it chose and why.
  A configuration already trained or checkpointed in one mode keeps that mode.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from .. import runtime, store
from ..data.images import ImageTensors, Views, augment_seed, image_loader, normalize_batch
from ..errors import CacheError, FinetuneError, plural
from ..extraction.distributed import is_primary
from ..files import write_json
from ..metrics import classification_metrics
from ..progress import Progress
from . import parallel
from .blocks import named_blocks
from .network import FeatureColumns, Network

ACTIVATIONS_FILE = "activations.json"  # in the fine-tuning folder: what was stored, its size and cost
STORE_BATCH = 64  # images per forward pass of the frozen blocks while storing
SCALE_TO = 256.0  # the largest value of the first batch, once stored (float16 reaches 65504)
WIN = 1.25  # the automatic choice stores activations only when the run is estimated this many times faster
WORTH = 10.0  # ... and at least this many seconds shorter: storing a few seconds' worth is not worth a cache write


def _log(message: str) -> None:
    """A line on stderr, from the first torchrun rank only."""
    if is_primary():
        print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- splitting the backbone


def first_trained_block(model: nn.Module, unfreeze: str) -> str:
    """The name of the first block ``unfreeze`` (``last:N``) trains; a FinetuneError for any other value."""
    name, _, count = unfreeze.partition(":")
    if name != "last":
        raise FinetuneError(f"--from-activations trains the last blocks only: use --unfreeze last:N, not {unfreeze}")
    blocks = list(named_blocks(model))
    if int(count) >= len(blocks):
        raise FinetuneError(f"--unfreeze {unfreeze} trains every block of the backbone ({len(blocks)}): "
                            "there is nothing frozen to store; drop --from-activations")
    return blocks[-int(count)]


class _Reached(Exception):
    """Raised by the hook on the first trained block: carries its input and ends the forward pass."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value


@contextlib.contextmanager
def _stop_at(module: nn.Module):
    def hook(_module, args):
        raise _Reached(args[0])

    handle = module.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def block_input(model: nn.Module, block: str, x: torch.Tensor) -> torch.Tensor:
    """The input of ``block`` for images ``x``: the frozen blocks only are run."""
    with _stop_at(model.get_submodule(block)):
        try:
            model(x)
        except _Reached as reached:
            return reached.value
    raise FinetuneError(f"the forward pass of the backbone never reaches {block}")


class _BlockTracer(fx.Tracer):
    def __init__(self, block: str):
        super().__init__()
        self.block = block

    def is_leaf_module(self, module: nn.Module, name: str) -> bool:
        return name == self.block or super().is_leaf_module(module, name)


def tail(model: nn.Module, block: str) -> fx.GraphModule:
    """The backbone from ``block`` on, as a module of the block's input; it shares ``model``'s modules
    and parameters, so training it trains ``model``. A FinetuneError when the rest of the network
    reads anything computed before ``block`` but its input (a skip connection around it)."""
    try:
        graph = _BlockTracer(block).trace(model)
    except Exception as exc:  # fx cannot trace every model
        message = f"--from-activations cannot split this backbone at {block}: {exc}"
        raise FinetuneError(message.splitlines()[0]) from None
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == block]
    if len(calls) != 1 or len(calls[0].args) != 1 or calls[0].kwargs or not isinstance(calls[0].args[0], fx.Node):
        raise FinetuneError(f"--from-activations cannot split this backbone at {block}: it is not called once "
                            "on one tensor")
    split = calls[0]
    out = fx.Graph()
    env = {split.args[0]: out.placeholder("activation")}
    nodes = list(graph.nodes)
    for node in nodes[nodes.index(split):]:
        for needed in node.all_input_nodes:
            if needed not in env and needed.op == "get_attr":
                env[needed] = out.node_copy(needed)
            elif needed not in env:
                raise FinetuneError(f"--from-activations cannot split this backbone at {block}: {node.name} also "
                                    f"reads {needed.name}, computed before it")
        env[node] = out.node_copy(node, lambda n: env[n])
    return fx.GraphModule(model, out)


# --------------------------------------------------------------------------- what is stored


@dataclass(frozen=True)
class Plan:
    """The activations of one job: the block, the map's shape, the parts and their rows."""

    block: str
    shape: tuple[int, int, int]
    parts: dict  # part (a split or store.VIEWS) -> rows
    views: dict  # the cache's --augment-views {"k", "policy", "seed"}, or {}

    @property
    def name(self) -> str:
        return f"{self.block}-{'x'.join(str(d) for d in self.shape)}-{np.dtype(store.ACTIVATION_DTYPE).name}"

    @property
    def per_image(self) -> int:
        return store.activation_bytes(self.shape, 1)

    @property
    def rows(self) -> int:
        return sum(self.parts.values())

    @property
    def bytes(self) -> int:
        return store.activation_bytes(self.shape, self.rows)

    def shape_of(self, part: str) -> tuple[int, ...]:
        return (self.parts[part], *self.shape)

    def describe(self) -> dict:
        return {"name": self.name, "block": self.block, "shape": list(self.shape), "parts": self.parts,
                "views": self.views, "bytes_per_image": self.per_image, "bytes": self.bytes}


def _seconds(t: float) -> str:
    return f"{t:.1f} s" if t < 10 else f"{t:,.0f} s"


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def room_problem(plan: Plan, cache: Path, max_memory: str | None, stored: bool) -> str | None:
    """Why the activations do not fit: more than ``max_memory``, or (to be stored) more than the free disk."""
    from ..sweep.halving import memory_cap  # here: the module stays importable without the heads' packages

    what = f"the activations of {plan.name} take {_size(plan.bytes)} ({plan.per_image:,} bytes x {plan.rows:,} rows)"
    cap = memory_cap(max_memory)
    if plan.bytes > cap:
        return (f"{what}, more than --max-memory {_size(cap)}: give a larger --max-memory, "
                "train fewer blocks, or drop --from-activations")
    free = shutil.disk_usage(cache.parent).free
    if not stored and plan.bytes + cache.stat().st_size > free:
        return (f"{what} and the cache file is copied while they are written: "
                f"{_size(free)} free on {cache.parent} is not enough")
    return None


def check_room(plan: Plan, cache: Path, max_memory: str | None, stored: bool) -> None:
    """A one-line FinetuneError when the activations do not fit (:func:`room_problem`)."""
    problem = room_problem(plan, cache, max_memory, stored)
    if problem:
        raise FinetuneError(problem)


def plan_of(job, block: str, shape: tuple[int, ...], n_train: int, n_selection: int) -> Plan:
    """The activations ``job`` stores for ``block``, whose input map has ``shape`` (C, H, W)."""
    views = dict(job.cache_meta["config"].get("augment_views") or {})
    parts = {"train": n_train, job.split: n_selection}
    if views:
        parts[store.VIEWS] = int(views["k"]) * n_train
    return Plan(block, tuple(int(d) for d in shape), parts, views)


def unsuited(job, backbone) -> str | None:
    """Why ``job`` cannot train from stored activations (None when it can); a FinetuneError
    when ``unfreeze`` is not ``last:N`` with a frozen part."""
    if job.cache_meta["config"].get("tta") or len(backbone.parts) > 1 or isinstance(backbone.model, FeatureColumns):
        return ("--from-activations trains from the input of one block: it needs a cache extracted without --tta and "
                f"a head on the penultimate features, not on stored layers (this run's head "
                f"{job.head_meta['head']} reads {job.loaded.meta.get('features')})")
    return None


# --------------------------------------------------------------------------- choosing the mode


@dataclass(frozen=True)
class Estimate:
    """The seconds a run would take from images and from stored activations, from a few timed batches.

    ``live`` and ``tail`` are the median seconds of one training batch (forward and backward)
    from images, loading and decoding included, and from stored maps; ``store`` the seconds to
    store every map (0 when they are stored), estimated from what a batch from images spends
    beyond the trained part. The selection split's evaluations are left out: they favour the
    stored activations too, so the estimate errs towards images.
    """

    epochs: int
    batches: int  # training batches per epoch
    live: float
    tail: float
    store: float
    stored: bool
    startup: float = 0.0  # seconds an epoch's image loader takes to give its first batch, beyond a batch
    room: str | None = None  # why the activations do not fit (memory or disk), if they do not

    @property
    def from_images(self) -> float:
        return self.epochs * (self.startup + self.batches * self.live)

    @property
    def from_activations(self) -> float:
        return self.store + self.epochs * self.batches * self.tail

    @property
    def wins(self) -> bool:
        return (self.room is None and self.from_activations * WIN <= self.from_images
                and self.from_images - self.from_activations >= WORTH)

    def describe(self) -> dict:
        return {"epochs": self.epochs, "batches_per_epoch": self.batches, "seconds_per_batch_from_images": self.live,
                "seconds_per_batch_from_activations": self.tail, "loader_startup_seconds": self.startup,
                "store_seconds": self.store,
                "already_stored": self.stored, "estimate_from_images": self.from_images,
                "estimate_from_activations": self.from_activations, "room": self.room,
                "chosen": "activations" if self.wins else "images"}

    def sentence(self) -> str:
        store_part = "already stored" if self.stored else f"storing them once about {_seconds(self.store)}"
        head = (f"{plural(self.epochs, 'epoch')} of {plural(self.batches, 'batch')}: from images about "
                f"{_seconds(self.from_images)} ({self.live:.3f} s a batch), from stored activations about "
                f"{_seconds(self.from_activations)} ({self.tail:.3f} s a batch, {store_part})")
        if self.wins:
            return f"training from stored activations, measured faster: {head}; --from-images trains from images"
        why = self.room or (f"not {WIN:g}x faster" if self.from_activations * WIN > self.from_images
                            else f"saves under {WORTH:g} s")
        return f"training from images ({why}): {head}; --from-activations forces it"


# --------------------------------------------------------------------------- the trainer


def trainer_class(base: type) -> type:
    """The trainer ``base`` (:class:`featurecache.finetuning.trainer._Trainer`) with :class:`FromActivations`."""
    return type("ActivationTrainer", (FromActivations, base), {})


class FromActivations:
    """Makes a trainer's epochs and selection-split evaluations run the backbone's tail on stored
    activations; the held-out split and the export use the whole network on images."""

    def __init__(self, job, backbone, head: nn.Module):
        problem = unsuited(job, backbone)
        if problem:
            raise FinetuneError(problem)
        block = first_trained_block(backbone.model, job.settings.unfreeze)
        super().__init__(job, backbone, head)
        self.block = block
        self.tail = Network(tail(self.net.backbone, block), self.net.head)
        self.cache = Path(job.cache_meta["path"])
        self.plan = self._plan()
        started = time.perf_counter()
        self.acts = self._load()
        self.views_used = bool(self.plan.views) and job.settings.augment != "none"
        if job.settings.augment != "none" and not self.plan.views:
            _log(f"warning: {self.cache.name} holds no augmented views (fc extract --augment-views K): training from "
                 "activations without augmentation")
        described = {**self.plan.describe(), "store_seconds": self.store_seconds,
                     "load_seconds": time.perf_counter() - started - self.store_seconds}
        job.group.lead(lambda: write_json(job.out / ACTIVATIONS_FILE, described))

    # ----------------------------------------------------------------------- storing

    def _plan(self) -> Plan:
        crop = self.pre.crop
        self.net.eval()
        with torch.inference_mode():
            probe = block_input(self.net.backbone, self.block, torch.zeros(1, 3, crop, crop, device=self.dev))
        return plan_of(self.job, self.block, probe.shape[1:], len(self.train_labels), len(self.val_labels))

    def _load(self) -> dict[str, torch.Tensor]:
        """The stored activations of every part. Under torchrun the first rank stores them when missing or
        damaged, while the others wait; then they read them (every rank holds them all)."""
        acts: dict = {}

        def first_rank() -> float:
            acts.update(self._load_here())
            return self.store_seconds

        self.store_seconds = self.job.group.lead(first_rank)
        return acts or self._read()

    def _load_here(self) -> dict[str, torch.Tensor]:
        """The stored activations of every part (storing them first when missing or damaged)."""
        self.store_seconds = 0.0
        stored = store.has_activations(self.cache, self.plan.name)
        check_room(self.plan, self.cache, self.job.max_memory, stored)
        if stored:
            try:
                return self._read()
            except CacheError as exc:
                _log(f"warning: {exc}; storing them again")
        started = time.perf_counter()
        self.meta = self.plan.describe()
        store.write_activations(self.cache, self.plan.name, {p: self.plan.shape_of(p) for p in self.plan.parts},
                                self.meta, self._fill)
        self.store_seconds = time.perf_counter() - started
        if self.job.progress:
            _log(f"stored the activations {self.plan.name} of {self.plan.rows:,} images "
                 f"({_size(self.plan.bytes)}, {self.plan.per_image:,} bytes each) in {self.store_seconds:.1f} s")
        return self._read()

    def _read(self) -> dict[str, torch.Tensor]:
        scale = store.activation_meta(self.cache, self.plan.name).get("scale")
        if not scale:
            raise CacheError(f"{self.cache.name}: stored activations {self.plan.name} have no scale")
        self.scale = float(scale)
        return {part: torch.from_numpy(store.read_activations(self.cache, self.plan.name, part,
                                                              self.plan.shape_of(part)))
                for part in self.plan.parts}

    def _images(self, part: str) -> tuple[ImageTensors, int]:
        """The images of one part and the index of its first row."""
        images, labels = self.images("train" if part == store.VIEWS else part)
        if part != store.VIEWS:
            return images, 0
        data, v, n = images.dataset, self.plan.views, len(labels)
        views = Views(first=n, records=tuple(range(n)), k=int(v["k"]), seed=int(v["seed"]), policy=v["policy"])
        return ImageTensors(data, np.arange(n, n + views.rows), self.pre, self.max_pixels, views), n

    def _fill(self, put) -> None:
        """Run the frozen blocks over every image of every part and ``put`` the maps."""
        self.net.eval()
        for part in self.plan.parts:
            images, first = self._images(part)
            loader = image_loader(images, STORE_BATCH, self.job.workers, self.dev)
            with torch.inference_mode(), Progress(len(images), f"store {part}", unit="images",
                                                  enabled=self.job.progress) as bar:
                for index, batch, reasons in loader:
                    bad = [r for r in reasons if r]
                    if bad:
                        item = int(index[[bool(r) for r in reasons].index(True)])
                        path = images.dataset.records[images.views.locate(item)[0] if first else item].path
                        raise FinetuneError(f"{path}: {bad[0]} (it was readable at extraction)")
                    x = normalize_batch(batch.to(self.dev, non_blocking=True), self.pre)
                    with runtime.autocast(self.dev, self.s.precision):
                        maps = block_input(self.net.backbone, self.block, x)
                    rows = index.numpy() - first
                    if not np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
                        raise FinetuneError("the images came out of order while storing activations")
                    put(part, int(rows[0]), self._scaled(maps.float().cpu().numpy()))
                    bar.update(len(index))

    def _scaled(self, maps: np.ndarray) -> np.ndarray:
        """``maps`` times the power of two that brings the first batch's largest value to
        :data:`SCALE_TO` (exact, and float16 keeps its 11 bits of precision for maps of any
        magnitude); a FinetuneError when a value would not fit float16."""
        if "scale" not in self.meta:
            top = float(np.abs(maps).max())
            self.meta["scale"] = 2.0 ** round(np.log2(SCALE_TO / top)) if top > 0 else 1.0
        scaled = maps * self.meta["scale"]
        if not np.isfinite(scaled).all() or np.abs(scaled).max() >= np.finfo(store.ACTIVATION_DTYPE).max:
            raise FinetuneError(f"the activations {self.plan.name} do not fit their type: drop --from-activations")
        return scaled

    # ----------------------------------------------------------------------- training and evaluation

    def train_loader(self, epoch: int, batches: list[list[int]]):
        """``(train rows, stored maps, no reasons)`` for each of ``batches``; with views, the view of each
        image drawn for ``epoch``."""
        n = len(self.train_labels)
        source = self.acts["train"]
        rows = torch.arange(n)
        if self.views_used:
            k = int(self.plan.views["k"])
            draw = torch.Generator().manual_seed(augment_seed(self.s.seed, epoch, 0))
            rows = torch.randint(k, (n,), generator=draw) * n + rows
            source = self.acts[store.VIEWS]
        for batch in batches:
            index = torch.as_tensor(batch, dtype=torch.int64)
            yield index, source[rows[index]], ("",) * len(index)

    def inputs(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.dev, non_blocking=True).float().div(self.scale)  # never in place: it may be the store
        return x.contiguous(memory_format=torch.channels_last)

    def training_module(self) -> nn.Module:
        return self.tail

    def evaluate(self, images: ImageTensors, labels: np.ndarray, desc: str) -> dict:
        """On the selection split, from its stored maps (each rank its share, as :meth:`_Trainer.evaluate`)."""
        if images is not self.val_images:
            return super().evaluate(images, labels, desc)
        self.net.eval()
        maps = self.acts[self.job.split]
        probs = np.zeros((len(maps), len(self.job.classes)), dtype=np.float32)
        first, stop = parallel.span(len(maps), self.group)
        with torch.inference_mode():
            for start in range(first, stop, self.s.batch_size):
                x = self.inputs(maps[start:min(stop, start + self.s.batch_size)])
                with runtime.autocast(self.dev, self.s.precision):
                    logits = self.tail(x)
                probs[start:start + len(x)] = torch.softmax(logits.float(), dim=1).cpu().numpy()
        return classification_metrics(labels, parallel.all_sum(probs, self.group), self.job.classes)


def stored_summary(folder: str | Path) -> dict:
    """What ``activations.json`` of a fine-tuning folder records ({} when it trained from images)."""
    path = Path(folder) / ACTIVATIONS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}

