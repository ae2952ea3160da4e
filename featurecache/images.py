"""Images, decoded the same way for extract, finetune, predict and report.

:func:`load_rgb` is the tolerant loader: it opens, fully decodes and converts one
image to RGB, or raises :class:`ImageSkipped` with the reason that is recorded.
:class:`ImageTensors` turns records into uint8 CHW tensors of the crop size (a failure
becomes a reason, not a crash), :func:`image_loader` batches them with DataLoader
workers, and :func:`normalize_batch` normalizes a whole batch on its device.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from . import runtime
from .data import Dataset, Preprocess, Record

# --------------------------------------------------------------------------- loading images

class ImageSkipped(Exception):
    """An image that cannot be used; the message is the recorded reason."""


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def load_rgb(dataset: Dataset, record: Record, draft_size: int | None = None, max_pixels: int | None = None):
    """Open, fully decode and convert one image to RGB, or raise :class:`ImageSkipped` with the reason."""
    if dataset.loader is None:
        try:
            if os.path.getsize(os.path.join(dataset.root, record.path)) == 0:
                raise ImageSkipped("empty file")
        except OSError:
            raise ImageSkipped("file not found") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", message="Palette images with Transparency")
            img = dataset.open(record)
            if max_pixels and img.width * img.height > max_pixels:
                raise Image.DecompressionBombError(f"{img.width}x{img.height} pixels exceeds the limit of {max_pixels}")
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            return _to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageSkipped(f"decompression bomb: {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageSkipped("not an image (cannot identify the format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageSkipped(f"unreadable image: {exc or type(exc).__name__}") from None



# --------------------------------------------------------------------------- decoding into batches

class ImageTensors(torch.utils.data.Dataset):
    """Decodes records into uint8 CHW tensors of the crop size; failures become reasons.

    Normalization happens later on the whole batch (on the GPU when there is one), which
    keeps worker-to-main traffic four times smaller than float tensors.
    """

    def __init__(self, dataset: Dataset, indices: np.ndarray, pre: Preprocess, max_pixels: int | None):
        self.dataset = dataset
        self.indices = indices
        self.pre = pre
        self.max_pixels = max_pixels
        self.interpolation = InterpolationMode(pre.interpolation)

    def __len__(self) -> int:
        return len(self.indices)

    def transform(self, img) -> torch.Tensor:
        img = TF.resize(img, [self.pre.resize], interpolation=self.interpolation, antialias=True)
        img = TF.center_crop(img, [self.pre.crop])
        return TF.pil_to_tensor(img)

    def __getitem__(self, i: int):
        index = int(self.indices[i])
        record = self.dataset.records[index]
        try:
            img = load_rgb(self.dataset, record, self.pre.resize if self.pre.draft else None, self.max_pixels)
            return index, self.transform(img), ""
        except ImageSkipped as exc:
            return index, torch.zeros(3, self.pre.crop, self.pre.crop, dtype=torch.uint8), str(exc)
        except Exception as exc:  # any decoder failure is a skip, not a crash
            reason = f"unreadable image: {type(exc).__name__}: {exc}".splitlines()[0]
            return index, torch.zeros(3, self.pre.crop, self.pre.crop, dtype=torch.uint8), reason


def image_loader(images: ImageTensors, batch_size: int, workers: int, device: torch.device, order=None,
                 drop_last: bool = False) -> torch.utils.data.DataLoader:
    """Batches of ``(indices, uint8 images, skip reasons)``, in ``order`` (default: as stored).

    Workers decode with one thread each; batches are pinned for CUDA. The workers' seeds come
    from a generator of their own, so the caller's random state is left alone.
    """
    return torch.utils.data.DataLoader(
        images,
        batch_size=batch_size,
        sampler=None if order is None else list(order),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=runtime.set_worker_threads if workers else None,
        prefetch_factor=4 if workers else None,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(0),
    )


def normalize_batch(x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 NCHW -> normalized float, exactly as torchvision's ImageClassification preset does."""
    x = x.float().div_(255.0)
    mean = torch.tensor(pre.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous(memory_format=torch.channels_last)


