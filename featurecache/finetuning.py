"""Stage three: fine-tune the backbone together with the head a stage-two run selected.

The network is assembled from the run alone. The run's cache config names the backbone,
its weights, the layer and the preprocessing; the chosen head becomes a torch module through
:func:`featurecache.heads.to_torch`, its preprocessing folded in. At step 0 the network
therefore predicts what the head predicted on the cached features. That is measured on the
selection split before any update and reported as ``start_accuracy`` next to the head's
recorded ``head_accuracy`` (LP-FT: fine-tuning starts from the best linear probe, not from a
random head that would damage the pretrained features).

Output, content-addressed under the run directory::

    <run_dir>/finetune/<hash>/
        config.json    what was asked, the run and head it starts from
        last.pt        model, optimizer, scheduler, scaler, RNG, epoch and batch (for --resume);
                       written after every epoch and every ``checkpoint_every`` optimizer steps
        best.pt        the weights of the best epoch on the selection split (epoch 0: the head)
        history.json   per epoch: train_loss, val_loss, val_accuracy, seconds, lr
        model.pt       TorchScript, uint8 N x 3 x crop x crop -> class probabilities, with the class
                       names and preprocessing as JSON in its extra file ``featurecache.json``
        result.json    written last: the fine-tuning is complete
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import backbones, runtime, store
from .data import Dataset, Preprocess, Record, open_dataset
from .errors import FinetuneError, suggest
from .images import ImageTensors, image_loader, normalize_batch
from .metrics import classification_metrics, summary

EXPORT_INFO = "featurecache.json"
EXPORT_FORMAT = "featurecache-model/1"


# --------------------------------------------------------------------------- the network


class Network(nn.Module):
    """Backbone and head: normalized images -> logits."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class Exported(nn.Module):
    """uint8 images (resized and center-cropped) -> class probabilities.

    Normalization repeats :func:`featurecache.images.normalize_batch` operation for
    operation, so an exported model sees exactly what extraction and training saw.
    """

    def __init__(self, network: nn.Module, preprocess: Preprocess):
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div(255.0).sub(self.mean).div(self.std).contiguous(memory_format=torch.channels_last)
        return torch.softmax(self.network(x).float(), dim=1)


def weights_argument(identity: dict) -> str:
    """The ``weights=`` value for :func:`backbones.build` from a cache's recorded weights identity."""
    recorded = str(identity.get("weights", "none"))
    return recorded.rpartition(".")[2].removeprefix("timm:")


def load_backbone(config: dict) -> backbones.Backbone:
    """Rebuild the exact backbone a cache was extracted with, from its config alone."""
    identity = config["weights"]
    weights_file = identity.get("weights_file")
    if identity.get("weights") == "none" and not weights_file and "init_seed" not in identity:
        raise FinetuneError(
            f"the cache was extracted with unseeded random weights (weights=none) for {config['backbone']}; "
            "they cannot be rebuilt: re-run fc extract"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = backbones.build(
            config["backbone"],
            weights=None if weights_file else weights_argument(identity),
            weights_file=weights_file,
            layer=None if config.get("layer") in (None, "penultimate") else config["layer"],
            preprocess=Preprocess(**config["preprocess"]),
        )
    for key in ("weights", "sha256", "init_seed"):
        if key in identity and net.identity.get(key) not in (None, identity[key]):
            raise FinetuneError(
                f"the backbone weights changed since extraction: the cache used {key} {identity[key]}, "
                f"now {net.identity[key]}; re-run fc extract and fc fit-head"
            )
    return net


def head_module(pipeline, head_meta: dict, leaderboard: list[dict]) -> nn.Module:
    """The head as a torch module on raw cached features, or a FinetuneError naming one that works."""
    from .heads import to_torch
    from .sweep import best_transferable

    if not head_meta.get("transferable"):
        alternative = best_transferable(leaderboard)
        hint = (f"; the best head that can is {alternative} (--head '{alternative}')" if alternative
                else "; the run has no head that can (linear, mlp, logreg, linear-svm, ridge)")
        raise FinetuneError(f"head {head_meta['head']} cannot become a layer of the network{hint}")
    return to_torch(pipeline).float()


@dataclass
class Assembly:
    """A run's backbone and one of its heads, joined into a network (``network`` is None for a
    head that is not transferable, which ``allow_sklearn`` lets through for prediction)."""

    run_dir: Path
    meta: dict
    leaderboard: list
    pipeline: object
    head_meta: dict
    backbone: backbones.Backbone
    network: Network | None


def load_run_head(run, head: str = "best", cache_dir: str | None = None):
    """``(run, fitted pipeline, head.json)`` of a stage-two run (path or id) and one of its heads."""
    from .sweep import load_head, load_run, resolve_run

    loaded = load_run(resolve_run(run, cache_dir))
    pipeline, head_meta = load_head(loaded.path, head)
    return loaded, pipeline, head_meta


def assemble(run, head: str = "best", cache_dir: str | None = None, allow_sklearn: bool = False) -> Assembly:
    """Join the backbone of ``run``'s cache and its ``head`` (``best``, ``best-transferable``, a spec or a slug)."""
    loaded, pipeline, head_meta = load_run_head(run, head, cache_dir)
    module = None
    if head_meta.get("transferable") or not allow_sklearn:
        module = head_module(pipeline, head_meta, loaded.leaderboard)
    backbone = load_backbone(loaded.meta["config"])
    network = Network(backbone.model, module) if module is not None else None
    return Assembly(Path(loaded.path), loaded.meta, loaded.leaderboard, pipeline, head_meta, backbone, network)


# --------------------------------------------------------------------------- images


def cache_images(cache_meta: dict, split: str) -> tuple[Dataset, np.ndarray]:
    """The images of one split of a cache, in cache order (skipped ones excluded), with labels."""
    data = cache_meta["config"]["data"]
    _, labels, paths = store.load_features(cache_meta["path"], split)
    if data.get("kind") == "torchvision":
        base = open_dataset(data["source"], root=data["root"])
    else:
        if not Path(data["root"]).is_dir():
            raise FinetuneError(f"the images of {cache_meta['path']} are no longer at {data['root']}")
        base = Dataset(data["root"], cache_meta["classes"], [], data.get("source", "folder"))
    records = [Record(p, int(label), split) for p, label in zip(paths, labels)]
    return dataclasses.replace(base, records=records, skipped=[]), np.asarray(labels, dtype=np.int64)


def _light(pre: Preprocess):
    from torchvision import transforms as T

    mode = T.InterpolationMode(pre.interpolation)
    return T.Compose([T.RandomResizedCrop(pre.crop, scale=(0.35, 1.0), interpolation=mode, antialias=True),
                      T.RandomHorizontalFlip()])


def _strong(pre: Preprocess):
    from torchvision import transforms as T

    mode = T.InterpolationMode(pre.interpolation)
    return T.Compose([T.RandomResizedCrop(pre.crop, scale=(0.08, 1.0), interpolation=mode, antialias=True),
                      T.RandomHorizontalFlip(), T.TrivialAugmentWide(interpolation=mode)])


# name -> PIL transform factory (None: the evaluation transform, resize and center crop)
AUGMENTS: dict[str, Callable[[Preprocess], Callable] | None] = {"none": None, "light": _light, "strong": _strong}


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
            torch.manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
            return super().__getitem__(i)


# --------------------------------------------------------------------------- training parts


@dataclass(frozen=True)
class OptimizerType:
    factory: Callable[[list], torch.optim.Optimizer]  # param groups (each with lr, weight_decay)
    lr: float
    weight_decay: float


OPTIMIZERS = {
    "adamw": OptimizerType(lambda groups: torch.optim.AdamW(groups), lr=1e-4, weight_decay=0.05),
    "sgd": OptimizerType(lambda groups: torch.optim.SGD(groups, momentum=0.9, nesterov=True), lr=0.003, weight_decay=1e-4),
}

# --unfreeze NAME[:N] -> the backbone blocks to train
UNFREEZE: dict[str, Callable[[list, int | None], list]] = {
    "all": lambda blocks, n: blocks,
    "none": lambda blocks, n: [],
    "last": lambda blocks, n: blocks[len(blocks) - n:],
}

BN_MODES = ("frozen", "train")
_INDEX = re.compile(r"(.*_)?\d+")


def parameter_blocks(model: nn.Module) -> list[list[nn.Parameter]]:
    """Parameters grouped into blocks in forward order.

    A block is what a parameter's name holds up to its first numbered module:
    ``features.17`` (MobileNetV2), ``layer4.1`` (ResNet), ``encoder_layer_11`` (ViT);
    a name without one is a block of its own module (``conv1``, ``bn1``).
    """
    blocks: dict[str, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        parts = name.split(".")[:-1]
        cut = next((i + 1 for i, part in enumerate(parts) if _INDEX.fullmatch(part)), len(parts))
        blocks.setdefault(".".join(parts[:cut]), []).append(param)
    return list(blocks.values())


def trainable_blocks(model: nn.Module, unfreeze: str) -> list[list[nn.Parameter]]:
    name, _, arg = unfreeze.partition(":")
    if name not in UNFREEZE:
        raise FinetuneError(f"unknown --unfreeze {unfreeze!r}: use all, none or last:N" + suggest(name, UNFREEZE))
    if (name == "last") != bool(arg) or (arg and not (arg.isdigit() and int(arg) >= 1)):
        raise FinetuneError(f"bad --unfreeze {unfreeze!r}: use all, none or last:N with N >= 1")
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
    for params, rate in (([p for p in network.head.parameters() if p.requires_grad], lr), (backbone_params, lr * backbone_lr_mult)):
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
    from tqdm.auto import tqdm

    network.eval()
    probs = np.zeros((len(labels), len(classes)), dtype=np.float32)
    loader = image_loader(images, batch_size, workers, device)
    with torch.inference_mode(), tqdm(total=len(images), desc=desc, unit="img", leave=False,
                                      disable=not progress, dynamic_ncols=True) as bar:
        for index, batch, reasons in loader:
            bad = [r for r in reasons if r]
            if bad:
                raise FinetuneError(f"{images.dataset.records[int(index[0])].path}: {bad[0]} (it was readable at extraction)")
            x = normalize_batch(batch.to(device, non_blocking=True), images.pre)
            with runtime.autocast(device, precision):
                logits = network(x)
            probs[index.numpy()] = torch.softmax(logits.float(), dim=1).cpu().numpy()
            bar.update(len(index))
    return classification_metrics(labels, probs, classes)


# --------------------------------------------------------------------------- checkpoints and export


def _replace(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` under a temporary name, then rename it into place."""
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _save(obj, path: Path) -> None:
    _replace(path, lambda tmp: torch.save(obj, tmp))


def _write_json(obj, path: Path) -> None:
    _replace(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str)))


def export(network: Network, preprocess: Preprocess, classes: list[str], path: Path, info: dict) -> Path:
    """Trace ``network`` with its normalization into a TorchScript file that needs only torch."""
    model = Exported(copy.deepcopy(network).float().cpu(), preprocess).eval().requires_grad_(False)
    example = torch.zeros(2, 3, preprocess.crop, preprocess.crop, dtype=torch.uint8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example)
    extra = {
        "format": EXPORT_FORMAT,
        "classes": list(classes),
        "preprocess": preprocess.to_dict(),
        "input": f"uint8 RGB images, N x 3 x {preprocess.crop} x {preprocess.crop}: the shorter side resized to "
                 f"{preprocess.resize} ({preprocess.interpolation}, antialiased), then center-cropped",
        "output": "class probabilities, N x C, in the order of classes",
        **info,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in favour of torch.export
        _replace(path, lambda tmp: torch.jit.save(traced, str(tmp), _extra_files={EXPORT_INFO: json.dumps(extra, indent=2)}))
    return path


def load_exported(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[torch.jit.ScriptModule, dict]:
    """An exported model and its JSON info (classes, preprocess, ...)."""
    files = {EXPORT_INFO: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(path), map_location=device, _extra_files=files)
    except (RuntimeError, ValueError) as exc:
        raise FinetuneError(f"{path} is not an exported featurecache model: {exc}".splitlines()[0]) from None
    if not files[EXPORT_INFO]:
        raise FinetuneError(f"{path} is a TorchScript file without featurecache's class names and preprocessing")
    return model.eval(), json.loads(files[EXPORT_INFO])


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

    def to_dict(self) -> dict:
        keys = ("model", "head", "head_accuracy", "start_accuracy", "best_accuracy", "epochs", "split")
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


def _validate(unfreeze, bn, augment, optimizer, epochs, batch_size, accumulate, warmup_epochs, backbone_lr_mult,
              patience, checkpoint_every):
    trainable_blocks(nn.Linear(1, 1), unfreeze)  # checks the spelling
    for value, name, choices in ((bn, "bn", BN_MODES), (augment, "augment", AUGMENTS), (optimizer, "optimizer", OPTIMIZERS)):
        if value not in choices:
            raise FinetuneError(f"unknown --{name} {value!r}: choose one of {', '.join(choices)}" + suggest(value, choices))
    for value, name in ((epochs, "epochs"), (batch_size, "batch-size"), (accumulate, "accumulate"),
                        (checkpoint_every, "checkpoint-every")):
        if value < 1:
            raise FinetuneError(f"--{name} must be at least 1")
    if warmup_epochs < 0 or backbone_lr_mult < 0 or patience < 0:
        raise FinetuneError("--warmup-epochs, --backbone-lr-mult and --patience cannot be negative")


def finetune(
    run: str,
    head: str = "best-transferable",
    epochs: int = 5,
    unfreeze: str = "all",
    backbone_lr_mult: float = 0.1,
    bn: str = "frozen",
    augment: str = "light",
    optimizer: str = "adamw",
    lr: float | None = None,
    weight_decay: float | None = None,
    warmup_epochs: float = 1.0,
    batch_size: int = 32,
    accumulate: int = 1,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    patience: int = 3,
    checkpoint_every: int = 50,
    resume: bool = False,
    seed: int = 0,
    cache_dir: str | None = None,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune backbone and head of a stage-two run; export the best epoch as ``model.pt``.

    ``run``: a run directory, run id or unique prefix. ``head``: ``best-transferable`` (the
    best-ranked head that can become a layer), ``best`` (the top of the leaderboard, which
    must be transferable), a head spec or a slug of the run.
    ``unfreeze``: ``all``, ``none`` (head only) or ``last:N`` backbone blocks; the backbone's
    learning rate is ``lr * backbone_lr_mult``. ``bn``: ``frozen`` keeps batch norm statistics
    and scales as pretrained. ``patience``: epochs without improvement on the selection split
    before stopping (0: never). ``checkpoint_every``: optimizer steps between mid-epoch
    checkpoints. ``resume``: continue from the last checkpoint of the same configuration.
    """
    _validate(unfreeze, bn, augment, optimizer, epochs, batch_size, accumulate, warmup_epochs, backbone_lr_mult,
              patience, checkpoint_every)
    dev = runtime.resolve_device(device)
    prec = runtime.resolve_precision(precision, dev)
    workers = runtime.usable_cores() if workers is None else int(workers)
    opt_type = OPTIMIZERS[optimizer]
    lr = opt_type.lr if lr is None else float(lr)
    weight_decay = opt_type.weight_decay if weight_decay is None else float(weight_decay)

    loaded, pipeline, head_meta = load_run_head(run, head, cache_dir)
    meta, run_dir = loaded.meta, Path(loaded.path)
    cache_meta = store.info(meta["cache"])
    classes = list(meta["classes"])
    split = meta["selection_split"]
    if split not in cache_meta["splits"] or "train" not in cache_meta["splits"]:
        raise FinetuneError(
            f"fine-tuning needs a train split and held-out images to stop on, but {Path(meta['cache']).name} has "
            f"{', '.join(cache_meta['splits'])} (heads were selected by {split}); re-extract with --split train=0.8,val=0.2"
        )
    head_accuracy = float(head_meta["metrics"][split]["accuracy"])
    config = {
        "run_id": meta["run_id"], "cache_key": meta["cache_key"], "head": head_meta["head"], "epochs": epochs,
        "unfreeze": unfreeze, "backbone_lr_mult": backbone_lr_mult, "bn": bn, "augment": augment,
        "optimizer": optimizer, "lr": lr, "weight_decay": weight_decay, "warmup_epochs": warmup_epochs,
        "batch_size": batch_size, "accumulate": accumulate, "precision": prec, "patience": patience, "seed": seed,
    }
    out = run_dir / "finetune" / store.cache_key(config)[:12]
    if (out / "result.json").is_file():
        done = json.loads((out / "result.json").read_text())
        return FinetuneResult(**{**done, "reused": True})
    module = head_module(pipeline, head_meta, loaded.leaderboard)
    backbone = load_backbone(meta["config"])
    net = Network(backbone.model, module)
    out.mkdir(parents=True, exist_ok=True)
    _write_json({**config, "run_dir": str(run_dir)}, out / "config.json")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    pre = backbone.preprocess
    max_pixels = cache_meta["config"].get("max_image_pixels")
    val_data, val_labels = cache_images(cache_meta, split)
    val_images = ImageTensors(val_data, np.arange(len(val_labels)), pre, max_pixels)
    train_data, train_labels = cache_images(cache_meta, "train")
    train_images = TrainImages(train_data, pre, augment, seed, max_pixels)

    torch.manual_seed(seed)
    net = net.to(dev).to(memory_format=torch.channels_last)
    backbone_params = prepare(net, unfreeze, bn)
    opt = opt_type.factory(param_groups(net, backbone_params, lr, weight_decay, backbone_lr_mult))
    drop_last = bn == "train" and len(train_labels) > batch_size
    n_batches = len(train_labels) // batch_size if drop_last else math.ceil(len(train_labels) / batch_size)
    steps_per_epoch = math.ceil(n_batches / accumulate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, cosine_with_warmup(epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)))
    scaler = torch.amp.GradScaler(dev.type, enabled=prec == "fp16")
    eval_args = dict(classes=classes, device=dev, precision=prec, batch_size=batch_size, workers=workers,
                     progress=progress)

    def checkpoint(state: _State) -> None:
        _save({"model": net.state_dict(), "optimizer": opt.state_dict(), "schedule": schedule.state_dict(),
               "scaler": scaler.state_dict(), "state": asdict(state), "rng": torch.get_rng_state(),
               "cuda_rng": torch.cuda.get_rng_state_all() if dev.type == "cuda" else []}, out / "last.pt")

    def record_best(state: _State, metrics: dict) -> None:
        state.best_accuracy, state.best_loss = metrics["accuracy"], metrics["log_loss"]
        state.best_metrics, state.best_epoch, state.stale = metrics, state.epoch, 0
        _save({"model": net.state_dict(), "epoch": state.epoch}, out / "best.pt")

    resumed_from = None
    if resume and (out / "last.pt").is_file():
        saved = torch.load(out / "last.pt", map_location=dev, weights_only=True)
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["rng"].cpu())
        if saved["cuda_rng"]:
            torch.cuda.set_rng_state_all([s.cpu() for s in saved["cuda_rng"]])
        state = _State(**saved["state"])
        resumed_from = {"epoch": state.epoch, "batch": state.batch, "step": state.step}
        log(f"resuming {out.name} from epoch {state.epoch} batch {state.batch} (step {state.step})")
    else:
        if (out / "last.pt").is_file():
            log(f"an interrupted fine-tuning of this configuration is in {out}; starting over (--resume continues it)")
        started = time.perf_counter()
        metrics = evaluate(net, val_images, val_labels, desc="step 0", **eval_args)
        state = _State(start_accuracy=metrics["accuracy"])
        state.history.append({"epoch": 0, "train_loss": None, "val_loss": metrics["log_loss"],
                              "val_accuracy": metrics["accuracy"], "seconds": time.perf_counter() - started,
                              "lr": 0.0, "val": summary(metrics)})
        record_best(state, metrics)
        if metrics["accuracy"] != head_accuracy:
            log(f"warning: at step 0 the network reaches {metrics['accuracy']:.4f} on {split}, the head "
                f"{head_accuracy:.4f}: the images or the backbone differ from extraction")
        checkpoint(state)
        _write_json(state.history, out / "history.json")
    if progress:
        log(f"{head_meta['head']}: head {head_accuracy:.4f}, step 0 {state.start_accuracy:.4f} on {split}")

    from tqdm.auto import tqdm

    stopped_early = bool(patience) and state.stale >= patience
    while state.epoch < epochs and not stopped_early:
        epoch = state.epoch
        started = time.perf_counter()
        order = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        train_images.epoch = epoch
        loader = image_loader(train_images, batch_size, workers, dev, order[state.batch * batch_size:].tolist(),
                              drop_last)
        train_mode(net, bn)
        bar = tqdm(total=n_batches, initial=state.batch, desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                   leave=False, disable=not progress, dynamic_ncols=True)
        for b, (index, batch, reasons) in enumerate(loader, start=state.batch):
            ok = torch.tensor([not r for r in reasons])
            group = min(accumulate, n_batches - (b // accumulate) * accumulate)
            if ok.any():
                x = normalize_batch(batch[ok].to(dev, non_blocking=True), pre)
                y = torch.from_numpy(train_labels[index[ok].numpy()]).to(dev)
                with runtime.autocast(dev, prec):
                    loss = F.cross_entropy(net(x).float(), y)
                scaler.scale(loss / group).backward()
                state.loss_sum += float(loss.detach()) * int(ok.sum())
                state.seen += int(ok.sum())
            if (b + 1) % accumulate == 0 or b + 1 == n_batches:
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                schedule.step()
                state.step += 1
                state.batch = b + 1
                if state.step % checkpoint_every == 0 and state.batch < n_batches:
                    state.seconds += time.perf_counter() - started
                    started = time.perf_counter()
                    checkpoint(state)
            bar.update(1)
            bar.set_postfix(loss=f"{state.loss_sum / max(1, state.seen):.4f}")
        bar.close()
        metrics = evaluate(net, val_images, val_labels, desc=f"eval {epoch + 1}", **eval_args)
        state.epoch, state.batch = epoch + 1, 0
        entry = {"epoch": state.epoch, "train_loss": state.loss_sum / max(1, state.seen),
                 "val_loss": metrics["log_loss"], "val_accuracy": metrics["accuracy"],
                 "seconds": state.seconds + time.perf_counter() - started,
                 "lr": schedule.get_last_lr()[0], "val": summary(metrics)}
        state.history.append(entry)
        state.loss_sum, state.seen, state.seconds = 0.0, 0, 0.0
        improved = (metrics["accuracy"], -metrics["log_loss"]) > (state.best_accuracy, -state.best_loss)
        if improved:
            record_best(state, metrics)
        else:
            state.stale += 1
        stopped_early = bool(patience) and state.stale >= patience
        checkpoint(state)
        _write_json(state.history, out / "history.json")
        if progress:
            log(f"epoch {state.epoch}/{epochs}  train_loss {entry['train_loss']:.4f}  val_loss {entry['val_loss']:.4f}  "
                f"val_accuracy {entry['val_accuracy']:.4f}{'  (best)' if improved else ''}  {entry['seconds']:.1f} s")

    net.load_state_dict(torch.load(out / "best.pt", map_location=dev, weights_only=True)["model"])
    metrics = {"head": dict(head_meta["metrics"]), "finetuned": {split: state.best_metrics}}
    final = meta.get("final_split", split)
    if final != split and final in cache_meta["splits"]:
        data, labels = cache_images(cache_meta, final)
        images = ImageTensors(data, np.arange(len(labels)), pre, max_pixels)
        metrics["finetuned"][final] = evaluate(net, images, labels, desc=final, **eval_args)
    model_path = export(net, pre, classes, out / "model.pt", {
        "backbone": backbone.identity, "layer": backbone.layer, "head": head_meta["head"],
        "run_id": meta["run_id"], "cache_key": meta["cache_key"], "finetune": config,
        "best_epoch": state.best_epoch, "metrics": {s: summary(m) for s, m in metrics["finetuned"].items()},
    })
    result = FinetuneResult(
        model=str(model_path), head=head_meta["head"], head_accuracy=head_accuracy,
        start_accuracy=state.start_accuracy, best_accuracy=state.best_accuracy, epochs=state.epoch, split=split,
        output_dir=str(out), best_epoch=state.best_epoch, stopped_early=stopped_early, history=state.history,
        metrics=metrics,
    )
    saved = asdict(result)
    saved.pop("reused")
    saved.pop("resumed_from")
    _write_json(saved, out / "result.json")
    result.resumed_from = resumed_from
    return result
