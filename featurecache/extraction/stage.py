"""Stage one: run a frozen backbone over a dataset and write its features to the cache.

:func:`extract` checks its options, resolves the preprocessing and the cache key, looks
the key up, and otherwise runs the model over the images that have no features yet
(finished batches are checkpointed as shards, named by their rows) and writes the cache
file. It runs as one process, as one rank of a ``torchrun`` job or as one ``--shard I/N``
slice (:mod:`featurecache.extraction.distributed`): all of them add to the same shards, so any of
them resumes the work of any other, and all of them write the same file.

The job's rows are the dataset's records, then, with ``augment_views=K``, K augmented views
of each train record (:class:`featurecache.data.images.Views`): the loop, the shards, a resume and
the slices treat them alike. The model returns one tensor per image, the main features then
the pooled ``layers`` (:attr:`featurecache.backbones.models.Backbone.parts`); the shards hold it
whole, and writing the file splits it into ``features`` and ``layers/NAME`` and puts the
views' rows in :data:`featurecache.store.VIEWS`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import functools
import itertools
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import runtime, store
from ..backbones import models as backbones
from ..backbones import taps
from ..data.images import DECODERS, Views, content_hashes, image_loader, normalize_batch, resolve_decode
from ..data.preprocess import Preprocess
from ..data.sources import Dataset, open_dataset
from ..errors import CacheLockedError, DataError, FeatureCacheWarning, UsageError, plural
from ..files import versions
from ..progress import Progress
from ..stages import takes
from . import compiled, distributed

DTYPES = ("float32", "float16")
# Below this many images to extract, eager mode runs (freezing would cost more than it
# saves) and images are decoded in the process itself (no worker processes to start).
FREEZE_MIN_IMAGES = 128
# The first images are decoded in the process itself and timed: with the forward pass's
# time, that sets how many cores decode and how many run the model.
PROBE_IMAGES = 8
# The transform of --augment-views (a name of images.AUGMENTS): fine-tuning's light policy.
VIEW_POLICY = "light"
# --aoti: compile the forward pass with torch.export and AOTInductor (artifacts cached on disk)
# auto (when a cached artifact exists, or the job's forward pass is long enough to pay for a
# compile), on (always, once exact) or off.
AOTI = ("auto", "on", "off")
# In auto a compile is made only when it would cost at most this share of the job's forward
# time, even if it gained nothing.
COMPILE_SHARE = 0.1
# bf16 autocast (--precision auto, a CPU with AVX512-BF16 or AMX) is used only when its features
# keep this cosine to fp32's on the first batch, and its forward pass is this much faster.
BF16_COSINE = 0.999
BF16_GAIN = 1.1


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
    missing: int = 0  # images without features yet: other --shard slices still to finish
    layers: dict = field(default_factory=dict)  # name -> width of each pooled --layers module
    views: int = 0  # rows of augmented training views (--augment-views)

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
    workers: int | None  # None: from measured costs
    strict: bool
    max_image_pixels: int | None
    checkpoint_every: int
    progress: bool
    decode: str  # a name of images.DECODERS
    cores: int  # this process's share of the machine's cores
    aoti: str = "auto"  # a name of AOTI
    compiled_dir: str = ""  # where compiled forward passes are kept (CACHE_DIR/compiled)


@dataclass
class _Job:
    """One extraction: its data, preprocessing, key and entry, how it runs, and the processes it runs in."""

    backbone: dict  # backbones.build's arguments but the preprocessing
    dataset: Dataset
    pre: Preprocess
    run: _Run
    group: distributed.Group
    lock_timeout: float | None
    started: float
    views: Views | None = None  # augmented views of the train records, as rows after the records
    key_config: dict = field(default_factory=dict)  # what the key hashes (set by _job)
    key: str = ""
    entry: store.Entry | None = None
    bf16: dict = field(default_factory=dict)  # the bf16 decision of --precision auto, for the provenance
    prepared: _Features | None = None  # the forward pass as the bf16 decision left it

    def model_fields(self) -> dict:
        """What the network computes (backbone, weights, read-out), for the key of a compiled artifact."""
        keep = ("backbone", "weights", "layer", "layers", "tta")
        return {k: self.key_config[k] for k in keep if k in self.key_config}

    @functools.cached_property
    def net(self) -> backbones.Backbone:
        return backbones.build(**self.backbone, preprocess=self.pre)

    @property
    def width(self) -> int:
        """Columns of a row in the shards: the main features and every layer's."""
        return sum(dim for _, dim in self.net.parts)

    @property
    def n(self) -> int:
        """Rows of the job: the records, then the views."""
        return len(self.dataset.records) + (self.views.rows if self.views else 0)

    def path_of(self, row: int) -> str:
        """The image file of a row (a view's: its record's)."""
        if self.views is not None and row >= self.views.first:
            row = self.views.locate(row)[0]
        return self.dataset.records[row].path

    @property
    def manifest(self) -> dict:
        return {"key": self.key, "records": self.n}


# --------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class ExtractOptions:
    """Every option of :func:`extract`, as given: the one object the stage hands down.

    The data and how they are read (``data``, ``split``, ``root``, ``seed``, ``limit``, ``strict``,
    ``max_image_pixels``), the backbone and what it stores (``backbone``, ``weights``,
    ``weights_file``, ``layer``, ``layers``, ``tta``, ``augment_views``), the preprocessing
    (``resize`` ... ``draft``: None takes the weights' own), how the loop runs (``batch_size``,
    ``workers``, ``device``, ``precision``, ``dtype``, ``decode``, ``shard``, ``checkpoint_every``)
    and where the cache goes (``cache_dir``, ``lock_timeout``).
    """

    data: str
    backbone: str = "mobilenet_v2"
    weights: str = "DEFAULT"
    weights_file: str | None = None
    layer: str | None = None
    layers: str | Sequence[str] | None = "auto"
    tta: str | None = None
    augment_views: int = 0
    split: str | None = None
    root: str | None = None
    seed: int = 0
    limit: int | None = None
    resize: int | None = None
    crop: int | None = None
    mean: tuple | None = None
    std: tuple | None = None
    interpolation: str | None = None
    draft: bool = False
    batch_size: int | None = None
    workers: int | None = None
    device: str = "auto"
    precision: str = "auto"
    dtype: str = "float32"
    decode: str = "auto"
    aoti: str = "auto"
    shard: str | None = None
    cache_dir: str | None = None
    strict: bool = False
    max_image_pixels: int | None = None
    lock_timeout: float | None = None
    checkpoint_every: int = 256
    progress: bool = True
    label_key: str | None = None  # webdataset: cls (the default) or json:FIELD
    image_column: str | None = None  # parquet:, hf: found by its type when not given
    label_column: str | None = None


@takes(ExtractOptions)
def extract(options: ExtractOptions) -> ExtractResult:
    """Extract features of ``data`` with ``backbone`` into the cache, or reuse a complete match.

    Returns an :class:`ExtractResult`; ``result.cache`` is the HDF5 file to pass to
    :func:`featurecache.load_features` or :func:`featurecache.fit_head`. Finished features are
    checkpointed every ``checkpoint_every`` images and every 5 seconds; an interrupted run
    resumes from the last checkpoint. Under ``torchrun`` every rank computes a share and the
    first writes the cache; ``shard="I/N"`` computes slice I of N, and the last slice to
    finish (or any later plain run) writes it (``result.missing`` counts what is left).

    ``layers`` (names, or one comma-separated string): more modules to pool and store, from the same
    forward pass; ``auto`` (the default) stores the ends of the backbone's stages where its source names
    them (MobileNetV2: ``features.6,features.13,features.17``) and ``none`` nothing; ``tta="flip"``: every
    feature is the mean over the image and its mirror;
    ``augment_views=K``: also K seeded augmented views of each train image (:data:`store.VIEWS`).
    ``label_key`` (``webdataset:``), ``image_column`` and ``label_column`` (``parquet:``, ``hf:``) say
    where a sample's label and image are, when they are not found by themselves.

    The options are the fields of :class:`ExtractOptions`.
    """
    started = time.perf_counter()
    options = dataclasses.replace(options, backbone=backbones.canonical_name(options.backbone))  # timm:NAME
    group = distributed.Group.from_environment(options.shard)
    layers, tta = _check_tricks(options)
    run = _settings(options, group, tta)
    if options.lock_timeout is not None and options.lock_timeout < 0:
        raise UsageError(f"--lock-timeout must be 0 or more seconds, not {options.lock_timeout}")
    dataset = _open_data(options)
    views = _views(dataset, options.augment_views, options.seed)
    pre = backbones.resolve_preprocess(options.backbone, options.weights, options.weights_file, options.draft,
                                       resize=options.resize, crop=options.crop, mean=options.mean, std=options.std,
                                       interpolation=options.interpolation)
    net = dict(name=options.backbone, weights=options.weights, weights_file=options.weights_file,
               layer=options.layer, layers=layers, tta=tta)
    job = _Job(backbone=net, dataset=dataset, pre=pre, run=run, group=group, lock_timeout=options.lock_timeout,
               started=started, views=views)
    job = _job(options, job)
    if options.precision == "auto" and run.device.type == "cpu":
        job = _choose_precision(options, job)
    return _launch(job)


def _job(options: ExtractOptions, job: _Job) -> _Job:
    """``job`` with its key and entry: the backbone's arguments checked (from the shapes alone, before
    any work), the cache key from everything that changes the features, and where its entry lives."""
    net = job.backbone
    backbones.check_layers(net["name"], net["layer"], net["layers"])
    job.key_config = {**_key_config(options, job), **_tricks_config(net["layers"], net["tta"], job.views)}
    return _locate(options, job)


def _locate(options: ExtractOptions, job: _Job) -> _Job:
    """``job`` with the key of its ``key_config`` and the entry of that key."""
    job.key = store.cache_key(job.key_config)
    job.entry = store.Entry.locate(store.default_cache_dir(options.cache_dir), _label(job.backbone["name"],
                                                                                      job.dataset), job.key)
    return job


def _launch(job: _Job) -> ExtractResult:
    """Run the job in this process's mode: alone, as a torchrun rank or as a ``--shard`` slice."""
    group = job.group
    try:
        group.connect(job.run.device)
        group.agree(job.key_config)
        return _MODES[group.mode](job)
    finally:
        group.close()


# --------------------------------------------------------------------------- its steps


def _settings(options: ExtractOptions, group: distributed.Group, tta: str | None) -> _Run:
    """The loop's options, checked (a UsageError for a value that cannot be used) and resolved.

    With ``tta`` each image and its mirror go through the model together: the default batch is
    halved so that a forward pass holds as many images as without (MobileNetV2 with ``tta`` on two
    CPU cores: 92 images/s at batch 2, 51 at batch 4)."""
    if options.dtype not in DTYPES:
        raise UsageError(f"unknown dtype {options.dtype!r}: choose float32 or float16")
    for option, value in (("--batch-size", options.batch_size), ("--checkpoint-every", options.checkpoint_every),
                          ("--max-image-pixels", options.max_image_pixels)):
        if value is not None and value < 1:
            raise UsageError(f"{option} must be at least 1, not {value}")
    if options.aoti not in AOTI:
        raise UsageError(f"unknown --aoti {options.aoti!r}: choose one of {', '.join(AOTI)}")
    dev = runtime.resolve_device(options.device, group.local_rank)
    return _Run(device=dev, precision=runtime.resolve_precision(options.precision, dev), dtype=options.dtype,
                batch_size=options.batch_size or max(1, runtime.default_batch_size(dev) // (2 if tta else 1)),
                workers=None if options.workers is None else runtime.resolve_workers(options.workers),
                strict=options.strict, max_image_pixels=options.max_image_pixels,
                checkpoint_every=options.checkpoint_every, progress=options.progress,
                decode=resolve_decode(options.decode, dev, options.draft),
                cores=runtime.cores_per_process(group.local_world), aoti=options.aoti,
                compiled_dir=str(store.default_cache_dir(options.cache_dir) / compiled.FOLDER))


def _strict_error(path: str, reason: str) -> DataError:
    return DataError(f"{path}: {reason} (--strict)")


def _open_data(options: ExtractOptions) -> Dataset:
    dataset = open_dataset(options.data, split=options.split, root=options.root, seed=options.seed,
                           limit=options.limit, label_key=options.label_key, image_column=options.image_column,
                           label_column=options.label_column)
    if options.strict and dataset.skipped:
        _, path, reason = dataset.skipped[0]
        raise _strict_error(path, reason)
    return dataset


def _key_config(options: ExtractOptions, job: _Job) -> dict:
    """Everything that changes the features: its hash is the cache key. The decoder is part of
    it only when it is not PIL on the CPU, so that the caches made before it was an option stay valid."""
    config = {
        "backbone": options.backbone,
        "weights": backbones.weights_identity(options.backbone, options.weights, options.weights_file),
        "preprocess": job.pre.to_dict(),
        "layer": options.layer or "penultimate",
        "precision": job.run.precision,
        "dtype": job.run.dtype,
        "max_image_pixels": job.run.max_image_pixels,
        "dataset": job.dataset.fingerprint(),
    }
    if job.run.decode != "cpu":
        config["decode"] = job.run.decode
    return config


def _check_tricks(options: ExtractOptions) -> tuple[list[str], str | None]:
    """``layers`` as a list of names and ``tta`` as None or ``flip``; a UsageError for a value of
    ``--layers``, ``--tta`` or ``--augment-views`` that cannot be used."""
    k = options.augment_views
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise UsageError(f"--augment-views must be a whole number, 0 or more, not {k!r}")
    if options.layers == "auto":
        layers = [] if options.layer else list(backbones.default_layers(options.backbone))
    else:
        layers = taps.parse_layers(options.layers)
    return layers, taps.check_tta(options.tta)


def _views(dataset: Dataset, k: int, seed: int) -> Views | None:
    """The ``k`` augmented views of every train record as rows after the records (None for 0);
    a UsageError when the data has no split named train."""
    if not k:
        return None
    train = tuple(i for i, r in enumerate(dataset.records) if r.split == "train")
    if not train:
        raise UsageError(f"--augment-views makes views of the train split, and these data have none (splits: "
                         f"{', '.join(dataset.splits) or 'none'})")
    return Views(first=len(dataset.records), records=train, k=k, seed=seed, policy=VIEW_POLICY)


def _tricks_config(layers: list[str], tta: str | None, views: Views | None) -> dict:
    """The key's entries of ``--layers``, ``--tta`` and ``--augment-views``: present only when used,
    so that the key of an extraction without them is the one it always had."""
    config: dict = {}
    if layers:
        config["layers"] = list(layers)
    if tta:
        config["tta"] = tta
    if views:
        config["augment_views"] = {"k": views.k, "policy": views.policy, "seed": views.seed}
    return config


def _label(backbone: str, dataset: Dataset) -> str:
    """The readable part of the cache file's name: backbone and data."""
    data = dataset.source.split(":")[-1] if dataset.loader else Path(dataset.root).name
    if dataset.opener is not None:  # webdataset:DIR, parquet:DIR, hf:DIR or hf:NAME
        data = f"{dataset.source.split(':')[0]}-{Path(dataset.source.split(':', 1)[1]).name}"
    return f"{backbone.replace('/', '-')}-{data}"


def _waiting(entry: store.Entry):
    def say(pid: str) -> None:
        print(f"waiting for another extraction of {entry.path.name} (pid {pid}) ...", file=sys.stderr)

    return say


def _summary(path, key: str, reused: bool, started: float, rate: float = 0.0) -> ExtractResult:
    meta = store.info(path)
    splits = {name: {"n": s["n"], "skipped": s["skipped"]} for name, s in meta["splits"].items()}
    dim = next(iter(meta["splits"].values()))["dim"]
    return ExtractResult(str(Path(path).resolve()), reused, dim, splits, rate, time.perf_counter() - started, key,
                         layers=dict(meta["layers"]), views=meta["views"]["n"])


def _usable(entry: store.Entry, say: bool = True) -> bool:
    """Whether the entry's cache is complete and every number passes its checksum; a damaged
    one is extracted again (``say``: with a warning)."""
    if not store.is_complete(entry.path):
        return False
    if store.is_sound(entry.path):
        return True
    if say:
        warnings.warn(FeatureCacheWarning(f"{entry.path} is damaged (its numbers fail their checksums); "
                                          "extracting it again"), stacklevel=2)
    return False


def _reused(job: _Job) -> ExtractResult:
    store.clear_leftovers(job.entry)
    return _summary(job.entry.path, job.key, True, job.started)


# --------------------------------------------------------------------------- one process, ranks, slices


def _alone(job: _Job) -> ExtractResult:
    """A single process: lock the entry, compute the rows without features, write the cache."""
    entry = job.entry
    if not _usable(entry):
        with store.locked(entry, wait=job.lock_timeout, on_wait=_waiting(entry)):
            if not _usable(entry, say=False):  # else another process finished it while this one waited
                writer = store.ShardWriter(entry, job.n, job.manifest)
                pending = np.flatnonzero(~writer.done())
                return _write(job, writer, [_work(job, writer, pending, job.n - len(pending))])
    return _reused(job)


def _ranks(job: _Job) -> ExtractResult:
    """One torchrun rank. The first locks the entry for the job and says which rows are left;
    every rank computes its share of them; once all are done, the first writes the cache."""
    group = job.group
    with contextlib.ExitStack() as held:
        pending = group.lead(lambda: _open_entry(job, held))
        if pending is None:
            return _reused(job)
        writer = store.ShardWriter(job.entry, job.n, job.manifest, owner=False)
        counts = group.gather(_work(job, writer, group.share(pending), 0))  # also the barrier
        return group.lead(lambda: _write(job, writer, counts))


def _open_entry(job: _Job, held: contextlib.ExitStack) -> np.ndarray | None:
    """The rows left, the entry locked until ``held`` closes; None when the cache is complete."""
    entry = job.entry
    if not _usable(entry):
        held.enter_context(store.locked(entry, wait=job.lock_timeout, on_wait=_waiting(entry)))
        if not _usable(entry, say=False):
            return np.flatnonzero(~store.ShardWriter(entry, job.n, job.manifest).done())
    return None


def _slice(job: _Job) -> ExtractResult:
    """One ``--shard I/N`` slice, computed beside the others (they share the entry's lock)."""
    entry = job.entry
    if _usable(entry):
        return _reused(job)
    rows = job.group.rows(job.n)
    with store.locked(entry, wait=job.lock_timeout, on_wait=_waiting(entry), shared=True):
        writer = store.ShardWriter(entry, job.n, job.manifest, owner=False)
        pending = rows[~writer.done()[rows]]
        done = _work(job, writer, pending, len(rows) - len(pending))
    return _finish_slice(job, done)


def _finish_slice(job: _Job, done: tuple[int, float]) -> ExtractResult:
    """Write the cache when every row is done and no other process holds the entry; else say how
    many rows are missing (the slice that finishes last, or a later plain run, writes it)."""
    entry = job.entry
    with contextlib.suppress(CacheLockedError), store.locked(entry, wait=0):
        if store.is_complete(entry.path):  # another process wrote it meanwhile
            return _summary(entry.path, job.key, False, job.started, _rate([done]))
        writer = store.ShardWriter(entry, job.n, job.manifest)
        if writer.done().all():
            return _write(job, writer, [done])
    missing = int((~store.rows_done(entry.partial, job.n)).sum())
    return ExtractResult(str(entry.path.resolve()), False, job.net.feature_dim, {}, _rate([done]),
                         time.perf_counter() - job.started, job.key, missing=missing)


def _rate(counts: list[tuple[int, float]]) -> float:
    """Images per second of processes that ran side by side: ``(images, seconds)`` of each."""
    seconds = max(c[1] for c in counts)
    return sum(c[0] for c in counts) / seconds if seconds > 0 else 0.0


def _write(job: _Job, writer: store.ShardWriter, counts: list[tuple[int, float]]) -> ExtractResult:
    """Assemble every shard into the cache file (the entry is locked), then remove the shards."""
    features, ok, reasons, tags = writer.collect(job.width, job.run.dtype)
    hashing = time.perf_counter()
    splits = _assemble(job, features, ok, reasons)
    hashing = time.perf_counter() - hashing  # nearly all of it: the content hash of every file
    _check_usable(job, splits)
    provenance = {**_provenance(job, tags), "hash_seconds": round(hashing, 3)}
    store.write_cache(job.entry.path, job.dataset.classes, provenance, splits, key=job.key)
    writer.remove()
    result = _summary(job.entry.path, job.key, False, job.started, _rate(counts))
    result.skipped = [(s, p, r) for s, part in splits.items() for p, r in part["skipped"]]
    return result


def _check_usable(job: _Job, splits: dict) -> None:
    """A DataError when a split has no image that could be read: such a cache cannot be used."""
    for name, part in splits.items():
        if name != store.VIEWS and not len(part["labels"]):
            first = f" (first: {part['skipped'][0][0]}: {part['skipped'][0][1]})" if part["skipped"] else ""
            raise DataError(f"no image of split {name!r} of {job.dataset.root} could be read: "
                            f"{plural(len(part['skipped']), 'file')} skipped{first}")


def _provenance(job: _Job, tags: dict[str, set[str]]) -> dict:
    """The cache's record of what made it: the key's parts and how it ran (``tags``: how the
    shards were computed, by each process that computed some)."""
    net, dataset, run = job.net, job.dataset, job.run
    return {
        **job.key_config,
        "weights": net.identity,
        "feature_dim": net.feature_dim,
        "data": {"root": str(Path(dataset.root).resolve()), "source": dataset.source, **dataset.description,
                 "fingerprint": job.key_config["dataset"]},
        "device": str(run.device),
        "batch_size": run.batch_size,
        "graph": "; ".join(sorted(tags.get("graph", ()))) or "eager",
        **({"compiled": "; ".join(sorted(tags["compiled"]))} if tags.get("compiled") else {}),
        **({"bf16": job.bf16} if job.bf16 else {}),
        "cores": "; ".join(sorted(tags.get("cores", ()))),
        "decode": run.decode,
        "processes": job.group.world,
        "seconds": round(time.perf_counter() - job.started, 3),  # this run's wall time, up to writing the file
        "versions": {**versions("torch", "torchvision", "numpy", "PIL"), "h5py": store.h5py_version()},
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


_MODES = {"single": _alone, "torchrun": _ranks, "shard": _slice}


# --------------------------------------------------------------------------- the loop


class _Features:
    """The backbone on its device, turning a batch of uint8 images into feature rows.

    On the first batch it becomes the fastest exact form (:meth:`_choose`): eager mode, a frozen
    TorchScript graph (:func:`runtime.inference_model`) or an AOTInductor artifact
    (:mod:`featurecache.extraction.compiled`), unless there are too few images to pay for freezing.
    """

    def __init__(self, net: backbones.Backbone, run: _Run, n_images: int, model_fields: dict | None = None):
        self.net, self.run, self.n_images = net, run, n_images
        self.model_fields = model_fields or {"backbone": net.name, "weights": net.identity}
        self.width = sum(dim for _, dim in net.parts)  # of a row: the main features and every layer's
        self.eager = net.model.to(run.device).to(memory_format=torch.channels_last)
        self.model, self.mode = None, "eager"
        self.example: torch.Tensor | None = None  # the first normalized batch
        self.dtype = np.dtype(run.dtype)
        self.cores = ""  # how the cores are split between decoding workers and the model
        self.compiled = ""  # the AOTInductor artifact used: its key, and whether it was compiled now

    def tags(self) -> dict[str, str]:
        """How the rows were computed, for the shards and the provenance."""
        return {"graph": self.mode, "cores": self.cores, **({"compiled": self.compiled} if self.compiled else {})}

    def _choose(self, x: torch.Tensor) -> None:
        self.example = x
        run = self.run
        if self.n_images >= FREEZE_MIN_IMAGES:  # freezing costs about a second: not worth it for a few images
            self.model, self.mode = runtime.inference_model(self.eager, run.device, run.precision, x)
        else:
            self.model = self.eager
        if (run.device.type == "cpu" and run.precision == "fp32" and run.compiled_dir
                and (run.aoti == "on" or (run.aoti == "auto" and self.n_images >= FREEZE_MIN_IMAGES))):
            self._try_compiled(x)

    def _try_compiled(self, x: torch.Tensor) -> None:
        """Move to the AOTInductor artifact of this network, batch and shape when it is exact and faster
        (with ``--aoti on``: exact): a cached one, or one compiled now when :meth:`_worth_compiling`."""
        run, batch = self.run, self.run.batch_size
        fields = compiled.artifact_fields(self.model_fields, batch, tuple(x.shape[1:]), run.precision)
        key, store_ = compiled.artifact_key(fields), compiled.Artifacts(run.compiled_dir)
        model, how = store_.load(key), "cached"
        if model is None:
            if not self._worth_compiling(x, store_):
                return
            try:
                model, seconds = store_.compile(self.eager, _padded(x, batch), key, fields)
            except Exception as exc:  # an operator AOTInductor cannot take, no C++ compiler, a full disk ...
                first = (str(exc).splitlines() or [""])[0][:200]
                warnings.warn(FeatureCacheWarning(f"the forward pass could not be compiled ahead of time "
                                                  f"({type(exc).__name__}: {first}); running {self.mode}"),
                              stacklevel=2)
                return
            how = f"compiled in {seconds:.1f} s"
            if model is None:
                return
        padded = compiled.Padded(model, batch)
        try:
            exact = runtime.matches(padded, self.eager, x)
        except Exception:  # an artifact that loads but does not run here
            store_.discard(key)
            return
        if exact and (run.aoti == "on" or runtime.faster(padded, self.model, x)):
            self.model, self.mode, self.compiled = padded, "aot-inductor", f"{key}, {how}"

    def _worth_compiling(self, x: torch.Tensor, store_: compiled.Artifacts) -> bool:
        """``--aoti on``; in auto, when the compile would cost at most :data:`COMPILE_SHARE` of the
        job's forward time at the current form's measured rate (so that it pays even if it gains nothing)."""
        if self.run.aoti == "on":
            return True
        with torch.inference_mode():
            per_image = runtime.forward_seconds(self.model, x, torch.get_num_threads(), repeats=2)
        return self.n_images * per_image * COMPILE_SHARE >= store_.compile_seconds()

    def __call__(self, batch: torch.Tensor, ok: np.ndarray) -> np.ndarray:
        """Rows for the ``ok`` images of ``batch``."""
        if not ok.any():
            return np.zeros((0, self.width), dtype=self.dtype)
        x = batch if ok.all() else batch[torch.from_numpy(ok).to(batch.device)]
        x = normalize_batch(x.to(self.run.device, non_blocking=True), self.net.preprocess)
        if self.model is None:
            self._choose(x)
        with runtime.autocast(self.run.device, self.run.precision):
            features = self.model(x)
        return features.float().cpu().numpy().astype(self.dtype, copy=False)

    def seconds(self, threads: int) -> float:
        """Seconds per image of the forward pass on ``threads`` threads."""
        x = self.example
        if x is None:  # no image of the first batches could be read
            crop = self.net.preprocess.crop
            x = torch.zeros(self.run.batch_size, 3, crop, crop).contiguous(memory_format=torch.channels_last)
        with runtime.autocast(self.run.device, self.run.precision):
            return runtime.forward_seconds(self.model or self.eager, x, threads)


def _padded(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``x`` with rows repeated up to ``batch`` (the example a compiled artifact is exported on)."""
    if len(x) >= batch:
        return x[:batch]
    return x[torch.arange(batch) % len(x)].contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------- bf16


def _choose_precision(options: ExtractOptions, job: _Job) -> _Job:
    """``--precision auto`` on a CPU: bf16 autocast where the CPU has bf16 dot products, its features
    keep a cosine of at least :data:`BF16_COSINE` to fp32's on the first batch and its forward pass is
    :data:`BF16_GAIN` faster than fp32's fastest form. It enters the key (``precision: bf16``) only
    when used. A cache already made either way is reused without measuring; ranks and slices, which
    must agree on the key, stay in fp32."""
    if not compiled.bf16_capable():
        job.bf16 = {"used": False, "why": "no AVX512-BF16 or AMX on this CPU"}
        return job
    if job.group.mode != "single" or job.n < FREEZE_MIN_IMAGES:
        why = "ranks and slices stay in fp32" if job.group.mode != "single" else "too few images to measure"
        job.bf16 = {"used": False, "why": why}
        return job
    bf16 = _locate(options, dataclasses.replace(job, run=dataclasses.replace(job.run, precision="bf16"),
                                                key_config={**job.key_config, "precision": "bf16"}))
    for made in (bf16, job):
        if store.is_complete(made.entry.path) or made.entry.partial.exists():
            made.bf16 = {"used": made is bf16, "why": "a cache of these images was made so"}
            return made
    return _measure_bf16(job, bf16)


def _measure_bf16(job: _Job, bf16: _Job) -> _Job:
    """The bf16 decision on the first batch: cosine to fp32 first, then the timed forward passes."""
    rows = np.arange(min(job.n, job.run.batch_size))
    images = DECODERS[job.run.decode](job.dataset, rows, job.pre, job.run.max_image_pixels, job.views)
    indices, payload, reasons = images.collate([images[i] for i in range(len(rows))])
    batch, reasons = images.to_batch(indices, payload, reasons, job.run.device)
    ok = np.array([r == "" for r in reasons], dtype=bool)
    if not ok.any():
        job.bf16 = {"used": False, "why": "no image of the first batch could be read"}
        return job
    fp32 = _Features(job.net, job.run, job.n, job.model_fields())
    with torch.inference_mode(), runtime.num_threads(job.run.cores):
        fp32(batch, ok)  # chooses fp32's fastest form
        x = fp32.example
        reference = fp32.eager(x)
        with runtime.autocast(job.run.device, "bf16"):
            low = fp32.eager(x)
        cosine = min(compiled.min_cosine(low[:, a:b], reference[:, a:b]) for a, b in _edges(job.net.parts))
        decision = {"cosine": round(cosine, 5), "fp32_form": fp32.mode}
        if cosine < BF16_COSINE:
            job.bf16, job.prepared = {"used": False, "why": f"cosine {cosine:.4f} < {BF16_COSINE}", **decision}, fp32
            return job
        gain = runtime.speedup(_autocast_bf16(fp32.eager, job.run.device), fp32.model, x)
    decision["speedup"] = round(gain, 3)
    if gain < BF16_GAIN:
        job.bf16, job.prepared = {"used": False, "why": f"{gain:.2f}x fp32's form", **decision}, fp32
        return job
    bf16.bf16 = {"used": True, "why": f"{gain:.2f}x fp32's form", **decision}
    return bf16


def _autocast_bf16(model, device: torch.device):
    def run(x):
        with runtime.autocast(device, "bf16"):
            return model(x)

    return run


def _edges(parts: list[tuple[str, int]]) -> list[tuple[int, int]]:
    """``(first, end)`` columns of each part of a row."""
    edges = np.cumsum([0, *(dim for _, dim in parts)])
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def _work(job: _Job, writer: store.ShardWriter, pending: np.ndarray, already: int) -> tuple[int, float]:
    """Features of the ``pending`` records into ``writer``'s shards: ``(images, seconds)``.
    ``already``: images of this process's part done before (progress counts them)."""
    if len(pending) == 0:
        return 0, 0.0
    run = job.run
    images = DECODERS[run.decode](job.dataset, pending, job.pre, run.max_image_pixels, job.views)
    features = job.prepared if job.prepared is not None and job.prepared.run == run else None
    features = features or _Features(job.net, run, len(pending), job.model_fields())
    bar = Progress(already + len(pending), "extract", unit="images", enabled=run.progress, initial=already,
                   prefix=job.group.prefix)
    start = time.perf_counter()
    with (distributed.sigterm_exits(), torch.inference_mode(), runtime.num_threads(_threads(run)),
          _ShardBuffer(writer, features, run.checkpoint_every) as shard, bar, bar.heartbeat()):
        for indices, batch, reasons in _batches(images, features, run):
            ok = np.array([r == "" for r in reasons], dtype=bool)
            if run.strict and not ok.all():
                bad = int(np.flatnonzero(~ok)[0])
                raise _strict_error(job.path_of(int(indices[bad])), reasons[bad])
            shard.add(indices.numpy(), features(batch, ok), ok, list(reasons))
            bar.update(len(reasons))
    return len(pending), time.perf_counter() - start


def _threads(run: _Run) -> int | None:
    """Intra-op threads until the cores are split: all of this process's on a CPU."""
    return run.cores if run.device.type == "cpu" else None


def _batches(images, features: _Features, run: _Run):
    """``(indices, uint8 batch on the device, reasons)`` for every image of ``images``.

    The first images are decoded in this process and timed; the model is chosen on them.
    Then :func:`runtime.split_cores` splits the cores between decoding workers and the
    forward pass from the two measured costs, and the workers decode the rest.
    """
    probe = min(len(images), max(PROBE_IMAGES, run.batch_size))
    features.cores = _cores(0, torch.get_num_threads())
    items, seconds = [], []
    for i in range(probe):
        start = time.perf_counter()
        items.append(images[i])
        seconds.append(time.perf_counter() - start)
    decode_s = float(np.median(seconds))  # the first image also pays for imports and first calls
    for first in range(0, probe, run.batch_size):
        indices, payload, reasons = images.collate(items[first:first + run.batch_size])
        yield indices, *images.to_batch(indices, payload, reasons, run.device)
    if probe == len(images):
        return
    given = 0 if run.workers is None and len(images) < FREEZE_MIN_IMAGES else run.workers
    workers, threads = runtime.split_cores(run.device, run.cores, given, decode_s, features.seconds)
    torch.set_num_threads(threads)
    features.cores = _cores(workers, threads)
    for indices, payload, reasons in image_loader(images, run.batch_size, workers, run.device,
                                                  order=range(probe, len(images))):
        yield indices, *images.to_batch(indices, payload, reasons, run.device)


def _cores(workers: int, threads: int) -> str:
    return f"{plural(workers, 'decoding worker')}, {plural(threads, 'model thread')}"


class _ShardBuffer:
    """Batches go to disk as one shard per ``rows`` images or ``seconds``, whichever comes
    first: small forward batches (the fastest on a CPU) do not become thousands of files,
    and a kill loses at most a few seconds of work."""

    def __init__(self, writer: store.ShardWriter, features: _Features, rows: int = 256, seconds: float = 5.0):
        self.writer, self.features, self.rows, self.seconds = writer, features, rows, seconds
        self.parts: list[tuple] = []
        self.since = time.monotonic()

    def add(self, indices, features, ok, reasons) -> None:
        self.parts.append((indices, features, ok, reasons))
        if sum(len(p[0]) for p in self.parts) >= self.rows or time.monotonic() - self.since >= self.seconds:
            self.flush()

    def __enter__(self) -> _ShardBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.flush()  # also on an error, Ctrl-C or SIGTERM: the finished batches are kept for the rerun

    def flush(self) -> None:
        parts, self.parts = self.parts, []  # taken first: a write that fails is not tried again on exit
        self.since = time.monotonic()
        if parts:
            indices, features, ok = (np.concatenate([p[i] for p in parts]) for i in range(3))
            self.writer.write(indices, features, ok, [r for p in parts for r in p[3]],
                              tags=self.features.tags())


def _columns(features: np.ndarray, parts: list[tuple[str, int]]) -> dict:
    """``features`` and, with more parts than the main one, ``layers``: the rows' columns split by part."""
    edges = np.cumsum([0, *(dim for _, dim in parts)])
    out = {"features": features[:, edges[0]:edges[1]]}
    if len(parts) > 1:
        out["layers"] = {name: features[:, left:right] for (name, _), left, right in
                         zip(parts[1:], edges[1:-1], edges[2:])}
    return out


def _assemble(job: _Job, features: np.ndarray, ok: np.ndarray, reasons: list[str]) -> dict:
    """Split the ordered rows back into per-split arrays, with skipped files and reasons, and the
    views' rows into :data:`store.VIEWS`."""
    dataset, parts = job.dataset, job.net.parts
    row_of = np.cumsum(ok) - 1
    splits: dict[str, dict] = {}
    for name in dataset.splits:
        idx = np.array([i for i, r in enumerate(dataset.records) if r.split == name], dtype=np.int64)
        good = idx[ok[idx]] if len(idx) else idx
        splits[name] = {
            **_columns(features[row_of[good]], parts),
            "labels": np.array([dataset.records[i].label for i in good], dtype=np.int64),
            "paths": [dataset.records[i].path for i in good],
            "hashes": content_hashes(dataset, good),  # for fc audit: recorded, not part of the key
            "skipped": [(dataset.records[i].path, reasons[i]) for i in idx[~ok[idx]]]
            + [(p, r) for s, p, r in dataset.skipped if s == name],
        }
    if job.views is not None:
        splits[store.VIEWS] = _assemble_views(job, features, ok, row_of)
    return splits


def _assemble_views(job: _Job, features: np.ndarray, ok: np.ndarray, row_of: np.ndarray) -> dict:
    """The views whose image and view both decoded, in row order (view by view); ``source``: the
    row of the written train split each one is a view of."""
    views, records = job.views, job.dataset.records
    train = np.asarray(views.records, dtype=np.int64)
    rows = views.first + np.arange(views.rows)
    record = np.tile(train, views.k)
    keep = ok[record] & ok[rows]
    train_row = np.tile(np.cumsum(ok[train]) - 1, views.k)  # the row of /train of each view's record
    return {
        **_columns(features[row_of[rows[keep]]], job.net.parts),
        "labels": np.array([records[i].label for i in record[keep]], dtype=np.int64),
        "paths": [records[i].path for i in record[keep]],
        "skipped": [],
        "source": train_row[keep].astype(np.int64),
        "view": np.repeat(np.arange(views.k), len(train))[keep].astype(np.int64),
    }
