"""Heads fitted from row chunks: features larger than memory, read from the cache file.

:class:`RowChunks` holds the labels of some rows of a split and a function that reads
their features; it hands them out a chunk at a time, so no more than one chunk is in
memory. A head type that can learn this way registers ``chunked=`` (one of the
trainers below): the torch heads train on mini-batches drawn from chunks visited in a
seeded order, SGD-type linear models call ``partial_fit`` on each chunk, and nearest
centroid sums each class's rows. The preprocessing comes from one pass as well:
``standardize`` from running moments (``StandardScaler.partial_fit``), ``l2`` is per row;
``pca:K`` needs every row and cannot be fitted this way.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.base import clone
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.class_weight import compute_class_weight

from ..errors import HeadError
from .preprocessing import FeatureColumns, make_pre
from .registry import head_type, make_estimator
from .torch_heads import batch_bounds


class RowChunks:
    """Rows of one split read ``chunk_rows`` at a time by ``read(rows) -> N x D float32``.

    ``rows`` are increasing row indices, ``labels`` their raw labels; ``classes`` the
    sorted labels present and ``labels_encoded`` the labels as indices into them (what
    the torch trainer uses). ``transform`` is applied to every chunk read.
    """

    def __init__(self, read, rows: np.ndarray, labels: np.ndarray, n_features: int, chunk_rows: int,
                 transform=None):
        self.read, self.rows, self.n_features = read, np.asarray(rows), int(n_features)
        self.raw_labels = np.asarray(labels)
        self.classes, self.labels = np.unique(self.raw_labels, return_inverse=True)
        self.chunk_rows, self.transform = max(1, int(chunk_rows)), transform

    def transformed(self, transform) -> RowChunks:
        """The same rows, each chunk passed through ``transform`` (a fitted preprocessing step)."""
        return RowChunks(self.read, self.rows, self.raw_labels, self.n_features, self.chunk_rows, transform)

    def columns(self, start: int, stop: int) -> RowChunks:
        """The same rows, with only the columns ``[start, stop)`` of their features (before any transform)."""
        read = self.read
        return RowChunks(lambda rows: read(rows)[:, start:stop], self.rows, self.raw_labels, stop - start,
                         self.chunk_rows, None)

    def bounds(self) -> list[tuple[int, int]]:
        return [(start, min(start + self.chunk_rows, len(self.rows))) for start in range(0, len(self.rows),
                                                                                          self.chunk_rows)]

    def sizes(self) -> list[int]:
        return [stop - start for start, stop in self.bounds()]

    def chunk(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Features (transformed) and encoded labels of ``rows[start:stop]``."""
        X = self.read(self.rows[start:stop])
        if self.transform is not None:
            X = np.asarray(self.transform(X), dtype=np.float32)
        return X, self.labels[start:stop]

    def __iter__(self):
        for start, stop in self.bounds():
            yield self.chunk(start, stop)

    def shuffled(self, generator: torch.Generator):
        """The chunks in a seeded random order."""
        bounds = self.bounds()
        for i in torch.randperm(len(bounds), generator=generator).tolist():
            yield self.chunk(*bounds[i])

    def batches(self, batch_size: int, seed: int, device: torch.device):
        """``(epoch, steps per epoch)`` for the torch trainer: chunks in a seeded order, each
        chunk's rows in a seeded order, in mini-batches (see :class:`~featurecache.heads.torch_heads.ArrayRows`)."""
        generator = torch.Generator().manual_seed(seed)
        steps = sum(len(batch_bounds(size, batch_size)) for size in self.sizes())

        def epoch():
            for X, y in self.shuffled(generator):
                X_t, y_t = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32)), torch.from_numpy(y)
                order = torch.randperm(len(y_t), generator=generator)
                for start, stop in batch_bounds(len(y_t), batch_size):
                    idx = order[start:stop]
                    yield X_t[idx].to(device), y_t[idx].to(device)

        return epoch, steps


# --------------------------------------------------------------------------- preprocessing in one pass


def _standardize(pre: StandardScaler, chunks: RowChunks):
    for X, _ in chunks:
        pre.partial_fit(X)
    return pre


def _first_chunk(pre, chunks: RowChunks):
    X, _ = chunks.chunk(*chunks.bounds()[0])
    return pre.fit(X[:1])  # a row-wise step: fitting only records the number of features


def _passthrough(pre, chunks: RowChunks):
    return pre


# pre name -> fit(unfitted step, chunks) -> fitted step
CHUNK_PRE = {"none": _passthrough, "standardize": _standardize, "l2": _first_chunk}


def _fit_pre(pre_spec: str, chunks: RowChunks, random_state):
    name = pre_spec.partition(":")[0]
    if name not in CHUNK_PRE:
        raise HeadError(f"pre={pre_spec} needs every row in memory; it cannot be fitted from row chunks")
    return CHUNK_PRE[name](make_pre(pre_spec, random_state), chunks)


# --------------------------------------------------------------------------- trainers (registered with chunked=)


def torch_chunks(estimator, chunks: RowChunks, random_state):
    """A featurecache torch head trained on mini-batches drawn from the chunks."""
    return estimator.fit_rows(chunks, chunks.classes)


def sgd_chunks(wrapper, chunks: RowChunks, random_state):
    """An SGD-type linear model (inside a :class:`~featurecache.heads.sklearn_heads.DecisionSoftmaxClassifier`):
    ``max_iter`` passes of ``partial_fit``, one call per chunk."""
    generator = torch.Generator().manual_seed(int(random_state or 0))
    estimator = clone(wrapper.estimator)
    if estimator.class_weight == "balanced":  # partial_fit takes weights, not "balanced"
        weights = compute_class_weight("balanced", classes=chunks.classes, y=chunks.raw_labels)
        estimator.set_params(class_weight=dict(zip(chunks.classes.tolist(), weights)))
    for _ in range(estimator.max_iter):
        for X, y in chunks.shuffled(generator):
            estimator.partial_fit(X, chunks.classes[y], classes=chunks.classes)
    wrapper.estimator_, wrapper.classes_, wrapper.n_features_in_ = estimator, estimator.classes_, chunks.n_features
    return wrapper


def centroid_chunks(estimator, chunks: RowChunks, random_state):
    """Nearest centroid: each class's mean from running sums (no shrinkage)."""
    if estimator.shrink_threshold is not None:
        raise HeadError("a shrunken nearest centroid needs every row in memory")
    sums = np.zeros((len(chunks.classes), chunks.n_features))
    for X, y in chunks:
        sums += np.eye(len(chunks.classes))[y].T @ X.astype(np.float64)
    counts = np.bincount(chunks.labels, minlength=len(chunks.classes))
    estimator.classes_, estimator.centroids_ = chunks.classes, sums / counts[:, None]
    estimator.class_prior_ = np.full(len(chunks.classes), 1.0 / len(chunks.classes))
    estimator.n_features_in_ = chunks.n_features
    return estimator


def can_learn_from_chunks(cfg) -> bool:
    """Whether the head of ``cfg`` and its preprocessing can be fitted from row chunks."""
    return head_type(cfg.name).chunked is not None and cfg.pre.partition(":")[0] in CHUNK_PRE


def fit_chunked(cfg, chunks: RowChunks, random_state: int = 0, device="auto") -> Pipeline:
    """The fitted pipeline of ``cfg`` (``pre``, ``head``) learnt from ``chunks``, one chunk in memory at a time."""
    trainer = head_type(cfg.name).chunked
    if trainer is None:
        raise HeadError(f"head {cfg.name} cannot learn from row chunks")
    cols = []
    if cfg.cols is not None:
        probe = np.zeros((1, chunks.n_features), dtype=np.float32)
        cols = [("cols", FeatureColumns(*cfg.cols).fit(probe))]  # checks the columns against the width
        chunks = chunks.columns(*cfg.cols)
    pre = _fit_pre(cfg.pre, chunks, random_state)
    head = make_estimator(cfg, random_state=random_state, device=device).named_steps["head"]
    transform = None if pre == "passthrough" else pre.transform
    head = trainer(head, chunks.transformed(transform), random_state)
    return Pipeline([*cols, ("pre", pre), ("head", head)])
