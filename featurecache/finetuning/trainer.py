"""Stage three: fine-tune the backbone together with the head a stage-two run selected.

The network is assembled from the run alone (:mod:`featurecache.finetuning.network`): at step 0 it
predicts what the head predicted on the cached features. That is measured on the selection
split before any update and reported as ``start_accuracy`` next to the head's recorded
``head_accuracy`` (LP-FT: fine-tuning starts from the best linear probe, not from a random
head that would damage the pretrained features).

Output, content-addressed under the run directory::

    <run_dir>/finetune/<hash>/
        config.json        what was asked, the run and head it starts from
        last.pt            model, optimizer, scheduler, scaler, RNG, epoch and batch (for --resume);
                           written after every epoch and every ``checkpoint_every`` optimizer steps
        best.pt            the weights of the best epoch on the selection split (epoch 0: the head)
        history.json       per epoch: train_loss, val_loss, val_accuracy, seconds, lr
        model.safetensors  the best epoch's network as plain tensors; its sha256 is in result.json
        model.pt           TorchScript, uint8 N x 3 x crop x crop -> class probabilities, with the class
                           names and preprocessing as JSON in its extra file ``featurecache.json``;
                           its sha256 is in result.json
        result.json        written last: the fine-tuning is complete; a finished folder whose
                           model files no longer have their recorded sha256 is trained again

``last.pt`` and ``best.pt`` are private to the run and are read with
``torch.load(weights_only=True)``, which never unpickles arbitrary objects.

Under torchrun the ranks train with DistributedDataParallel on shares of every global batch and the
first rank alone writes (:mod:`featurecache.finetuning.parallel`); the folder, the checkpoints and
the result are those of one process.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import runtime, store
from ..data.images import AUGMENTS, ImageTensors, augment_seed, image_loader, normalize_batch
from ..data.preprocess import Preprocess
from ..data.sources import Dataset, Record, reopen
from ..errors import FinetuneError, UsageError, suggest
from ..extraction import distributed
from ..files import atomic_write, require_space, sha256_file, write_json
from ..metrics import classification_metrics, summary
from ..progress import Progress
from ..stages import takes
from ..sweep.calibration import apply_temperature, fit_temperature
from . import activations, parallel
from .blocks import named_blocks
from .network import (
    CONFIG_FILE,
    FINETUNE_DIR,
    HISTORY_FILE,
    MODEL_FILE,
    RESULT_FILE,
    WEIGHTS_FILE,
    Network,
    export,
    finetune_problem,
    head_module,
    load_run_head,
    run_backbone,
    save_weights,
)

LAST_FILE = "last.pt"
BEST_FILE = "best.pt"


# --------------------------------------------------------------------------- images


def cache_images(cache_meta: dict, split: str) -> tuple[Dataset, np.ndarray]:
    """The images of one split of a cache, in cache order (skipped ones excluded), with labels."""
    data = cache_meta["config"]["data"]
    _, labels, paths = store.load_features(cache_meta["path"], split)
    if data.get("kind") != "torchvision" and not Path(data["root"]).is_dir():
        raise FinetuneError(f"the images of {cache_meta['path']} are no longer at {data['root']}")
    base = reopen(data)
    records = [Record(p, int(label), split) for p, label in zip(paths, labels)]
    return (dataclasses.replace(base, classes=list(cache_meta["classes"]), records=records, skipped=[]),
            np.asarray(labels, dtype=np.int64))


class TrainImages(ImageTensors):
    """Training images: each item's augmentation is seeded by (seed, epoch, index), so the
    stream is the same with any number of workers and after a resume."""

    def __init__(self, dataset: Dataset, pre: Preprocess, augment: str, seed: int, max_pixels: int | None):
        super().__init__(dataset, np.arange(len(dataset.records)), pre, max_pixels)
        factory = AUGMENTS[augment]
        self.augment = factory(pre) if factory else None
        self.seed = seed
        self.epoch = 0

    def transform(self, img) -> torch.Tensor:
        if self.augment is None:
            return super().transform(img)
        from torchvision.transforms import functional as TF

        return TF.pil_to_tensor(self.augment(img))

    def __getitem__(self, i: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(augment_seed(self.seed, self.epoch, i))
            return super().__getitem__(i)


# --------------------------------------------------------------------------- training parts


@dataclass(frozen=True)
class OptimizerType:
    factory: Callable[[list], torch.optim.Optimizer]  # param groups (each with lr, weight_decay)
    lr: float
    weight_decay: float


OPTIMIZERS = {
    "adamw": OptimizerType(lambda groups: torch.optim.AdamW(groups), lr=1e-4, weight_decay=0.05),
    "sgd": OptimizerType(lambda groups: torch.optim.SGD(groups, momentum=0.9, nesterov=True), lr=0.003,
                         weight_decay=1e-4),
}

# --unfreeze NAME[:N] -> the backbone blocks to train
UNFREEZE: dict[str, Callable[[list, int | None], list]] = {
    "all": lambda blocks, n: blocks,
    "none": lambda blocks, n: [],
    "last": lambda blocks, n: blocks[len(blocks) - n:],
}

BN_MODES = ("frozen", "train")


def parameter_blocks(model: nn.Module) -> list[list[nn.Parameter]]:
    """The parameters of :func:`named_blocks`, block by block."""
    return list(named_blocks(model).values())


def trainable_blocks(model: nn.Module, unfreeze: str) -> list[list[nn.Parameter]]:
    name, _, arg = unfreeze.partition(":")
    if name not in UNFREEZE:
        raise UsageError(f"unknown --unfreeze {unfreeze!r}: use all, none or last:N" + suggest(name, UNFREEZE))
    if (name == "last") != bool(arg) or (arg and not (arg.isdigit() and int(arg) >= 1)):
        raise UsageError(f"bad --unfreeze {unfreeze!r}: use all, none or last:N with N >= 1")
    return UNFREEZE[name](parameter_blocks(model), int(arg) if arg else None)


def _is_bn(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def prepare(network: Network, unfreeze: str, bn: str) -> list[nn.Parameter]:
    """Set ``requires_grad`` for the chosen blocks; return the trainable backbone parameters."""
    network.backbone.requires_grad_(False)
    for block in trainable_blocks(network.backbone, unfreeze):
        for param in block:
            param.requires_grad_(True)
    network.head.requires_grad_(True)
    if bn == "frozen":
        for module in network.modules():
            if _is_bn(module):
                module.requires_grad_(False)
    return [p for p in network.backbone.parameters() if p.requires_grad]


def train_mode(network: Network, bn: str) -> None:
    """Train mode, except batch norm layers that are frozen or belong to frozen blocks."""
    network.train()
    for module in network.modules():
        if _is_bn(module) and (bn == "frozen" or not any(p.requires_grad for p in module.parameters(recurse=False))):
            module.eval()


def param_groups(network: Network, backbone_params, lr, weight_decay, backbone_lr_mult) -> list[dict]:
    """Discriminative learning rates; no weight decay on biases and normalization scales."""
    groups = []
    head_params = [p for p in network.head.parameters() if p.requires_grad]
    for params, rate in ((head_params, lr), (backbone_params, lr * backbone_lr_mult)):
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        groups += [{"params": ps, "lr": rate, "weight_decay": wd}
                   for ps, wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]
    return groups


def cosine_with_warmup(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def evaluate(network: nn.Module, images: ImageTensors, labels: np.ndarray, classes, device, precision,
             batch_size: int, workers: int, progress: bool, desc: str = "eval") -> dict:
    """classification_metrics of ``network`` on ``images`` (every image must decode)."""
    probs = probabilities(network, images, len(classes), device, precision, batch_size, workers, progress, desc)
    return classification_metrics(labels, probs, classes)


def probabilities(network: nn.Module, images: ImageTensors, n_classes: int, device, precision, batch_size: int,
                  workers: int, progress: bool, desc: str = "eval", rows: np.ndarray | None = None) -> np.ndarray:
    """Class probabilities of ``network`` on ``images``, N x C (every image must decode); with ``rows``,
    those rows only (a torchrun rank's share), the others left 0."""
    network.eval()
    probs = np.zeros((len(images), n_classes), dtype=np.float32)
    loader = image_loader(images, batch_size, workers, device, rows)
    count = len(images) if rows is None else len(rows)
    with torch.inference_mode(), Progress(count, desc, unit="images", enabled=progress) as bar:
        for index, batch, reasons in loader:
            bad = [r for r in reasons if r]
            if bad:
                path = images.dataset.records[int(index[0])].path
                raise FinetuneError(f"{path}: {bad[0]} (it was readable at extraction)")
            x = normalize_batch(batch.to(device, non_blocking=True), images.pre)
            with runtime.autocast(device, precision):
                logits = network(x)
            probs[index.numpy()] = torch.softmax(logits.float(), dim=1).cpu().numpy()
            bar.update(len(index))
    return probs


# --------------------------------------------------------------------------- the stage


@dataclass
class FinetuneResult:
    model: str
    head: str
    head_accuracy: float
    start_accuracy: float
    best_accuracy: float
    epochs: int
    split: str
    output_dir: str = ""
    best_epoch: int = 0
    stopped_early: bool = False
    reused: bool = False
    resumed_from: dict | None = None  # {"epoch", "batch", "step"} of the checkpoint a resume started from
    history: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)  # {"head": {split: metrics}, "finetuned": {split: metrics}}
    weights: dict = field(default_factory=dict)  # {"file": "model.safetensors", "sha256": ...}
    export: dict = field(default_factory=dict)  # {"file": "model.pt", "sha256": ...}
    temperature: float = 1.0  # applied to the logits when the head was fitted with calibrate="temperature"
    trained_from: str = "images"  # or "activations" (stored block inputs, finetuning.activations)

    def to_dict(self) -> dict:
        keys = ("model", "head", "head_accuracy", "start_accuracy", "best_accuracy", "epochs", "split", "output_dir",
                "trained_from", "reused")
        return {k: getattr(self, k) for k in keys}


@dataclass
class _State:
    """Everything of the loop that a checkpoint restores besides model and optimizer."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # batches done in the epoch in progress
    step: int = 0  # optimizer steps in total
    loss_sum: float = 0.0  # of the epoch in progress
    seen: int = 0
    seconds: float = 0.0  # spent in the epoch in progress
    start_accuracy: float = 0.0
    best_accuracy: float = -1.0
    best_loss: float = math.inf
    best_epoch: int = 0
    best_metrics: dict = field(default_factory=dict)
    stale: int = 0  # epochs without improvement
    history: list = field(default_factory=list)


@dataclass(frozen=True)
class _Settings:
    """The options that change the outcome; with the run and the head they name the output folder."""

    epochs: int
    unfreeze: str
    backbone_lr_mult: float
    bn: str
    augment: str
    optimizer: str
    lr: float
    weight_decay: float
    warmup_epochs: float
    batch_size: int
    accumulate: int
    precision: str
    patience: int
    seed: int


@dataclass
class _Job:
    """One fine-tuning: the run and head it starts from, its settings, where it runs and writes."""

    loaded: object  # runs.Run
    pipeline: object
    head_meta: dict
    cache_meta: dict
    settings: _Settings
    device: torch.device
    workers: int
    checkpoint_every: int
    progress: bool
    from_activations: bool | None = False  # train the last blocks from stored activations (None: to be chosen)
    max_memory: str | None = None  # the most the stored activations may take in memory
    chosen: dict | None = None  # how the mode was chosen when it was not given (activations.Estimate.describe)
    group: distributed.Group = field(default_factory=distributed.Group)  # this process's torchrun rank, if any

    @property
    def config(self) -> dict:
        meta = self.loaded.meta
        used = {"from_activations": True} if self.from_activations else {}  # absent: the address it always had
        return {"run_id": meta["run_id"], "cache_key": meta["cache_key"], "head": self.head_meta["head"],
                **asdict(self.settings), **used}

    @property
    def out(self) -> Path:
        return Path(self.loaded.path) / FINETUNE_DIR / store.cache_key(self.config)[:12]

    @property
    def split(self) -> str:
        return self.loaded.meta["selection_split"]

    @property
    def classes(self) -> list[str]:
        return list(self.loaded.meta["classes"])

    @property
    def head_accuracy(self) -> float:
        """The head's accuracy on the selection split as the network at step 0 reproduces it (an ensemble's
        score there is cross-fitted: its saved weights' own accuracy is recorded beside it)."""
        applied = (self.head_meta.get("ensemble") or {}).get("saved_weights_accuracy", {})
        return float(applied.get(self.split, self.head_meta["metrics"][self.split]["accuracy"]))


def _log(message: str) -> None:
    """A line on stderr, from the first torchrun rank only (it speaks for the job)."""
    if distributed.is_primary():
        print(message, file=sys.stderr, flush=True)


def _validate(settings: _Settings, checkpoint_every: int) -> None:
    """A UsageError for the first option value that cannot be used."""
    trainable_blocks(nn.Linear(1, 1), settings.unfreeze)  # checks the spelling
    for name, choices in (("bn", BN_MODES), ("augment", AUGMENTS), ("optimizer", OPTIMIZERS)):
        value = getattr(settings, name)
        if value not in choices:
            raise UsageError(f"unknown --{name} {value!r}: choose one of {', '.join(choices)}"
                             + suggest(value, choices))
    counts = {"epochs": settings.epochs, "batch-size": settings.batch_size, "accumulate": settings.accumulate,
              "checkpoint-every": checkpoint_every}
    for name, value in counts.items():
        if value < 1:
            raise UsageError(f"--{name} must be at least 1")
    amounts = {"warmup-epochs": settings.warmup_epochs, "backbone-lr-mult": settings.backbone_lr_mult,
               "patience": settings.patience, "lr": settings.lr,
               "weight-decay": settings.weight_decay}
    for name, value in amounts.items():
        if value < 0:
            raise UsageError(f"--{name} cannot be negative")


def _open_job(options: FinetuneOptions, settings: _Settings, device: torch.device, workers: int,
              group: distributed.Group) -> _Job:
    """The run and head to start from; a FinetuneError if its cache has no split to train or stop on."""
    loaded, pipeline, head_meta = load_run_head(options.run, options.head, options.cache_dir, options.trust)
    meta = loaded.meta
    cache_meta = store.info(meta["cache"])
    split = meta["selection_split"]
    if split not in cache_meta["splits"] or "train" not in cache_meta["splits"]:
        raise FinetuneError(
            f"fine-tuning needs a train split and held-out images to stop on, but {Path(meta['cache']).name} has "
            f"{', '.join(cache_meta['splits'])} (heads were selected by {split}); "
            "re-extract with --split train=0.8,val=0.2"
        )
    return _Job(loaded, pipeline, head_meta, cache_meta, settings, device, workers, options.checkpoint_every,
                options.progress and group.rank == 0, options.from_activations, options.max_memory, group=group)


def _reused(job: _Job) -> FinetuneResult | None:
    """The result of the same fine-tuning done before, if it finished (with its safetensors weights)."""
    path = job.out / RESULT_FILE
    if not path.is_file():
        return None
    problem = finetune_problem(job.out)
    if problem is not None:
        _log(f"warning: the fine-tuning in {job.out} is damaged ({problem}); training it again")
        return None
    done = json.loads(path.read_text())
    if not done.get("weights"):
        return None  # fine-tuned before model.safetensors was written: train again
    return FinetuneResult(**{**done, "reused": True})


class _Trainer:
    """The network, optimizer, schedule and images of one job; each method is one step of the loop."""

    def __init__(self, job: _Job, backbone, head: nn.Module):
        s = self.s = job.settings
        self.job, self.dev, self.out = job, job.device, job.out
        self.backbone, self.pre = backbone, backbone.preprocess
        self.max_pixels = job.cache_meta["config"].get("max_image_pixels")
        self.val_images, self.val_labels = self.images(job.split)
        train_data, self.train_labels = cache_images(job.cache_meta, "train")
        self.train_images = TrainImages(train_data, self.pre, s.augment, s.seed, self.max_pixels)
        torch.manual_seed(s.seed)
        self.net = Network(backbone.model, head).to(self.dev).to(memory_format=torch.channels_last)
        groups = param_groups(self.net, prepare(self.net, s.unfreeze, s.bn), s.lr, s.weight_decay,
                              s.backbone_lr_mult)
        self.opt = OPTIMIZERS[s.optimizer].factory(groups)
        n = len(self.train_labels)
        self.drop_last = s.bn == "train" and n > s.batch_size
        self.n_batches = n // s.batch_size if self.drop_last else math.ceil(n / s.batch_size)
        steps = math.ceil(self.n_batches / s.accumulate)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.opt, cosine_with_warmup(s.epochs * steps, round(s.warmup_epochs * steps)))
        self.scaler = torch.amp.GradScaler(self.dev.type, enabled=s.precision == "fp16")
        self.group = job.group
        self.trained = self.net  # what a training step runs: the network, under DDP once distributed
        self.started = time.perf_counter()

    def training_module(self) -> nn.Module:
        """The module a training step runs on what :meth:`inputs` gives."""
        return self.net

    def distribute(self) -> None:
        """Under torchrun, wrap :meth:`training_module` in DistributedDataParallel (:mod:`.parallel`)."""
        self.trained = parallel.wrap(self.training_module(), self.dev, self.group, self.s.bn)

    def images(self, split: str) -> tuple[ImageTensors, np.ndarray]:
        data, labels = cache_images(self.job.cache_meta, split)
        return ImageTensors(data, np.arange(len(labels)), self.pre, self.max_pixels), labels

    def evaluate(self, images: ImageTensors, labels: np.ndarray, desc: str) -> dict:
        """Metrics of the network on ``images``: each rank computes its share of the probabilities and every
        rank the metrics of their sum, the same on every rank."""
        rows = np.arange(*parallel.span(len(labels), self.group))
        probs = probabilities(self.net, images, len(self.job.classes), self.dev, self.s.precision,
                              self.s.batch_size, self.job.workers, self.job.progress, desc, rows)
        return classification_metrics(labels, parallel.all_sum(probs, self.group), self.job.classes)

    def temperature(self) -> float:
        """The network's own temperature on the selection split, for a head fitted with calibration (else 1)."""
        if not self.job.head_meta.get("calibration"):
            return 1.0
        images, labels = self.images(self.job.split)
        probs = probabilities(self.net, images, len(self.job.classes), self.dev, self.s.precision,
                              self.s.batch_size, self.job.workers, self.job.progress, "calibrate")
        return fit_temperature(probs, labels)

    # ----------------------------------------------------------------------- checkpoints

    def checkpoint(self, state: _State) -> None:
        """``last.pt``, written by the first rank (the train loss's sums folded onto it first) while the
        others wait."""
        state.loss_sum, state.seen = parallel.fold(state.loss_sum, state.seen, self.group)
        self.group.lead(lambda: self._write_checkpoint(state))

    def _write_checkpoint(self, state: _State) -> None:
        # the random state of the training's own GPU: under torchrun every rank's, equal, goes on at any rank
        cuda_rng = [torch.cuda.get_rng_state(self.dev)] if self.dev.type == "cuda" else []
        saved = {"model": self.net.state_dict(), "optimizer": self.opt.state_dict(),
                 "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict(),
                 "state": asdict(state), "rng": torch.get_rng_state(), "cuda_rng": cuda_rng}
        _save(self.out / LAST_FILE, saved)

    def record_best(self, state: _State, metrics: dict) -> None:
        state.best_accuracy, state.best_loss = metrics["accuracy"], metrics["log_loss"]
        state.best_metrics, state.best_epoch, state.stale = metrics, state.epoch, 0
        self.group.lead(lambda: _save(self.out / BEST_FILE, {"model": self.net.state_dict(), "epoch": state.epoch}))

    def write_history(self, state: _State) -> None:
        self.group.lead(lambda: write_json(self.out / HISTORY_FILE, state.history))

    def load_best(self) -> None:
        saved = torch.load(self.out / BEST_FILE, map_location=self.dev, weights_only=True)
        self.net.load_state_dict(saved["model"])

    def resume(self) -> _State:
        """Model, optimizer, schedule, scaler, random state and loop state of ``last.pt``."""
        saved = torch.load(self.out / LAST_FILE, map_location=self.dev, weights_only=True)
        self.net.load_state_dict(saved["model"])
        self.opt.load_state_dict(saved["optimizer"])
        self.schedule.load_state_dict(saved["schedule"])
        self.scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["rng"].cpu())
        if saved["cuda_rng"] and self.dev.type == "cuda":
            torch.cuda.set_rng_state(saved["cuda_rng"][0].cpu(), self.dev)
        state = _State(**saved["state"])
        if self.group.rank:  # the first rank holds the epoch's train loss so far
            state.loss_sum, state.seen = 0.0, 0
        _log(f"resuming {self.out.name} from epoch {state.epoch} batch {state.batch} (step {state.step})")
        return state

    def start(self) -> _State:
        """Step 0: the network before any update, evaluated on the selection split and recorded as best."""
        started = time.perf_counter()
        metrics = self.evaluate(self.val_images, self.val_labels, "step 0")
        state = _State(start_accuracy=metrics["accuracy"])
        state.history.append({"epoch": 0, "train_loss": None, "val_loss": metrics["log_loss"],
                              "val_accuracy": metrics["accuracy"], "seconds": time.perf_counter() - started,
                              "lr": 0.0, "val": summary(metrics)})
        self.record_best(state, metrics)
        if metrics["accuracy"] != self.job.head_accuracy:
            _log(f"warning: at step 0 the network reaches {metrics['accuracy']:.4f} on {self.job.split}, the head "
                 f"{self.job.head_accuracy:.4f}: the images or the backbone differ from extraction")
        self.checkpoint(state)
        self.write_history(state)
        return state

    # ----------------------------------------------------------------------- training

    def batch(self, state: _State, share: tuple, steps: int, sync: bool) -> None:
        """Forward and backward on the images of this rank's ``share`` ``(indices, batch, reasons)`` of a global
        batch that decoded. The loss is their summed cross-entropy over the images of the global batch that
        decoded on all ranks, times the ranks (DDP averages over them), over the ``steps`` batches accumulated:
        the gradient is one process's. ``sync``: the last batch of an optimizer step (DDP's all-reduce)."""
        index, batch, reasons = share
        ok = torch.tensor([not r for r in reasons], dtype=torch.bool)
        start, total = parallel.place(int(ok.sum()), self.group)
        if total == 0 and not (sync and self.group.control is not None):
            return  # no image decoded; under DDP the last batch of a step still runs, to reduce the gradients
        x = self.inputs(batch[ok])
        y = torch.from_numpy(self.train_labels[index[ok].numpy()]).to(self.dev)
        dropout = parallel.global_dropout(self.training_module(), start, int(ok.sum()), total)
        with parallel.syncing(self.trained, sync), dropout:
            with runtime.autocast(self.dev, self.s.precision):
                loss = F.cross_entropy(self.forward(x).float(), y, reduction="sum")
            self.scaler.scale(loss * (self.group.world / max(1, total) / steps)).backward()
        state.loss_sum += float(loss.detach())
        state.seen += int(ok.sum())

    def inputs(self, batch: torch.Tensor) -> torch.Tensor:
        """What :meth:`forward` takes, from a batch of the train loader: normalized images."""
        return normalize_batch(batch.to(self.dev, non_blocking=True), self.pre)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trained(x)

    def train_loader(self, epoch: int, batches: list[list[int]]):
        """``(indices, uint8 images, reasons)`` of the train images of ``epoch`` for each of ``batches`` (an
        empty one, a rank's share of a short last batch, gives no images)."""
        self.train_images.epoch = epoch
        loader = iter(image_loader(self.train_images, self.s.batch_size, self.job.workers, self.dev,
                                   batches=[b for b in batches if b]))
        crop = self.pre.crop
        for rows in batches:
            yield next(loader) if rows else (torch.zeros(0, dtype=torch.int64),
                                             torch.zeros(0, 3, crop, crop, dtype=torch.uint8), ())

    def optimizer_step(self, state: _State, done: int) -> None:
        """One update after ``done`` batches of the epoch; a mid-epoch checkpoint every ``checkpoint_every``."""
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.schedule.step()
        state.step += 1
        state.batch = done  # in global batches: the same place with any number of ranks
        if state.step % self.job.checkpoint_every == 0 and state.batch < self.n_batches:
            now = time.perf_counter()
            state.seconds += now - self.started
            self.started = now
            self.checkpoint(state)

    def global_batches(self, epoch: int, first: int) -> list[list[int]]:
        """The batches of ``epoch`` from batch ``first`` on, in the epoch's seeded order (the same on every rank)."""
        size = self.s.batch_size
        seed = torch.Generator().manual_seed(self.s.seed * 7919 + epoch)
        order = torch.randperm(len(self.train_labels), generator=seed).tolist()
        return [order[b * size:(b + 1) * size] for b in range(first, self.n_batches)]

    def train_epoch(self, state: _State) -> None:
        """The rest of epoch ``state.epoch``, from batch ``state.batch`` on; each rank runs its share of each batch."""
        s, epoch = self.s, state.epoch
        self.started = time.perf_counter()
        batches = self.global_batches(epoch, state.batch)
        loader = self.train_loader(epoch, [parallel.share(b, self.group) for b in batches])
        train_mode(self.net, s.bn)
        total = min(len(self.train_labels), self.n_batches * s.batch_size)  # images of the epoch
        with Progress(total, f"epoch {epoch + 1}/{s.epochs}", unit="images", enabled=self.job.progress,
                      initial=min(total, state.batch * s.batch_size)) as bar:
            for b, (rows, share) in enumerate(zip(batches, loader), start=state.batch):
                steps = min(s.accumulate, self.n_batches - (b // s.accumulate) * s.accumulate)  # batches in this step
                last = (b + 1) % s.accumulate == 0 or b + 1 == self.n_batches
                self.batch(state, share, steps, last)
                if last:
                    self.optimizer_step(state, b + 1)
                bar.update(len(rows), current=f"loss {state.loss_sum / max(1, state.seen):.4f}")

    def end_epoch(self, state: _State) -> bool:
        """Evaluate, record the epoch and the best so far, checkpoint; whether the epoch improved."""
        metrics = self.evaluate(self.val_images, self.val_labels, f"eval {state.epoch + 1}")
        state.epoch, state.batch = state.epoch + 1, 0
        loss_sum, seen = parallel.fold(state.loss_sum, state.seen, self.group)
        loss_sum, seen = self.group.lead(lambda: (loss_sum, seen))  # every rank records the same history
        entry = {"epoch": state.epoch, "train_loss": loss_sum / max(1, seen),
                 "val_loss": metrics["log_loss"], "val_accuracy": metrics["accuracy"],
                 "seconds": state.seconds + time.perf_counter() - self.started,
                 "lr": self.schedule.get_last_lr()[0], "val": summary(metrics)}
        state.history.append(entry)
        state.loss_sum, state.seen, state.seconds = 0.0, 0, 0.0
        improved = (metrics["accuracy"], -metrics["log_loss"]) > (state.best_accuracy, -state.best_loss)
        if improved:
            self.record_best(state, metrics)
        else:
            state.stale += 1
        self.checkpoint(state)
        self.write_history(state)
        if self.job.progress:
            _log(f"epoch {state.epoch}/{self.s.epochs}  train_loss {entry['train_loss']:.4f}  "
                 f"val_loss {entry['val_loss']:.4f}  val_accuracy {entry['val_accuracy']:.4f}"
                 f"{'  (best)' if improved else ''}  {entry['seconds']:.1f} s")
        return improved


def _save(path: Path, obj: dict) -> None:
    """``torch.save`` of ``obj`` to ``path``, atomically: serialized in memory first, so that a full disk is
    refused before writing, or is a StorageError of the write itself (torch's own writer aborts on it)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    require_space(path.parent, buffer.getbuffer().nbytes, f"the checkpoint {path.name}")
    atomic_write(path, buffer.getbuffer())


def _begin(trainer: _Trainer, resume: bool) -> tuple[_State, dict | None]:
    """The loop state to go on from, and where a resume started (None when it starts at step 0). The first
    rank looks for the checkpoint, so that every rank decides alike."""
    found = trainer.group.lead(lambda: (trainer.out / LAST_FILE).is_file())
    if resume and found:
        state = trainer.resume()
        return state, {"epoch": state.epoch, "batch": state.batch, "step": state.step}
    if found:
        _log(f"an interrupted fine-tuning of this configuration is in {trainer.out}; starting over "
             "(--resume continues it)")
    return trainer.start(), None


def _train(trainer: _Trainer, state: _State) -> bool:
    """Epochs until ``epochs`` or ``patience`` epochs without improvement; whether it stopped early."""
    patience = trainer.s.patience

    def stop() -> bool:
        return bool(patience) and state.stale >= patience

    while state.epoch < trainer.s.epochs and not stop():
        trainer.train_epoch(state)
        trainer.end_epoch(state)
    return stop()


def _final_metrics(job: _Job, trainer: _Trainer, state: _State, temperature: float) -> dict:
    """The head's recorded metrics and the best epoch's, on the selection split and the held-out one: those of
    the probabilities the exported model gives, after its ``temperature``."""
    metrics = {"head": dict(job.head_meta["metrics"]), "finetuned": {job.split: state.best_metrics}}
    splits = [job.split] if temperature != 1.0 else []
    final = job.loaded.meta.get("final_split", job.split)
    if final != job.split and final in job.cache_meta["splits"]:
        splits.append(final)
    for split in splits:
        images, labels = trainer.images(split)
        probs = probabilities(trainer.net, images, len(job.classes), trainer.dev, trainer.s.precision,
                              trainer.s.batch_size, job.workers, job.progress, split)
        metrics["finetuned"][split] = classification_metrics(labels, apply_temperature(probs, temperature),
                                                             job.classes)
    return metrics


def _finish(job: _Job, trainer: _Trainer, state: _State, stopped_early: bool) -> FinetuneResult:
    """Save the best epoch as safetensors and TorchScript, then ``result.json``, which marks it complete."""
    trainer.load_best()
    temperature = trainer.temperature()
    metrics = _final_metrics(job, trainer, state, temperature)
    size = sum(t.numel() * t.element_size() for t in trainer.net.state_dict().values())
    require_space(job.out, 2 * size, "the fine-tuned model (model.safetensors and model.pt)")
    weights = save_weights(trainer.net, job.out / WEIGHTS_FILE)
    meta = job.loaded.meta
    info = {"backbone": trainer.backbone.identity, "layer": trainer.backbone.layer, "head": job.head_meta["head"],
            "run_id": meta["run_id"], "cache_key": meta["cache_key"], "finetune": job.config,
            "best_epoch": state.best_epoch, "metrics": {s: summary(m) for s, m in metrics["finetuned"].items()}}
    model_path = export(trainer.net, trainer.pre, job.classes, job.out / MODEL_FILE, info, temperature)
    exported = {"file": model_path.name, "sha256": sha256_file(model_path)}
    result = FinetuneResult(
        model=str(model_path), head=job.head_meta["head"], head_accuracy=job.head_accuracy,
        start_accuracy=state.start_accuracy, best_accuracy=state.best_accuracy, epochs=state.epoch, split=job.split,
        output_dir=str(job.out), best_epoch=state.best_epoch, stopped_early=stopped_early, history=state.history,
        metrics=metrics, weights=weights, export=exported, temperature=temperature,
        trained_from="activations" if job.from_activations else "images",
    )
    saved = asdict(result)
    saved.pop("reused")
    saved.pop("resumed_from")
    write_json(job.out / RESULT_FILE, saved)
    return result


def _network_parts(job: _Job) -> tuple[object, nn.Module]:
    """The run's backbone and its head as a layer, as step 0 starts from them."""
    backbone, pipeline = run_backbone(job.loaded.meta, job.pipeline, job.head_meta)
    return backbone, head_module(pipeline, job.head_meta, job.loaded.leaderboard)


def _run(job: _Job, resume: bool, parts: tuple | None = None) -> FinetuneResult:
    """Assemble the network (or take ``parts``, the backbone and head), start at step 0 (or resume), train
    and save the best epoch."""
    kind = activations.trainer_class(_Trainer) if job.from_activations else _Trainer
    trainer = kind(job, *(parts or _network_parts(job)))
    trainer.distribute()
    chosen = {"mode_chosen": job.chosen} if job.chosen else {}
    job.group.lead(lambda: write_json(job.out / CONFIG_FILE, {**job.config, "run_dir": str(job.loaded.path),
                                                               **chosen}))
    state, resumed_from = _begin(trainer, resume)
    if job.progress:
        from ..sweep.runs import start_note

        note = start_note(job.loaded.leaderboard, job.head_meta["head"])
        if note is not None:
            _log(note)
        _log(f"{job.head_meta['head']}: head {job.head_accuracy:.4f}, step 0 {state.start_accuracy:.4f} on {job.split}")
    stopped_early = _train(trainer, state)
    result = job.group.lead(lambda: _finish(job, trainer, state, stopped_early))  # the other ranks get its result
    result.resumed_from = resumed_from
    return result


@dataclass(frozen=True)
class FinetuneOptions:
    """Every option of :func:`finetune`, as given: the one object the stage hands down.

    Where it starts (``run``, ``head``, ``trust``, ``cache_dir``), what it trains and how (``epochs``
    ... ``patience``, ``seed``: with the run and the head they name the output folder), and how it
    runs (``workers``, ``device``, ``checkpoint_every``, ``resume``).
    """

    run: str
    head: str = "best-transferable"
    epochs: int = 5
    unfreeze: str = "all"
    backbone_lr_mult: float = 0.1
    bn: str = "frozen"
    augment: str = "light"
    optimizer: str = "adamw"
    lr: float | None = None
    weight_decay: float | None = None
    warmup_epochs: float = 1.0
    batch_size: int = 32
    accumulate: int = 1
    workers: int | None = None
    device: str = "auto"
    precision: str = "auto"
    patience: int = 3
    checkpoint_every: int = 50
    resume: bool = False
    seed: int = 0
    trust: bool = False
    cache_dir: str | None = None
    progress: bool = True
    from_activations: bool | None = None
    max_memory: str | None = None


@takes(FinetuneOptions)
def finetune(options: FinetuneOptions) -> FinetuneResult:
    """Fine-tune backbone and head of a stage-two run; export the best epoch as ``model.pt`` and ``model.safetensors``.

    ``run``: a run directory, run id or unique prefix. ``head``: ``best-transferable`` (the
    best-ranked head that can become a layer), ``best`` (the top of the leaderboard, which
    must be transferable), a head spec or a slug of the run.
    ``unfreeze``: ``all``, ``none`` (head only) or ``last:N`` backbone blocks; the backbone's
    learning rate is ``lr * backbone_lr_mult``. ``bn``: ``frozen`` keeps batch norm statistics
    and scales as pretrained. ``patience``: epochs without improvement on the selection split
    before stopping (0: never). ``checkpoint_every``: optimizer steps between mid-epoch
    checkpoints. ``resume``: continue from the last checkpoint of the same configuration.
    ``trust``: also load a run saved in the old pickle format, which can run code when loaded.
    ``from_activations`` (``unfreeze=last:N``): store the input of the first trained block once in the
    cache and train from it, without decoding images or running the frozen blocks
    (:mod:`featurecache.finetuning.activations`); ``False`` trains from images; ``None`` (the default)
    times a few batches both ways and stores the activations when that is measured to pay
    (:func:`_choose_mode`). ``max_memory`` (e.g. ``"2G"``; default half the available memory) bounds
    what those activations may take.
    Under ``torchrun`` every rank calls it: ``batch_size`` is the global batch, split across the ranks, so
    ``lr`` needs no change with their number (:mod:`featurecache.finetuning.parallel`).
    """
    group = distributed.Group.from_environment()
    device = runtime.resolve_device(options.device, group.local_rank)
    settings = _settings(options, device)
    _validate(settings, options.checkpoint_every)
    parallel.check_batch(settings.batch_size, group)
    workers = runtime.resolve_workers(options.workers)
    with distributed.sigterm_exits():
        try:
            group.connect(device)
            job = _open_job(options, settings, device, workers, group)
            job, parts = _choose_mode(job) if job.from_activations is None else (job, None)
            group.agree({**job.config, "checkpoint_every": options.checkpoint_every, "resume": options.resume})
            return group.lead(lambda: _reused(job)) or _run(job, options.resume, parts)
        finally:
            group.close()


# --------------------------------------------------------------------------- from images or from activations


def _choose_mode(job: _Job) -> tuple[_Job, tuple | None]:
    """``job`` trained from images or from stored activations, and the network's parts if they were built.

    Only ``unfreeze=last:N`` with a frozen part can train from activations, and with augmentation
    only from a cache that holds augmented views (else the epochs would lose it). A configuration
    trained or checkpointed before keeps its mode (its folder is found again, and ``--resume``
    goes on); a torchrun job trains from images, so that its ranks cannot choose differently.
    Otherwise a few batches are timed both ways (:func:`_measure`) and the activations are stored
    when the whole run is measured to be faster that way (:class:`activations.Estimate`).
    """
    images, stored = dataclasses.replace(job, from_activations=False), dataclasses.replace(job, from_activations=True)
    if not job.settings.unfreeze.startswith("last:") or job.group.world > 1:
        return images, None
    for kept in (stored, images):
        if (kept.out / RESULT_FILE).is_file() or (kept.out / LAST_FILE).is_file():
            return kept, None
    parts = _network_parts(job)
    try:
        activations.first_trained_block(parts[0].model, job.settings.unfreeze)
    except FinetuneError:  # last:N trains every block: nothing frozen to store
        return images, parts
    unsuited = activations.unsuited(job, parts[0])
    if unsuited:
        if job.progress:
            _log(f"training from images: {unsuited}")
        return images, parts
    if job.settings.augment != "none" and not job.cache_meta["config"].get("augment_views"):
        if job.progress:
            _log(f"training from images: {Path(job.cache_meta['path']).name} holds no augmented views (fc extract "
                 "--augment-views K), so from stored activations the epochs would not be augmented; "
                 "--from-activations forces it")
        return images, parts
    estimate = _measure(_Trainer(images, *parts))
    if job.progress:
        _log(estimate.sentence())
    chosen = stored if estimate.wins else images
    return dataclasses.replace(chosen, chosen=estimate.describe()), parts


def _measure(trainer: _Trainer, batches: int = 3) -> activations.Estimate:
    """Time training batches from images and from the stored maps they would give, on a warm-up batch and
    ``batches`` more of epoch 0's images; the network's weights and statistics are restored after. With
    decoding workers, what the first batch takes beyond the others is the loader's start, paid every epoch."""
    s, net, dev = trainer.s, trainer.net, trainer.dev
    block = activations.first_trained_block(net.backbone, s.unfreeze)
    tail = Network(activations.tail(net.backbone, block), net.head)
    saved = {name: value.clone() for name, value in net.state_dict().items()}
    n = len(trainer.train_labels)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(s.seed))[:s.batch_size * (batches + 1)].tolist()
    live, tail_seconds, shape = [], [], None
    train_mode(net, s.bn)
    started = time.perf_counter()
    for index, batch, reasons in trainer.train_loader(0, [order[i:i + s.batch_size]
                                                           for i in range(0, len(order), s.batch_size)]):
        ok = torch.tensor([not r for r in reasons])
        if not ok.any():
            continue
        x, y = trainer.inputs(batch[ok]), torch.from_numpy(trainer.train_labels[index[ok].numpy()]).to(dev)
        with runtime.autocast(dev, s.precision):
            F.cross_entropy(net(x).float(), y).backward()
        live.append(time.perf_counter() - started)
        with torch.no_grad(), runtime.autocast(dev, s.precision):
            maps = activations.block_input(net.backbone, block, x).float()
        shape = maps.shape[1:]
        begun = time.perf_counter()
        with runtime.autocast(dev, s.precision):
            F.cross_entropy(tail(maps.contiguous(memory_format=torch.channels_last)).float(), y).backward()
        tail_seconds.append(time.perf_counter() - begun)
        net.zero_grad(set_to_none=True)
        started = time.perf_counter()
    net.load_state_dict(saved)
    steady = float(np.median(live[1:] or live))
    per_batch = float(np.median(tail_seconds[1:] or tail_seconds))
    plan = activations.plan_of(trainer.job, block, tuple(shape), n, len(trainer.val_labels))
    cache = Path(trainer.job.cache_meta["path"])
    stored = store.has_activations(cache, plan.name)
    store_seconds = 0.0 if stored else math.ceil(plan.rows / s.batch_size) * max(0.0, steady - per_batch)
    return activations.Estimate(
        epochs=s.epochs, batches=trainer.n_batches, live=steady, tail=per_batch, store=store_seconds, stored=stored,
        startup=max(0.0, live[0] - steady) if trainer.job.workers else 0.0,
        room=activations.room_problem(plan, cache, trainer.job.max_memory, stored))


def _settings(options: FinetuneOptions, device: torch.device) -> _Settings:
    """The options that change the outcome, with the optimizer's defaults and the precision resolved."""
    defaults = OPTIMIZERS.get(options.optimizer, OPTIMIZERS["adamw"])
    return _Settings(
        epochs=options.epochs, unfreeze=options.unfreeze, backbone_lr_mult=options.backbone_lr_mult, bn=options.bn,
        augment=options.augment, optimizer=options.optimizer,
        lr=defaults.lr if options.lr is None else float(options.lr),
        weight_decay=defaults.weight_decay if options.weight_decay is None else float(options.weight_decay),
        warmup_epochs=options.warmup_epochs, batch_size=options.batch_size, accumulate=options.accumulate,
        precision=runtime.resolve_precision(options.precision, device), patience=options.patience, seed=options.seed)
