"""The nearest rows of every row by cosine similarity.

Up to :data:`EXACT_MAX_ROWS` rows the search is exact: the L2-normalized features multiplied
block by block (:data:`BLOCK` rows at a time, so memory stays at a block times the rows).
Its cost grows with the square of the rows; above that size a faiss inverted-file index
(:data:`LISTS_PER_SQRT` x sqrt(rows) lists, :data:`PROBES` of them searched) keeps it near
linear: each query compares with about ``PROBES / lists`` of the rows. faiss is the optional
extra ``featurecache[audit]``; without it, larger caches are searched exactly, with a warning.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from ..errors import FeatureCacheWarning

# Measured on MobileNetV2-sized rows (1,280 features) on two CPU cores: the exact search takes
# about as long as the index (training, adding, searching) at 20,000 rows, and grows as the square.
EXACT_MAX_ROWS = 20_000
BLOCK = 1024
LISTS_PER_SQRT = 1.0
PROBES = 16
TRAIN_ROWS = 40  # rows per list the index's k-means learns from


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


def approximate(X: np.ndarray, k: int, seed: int = 0, on_block=None) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`exact`, with a faiss inverted-file index (inner product of normalized rows)."""
    import faiss

    n, d = X.shape
    lists = max(1, int(LISTS_PER_SQRT * math.sqrt(n)))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, lists, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    index.train(X[rng.choice(n, size=min(n, lists * TRAIN_ROWS), replace=False)])
    index.add(X)
    index.nprobe = min(PROBES, lists)
    sims = np.empty((n, k), dtype=np.float32)
    idx = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, 8 * BLOCK):
        stop = min(n, start + 8 * BLOCK)
        s, i = index.search(X[start:stop], k + 1)
        own = i == np.arange(start, stop)[:, None]
        # drop the row itself (or, when it is missing, the last neighbour): k remain
        keep = np.where(own.any(axis=1)[:, None], ~own, np.arange(k + 1) < k)
        sims[start:stop] = s[keep].reshape(-1, k)
        idx[start:stop] = i[keep].reshape(-1, k)
        if on_block:
            on_block(stop - start)
    return sims, idx


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
