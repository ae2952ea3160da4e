"""The nearest rows of every row by cosine similarity.

Up to :data:`EXACT_MAX_ROWS` rows the search is exact: the L2-normalized features multiplied
block by block (:data:`BLOCK` rows at a time, so memory stays at a block times the rows).
Its cost grows with the square of the rows; above that size :func:`approximate` keeps it near
linear: a faiss inverted-file index of the rows projected on their principal axes proposes
candidates (each query compares with about ``PROBES / lists`` of the rows, and the lists grow
as the square root of the rows), and the exact cosines of the candidates choose. faiss is the
optional extra ``featurecache[audit]``; without it, larger caches are searched exactly, with a warning.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from ..errors import FeatureCacheWarning

# Measured on MobileNetV2 features (1,280) of 20,030 Fashion-MNIST images: the exact search took 14.0 s of CPU
# time, the approximate one 5.7 s (it finds 99% of the pairs at cosine >= 0.9); the exact one grows as the
# square of the rows, so below about 10,000 rows it costs less than 4 s and is the better choice.
EXACT_MAX_ROWS = 10_000
BLOCK = 1024
PCA_DIMS = 128  # the index searches the rows projected on this many principal axes
PCA_SAMPLE = 4096
LISTS_PER_SQRT = 4.0
PROBES = 8
TRAIN_ROWS = 39  # rows per list the index's k-means learns from (faiss asks for 39)
KMEANS_ITERATIONS = 10
CANDIDATES = 2  # neighbours the index proposes per neighbour kept


def normalize(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a row of zeros stays zeros), as float32."""
    X = np.ascontiguousarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, 1e-12)


def exact(X: np.ndarray, k: int, on_block=None) -> tuple[np.ndarray, np.ndarray]:
    """``(similarities, indices)``, each N x k: the ``k`` most similar other rows of every row of the
    normalized ``X``, most similar first."""
    n = len(X)
    k = min(k, n - 1)
    sims = np.empty((n, k), dtype=np.float32)
    idx = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, BLOCK):
        stop = min(n, start + BLOCK)
        block = X[start:stop] @ X.T
        block[np.arange(stop - start), np.arange(start, stop)] = -np.inf  # not its own neighbour
        top = np.argpartition(-block, k - 1, axis=1)[:, :k] if k < n - 1 else np.argsort(-block, axis=1)[:, :k]
        values = np.take_along_axis(block, top, axis=1)
        order = np.argsort(-values, axis=1, kind="stable")
        sims[start:stop] = np.take_along_axis(values, order, axis=1)
        idx[start:stop] = np.take_along_axis(top, order, axis=1)
        if on_block:
            on_block(stop - start)
    return sims, idx


def _projection(X: np.ndarray, dims: int, seed: int) -> np.ndarray:
    """The ``dims`` principal axes of the rows (from a sample of :data:`PCA_SAMPLE` rows), D x dims."""
    rng = np.random.default_rng(seed)
    sample = X[np.sort(rng.choice(len(X), size=min(len(X), PCA_SAMPLE), replace=False))].astype(np.float64)
    sample -= sample.mean(axis=0)
    _, vectors = np.linalg.eigh(sample.T @ sample)
    return np.ascontiguousarray(vectors[:, ::-1][:, :dims], dtype=np.float32)


def _rescore(X: np.ndarray, candidates: np.ndarray, k: int, on_block=None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most similar of each row's ``candidates`` by their exact cosine (the row itself left out)."""
    n = len(X)
    sims = np.empty((n, k), dtype=np.float32)
    idx = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, BLOCK):
        stop = min(n, start + BLOCK)
        cand = candidates[start:stop]
        own = (cand == np.arange(start, stop)[:, None]) | (cand < 0)
        values = np.einsum("id,ikd->ik", X[start:stop], X[np.maximum(cand, 0)])
        values[own] = -np.inf
        order = np.argsort(-values, axis=1, kind="stable")[:, :k]
        sims[start:stop] = np.take_along_axis(values, order, axis=1)
        idx[start:stop] = np.take_along_axis(cand, order, axis=1)
        if on_block:
            on_block(stop - start)
    return sims, idx


def approximate(X: np.ndarray, k: int, seed: int = 0, on_block=None) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`exact`, approximately: the rows projected on their :data:`PCA_DIMS` principal axes go into a
    faiss inverted-file index (:data:`LISTS_PER_SQRT` x sqrt(rows) lists, :data:`PROBES` searched), which
    proposes :data:`CANDIDATES` x ``k`` neighbours per row; their exact cosines on all features choose the ``k``."""
    import faiss

    n, d = X.shape
    Z = X if d <= PCA_DIMS else X @ _projection(X, PCA_DIMS, seed)
    Z = normalize(Z)
    lists = max(1, min(int(LISTS_PER_SQRT * math.sqrt(n)), n // TRAIN_ROWS))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(Z.shape[1]), Z.shape[1], lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = KMEANS_ITERATIONS
    rng = np.random.default_rng(seed)
    index.train(Z[rng.choice(n, size=min(n, lists * TRAIN_ROWS), replace=False)])
    index.add(Z)
    index.nprobe = min(PROBES, lists)
    _, candidates = index.search(Z, min(n, CANDIDATES * k + 1))
    return _rescore(X, candidates, k, on_block)


def has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def search(X: np.ndarray, k: int, exact_max: int = EXACT_MAX_ROWS, on_block=None) -> tuple[np.ndarray, np.ndarray, str]:
    """``(similarities, indices, method)``: the ``k`` nearest other rows of every row of ``X`` (any
    scale; compared by cosine); ``method`` is ``exact`` or ``faiss-ivf``."""
    X = normalize(X)
    if len(X) > exact_max:
        if has_faiss():
            sims, idx = approximate(X, min(k, len(X) - 1), on_block=on_block)
            return sims, idx, "faiss-ivf"
        warnings.warn(f"{len(X):,} rows: without faiss the exact search grows as the square of the rows; "
                      "pip install 'featurecache[audit]'", FeatureCacheWarning, stacklevel=2)
    sims, idx = exact(X, k, on_block)
    return sims, idx, "exact"
