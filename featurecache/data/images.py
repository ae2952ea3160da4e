"""Images, decoded the same way for extract, finetune, predict and report.

:func:`load_rgb` is the tolerant loader: it opens, fully decodes and converts one
image to RGB, or raises :class:`ImageSkipped` with the reason that is recorded.
:class:`ImageTensors` turns records into uint8 CHW tensors of the crop size (a failure
becomes a reason, not a crash), :func:`image_loader` batches them with DataLoader
workers, and :func:`normalize_batch` normalizes a whole batch on its device. For stage
one, :data:`DECODERS` names where JPEGs are decoded: ``cpu`` (PIL in the workers) or
``gpu`` (:class:`JpegFiles`: batched ``torchvision.io.decode_jpeg`` on the model's device).

:data:`AUGMENTS` are the random training transforms (fine-tuning's ``--augment``, stage one's
``--augment-views``); :func:`augment_seed` seeds each item's draw, so that the same item gets
the same augmentation in any worker process, after a resume and in any slice of a job.
:class:`Views` describes the augmented views stage one adds as rows after the records.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import io
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from .. import runtime
from ..errors import UsageError
from .preprocess import Preprocess
from .sources import Dataset, Record

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
    if dataset.loader is None and dataset.opener is None:
        try:
            if os.path.getsize(os.path.join(dataset.root, record.path)) == 0:
                raise ImageSkipped("empty file")
        except OSError:
            raise ImageSkipped("file not found") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.filterwarnings("ignore", message="Palette images with Transparency")
            img = _open(dataset, record)
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


def _open(dataset: Dataset, record: Record) -> Image.Image:
    """The record as a PIL image, not decoded yet; a record read by ``dataset.opener`` (a tar
    member, a table row) is checked as a file is: missing or empty."""
    if dataset.opener is None:
        return dataset.open(record)
    try:
        data = dataset.opener(record.path)
    except FileNotFoundError as exc:
        given = exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], str) else ""
        raise ImageSkipped(given or "file not found") from None
    if not data:
        raise ImageSkipped("empty file")
    return Image.open(io.BytesIO(data))


# --------------------------------------------------------------------------- content hashes

HASH_THREADS = 4  # files hashed side by side: hashlib releases the GIL on large buffers


def content_hash(dataset: Dataset, record: Record) -> str:
    """The BLAKE2b-128 hash (hex) of an image file's bytes, or for an item of a torchvision dataset of
    its decoded pixels; ``""`` when it cannot be read. Byte-identical files share it, whatever their names."""
    digest = hashlib.blake2b(digest_size=16)
    try:
        if dataset.opener is not None:  # an item of a container: a tar member, a table row
            digest.update(dataset.opener(record.path) or b"")
        elif dataset.loader is None:
            with open(os.path.join(dataset.root, record.path), "rb") as fh:
                digest.update(fh.read())
        else:
            img = dataset.loader(record)
            digest.update(f"{img.mode}:{img.width}x{img.height}:".encode())
            digest.update(img.tobytes())
    except Exception:  # unreadable: such a row has no features either, or is told apart by them
        return ""
    return digest.hexdigest()


def content_hashes(dataset: Dataset, indices) -> list[str]:
    """:func:`content_hash` of the records at ``indices``, a few files at a time."""
    records = [dataset.records[int(i)] for i in indices]
    if len(records) < 64 or dataset.loader is not None:
        return [content_hash(dataset, r) for r in records]
    with concurrent.futures.ThreadPoolExecutor(HASH_THREADS) as pool:
        return list(pool.map(functools.partial(content_hash, dataset), records, chunksize=16))


# --------------------------------------------------------------------------- augmentation


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


def augment_seed(seed: int, round_: int, index: int) -> int:
    """The torch seed of one augmented item: ``seed`` of the job, ``round_`` (fine-tuning's epoch,
    stage one's view number) and the item's ``index`` (kept in the range torch accepts)."""
    return ((seed * 1_000_003 + round_) * 10_000_019 + index) % 2**63


@dataclass(frozen=True)
class Views:
    """``k`` augmented views of each of ``records`` (record indices), as rows after the
    ``first`` rows (the records themselves): row ``first + v * len(records) + j`` is view ``v``
    of record ``records[j]``, drawn with ``policy`` (a name of :data:`AUGMENTS`) seeded by
    ``(seed, view, record)``."""

    first: int
    records: tuple[int, ...]
    k: int
    seed: int
    policy: str = "light"

    @property
    def rows(self) -> int:
        return self.k * len(self.records)

    def locate(self, row: int) -> tuple[int, int]:
        """``(record index, view number)`` of a view row."""
        view, j = divmod(int(row) - self.first, len(self.records))
        return self.records[j], view

    def seed_of(self, record: int, view: int) -> int:
        return augment_seed(self.seed, view, record)


# --------------------------------------------------------------------------- decoding into batches

class ImageTensors(torch.utils.data.Dataset):
    """Decodes records into uint8 CHW tensors of the crop size; failures become reasons.

    Normalization happens later on the whole batch (on the GPU when there is one), which
    keeps worker-to-main traffic four times smaller than float tensors. This is the ``cpu``
    decoder of :data:`DECODERS`: PIL in the DataLoader workers.
    """

    def __init__(self, dataset: Dataset, indices: np.ndarray, pre: Preprocess, max_pixels: int | None,
                 views: Views | None = None):
        self.dataset = dataset
        self.indices = indices
        self.pre = pre
        self.max_pixels = max_pixels
        self.interpolation = InterpolationMode(pre.interpolation)
        self.views = views  # indices from views.first on are augmented views of records
        self.view_transform = AUGMENTS[views.policy](pre) if views is not None else None

    def __len__(self) -> int:
        return len(self.indices)

    def resize_crop(self, img):
        """Resize the shorter side and center-crop: a PIL image or a CHW tensor on any device alike."""
        img = TF.resize(img, [self.pre.resize], interpolation=self.interpolation, antialias=True)
        return TF.center_crop(img, [self.pre.crop])

    def transform(self, img) -> torch.Tensor:
        return TF.pil_to_tensor(self.resize_crop(img))

    def is_view(self, index: int) -> bool:
        return self.views is not None and index >= self.views.first

    def decode(self, index: int) -> tuple[torch.Tensor, str]:
        """Item ``index`` as a uint8 crop and ``""``, or zeros and the reason it cannot be used: a
        record, or (``views``) a view of one, augmented with the draw its seed gives."""
        if not self.is_view(index):
            return self.read(index, self.transform)
        record, view = self.views.locate(index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.views.seed_of(record, view))
            return self.read(record, lambda img: TF.pil_to_tensor(self.view_transform(img)))

    def read(self, index: int, transform) -> tuple[torch.Tensor, str]:
        """Record ``index`` decoded and ``transform``-ed into a uint8 crop and ``""``, or zeros and the reason."""
        record = self.dataset.records[index]
        try:
            img = load_rgb(self.dataset, record, self.pre.resize if self.pre.draft else None, self.max_pixels)
            return transform(img), ""
        except ImageSkipped as exc:
            reason = str(exc)
        except Exception as exc:  # any decoder failure is a skip, not a crash
            reason = f"unreadable image: {type(exc).__name__}: {exc}".splitlines()[0]
        return torch.zeros(3, self.pre.crop, self.pre.crop, dtype=torch.uint8), reason

    def __getitem__(self, i: int):
        index = int(self.indices[i])
        return (index, *self.decode(index))

    collate = staticmethod(torch.utils.data.default_collate)

    def to_batch(self, indices: torch.Tensor, payload, reasons, device: torch.device):
        """``(uint8 NCHW batch on device, reasons)`` from what :attr:`collate` made of the items."""
        return payload.to(device, non_blocking=True), reasons


JPEG_MAGIC = b"\xff\xd8\xff"


class JpegFiles(ImageTensors):
    """The ``gpu`` decoder: workers only read the bytes of JPEG files, which are decoded in
    batches on the model's device (``torchvision.io.decode_jpeg``), then resized, cropped and
    normalized there. Any other image (PNG, CMYK JPEG, a torchvision dataset, one the device
    cannot decode) is decoded with PIL as :class:`ImageTensors` does.
    """

    def jpeg_bytes(self, index: int) -> torch.Tensor | None:
        """The file's bytes as a 1-D uint8 tensor when the device can decode it, else None (also for a
        view, which is augmented with PIL)."""
        if self.dataset.loader is not None or self.pre.draft or self.is_view(index):
            return None
        try:
            data = self.dataset.read_bytes(self.dataset.records[index])
            if not data.startswith(JPEG_MAGIC):
                return None
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as img:  # reads the header only
                    too_big = self.max_pixels and img.width * img.height > self.max_pixels
                    if img.mode not in ("RGB", "L") or too_big:
                        return None
        except Exception:  # unreadable, a bomb, ...: the PIL path says why
            return None
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def __getitem__(self, i: int):
        index = int(self.indices[i])
        data = self.jpeg_bytes(index)
        return (index, *self.decode(index)) if data is None else (index, data, "")

    @staticmethod
    def collate(items):
        indices, payloads, reasons = zip(*items)
        return torch.tensor(indices), list(payloads), reasons

    def to_batch(self, indices: torch.Tensor, payload, reasons, device: torch.device):
        out = torch.empty((len(payload), 3, self.pre.crop, self.pre.crop), dtype=torch.uint8, device=device)
        reasons = list(reasons)
        jpegs = [i for i, p in enumerate(payload) if p.dim() == 1]
        decoded = dict(zip(jpegs, decode_jpegs([payload[i] for i in jpegs], device)))
        for i, item in enumerate(payload):
            image = decoded.get(i, item)
            if image is None:  # the device could not decode it: PIL on the CPU
                image, reasons[i] = self.decode(int(indices[i]))
            elif i in decoded:
                image = self.resize_crop(image)
            out[i] = image.to(device, non_blocking=True)
        return out, tuple(reasons)


def decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """JPEG bytes to RGB uint8 CHW tensors on ``device``, in one batched call when they all
    decode; otherwise one by one, with None for those that do not."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not datas:
        return []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29: "moving to TorchCodec"
        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            return [_decode_one(decode_jpeg, data, ImageReadMode.RGB, device) for data in datas]


def _decode_one(decode_jpeg, data: torch.Tensor, mode, device: torch.device) -> torch.Tensor | None:
    try:
        return decode_jpeg(data, mode=mode, device=device)
    except RuntimeError:
        return None


#: Decoders by ``--decode`` name: where JPEGs are decoded. ``auto`` picks ``gpu`` on a CUDA
#: device whose torchvision decodes JPEGs there, else ``cpu``.
DECODERS: dict[str, type[ImageTensors]] = {"cpu": ImageTensors, "gpu": JpegFiles}


@functools.cache
def _device_decodes_jpeg(device: str) -> str:
    """``""`` when ``device`` decodes a JPEG with torchvision, else why not."""
    from torchvision.io import decode_jpeg, encode_jpeg

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            decode_jpeg(encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8)), device=device)
    except Exception as exc:  # no nvjpeg, no driver, ...
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return ""


def resolve_decode(decode: str, device: torch.device, draft: bool = False) -> str:
    """``cpu`` or ``gpu`` for ``--decode auto|cpu|gpu``; a UsageError when ``gpu`` cannot be had."""
    if decode not in ("auto", *DECODERS):
        raise UsageError(f"unknown --decode {decode!r}: choose auto, cpu or gpu")
    if decode == "cpu" or (decode == "auto" and (device.type != "cuda" or draft)):
        return "cpu"
    why = "no CUDA device" if device.type != "cuda" else _device_decodes_jpeg(str(device))
    if decode == "auto":
        return "cpu" if why else "gpu"
    if why:
        raise UsageError(f"--decode gpu needs a CUDA device that decodes JPEGs ({why}); use --decode cpu or auto")
    if draft:
        raise UsageError("--draft is a way of decoding with PIL on the CPU; use it with --decode cpu or auto")
    return "gpu"


def image_loader(images: ImageTensors, batch_size: int, workers: int, device: torch.device, order=None,
                 drop_last: bool = False, batches: list[list[int]] | None = None) -> torch.utils.data.DataLoader:
    """Batches of ``(indices, uint8 images, skip reasons)``, in ``order`` (default: as stored), or
    exactly the ``batches`` given (lists of items, none empty; ``batch_size`` and ``drop_last`` unused).

    Workers decode with one thread each; batches are pinned for CUDA. The workers' seeds come
    from a generator of their own, so the caller's random state is left alone.
    """
    batching = (dict(batch_sampler=batches) if batches is not None else
                dict(batch_size=batch_size, sampler=None if order is None else list(order), drop_last=drop_last))
    return torch.utils.data.DataLoader(
        images,
        collate_fn=images.collate,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=runtime.set_worker_threads if workers else None,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(0),
        **batching,
    )


def normalize_batch(x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """uint8 NCHW -> normalized float, exactly as torchvision's ImageClassification preset does."""
    x = x.float().div_(255.0)
    mean = torch.tensor(pre.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std).contiguous(memory_format=torch.channels_last)


