"""The blocks of a backbone that ``--unfreeze`` counts: its parameters grouped by numbered module."""

from __future__ import annotations

import re

from torch import nn

_INDEX = re.compile(r"(.*_)?\d+")


def named_blocks(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameters grouped into blocks in forward order, by the block's module name.

    A block is what a parameter's name holds up to its first numbered module:
    ``features.17`` (MobileNetV2), ``layer4.1`` (ResNet), ``encoder_layer_11`` (ViT);
    a name without one is a block of its own module (``conv1``, ``bn1``).
    """
    blocks: dict[str, list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        parts = name.split(".")[:-1]
        cut = next((i + 1 for i, part in enumerate(parts) if _INDEX.fullmatch(part)), len(parts))
        blocks.setdefault(".".join(parts[:cut]), []).append(param)
    return blocks
