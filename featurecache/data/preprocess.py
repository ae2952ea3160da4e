"""The image transform every stage applies: resize, center-crop, normalize.

:class:`Preprocess` is recorded in every cache and run, so predict and finetune transform
images exactly as extract did. The ImageNet mean and standard deviation live here, once.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side, center-crop, normalize: the torchvision classification preset."""

    resize: int = 256
    crop: int = 224
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    interpolation: str = "bilinear"
    # Decode JPEGs at a reduced size (PIL draft mode) when they are at least twice the resize
    # target. Much faster for large photos; the features then differ slightly from a full decode.
    draft: bool = False

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if self.resize < 1 or self.crop < 1:
            raise DataError("resize and crop must be positive")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise DataError("mean and std need three values (R,G,B)")
        if self.interpolation not in ("nearest", "bilinear", "bicubic"):
            raise DataError(f"unknown interpolation {self.interpolation!r}: choose nearest, bilinear or bicubic")

    def to_dict(self) -> dict:
        return asdict(self)
