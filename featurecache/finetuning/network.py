"""The network of a run, and the two files it is saved as.

A run's cache config names the backbone, its weights, the layer and the preprocessing; the
chosen head becomes a torch module through :func:`featurecache.heads.to_torch`, its
preprocessing folded in. :func:`assemble` joins them, so at step 0 the network predicts what
the head predicted on the cached features.

A fine-tuning folder (``<run_dir>/finetune/<hash>/``) holds the trained network twice:

- ``model.safetensors``: the :class:`Network`'s state dict, plain tensors. Its sha256 is
  recorded in ``result.json``; :func:`load_finetuned` rebuilds the architecture from the run
  the folder belongs to and loads the tensors only if the hash matches.
- ``model.pt``: TorchScript, uint8 N x 3 x crop x crop -> class probabilities, with the class
  names and preprocessing as JSON in its extra file ``featurecache.json``. It loads with torch
  alone (:func:`export`, :func:`load_exported`) and is the file to deploy.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..backbones import models as backbones
from ..data.preprocess import Preprocess
from ..errors import FinetuneError, RunError
from ..files import atomic_write, sha256_file

EXPORT_INFO = "featurecache.json"
EXPORT_FORMAT = "featurecache-model/1"
MODEL_FILE = "model.pt"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_FORMAT = "featurecache-network/1"
# the files of a fine-tuning folder, <run_dir>/FINETUNE_DIR/<hash>/
FINETUNE_DIR = "finetune"
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
RESULT_FILE = "result.json"


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
    """uint8 images (resized and center-cropped) -> class probabilities, ``softmax(logits / temperature)``.

    Normalization repeats :func:`featurecache.data.images.normalize_batch` operation for
    operation, so an exported model sees exactly what extraction and training saw. The
    temperature is 1 unless the head was calibrated (:mod:`featurecache.sweep.calibration`).
    """

    def __init__(self, network: nn.Module, preprocess: Preprocess, temperature: float = 1.0):
        super().__init__()
        self.network = network
        self.register_buffer("mean", torch.tensor(preprocess.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocess.std).view(1, 3, 1, 1))
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div(255.0).sub(self.mean).div(self.std).contiguous(memory_format=torch.channels_last)
        return torch.softmax(self.network(x).float() / self.temperature, dim=1)


def weights_argument(identity: dict) -> str:
    """The ``weights=`` value for :func:`backbones.build` from a cache's recorded weights identity."""
    recorded = str(identity.get("weights", "none"))
    return recorded.rpartition(".")[2].removeprefix("timm:")


class FeatureColumns(nn.Module):
    """Columns ``[start, stop)`` of a backbone's output: one feature set of a cache that stores several
    layers side by side (``fc extract --layers``)."""

    def __init__(self, model: nn.Module, start: int, stop: int):
        super().__init__()
        self.model, self.start, self.stop = model, int(start), int(stop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[:, self.start:self.stop]


def feature_columns(parts: list[tuple[str, int]], features: str) -> tuple[int, int]:
    """Where feature set ``features`` (``penultimate``, a layer or ``concat``) lies among a backbone's ``parts``."""
    edges = np.cumsum([0, *(width for _, width in parts)])
    if features == "concat":
        return 0, int(edges[-1])
    index = 0 if features == "penultimate" else [name for name, _ in parts].index(features)
    return int(edges[index]), int(edges[index + 1])


def load_backbone(config: dict, features: str = "penultimate") -> backbones.Backbone:
    """Rebuild the exact backbone a cache was extracted with, from its config alone, returning the
    feature set ``features`` a run's heads learnt from. For the penultimate features the stored
    layers are not tapped at all: the network is the plain backbone, as without ``--layers``."""
    identity = config["weights"]
    weights_file = identity.get("weights_file")
    if identity.get("weights") == "none" and not weights_file and "init_seed" not in identity:
        raise FinetuneError(
            f"the cache was extracted with unseeded random weights (weights=none) for {config['backbone']}; "
            "they cannot be rebuilt: re-run fc extract"
        )
    wanted = ("tta",) if features == "penultimate" else ("layers", "tta")
    more = {key: config[key] for key in wanted if config.get(key)}  # fc extract --layers, --tta
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = backbones.build(
            config["backbone"],
            weights=None if weights_file else weights_argument(identity),
            weights_file=weights_file,
            layer=None if config.get("layer") in (None, "penultimate") else config["layer"],
            preprocess=Preprocess(**config["preprocess"]),
            **more,
        )
    for key in ("weights", "sha256", "init_seed"):
        if key in identity and net.identity.get(key) not in (None, identity[key]):
            raise FinetuneError(
                f"the backbone weights changed since extraction: the cache used {key} {identity[key]}, "
                f"now {net.identity[key]}; re-run fc extract and fc fit-head"
            )
    start, stop = feature_columns(net.parts, features)
    if (start, stop) != (0, sum(width for _, width in net.parts)):
        net = dataclasses.replace(net, model=FeatureColumns(net.model, start, stop), feature_dim=stop - start,
                                  parts=[(features, stop - start)])
    return net


def run_backbone(meta: dict, pipeline, head_meta: dict) -> tuple[backbones.Backbone, object]:
    """The backbone a run's head reads from, and the head's pipeline. A head of a run on ``concat`` that
    reads only the penultimate columns (``cols``, as ``fit-head --features auto`` fits them) needs no
    stored layer: its backbone is built without them and its pipeline loses the column step, so the
    network, its export and ``--from-activations`` are those of a run on the penultimate features."""
    config, features = meta["config"], meta.get("features", "penultimate")
    cols = head_meta.get("cols")
    if features == "concat" and cols is not None and cols[0] == 0 and "cols" in getattr(pipeline, "named_steps", {}):
        plain = load_backbone({k: v for k, v in config.items() if k != "layers"})
        if cols[1] == plain.feature_dim:
            return plain, pipeline[1:]
    return load_backbone(config, features), pipeline


def head_module(pipeline, head_meta: dict, leaderboard: list[dict]) -> nn.Module:
    """The head as a torch module on raw cached features, or a FinetuneError naming one that works."""
    from ..heads import to_torch, transferable_heads
    from ..sweep.runs import best_transferable

    if not head_meta.get("transferable"):
        alternative = best_transferable(leaderboard)
        hint = (f"; the best head that can is {alternative} (--head '{alternative}')" if alternative
                else f"; the run has no head that can ({', '.join(transferable_heads())})")
        raise FinetuneError(f"head {head_meta['head']} cannot become a layer of the network{hint}")
    return to_torch(pipeline, head_meta.get("name")).float()


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


def load_run_head(run, head: str = "best", cache_dir: str | None = None, trust: bool = False):
    """``(run, fitted pipeline, head.json)`` of a stage-two run (path or id) and one of its heads.

    ``trust`` lets a run of the old pickle format load (see :func:`featurecache.sweep.runs.load_head`).
    """
    from ..sweep.runs import load_head, load_run, resolve_run

    loaded = load_run(resolve_run(run, cache_dir))
    pipeline, head_meta = load_head(loaded.path, head, trust=trust)
    return loaded, pipeline, head_meta


def assemble(run, head: str = "best", cache_dir: str | None = None, allow_sklearn: bool = False,
             trust: bool = False) -> Assembly:
    """Join the backbone of ``run``'s cache and its ``head`` (``best``, ``best-transferable``, a spec or a slug)."""
    loaded, pipeline, head_meta = load_run_head(run, head, cache_dir, trust)
    backbone, pipeline = run_backbone(loaded.meta, pipeline, head_meta)
    module = None
    if head_meta.get("transferable") or not allow_sklearn:
        module = head_module(pipeline, head_meta, loaded.leaderboard)
    network = Network(backbone.model, module) if module is not None else None
    return Assembly(Path(loaded.path), loaded.meta, loaded.leaderboard, pipeline, head_meta, backbone, network)


# --------------------------------------------------------------------------- TorchScript export


def export(network: Network, preprocess: Preprocess, classes: list[str], path: Path, info: dict,
           temperature: float = 1.0) -> Path:
    """Trace ``network`` with its normalization (and ``temperature``) into a TorchScript file that needs only torch."""
    model = Exported(copy.deepcopy(network).float().cpu(), preprocess, temperature).eval().requires_grad_(False)
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
        "temperature": float(temperature),
        **info,
    }
    files = {EXPORT_INFO: json.dumps(extra, indent=2)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in favour of torch.export
        buffer = io.BytesIO()  # in memory first: a full disk is an OSError of Python's, not of torch's writer
        torch.jit.save(traced, buffer, _extra_files=files)
        return atomic_write(path, buffer.getbuffer())


def _check_export(path: Path) -> None:
    """A RunError if ``path`` lies in a fine-tuning folder whose ``result.json`` records another sha256 for it."""
    try:
        recorded = json.loads((path.parent / RESULT_FILE).read_text()).get("export")
    except (OSError, ValueError, AttributeError):
        return  # a model.pt on its own: nothing records its hash
    if recorded and recorded.get("file") == path.name and (problem := file_problem(path.parent, recorded)):
        raise RunError(f"{problem}; {RETRAIN}")


def load_exported(path: str | os.PathLike, device: torch.device | str = "cpu") -> tuple[torch.jit.ScriptModule, dict]:
    """An exported model and its JSON info (classes, preprocess, ...); in a fine-tuning folder, once its
    bytes have the sha256 ``result.json`` records."""
    _check_export(Path(path))
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


# --------------------------------------------------------------------------- safetensors weights


def save_weights(network: nn.Module, path: Path) -> dict:
    """Write the network's state dict as safetensors; return ``{"file", "sha256"}`` to record."""
    from safetensors.torch import save

    # clones: safetensors refuses tensors that share memory, and wants them contiguous
    tensors = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in network.state_dict().items()}
    atomic_write(path, save(tensors, metadata={"format": WEIGHTS_FORMAT}))
    return {"file": path.name, "sha256": sha256_file(path)}


def is_finetune_dir(path: Path) -> bool:
    """Whether ``path`` is a finished fine-tuning folder (it has ``result.json``)."""
    return path.is_dir() and (path / RESULT_FILE).is_file()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RunError(f"{path} cannot be read: {exc}".splitlines()[0]) from None


# The advice of a damaged fine-tuning folder: the same fc finetune trains it again.
RETRAIN = ("run the fc finetune that made it again (same run and options, see its config.json): it trains a damaged "
           "folder again")


def file_problem(folder: Path, recorded: dict | None) -> str | None:
    """What is wrong with the file ``recorded`` (``{"file", "sha256"}`` of ``result.json``) of a fine-tuning folder."""
    path = folder / recorded["file"]
    if not path.is_file():
        return f"{path} is missing"
    if sha256_file(path) != recorded["sha256"]:
        return f"{path} does not match the sha256 recorded in {folder / RESULT_FILE}: it was changed after fine-tuning"
    return None


def finetune_problem(folder: Path) -> str | None:
    """What is wrong with a finished fine-tuning folder's files, or None: ``result.json`` reads and
    ``model.safetensors`` and ``model.pt`` have the sha256 it records (folders of an older featurecache
    record no ``model.pt`` hash: it is not checked)."""
    try:
        result = json.loads((folder / RESULT_FILE).read_text())
    except (OSError, ValueError):
        return f"{folder / RESULT_FILE} cannot be read"
    for key in ("weights", "export"):
        if result.get(key) and (problem := file_problem(folder, result[key])) is not None:
            return problem
    return None


def _checked_weights(folder: Path, result: dict) -> Path:
    """The folder's safetensors file, if its bytes have the sha256 that ``result.json`` records."""
    recorded = result.get("weights")
    if not recorded:
        raise RunError(f"{folder} has no {WEIGHTS_FILE} (fine-tuned by an older featurecache); "
                       f"give {folder / MODEL_FILE} instead, or {RETRAIN}")
    problem = file_problem(folder, recorded)
    if problem is not None:
        raise RunError(f"{problem}; {RETRAIN}")
    return folder / recorded["file"]


def _load_tensors(network: nn.Module, path: Path, head: str) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        network.load_state_dict(load_file(path))
    except (RuntimeError, OSError, SafetensorError) as exc:
        message = f"{path} does not fit the network of {head}: {exc}"
        raise RunError(message.splitlines()[0]) from None


def load_finetuned(folder: str | os.PathLike, device: torch.device | str = "cpu",
                   trust: bool = False) -> tuple[Exported, dict]:
    """``(uint8 images -> probabilities, {"classes", "preprocess"})`` of a fine-tuning folder.

    The architecture comes from the run the folder lives in (``RUN/finetune/<hash>``) and the
    head it started from; the weights from ``model.safetensors`` after checking its hash. The
    probabilities are divided by the temperature ``result.json`` records for the fine-tuned
    network (1 when it records none): a temperature fitted to the head before fine-tuning
    does not describe the fine-tuned network, so it is not applied.
    """
    from ..sweep.runs import RUN_FILE

    folder = Path(folder)
    config, result = _read_json(folder / CONFIG_FILE), _read_json(folder / RESULT_FILE)
    weights = _checked_weights(folder, result)
    run_dir = folder.parent.parent
    if folder.parent.name != FINETUNE_DIR or not (run_dir / RUN_FILE).is_file():
        raise RunError(f"{folder} is not inside the run it was fine-tuned from (RUN/{FINETUNE_DIR}/...)")
    parts = assemble(run_dir, config["head"], trust=trust)
    if parts.meta["run_id"] != config["run_id"]:
        raise RunError(f"{folder} was fine-tuned from run {config['run_id']}, but lies under {parts.meta['run_id']}")
    _load_tensors(parts.network, weights, parts.head_meta["head"])
    pre = parts.backbone.preprocess
    model = Exported(parts.network, pre, float(result.get("temperature", 1.0))).to(device).eval()
    # the classes and preprocessing in the JSON form of model.pt's info
    return model, json.loads(json.dumps({"classes": parts.meta["classes"], "preprocess": pre.to_dict()}))
