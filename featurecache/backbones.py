"""Backbones addressable by name: torchvision classification models and, optionally, timm.

``build(name, weights=..., weights_file=..., layer=..., preprocess=...)`` returns a
:class:`Backbone` whose ``model`` maps a normalized image batch to features.

The penultimate layer is found generically: the classifier is the last ``Linear``
or ``Conv2d`` module of the network (``fc``, ``classifier.1``, ``heads.head``,
SqueezeNet's final 1x1 convolution ...). It is replaced by ``nn.Identity``, so
the model returns what the classifier would have read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import Preprocess
from .errors import BackboneError, FeatureCacheWarning, suggest

TIMM_PREFIX = "timm/"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Backbone:
    """A frozen feature extractor and everything needed to reproduce it."""

    name: str
    model: nn.Module
    preprocess: Preprocess
    feature_dim: int
    layer: str
    identity: dict = field(default_factory=dict)
    classifier: str | None = None


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def _empty_weights():
    """Build modules with parameters on the meta device: shapes without memory or init cost."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        original(module, name, param)
        if param is not None:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        nn.Module.register_parameter = original


def find_classifier(model: nn.Module) -> tuple[str, int]:
    """Name and input width of the final ``Linear``/``Conv2d`` (the classifier)."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            last = (name, module)
    if last is None:
        raise BackboneError("cannot find a classifier layer (Linear or Conv2d) in this model; pass --layer")
    name, module = last
    width = module.in_features if isinstance(module, nn.Linear) else module.in_channels
    return name, width


def _replace_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def global_pool(out: torch.Tensor) -> torch.Tensor:
    """Average a layer's output down to one vector per image."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.dim() == 4:  # N, C, H, W
        return out.mean(dim=(2, 3))
    if out.dim() == 3:  # N, tokens, D
        return out.mean(dim=1)
    return out.flatten(1)


class _StopForward(Exception):
    pass


class LayerTap(nn.Module):
    """Runs ``model`` up to ``layer`` and returns that layer's pooled output."""

    def __init__(self, model: nn.Module, layer: str):
        super().__init__()
        self.model = model
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []

        def hook(_module, _inputs, output):
            captured.append(output)
            raise _StopForward

        handle = self.model.get_submodule(self.layer).register_forward_hook(hook)
        try:
            self.model(x)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return global_pool(captured[0])


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, ...
        raise BackboneError(f"cannot read weights file {path}: {exc}".splitlines()[0]) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise BackboneError(f"weights file {path} does not hold a state dict")
    return state


def _load_without_classifier(model: nn.Module, state: dict, classifier: str | None, source: str) -> None:
    if classifier:
        state = {k: v for k, v in state.items() if not k.startswith(classifier + ".")}
    result = model.load_state_dict(state, strict=False)
    head = (classifier + ".") if classifier else None
    missing = [k for k in result.missing_keys if not (head and k.startswith(head))]
    unexpected = list(result.unexpected_keys)
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise BackboneError(f"{source} does not fit this backbone: " + ", ".join(detail))


# --------------------------------------------------------------------------- sources


class TorchvisionSource:
    """Every classification model of ``torchvision.models``."""

    prefix = ""

    def names(self) -> list[str]:
        import torchvision

        return list(torchvision.models.list_models(module=torchvision.models))

    def weights_enum(self, name: str):
        from torchvision.models import get_model_weights

        return get_model_weights(name)

    def weight_names(self, name: str) -> list[str]:
        return list(self.weights_enum(name).__members__)

    def resolve_weights(self, name: str, weights: str):
        enum = self.weights_enum(name)
        try:
            return enum[weights]
        except KeyError:
            raise BackboneError(
                f"unknown weights {weights!r} for {name}; choose one of: "
                + ", ".join(list(enum.__members__) + ["none"])
            ) from None

    def feature_dim(self, name: str) -> int:
        import torchvision

        with _empty_weights():
            model = torchvision.models.get_model(name)
        return find_classifier(model)[1]

    def default_preprocess(self, name: str, weights_enum_member) -> Preprocess:
        member = weights_enum_member or self.weights_enum(name).DEFAULT
        t = member.transforms()
        return Preprocess(
            resize=int(t.resize_size[0]),
            crop=int(t.crop_size[0]),
            mean=tuple(float(v) for v in t.mean),
            std=tuple(float(v) for v in t.std),
            interpolation=t.interpolation.value,
        )

    def create(self, name: str, weights: str | None, weights_file: str | None):
        """Return ``(model, default_preprocess or None, identity)``."""
        import torchvision

        if weights_file:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = torchvision.models.get_model(name, weights=None)
            return model, None, {"weights_file": str(Path(weights_file).resolve())}
        if weights is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = torchvision.models.get_model(name, weights=None)
            return model, self.default_preprocess(name, None), {"weights": "none"}
        member = self.resolve_weights(name, weights)
        try:
            model = torchvision.models.get_model(name, weights=member)
        except (OSError, RuntimeError) as exc:
            filename = os.path.basename(member.url)
            hub = Path(torch.hub.get_dir()) / "checkpoints"
            raise BackboneError(
                f"weights {type(member).__name__}.{member.name} are not in {hub} and could not be "
                f"downloaded ({type(exc).__name__}); on an offline machine copy {filename} there with "
                f"`fc weights import FILE --backbone {name} --weights {member.name}`"
            ) from None
        identity = {"weights": f"{type(member).__name__}.{member.name}", "url": member.url}
        return model, self.default_preprocess(name, member), identity


class TimmSource:
    """timm models as ``timm/NAME`` (optional: ``pip install featurecache[timm]``)."""

    prefix = TIMM_PREFIX

    def _timm(self):
        try:
            import timm
        except ImportError:
            raise BackboneError("timm backbones need timm: pip install 'featurecache[timm]'") from None
        return timm

    def names(self) -> list[str]:
        try:
            import timm
        except ImportError:
            return []
        return [TIMM_PREFIX + n for n in timm.list_models()]

    def weight_names(self, name: str) -> list[str]:
        return ["DEFAULT", "none"]

    def feature_dim(self, name: str) -> int:
        timm = self._timm()
        with _empty_weights():
            model = timm.create_model(name[len(TIMM_PREFIX):], pretrained=False)
        return int(model.num_features)

    def _preprocess(self, model) -> Preprocess:
        timm = self._timm()
        cfg = timm.data.resolve_data_config({}, model=model)
        crop = int(cfg["input_size"][-1])
        crop_pct = float(cfg.get("crop_pct") or 0.875)
        return Preprocess(
            resize=int(round(crop / crop_pct)),
            crop=crop,
            mean=tuple(float(v) for v in cfg["mean"]),
            std=tuple(float(v) for v in cfg["std"]),
            interpolation=str(cfg.get("interpolation", "bilinear")),
        )

    def create(self, name: str, weights: str | None, weights_file: str | None):
        timm = self._timm()
        short = name[len(TIMM_PREFIX):]
        if weights not in (None, "DEFAULT") and not weights_file:
            raise BackboneError(f"unknown weights {weights!r} for {name}; choose one of: DEFAULT, none")
        pretrained = weights == "DEFAULT" and not weights_file
        try:
            model = timm.create_model(short, pretrained=pretrained)
        except Exception as exc:
            raise BackboneError(f"cannot create {name}: {exc}".splitlines()[0]) from None
        if weights_file:
            identity = {"weights_file": str(Path(weights_file).resolve())}
        else:
            identity = {"weights": "timm:DEFAULT" if pretrained else "none", "timm": timm.__version__}
        return model, self._preprocess(model), identity


# The seed of every random initialization (weights=none): it is part of the cache key.
RANDOM_INIT_SEED = 0

SOURCES: dict[str, Any] = {TIMM_PREFIX: TimmSource(), "": TorchvisionSource()}


def _source_for(name: str):
    for prefix, source in SOURCES.items():
        if prefix and name.startswith(prefix):
            return source
    return SOURCES[""]


def list_backbones(include_timm: bool = False) -> list[str]:
    names = SOURCES[""].names()
    if include_timm:
        names += SOURCES[TIMM_PREFIX].names()
    return names


def check_name(name: str) -> None:
    source = _source_for(name)
    names = source.names()
    if name not in names:
        if source is SOURCES[TIMM_PREFIX] and not names:
            source._timm()
        raise BackboneError(f"unknown backbone {name!r}" + suggest(name, names))


def feature_dim(name: str) -> int:
    check_name(name)
    return _source_for(name).feature_dim(name)


def weight_names(name: str) -> list[str]:
    check_name(name)
    return _source_for(name).weight_names(name)


def build(
    name: str,
    weights: str | None = "DEFAULT",
    weights_file: str | None = None,
    layer: str | None = None,
    preprocess: Preprocess | dict | None = None,
) -> Backbone:
    """Instantiate a frozen backbone in eval mode that returns features.

    ``weights``: an enum member name (``IMAGENET1K_V1``, ``DEFAULT``), or ``"none"``/None for a
    random initialization (with a warning). ``weights_file``: a state dict (loaded with
    ``weights_only=True``); it needs ``preprocess`` stated. ``layer``: any named module, pooled.
    """
    check_name(name)
    if isinstance(weights, str) and weights.lower() == "none":
        weights = None
    if weights_file and preprocess is None:
        raise BackboneError(
            "a weights file needs its preprocessing stated: pass --resize, --crop (and --mean, --std)"
        )
    if weights is None and not weights_file:
        warnings.warn(f"{name} has random weights (weights=none): its features carry no pretrained knowledge",
                      FeatureCacheWarning, stacklevel=2)
    source = _source_for(name)
    if weights is None and not weights_file:
        # A seeded random initialization: the same features every time, and a backbone
        # that fine-tuning can rebuild. The caller's random state is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            model, default_pre, identity = source.create(name, weights, weights_file)
        identity["init_seed"] = RANDOM_INIT_SEED
    else:
        model, default_pre, identity = source.create(name, weights, weights_file)
    classifier, width = (None, None)
    if isinstance(source, TimmSource):
        model.reset_classifier(0)
    else:
        classifier, width = find_classifier(model)
    if weights_file:
        _load_without_classifier(model, load_state_dict_file(weights_file), classifier, f"weights file {weights_file}")
        identity["sha256"] = sha256_file(weights_file)
    if isinstance(preprocess, dict):
        preprocess = Preprocess(**preprocess)
    pre = preprocess or default_pre
    if layer:
        names = [n for n, _ in model.named_modules() if n]
        if layer not in names:
            raise BackboneError(f"unknown layer {layer!r} for {name}" + suggest(layer, names))
        model = LayerTap(model, layer)
    elif classifier is not None:
        _replace_module(model, classifier, nn.Identity())
    model.eval().requires_grad_(False)
    if layer:
        with torch.inference_mode():
            dim = int(model(torch.zeros(1, 3, pre.crop, pre.crop)).shape[1])
    elif isinstance(source, TimmSource):
        dim = int(model.num_features)
    else:
        dim = int(width)
    identity = {"backbone": name, **identity}
    return Backbone(
        name=name,
        model=model,
        preprocess=pre,
        feature_dim=dim,
        layer=layer or "penultimate",
        identity=identity,
        classifier=classifier,
    )


# --------------------------------------------------------------------------- offline weights

_HASH_RE = re.compile(r"-([a-f0-9]*)\.")


def import_weights(file: str, backbone: str, weights: str = "DEFAULT") -> dict:
    """Check ``file`` against torchvision's expected hash prefix and copy it into the hub cache."""
    check_name(backbone)
    source = _source_for(backbone)
    if not isinstance(source, TorchvisionSource):
        raise BackboneError("fc weights import handles torchvision weights; use timm's own cache for timm models")
    member = source.resolve_weights(backbone, weights)
    src = Path(file)
    if not src.is_file():
        raise BackboneError(f"weights file not found: {src}")
    filename = os.path.basename(member.url)
    match = _HASH_RE.search(filename)
    digest = sha256_file(src)
    if match and not digest.startswith(match.group(1)):
        raise BackboneError(
            f"{src} is not {filename}: its sha256 starts with {digest[:8]}, torchvision expects {match.group(1)}"
        )
    dest_dir = Path(torch.hub.get_dir()) / "checkpoints"
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / filename
    if not (dest.is_file() and sha256_file(dest) == digest):
        tmp = dest.with_suffix(dest.suffix + ".tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    return {"path": str(dest), "weights": f"{type(member).__name__}.{member.name}", "sha256": digest}

