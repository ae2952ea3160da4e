"""Taps: features read from inside a backbone, and the mirror average.

:class:`LayerTap` pools one named module's output; :class:`Taps` pools several, with forward
hooks in the same pass, beside the main features; :class:`FlipMean` averages every feature
over the image and its horizontal mirror (``--tta flip``). :func:`parse_layers`,
:func:`check_tta` and :func:`check_layer_names` check the options that ask for them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import BackboneError, UsageError, suggest
from ..names import FEATURE_SETS

TTA = ("none", "flip")  # --tta: none, or the mean over the image and its horizontal mirror


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


class Taps(nn.Module):
    """Runs ``model`` once and returns its main features, then the pooled output of each of
    ``layers``, side by side. ``main``: a module whose pooled output is the main features;
    None: ``model``'s own output (the penultimate features). The outputs are read by forward
    hooks that live only while one call runs: nothing stays registered on ``model``, and the
    module trains, traces and freezes like any other."""

    def __init__(self, model: nn.Module, main: str | None, layers: Sequence[str]):
        super().__init__()
        self.model = model
        self.main = main
        self.layers = list(layers)

    def outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The main features and each layer's pooled output, one ``N x D`` tensor each."""
        captured: dict[str, torch.Tensor] = {}
        handles = []
        try:
            for name in dict.fromkeys([self.main, *self.layers] if self.main else self.layers):
                def hook(_module, _inputs, output, name=name):
                    captured[name] = output

                handles.append(self.model.get_submodule(name).register_forward_hook(hook))
            out = self.model(x)
        finally:
            for handle in handles:
                handle.remove()
        main = global_pool(captured[self.main]) if self.main else out.flatten(1)
        return [main, *(global_pool(captured[name]) for name in self.layers)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.outputs(x), dim=1)


class FlipMean(nn.Module):
    """``tta="flip"``: the mean of ``model``'s output on the images and on their horizontal
    mirrors, computed in one pass over a batch twice as large."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(torch.cat([x, x.flip(-1)]))
        return out.unflatten(0, (2, -1)).mean(dim=0)


def parse_layers(layers: str | Sequence[str] | None) -> list[str]:
    """``--layers``: a comma-separated string or a sequence of module names, as a list (empty
    for None, "" or ``none``); a UsageError for an empty, reserved or repeated name."""
    if layers is None or (isinstance(layers, str) and layers.strip().lower() in ("", "none")):
        return []
    items = layers.split(",") if isinstance(layers, str) else list(layers)
    names = []
    for item in items:
        if not isinstance(item, str) or not item.strip():
            raise UsageError(f"--layers takes module names separated by commas (e.g. features.14,features.17), "
                             f"not {layers if isinstance(layers, str) else items!r}")
        name = item.strip()
        if name in FEATURE_SETS:
            raise UsageError(f"--layers: {name!r} names a set of the cache's features, not a layer "
                             f"({' and '.join(FEATURE_SETS)} are reserved)")
        if name in names:
            raise UsageError(f"--layers names {name} twice")
        names.append(name)
    return names


def check_tta(tta: str | None) -> str | None:
    """``--tta``: None for ``none`` (or None), ``flip``; a UsageError for anything else."""
    if tta is None or tta == "none":
        return None
    if tta not in TTA:
        raise UsageError(f"unknown --tta {tta!r}: choose none or flip" + suggest(str(tta), TTA))
    return tta


def check_layer_names(model: nn.Module, name: str, layer: str | None, layers: Sequence[str],
                       classifier: str) -> None:
    """A BackboneError for a name of ``layers`` that is not a module of ``model`` (with the close
    matches), that is the ``layer`` read as main features, or that is the classifier replaced by
    the penultimate features (or a part of it)."""
    names = [n for n, _ in model.named_modules() if n]
    for item in layers:
        if item not in names:
            raise BackboneError(f"unknown layer {item!r} for {name} in --layers" + suggest(item, names))
        if item == layer:
            raise BackboneError(f"--layers names {item}, the layer --layer already reads as the main features")
        if not layer and (item == classifier or item.startswith(classifier + ".")):
            raise BackboneError(f"--layers names {item}, the classifier of {name}: the main features are what it "
                                "reads (the penultimate layer)")
