"""Backbones addressable by name: torchvision classification models and, optionally, timm.

Each family of models is a :class:`BackboneSource` registered in :data:`SOURCES` under a
name prefix (``timm/``; torchvision's is empty). ``build(name, weights=..., weights_file=...,
layer=..., preprocess=..., layers=..., tta=...)`` returns a :class:`Backbone` whose ``model``
maps a normalized image batch to features; :func:`weights_identity` and
:func:`resolve_preprocess` say what identifies its weights and how images are prepared for
it, without building it.

The penultimate layer is found generically: the classifier is the layer the source names
(timm's configuration) or else the last ``Linear`` or ``Conv2d`` module of the network
(``fc``, ``classifier.1``, ``heads.head``, SqueezeNet's final 1x1 convolution ...). It is
replaced by ``nn.Identity``, so the model returns what the classifier would have read.

``layers`` adds the globally average-pooled output of more named modules, read by forward
hooks during the same pass (:class:`~featurecache.backbones.taps.Taps`), side by side after the main features;
``tta="flip"`` averages every feature over the image and its horizontal mirror
(:class:`~featurecache.backbones.taps.FlipMean`). The model still returns one tensor, and ``Backbone.parts`` says which
columns are which.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import os
import re
import shutil
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..data.preprocess import Preprocess
from ..errors import BackboneError, FeatureCacheWarning, suggest
from ..files import atomic_write, sha256_file
from .taps import FlipMean, LayerTap, Taps, check_layer_names, check_tta, parse_layers

TIMM_PREFIX = "timm/"


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
    #: The columns of ``model``'s output, in order: ``(layer, feature_dim)`` (the main features,
    #: ``layer`` being ``penultimate`` or the ``--layer`` name), then ``(NAME, width)`` of each of ``layers``.
    parts: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self):
        if not self.parts:
            self.parts = [(self.layer, int(self.feature_dim))]


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


def _input_width(module: nn.Module | None) -> int | None:
    """What a layer that can classify reads: a ``Linear``'s features, a ``Conv2d``'s channels; else None."""
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d):
        return module.in_channels
    return None


def find_classifier(model: nn.Module) -> tuple[str, int]:
    """Name and input width of the final ``Linear``/``Conv2d`` (the classifier)."""
    layers = [(name, width) for name, module in model.named_modules() if (width := _input_width(module)) is not None]
    if not layers:
        raise BackboneError("cannot find a classifier layer (Linear or Conv2d) in this model; pass --layer")
    return layers[-1]


def _replace_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def check_layers(name: str, layer: str | None, layers: Sequence[str]) -> None:
    """A BackboneError for a name of ``layers`` that backbone ``name`` cannot pool (see
    :func:`build`), found from the network's shapes alone, before anything is computed."""
    if not layers:
        return
    check_name(name)
    source = _source_for(name)
    with _empty_weights():
        model = source.create(name, None)
    check_layer_names(model, name, layer, layers, source.classifier(model)[0])


def load_state_dict_file(path: str | os.PathLike) -> dict:
    path = _weights_path(path)
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


class BackboneSource(abc.ABC):
    """A family of backbones addressed by name.

    ``SOURCES[prefix]`` serves every backbone name that starts with ``prefix`` (the longest
    registered prefix wins; ``""`` is torchvision). A new source is a subclass registered
    there: it lists its names and weights, creates a model with its classifier still on,
    says what identifies named weights and how they expect images to be preprocessed.
    Finding and removing the classifier, seeding a random initialization, weights files,
    ``--layer`` and the feature dimension are the same for every source.

    ``weights`` is always a name the source lists (``DEFAULT``, ``IMAGENET1K_V1``, ...) or
    None for a random initialization; the caller seeds the latter.
    """

    prefix: str = ""
    #: An optional dependency: ``fc backbones`` lists it only when asked (``--timm``).
    optional: bool = False

    @abc.abstractmethod
    def names(self) -> list[str]:
        """Every backbone name of this source, prefix included."""

    @abc.abstractmethod
    def weight_names(self, name: str) -> list[str]:
        """The weights a user can ask for by name, ``none`` aside."""

    @abc.abstractmethod
    def weights_identity(self, name: str, weights: str) -> dict:
        """What identifies named weights in a cache key; a BackboneError for unknown weights."""

    @abc.abstractmethod
    def default_preprocess(self, name: str, weights: str | None) -> Preprocess:
        """The preprocessing the weights were trained with (for None: that of the default weights)."""

    @abc.abstractmethod
    def create(self, name: str, weights: str | None) -> nn.Module:
        """The whole network, classifier included, in any mode."""

    def classifier(self, model: nn.Module) -> tuple[str, int]:
        """Dotted name and input width of the layer that maps features to classes."""
        return find_classifier(model)

    def feature_dim(self, name: str) -> int:
        """The width of the penultimate features, from the network's shapes alone."""
        with _empty_weights():
            model = self.create(name, None)
        return self.classifier(model)[1]

    def stage_ends(self, name: str) -> tuple[str, ...]:
        """The modules that end the backbone's stages before the last one, which ``fc extract`` pools
        and stores by default (``--layers auto``); none unless the source names them."""
        return ()

    def hub_file(self, name: str, weights: str) -> tuple[str, str]:
        """``(identity label, file name)`` of named weights in torch.hub's cache, for fc weights import."""
        raise BackboneError(f"fc weights import handles torchvision weights; {name} keeps its weights elsewhere")


class TorchvisionSource(BackboneSource):
    """Every classification model of ``torchvision.models``."""

    prefix = ""
    #: backbone -> the blocks that end its stages at strides 8, 16 and 32 (the last one before the
    #: final 1x1 convolution): extracting them costs no extra forward pass (``bench/layers_cost.py``).
    STAGE_ENDS: typing.ClassVar[dict[str, tuple[str, ...]]] = {
        "mobilenet_v2": ("features.6", "features.13", "features.17")}

    def stage_ends(self, name: str) -> tuple[str, ...]:
        return self.STAGE_ENDS.get(name, ())

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
                f"unknown weights {weights!r} for {name}; choose one of: " + ", ".join([*enum.__members__, "none"])
            ) from None

    @staticmethod
    def label(member) -> str:
        """``MobileNet_V2_Weights.IMAGENET1K_V2``: an enum member as it is recorded."""
        return f"{type(member).__name__}.{member.name}"

    def weights_identity(self, name: str, weights: str) -> dict:
        member = self.resolve_weights(name, weights)
        return {"weights": self.label(member), "url": member.url}

    def default_preprocess(self, name: str, weights: str | None) -> Preprocess:
        member = self.resolve_weights(name, weights or "DEFAULT")
        t = member.transforms()
        return Preprocess(
            resize=int(t.resize_size[0]),
            crop=int(t.crop_size[0]),
            mean=tuple(float(v) for v in t.mean),
            std=tuple(float(v) for v in t.std),
            interpolation=t.interpolation.value,
        )

    def create(self, name: str, weights: str | None) -> nn.Module:
        import torchvision

        if weights is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torchvision.models.get_model(name, weights=None)
        member = self.resolve_weights(name, weights)
        try:
            return torchvision.models.get_model(name, weights=member)
        except (OSError, RuntimeError) as exc:
            hub = Path(torch.hub.get_dir()) / "checkpoints"
            raise BackboneError(
                f"weights {self.label(member)} are not in {hub} and could not be "
                f"downloaded ({type(exc).__name__}); on an offline machine copy {os.path.basename(member.url)} there "
                f"with `fc weights import FILE --backbone {name} --weights {member.name}`"
            ) from None

    def hub_file(self, name: str, weights: str) -> tuple[str, str]:
        member = self.resolve_weights(name, weights)
        return self.label(member), os.path.basename(member.url)


class TimmSource(BackboneSource):
    """timm models as ``timm/NAME`` (optional: ``pip install featurecache[timm]``)."""

    prefix = TIMM_PREFIX
    optional = True

    def _timm(self):
        try:
            import timm
        except ImportError:
            raise BackboneError("timm backbones need timm: pip install 'featurecache[timm]'") from None
        return timm

    def names(self) -> list[str]:
        return [TIMM_PREFIX + n for n in self._timm().list_models()]

    def weight_names(self, name: str) -> list[str]:
        return ["DEFAULT"]

    def weights_identity(self, name: str, weights: str) -> dict:
        if weights != "DEFAULT":
            raise BackboneError(f"unknown weights {weights!r} for {name}; choose one of: DEFAULT, none")
        return {"weights": "timm:DEFAULT", "timm": self._timm().__version__}

    def default_preprocess(self, name: str, weights: str | None) -> Preprocess:
        timm = self._timm()
        cfg = timm.models.get_pretrained_cfg(name[len(TIMM_PREFIX):])
        if cfg is None:
            return Preprocess()
        data = timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict())
        crop = int(data["input_size"][-1])
        return Preprocess(
            resize=round(crop / float(data.get("crop_pct") or 0.875)),
            crop=crop,
            mean=data["mean"],
            std=data["std"],
            interpolation=str(data.get("interpolation") or "bilinear"),
        )

    def create(self, name: str, weights: str | None) -> nn.Module:
        timm = self._timm()
        try:
            return timm.create_model(name[len(TIMM_PREFIX):], pretrained=weights is not None)
        except Exception as exc:  # timm raises anything for a missing download or a bad name
            raise BackboneError(f"cannot create {name}: {exc}".splitlines()[0]) from None

    def classifier(self, model: nn.Module) -> tuple[str, int]:
        """The classifier timm names in the model's configuration, else the last Linear/Conv2d."""
        name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
        width = _input_width(model.get_submodule(name)) if isinstance(name, str) else None
        return (name, width) if width is not None else find_classifier(model)


# The seed of every random initialization (weights=none): it is part of the cache key.
RANDOM_INIT_SEED = 0

#: Backbone sources by name prefix; see :class:`BackboneSource`.
SOURCES: dict[str, BackboneSource] = {"": TorchvisionSource(), TIMM_PREFIX: TimmSource()}


def canonical_name(name: str) -> str:
    """A backbone name in the form caches record: ``timm:NAME``, the ``SCHEME:NAME`` grammar that
    data sources use too (``torchvision:NAME``, ``webdataset:DIR``), is ``timm/NAME``."""
    prefix, sep, rest = str(name).partition(":")
    return f"{prefix}/{rest}" if sep and f"{prefix}/" in SOURCES else str(name)


def _source_for(name: str) -> BackboneSource:
    return SOURCES[max((p for p in SOURCES if name.startswith(p)), key=len)]


def list_backbones(include_timm: bool = False) -> list[str]:
    """Every backbone name; those of optional sources (timm) only with ``include_timm``."""
    return [n for source in SOURCES.values() if include_timm or not source.optional for n in source.names()]


def check_name(name: str) -> None:
    names = _source_for(name).names()
    if name not in names:
        raise BackboneError(f"unknown backbone {name!r}" + suggest(name, names))


def default_layers(name: str) -> tuple[str, ...]:
    """What ``--layers auto`` stores for backbone ``name``: the ends of its stages, where its source names them."""
    return _source_for(name).stage_ends(name)


def feature_dim(name: str) -> int:
    check_name(name)
    return _source_for(name).feature_dim(name)


def weight_names(name: str) -> list[str]:
    check_name(name)
    return _source_for(name).weight_names(name)


# --------------------------------------------------------------------------- identity and preprocessing


def _weights_name(weights: str | None) -> str | None:
    """``none`` (any case) and None mean a random initialization."""
    return None if weights is None or str(weights).lower() == "none" else str(weights)


def _weights_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise BackboneError(f"weights file not found: {path}")
    return path


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(path)  # size and mtime are part of the memo's key: a changed file is hashed again


def weights_identity(name: str, weights: str | None = "DEFAULT", weights_file: str | os.PathLike | None = None) -> dict:
    """What identifies a backbone's weights, in its cache key and in the cache's record.

    A weights file: its sha256 (where the file lies is not part of it). Random weights
    (``none``): ``none`` and the seed of the initialization. Named weights: what the
    source says (torchvision: the enum member and its URL).
    """
    if weights_file:
        path = _weights_path(weights_file).resolve()
        stat = path.stat()
        return {"sha256": _file_digest(str(path), stat.st_size, stat.st_mtime_ns)}
    weights = _weights_name(weights)
    if weights is None:
        return {"weights": "none", "init_seed": RANDOM_INIT_SEED}
    check_name(name)
    return _source_for(name).weights_identity(name, weights)


def resolve_preprocess(
    name: str,
    weights: str | None = "DEFAULT",
    weights_file: str | os.PathLike | None = None,
    draft: bool = False,
    **given,
) -> Preprocess:
    """The weights' own preprocessing with the stated fields (``resize``, ``crop``, ``mean``,
    ``std``, ``interpolation``; None: not stated) put over it.

    A weights file says nothing about its preprocessing: it needs at least ``resize`` and
    ``crop`` stated, and the rest defaults to ImageNet's.
    """
    check_name(name)
    given = {k: v for k, v in given.items() if v is not None}
    if weights_file and not {"resize", "crop"} <= set(given):
        raise BackboneError("a weights file needs its preprocessing stated: pass --resize and --crop "
                            "(and --mean, --std)")
    base = Preprocess() if weights_file else _source_for(name).default_preprocess(name, _weights_name(weights))
    return Preprocess(**{**base.to_dict(), **given, "draft": bool(draft)})


# --------------------------------------------------------------------------- building


def _create(name: str, weights: str | None, warn: bool) -> nn.Module:
    """The source's network; a random initialization is seeded, leaving the caller's random state alone."""
    source = _source_for(name)
    if weights is not None:
        return source.create(name, weights)
    if warn:
        warnings.warn(f"{name} has random weights (weights=none): its features carry no pretrained knowledge",
                      FeatureCacheWarning, stacklevel=3)
    # The same features every time, and a backbone that fine-tuning can rebuild.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return source.create(name, None)


@dataclass(frozen=True)
class _Readout:
    """What of backbone ``name`` becomes features: the classifier's input, or ``layer`` pooled, then
    each of ``layers`` pooled, flip-averaged when ``tta`` is ``flip``."""

    name: str
    layer: str | None
    layers: Sequence[str]
    tta: str | None


def _features_model(model: nn.Module, readout: _Readout, classifier: str, width: int, crop: int,
                    ) -> tuple[nn.Module, list[tuple[str, int]]]:
    """The frozen network that returns the features of ``readout``, and its parts (name, width)
    measured on a ``crop``-pixel probe."""
    name, layer, layers, tta = readout.name, readout.layer, readout.layers, readout.tta
    model.eval().requires_grad_(False)
    if layer:
        names = [n for n, _ in model.named_modules() if n]
        if layer not in names:
            raise BackboneError(f"unknown layer {layer!r} for {name}" + suggest(layer, names))
    check_layer_names(model, name, layer, layers, classifier)
    if not layer:
        _replace_module(model, classifier, nn.Identity())
        if not layers and not tta:
            return model, [("penultimate", int(width))]
    probe = torch.zeros(1, 3, crop, crop)
    if layers:
        model = Taps(model, layer, layers).eval()
        with torch.inference_mode():
            dims = [int(out.shape[1]) for out in model.outputs(probe)]
    elif layer:
        model = LayerTap(model, layer).eval()
        with torch.inference_mode():
            dims = [int(model(probe).shape[1])]
    else:
        dims = [int(width)]
    if tta:
        model = FlipMean(model).eval()
    return model, list(zip([layer or "penultimate", *layers], dims))


def build(
    name: str,
    weights: str | None = "DEFAULT",
    weights_file: str | None = None,
    layer: str | None = None,
    preprocess: Preprocess | dict | None = None,
    layers: str | Sequence[str] | None = (),
    tta: str | None = None,
) -> Backbone:
    """Instantiate a frozen backbone in eval mode that returns features.

    ``weights``: a name of the source's weights (``IMAGENET1K_V1``, ``DEFAULT``), or ``"none"``/None
    for a seeded random initialization (with a warning). ``weights_file``: a state dict (loaded
    with ``weights_only=True``); it needs ``preprocess`` stated. ``layer``: any named module, pooled.
    ``layers``: more named modules (a sequence or a comma-separated string), pooled and returned
    after the main features, from the same forward pass. ``tta``: ``flip`` averages every feature
    over the image and its horizontal mirror. ``Backbone.parts`` names the columns of the output;
    ``Backbone.feature_dim`` is the width of the main features.
    """
    check_name(name)
    layers, tta = parse_layers(layers), check_tta(tta)
    weights = None if weights_file else _weights_name(weights)
    if preprocess is None:
        preprocess = resolve_preprocess(name, weights, weights_file)
    elif isinstance(preprocess, dict):
        preprocess = Preprocess(**preprocess)
    identity = {"backbone": name, **weights_identity(name, weights, weights_file)}
    model = _create(name, weights, warn=not weights_file)
    classifier, width = _source_for(name).classifier(model)
    if weights_file:
        _load_without_classifier(model, load_state_dict_file(weights_file), classifier, f"weights file {weights_file}")
        identity["weights_file"] = str(Path(weights_file).resolve())
    model, parts = _features_model(model, _Readout(name, layer, layers, tta), classifier, width, preprocess.crop)
    return Backbone(name=name, model=model, preprocess=preprocess, feature_dim=parts[0][1],
                    layer=layer or "penultimate", identity=identity, classifier=classifier, parts=parts)


# --------------------------------------------------------------------------- offline weights

_HASH_RE = re.compile(r"-([a-f0-9]*)\.")


def import_weights(file: str, backbone: str, weights: str = "DEFAULT") -> dict:
    """Check ``file`` against torchvision's expected hash prefix and copy it into the hub cache."""
    check_name(backbone)
    label, filename = _source_for(backbone).hub_file(backbone, weights)
    src = _weights_path(file)
    match = _HASH_RE.search(filename)
    digest = sha256_file(src)
    if match and not digest.startswith(match.group(1)):
        raise BackboneError(
            f"{src} is not {filename}: its sha256 starts with {digest[:8]}, torchvision expects {match.group(1)}"
        )
    dest = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not (dest.is_file() and sha256_file(dest) == digest):
        atomic_write(dest, lambda tmp: shutil.copyfile(src, tmp))
    return {"path": str(dest), "weights": label, "sha256": digest}
