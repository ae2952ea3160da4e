"""Stage one: run a frozen backbone over a dataset and write its features to the cache.

:func:`extract` checks its options, resolves the preprocessing and the cache key, looks
the key up, and otherwise runs the model over the images that have no features yet
(finished batches are checkpointed as shards) and writes the cache file.
"""

from __future__ import annotations

import datetime as _dt
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import backbones, runtime, store
from .data import Dataset, open_dataset
from .errors import DataError, UsageError
from .files import versions
from .images import ImageTensors, image_loader, normalize_batch

DTYPES = ("float32", "float16")
# Below this many images to extract, eager mode runs: freezing would cost more than it saves.
FREEZE_MIN_IMAGES = 128


@dataclass
class ExtractResult:
    cache: str
    reused: bool
    feature_dim: int
    splits: dict
    images_per_s: float
    seconds: float
    key: str = ""
    skipped: list = field(default_factory=list)  # (split, path, reason)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("skipped")
        out.pop("key")
        return out


@dataclass(frozen=True)
class _Run:
    """How the model runs over the images: every option of the loop, checked and resolved."""

    device: torch.device
    precision: str
    dtype: str
    batch_size: int
    workers: int
    strict: bool
    max_image_pixels: int | None
    checkpoint_every: int
    progress: bool


# --------------------------------------------------------------------------- the stage


def extract(
    data: str,
    backbone: str = "mobilenet_v2",
    weights: str = "DEFAULT",
    weights_file: str | None = None,
    layer: str | None = None,
    split: str | None = None,
    root: str | None = None,
    seed: int = 0,
    limit: int | None = None,
    resize: int | None = None,
    crop: int | None = None,
    mean: tuple | None = None,
    std: tuple | None = None,
    interpolation: str | None = None,
    draft: bool = False,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    dtype: str = "float32",
    cache_dir: str | None = None,
    strict: bool = False,
    max_image_pixels: int | None = None,
    lock_timeout: float | None = None,
    checkpoint_every: int = 256,
    progress: bool = True,
) -> ExtractResult:
    """Extract features of ``data`` with ``backbone`` into the cache, or reuse a complete match.

    Returns an :class:`ExtractResult`; ``result.cache`` is the HDF5 file to pass to
    :func:`featurecache.load_features` or :func:`featurecache.fit_head`. Finished features are
    checkpointed every ``checkpoint_every`` images and every 5 seconds; an interrupted run
    resumes from the last checkpoint.
    """
    started = time.perf_counter()
    run = _settings(device, precision, dtype, batch_size, workers, strict, max_image_pixels, checkpoint_every,
                    progress)
    if lock_timeout is not None and lock_timeout < 0:
        raise UsageError(f"--lock-timeout must be 0 or more seconds, not {lock_timeout}")
    dataset = _open_data(data, split, root, seed, limit, strict)
    pre = backbones.resolve_preprocess(backbone, weights, weights_file, draft, resize=resize, crop=crop, mean=mean,
                                       std=std, interpolation=interpolation)
    key_config = _key_config(backbone, weights, weights_file, layer, pre.to_dict(), run, dataset)
    key = store.cache_key(key_config)
    entry = store.Entry.locate(store.default_cache_dir(cache_dir), _label(backbone, dataset), key)
    if not store.is_complete(entry.path):
        with store.locked(entry, wait=lock_timeout, on_wait=_waiting(entry)):
            if not store.is_complete(entry.path):  # else another process finished it while this one waited
                net = backbones.build(backbone, weights=weights, weights_file=weights_file, layer=layer,
                                      preprocess=pre)
                return _compute(net, dataset, entry, key_config, run, started)
    store.clear_leftovers(entry)
    return _summary(entry.path, key, True, started)


# --------------------------------------------------------------------------- its steps


def _settings(device, precision, dtype, batch_size, workers, strict, max_image_pixels, checkpoint_every,
              progress) -> _Run:
    """The loop's options, checked (a UsageError for a value that cannot be used) and resolved."""
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}: choose float32 or float16")
    for option, value in (("--batch-size", batch_size), ("--checkpoint-every", checkpoint_every),
                          ("--max-image-pixels", max_image_pixels)):
        if value is not None and value < 1:
            raise UsageError(f"{option} must be at least 1, not {value}")
    dev = runtime.resolve_device(device)
    return _Run(device=dev, precision=runtime.resolve_precision(precision, dev), dtype=dtype,
                batch_size=batch_size or runtime.default_batch_size(dev), workers=runtime.resolve_workers(workers),
                strict=strict, max_image_pixels=max_image_pixels, checkpoint_every=checkpoint_every,
                progress=progress)


def _strict_error(path: str, reason: str) -> DataError:
    return DataError(f"{path}: {reason} (--strict)")


def _open_data(data, split, root, seed, limit, strict) -> Dataset:
    dataset = open_dataset(data, split=split, root=root, seed=seed, limit=limit)
    if strict and dataset.skipped:
        _, path, reason = dataset.skipped[0]
        raise _strict_error(path, reason)
    return dataset


def _key_config(backbone, weights, weights_file, layer, preprocess: dict, run: _Run, dataset: Dataset) -> dict:
    """Everything that changes the features: its hash is the cache key."""
    return {
        "backbone": backbone,
        "weights": backbones.weights_identity(backbone, weights, weights_file),
        "preprocess": preprocess,
        "layer": layer or "penultimate",
        "precision": run.precision,
        "dtype": run.dtype,
        "max_image_pixels": run.max_image_pixels,
        "dataset": dataset.fingerprint(),
    }


def _label(backbone: str, dataset: Dataset) -> str:
    """The readable part of the cache file's name: backbone and data."""
    data = dataset.source.split(":")[-1] if dataset.loader else Path(dataset.root).name
    return f"{backbone.replace('/', '-')}-{data}"


def _waiting(entry: store.Entry):
    def say(pid: str) -> None:
        print(f"waiting for another extraction of {entry.path.name} (pid {pid}) ...", file=sys.stderr)

    return say


def _summary(path, key: str, reused: bool, started: float, rate: float = 0.0) -> ExtractResult:
    meta = store.info(path)
    splits = {name: {"n": s["n"], "skipped": s["skipped"]} for name, s in meta["splits"].items()}
    dim = next(iter(meta["splits"].values()))["dim"]
    return ExtractResult(str(Path(path).resolve()), reused, dim, splits, rate, time.perf_counter() - started, key)


def _compute(net: backbones.Backbone, dataset: Dataset, entry: store.Entry, key_config: dict, run: _Run,
             started: float) -> ExtractResult:
    """Run the model over the images without features yet, then write the cache (the entry is locked)."""
    key = store.cache_key(key_config)
    writer = store.ShardWriter(entry, len(dataset.records), {"key": key, "records": len(dataset.records)})
    pending = np.flatnonzero(~writer.done())
    seconds, mode = _run_model(net, dataset, pending, writer, run)
    features, ok, reasons = writer.collect(net.feature_dim, run.dtype)
    splits = _assemble(dataset, features, ok, reasons)
    store.write_cache(entry.path, dataset.classes, _provenance(net, dataset, key_config, run, mode), splits, key=key)
    writer.remove()
    result = _summary(entry.path, key, False, started, len(pending) / seconds if seconds > 0 else 0.0)
    result.skipped = [(s, p, r) for s, part in splits.items() for p, r in part["skipped"]]
    return result


def _provenance(net: backbones.Backbone, dataset: Dataset, key_config: dict, run: _Run, mode: str) -> dict:
    """The cache's record of what made it: the key's parts and how it ran."""
    return {
        **key_config,
        "weights": net.identity,
        "feature_dim": net.feature_dim,
        "data": {"root": str(Path(dataset.root).resolve()), "source": dataset.source, **dataset.description,
                 "fingerprint": key_config["dataset"]},
        "device": str(run.device),
        "batch_size": run.batch_size,
        "graph": mode,
        "versions": {**versions("torch", "torchvision", "numpy", "PIL"), "h5py": store.h5py_version()},
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- the loop


class _Features:
    """The backbone on its device, turning a batch of uint8 images into feature rows.

    On the first batch it becomes the faster of eager mode and a frozen graph
    (:func:`runtime.inference_model`), unless there are too few images to pay for freezing.
    """

    def __init__(self, net: backbones.Backbone, run: _Run, n_images: int):
        self.net, self.run, self.n_images = net, run, n_images
        self.eager = net.model.to(run.device).to(memory_format=torch.channels_last)
        self.model, self.mode = None, "eager"
        self.dtype = np.dtype(run.dtype)

    def _choose(self, x: torch.Tensor) -> None:
        if self.n_images >= FREEZE_MIN_IMAGES:  # freezing costs about a second: not worth it for a few images
            self.model, self.mode = runtime.inference_model(self.eager, self.run.device, self.run.precision, x)
        else:
            self.model = self.eager
        torch.set_num_threads(runtime.model_threads(self.run.device, self.run.workers, self.mode))

    def __call__(self, batch: torch.Tensor, ok: np.ndarray) -> np.ndarray:
        """Rows for the ``ok`` images of ``batch``."""
        if not ok.any():
            return np.zeros((0, self.net.feature_dim), dtype=self.dtype)
        x = batch if ok.all() else batch[torch.from_numpy(ok)]
        x = normalize_batch(x.to(self.run.device, non_blocking=True), self.net.preprocess)
        if self.model is None:
            self._choose(x)
        with runtime.autocast(self.run.device, self.run.precision):
            features = self.model(x)
        return features.float().cpu().numpy().astype(self.dtype, copy=False)


def _run_model(net: backbones.Backbone, dataset: Dataset, pending: np.ndarray, writer: store.ShardWriter,
               run: _Run) -> tuple[float, str]:
    """Features of the ``pending`` records into ``writer``'s shards: ``(seconds, graph mode)``."""
    if len(pending) == 0:
        return 0.0, "eager"
    from tqdm.auto import tqdm

    images = ImageTensors(dataset, pending, net.preprocess, run.max_image_pixels)
    loader = image_loader(images, run.batch_size, run.workers, run.device)
    features = _Features(net, run, len(pending))
    total = len(dataset.records)
    bar = tqdm(total=total, initial=total - len(pending), unit="img", desc="extract", disable=not run.progress,
               dynamic_ncols=True, leave=False)
    start = time.perf_counter()
    with torch.inference_mode(), runtime.num_threads(), _ShardBuffer(writer, run.checkpoint_every) as shard, bar:
        for indices, batch, reasons in loader:
            ok = np.array([r == "" for r in reasons], dtype=bool)
            if run.strict and not ok.all():
                bad = int(np.flatnonzero(~ok)[0])
                raise _strict_error(dataset.records[int(indices[bad])].path, reasons[bad])
            shard.add(indices.numpy(), features(batch, ok), ok, list(reasons))
            bar.update(len(reasons))
    return time.perf_counter() - start, features.mode


class _ShardBuffer:
    """Batches go to disk as one shard per ``rows`` images or ``seconds``, whichever comes
    first: small forward batches (the fastest on a CPU) do not become thousands of files,
    and a kill loses at most a few seconds of work."""

    def __init__(self, writer: store.ShardWriter, rows: int = 256, seconds: float = 5.0):
        self.writer, self.rows, self.seconds = writer, rows, seconds
        self.parts: list[tuple] = []
        self.since = time.monotonic()

    def add(self, indices, features, ok, reasons) -> None:
        self.parts.append((indices, features, ok, reasons))
        if sum(len(p[0]) for p in self.parts) >= self.rows or time.monotonic() - self.since >= self.seconds:
            self.flush()

    def __enter__(self) -> _ShardBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()  # also on an error or Ctrl-C: the finished batches are kept for the rerun

    def flush(self) -> None:
        if self.parts:
            indices, features, ok = (np.concatenate([p[i] for p in self.parts]) for i in range(3))
            self.writer.write(indices, features, ok, [r for p in self.parts for r in p[3]])
        self.parts = []
        self.since = time.monotonic()


def _assemble(dataset: Dataset, features: np.ndarray, ok: np.ndarray, reasons: list[str]) -> dict:
    """Split the ordered rows back into per-split arrays, with skipped files and reasons."""
    row_of = np.cumsum(ok) - 1
    splits: dict[str, dict] = {}
    for name in dataset.splits:
        idx = np.array([i for i, r in enumerate(dataset.records) if r.split == name], dtype=np.int64)
        good = idx[ok[idx]] if len(idx) else idx
        splits[name] = {
            "features": features[row_of[good]] if len(good) else np.zeros((0, features.shape[1]), features.dtype),
            "labels": np.array([dataset.records[i].label for i in good], dtype=np.int64),
            "paths": [dataset.records[i].path for i in good],
            "skipped": [(dataset.records[i].path, reasons[i]) for i in idx[~ok[idx]]]
            + [(p, r) for s, p, r in dataset.skipped if s == name],
        }
    return splits
