"""Stage one: run a frozen backbone over a dataset and write its features to the cache."""

from __future__ import annotations

import datetime as _dt
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import backbones, runtime, store
from .data import Dataset, Preprocess, open_dataset
from .errors import DataError, FeatureCacheError
from .images import ImageTensors, image_loader, normalize_batch

DTYPES = ("float32", "float16")


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


# --------------------------------------------------------------------------- configuration


def _preprocess(backbone: str, weights, weights_file, resize, crop, mean, std, interpolation, draft) -> Preprocess | None:
    given = {k: v for k, v in dict(resize=resize, crop=crop, mean=mean, std=std, interpolation=interpolation).items() if v is not None}
    if not given and not draft:
        return None
    if weights_file and not {"resize", "crop"} <= set(given):
        raise FeatureCacheError("a weights file needs its preprocessing stated: pass at least --resize and --crop")
    base = None if weights_file else _default_preprocess(backbone, weights)
    fields = base.to_dict() if base else Preprocess().to_dict()
    fields.update(given)
    fields["draft"] = bool(draft)
    return Preprocess(**fields)


def _default_preprocess(backbone: str, weights) -> Preprocess:
    source = backbones._source_for(backbone)
    backbones.check_name(backbone)
    if isinstance(source, backbones.TorchvisionSource):
        member = None if weights in (None, "none") else source.resolve_weights(backbone, weights)
        return source.default_preprocess(backbone, member)
    return Preprocess()


def _versions() -> dict:
    import h5py
    import PIL
    import torchvision

    from . import __version__

    return {
        "featurecache": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
        "python": platform.python_version(),
    }


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
    if dtype not in DTYPES:
        raise FeatureCacheError(f"unknown dtype {dtype!r}: choose float32 or float16")
    if batch_size is not None and batch_size < 1:
        raise FeatureCacheError("--batch-size must be at least 1")
    if checkpoint_every < 1:
        raise FeatureCacheError("--checkpoint-every must be at least 1")
    dev = runtime.resolve_device(device)
    batch_size = batch_size or runtime.default_batch_size(dev)
    prec = runtime.resolve_precision(precision, dev)
    dataset = open_dataset(data, split=split, root=root, seed=seed, limit=limit)
    if strict and dataset.skipped:
        split_name, path, reason = dataset.skipped[0]
        raise DataError(f"{path}: {reason} (--strict)")
    pre = _preprocess(backbone, weights, weights_file, resize, crop, mean, std, interpolation, draft)
    if pre is None:
        pre = _default_preprocess(backbone, weights) if not weights_file else None
    if weights_file and pre is None:
        raise FeatureCacheError("a weights file needs its preprocessing stated: pass at least --resize and --crop")
    weights_id = _weights_identity(backbone, weights, weights_file)
    key_config = {
        "backbone": backbone,
        "weights": weights_id,
        "preprocess": pre.to_dict(),
        "layer": layer or "penultimate",
        "precision": prec,
        "dtype": dtype,
        "max_image_pixels": max_image_pixels,
        "dataset": dataset.fingerprint(),
    }
    key = store.cache_key(key_config)
    label = f"{backbone.replace('/', '-')}-{Path(dataset.root).name if not dataset.loader else dataset.source.split(':')[-1]}"
    entry = store.Entry.locate(store.default_cache_dir(cache_dir), label, key)

    def summary(path, reused, seconds, rate, dim) -> ExtractResult:
        meta = store.info(path)
        splits = {name: {"n": s["n"], "skipped": s["skipped"]} for name, s in meta["splits"].items()}
        dim = dim or next(iter(meta["splits"].values()))["dim"]
        return ExtractResult(str(Path(path).resolve()), reused, dim, splits, rate, seconds, key)

    if store.is_complete(entry.path):
        return summary(entry.path, True, time.perf_counter() - started, 0.0, None)

    def waiting(pid):
        print(f"waiting for another extraction of {entry.path.name} (pid {pid}) ...", file=sys.stderr)

    with store.locked(entry, wait=lock_timeout, on_wait=waiting):
        if store.is_complete(entry.path):  # the other process finished it while we waited
            return summary(entry.path, True, time.perf_counter() - started, 0.0, None)
        net = backbones.build(backbone, weights=weights, weights_file=weights_file, layer=layer, preprocess=pre)
        config = {
            **key_config,
            "weights": {**net.identity, **weights_id},
            "feature_dim": net.feature_dim,
            "data": {"root": str(Path(dataset.root).resolve()), "source": dataset.source, **dataset.description,
                     "fingerprint": key_config["dataset"]},
            "device": str(dev),
            "batch_size": batch_size,
            "versions": _versions(),
        }
        manifest = {"key": key, "records": len(dataset.records)}
        writer = store.ShardWriter(entry, len(dataset.records), manifest)
        pending = np.flatnonzero(~writer.done())
        n_done, seconds, mode = _run_model(net, dataset, pending, writer, dev, prec, dtype, batch_size, workers,
                                           strict, max_image_pixels, checkpoint_every, progress)
        config["graph"] = mode
        features, ok, reasons = writer.collect(net.feature_dim, dtype)
        splits = _assemble(dataset, features, ok, reasons)
        config["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        store.write_cache(entry.path, dataset.classes, config, splits, key=key)
        writer.remove()
    rate = n_done / seconds if seconds > 0 else 0.0
    result = summary(entry.path, False, time.perf_counter() - started, rate, net.feature_dim)
    result.skipped = [(s, p, r) for s, part in splits.items() for p, r in part["skipped"]]
    return result


def _weights_identity(backbone: str, weights, weights_file) -> dict:
    """What identifies the weights in the cache key: the enum member, or the file's hash."""
    if weights_file:
        return {"sha256": backbones.sha256_file(weights_file) if Path(weights_file).is_file() else weights_file}
    if weights in (None, "none"):
        return {"weights": "none"}
    source = backbones._source_for(backbone)
    backbones.check_name(backbone)
    if isinstance(source, backbones.TorchvisionSource):
        member = source.resolve_weights(backbone, weights)
        return {"weights": f"{type(member).__name__}.{member.name}"}
    return {"weights": str(weights)}


# Below this many images to extract, eager mode runs: freezing would cost more than it saves.
FREEZE_MIN_IMAGES = 128


def _run_model(net, dataset, pending, writer, dev, prec, dtype, batch_size, workers, strict, max_pixels,
               checkpoint_every, progress):
    if len(pending) == 0:
        return 0, 0.0, "eager"
    from tqdm.auto import tqdm

    workers = runtime.usable_cores() if workers is None else int(workers)
    loader = image_loader(ImageTensors(dataset, pending, net.preprocess, max_pixels), batch_size, workers, dev)
    eager = net.model.to(dev).to(memory_format=torch.channels_last)
    model, mode = None, "eager"
    np_dtype = np.dtype(dtype)
    done = 0
    bar = tqdm(total=len(dataset.records), initial=len(dataset.records) - len(pending), unit="img",
               desc="extract", disable=not progress, dynamic_ncols=True, leave=False)
    shard = _ShardBuffer(writer, checkpoint_every)
    start = time.perf_counter()
    with torch.inference_mode(), runtime.num_threads(), shard:
        for indices, batch, reasons in loader:
            ok = np.array([r == "" for r in reasons], dtype=bool)
            if strict and not ok.all():
                bad = int(np.flatnonzero(~ok)[0])
                raise DataError(f"{dataset.records[int(indices[bad])].path}: {reasons[bad]} (--strict)")
            if ok.any():
                x = batch[torch.from_numpy(ok)] if not ok.all() else batch
                x = normalize_batch(x.to(dev, non_blocking=True), net.preprocess)
                if model is None:  # freezing costs about a second: not worth it for a few images
                    model, mode = (runtime.inference_model(eager, dev, prec, x) if len(pending) >= FREEZE_MIN_IMAGES
                                   else (eager, "eager"))
                    torch.set_num_threads(runtime.model_threads(dev, workers, mode))
                with runtime.autocast(dev, prec):
                    feats = model(x)
                feats = feats.float().cpu().numpy().astype(np_dtype, copy=False)
            else:
                feats = np.zeros((0, net.feature_dim), dtype=np_dtype)
            shard.add(indices.numpy(), feats, ok, list(reasons))
            done += len(reasons)
            bar.update(len(reasons))
    bar.close()
    return done, time.perf_counter() - start, mode


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

    def __enter__(self) -> "_ShardBuffer":
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
