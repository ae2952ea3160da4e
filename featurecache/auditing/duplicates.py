"""Duplicates, leaks, conflicts and outliers, from the content hashes and the nearest neighbours.

A pair of rows is a duplicate when their files are byte-identical (same content hash) or
their features' cosine similarity is at least the threshold. A pair across two splits is a
**leak** (counted per split pair, the earlier split first: train before val before test); a
pair inside one split whose labels differ is a **conflict**; any other pair is a plain
duplicate. Caches written before content hashes were recorded find byte-identical files
through their features alone: identical images have identical features (cosine 1).

A row's outlier score is one minus the mean cosine similarity of its :data:`OUTLIER_K` nearest
other rows: the farther an image is from every other image, whatever its class, the higher.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from ..names import SPLITS

# Chosen on planted re-encodings (JPEG quality 70 at 90% size) and crops of hymenoptera's
# val images with MobileNetV2 features (bench/audit.py threshold; docs/audit.md).
DEFAULT_THRESHOLD = 0.90
IDENTICAL = 0.99999  # features this close come from identical pixels
OUTLIER_K = 5


@dataclass
class Rows:
    """Every row of the cache's splits, side by side."""

    splits: list[str]  # split of each row
    paths: list[str]
    labels: np.ndarray
    hashes: list[str] | None  # None: a cache without content hashes
    classes: list[str]

    def describe(self, i: int) -> dict:
        return {"split": self.splits[i], "path": self.paths[i], "label": self.classes[int(self.labels[i])]}


def _split_rank(split: str) -> int:
    return SPLITS.index(split) if split in SPLITS else len(SPLITS)


def _ordered(rows: Rows, i: int, j: int) -> tuple[int, int]:
    """The pair with the earlier split first (train before val before test), then by row."""
    return tuple(sorted((i, j), key=lambda r: (_split_rank(rows.splits[r]), rows.splits[r], r)))


def exact_pairs(rows: Rows) -> set[tuple[int, int]]:
    """Pairs of rows whose files have the same content hash."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(rows.hashes or []):
        if h:
            groups[h].append(i)
    return {(a, b) for members in groups.values() if len(members) > 1
            for x, a in enumerate(members) for b in members[x + 1:]}


def near_pairs(sims: np.ndarray, idx: np.ndarray, threshold: float) -> dict[tuple[int, int], float]:
    """Pairs ``(i, j)`` with ``i < j`` among the neighbours whose similarity is at least ``threshold``."""
    rows, cols = np.nonzero(sims >= threshold)
    out: dict[tuple[int, int], float] = {}
    for r, c in zip(rows, cols):
        j = int(idx[r, c])
        if j < 0:
            continue
        key = (min(int(r), j), max(int(r), j))
        out[key] = max(out.get(key, -1.0), float(sims[r, c]))
    return out


def kind_of(rows: Rows, i: int, j: int) -> str:
    """``leak``, ``conflict`` or ``duplicate``."""
    if rows.splits[i] != rows.splits[j]:
        return "leak"
    return "conflict" if rows.labels[i] != rows.labels[j] else "duplicate"


def find_pairs(rows: Rows, X: np.ndarray, sims: np.ndarray, idx: np.ndarray, threshold: float) -> list[dict]:
    """Every duplicate pair, most similar first: both rows (split, path, label), the similarity, how it was
    found (``identical bytes``, ``identical features`` or ``near``) and its kind."""
    near = near_pairs(sims, idx, threshold)
    exact = exact_pairs(rows)
    for i, j in exact - set(near):
        a, b = X[i].astype(np.float64), X[j].astype(np.float64)
        near[(i, j)] = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
    pairs = []
    for (i, j), sim in near.items():
        a, b = _ordered(rows, i, j)
        how = ("identical bytes" if (min(i, j), max(i, j)) in exact
               else "identical features" if rows.hashes is None and sim >= IDENTICAL else "near")
        pairs.append({"a": rows.describe(a), "b": rows.describe(b), "rows": [a, b], "similarity": round(sim, 5),
                      "found_by": how, "kind": kind_of(rows, a, b)})
    pairs.sort(key=lambda p: (p["found_by"] == "near", -p["similarity"], p["rows"]))
    return pairs


def leak_counts(pairs: list[dict]) -> dict[str, int]:
    """Leaks per split pair, ``train-test`` style, the earlier split first."""
    counts: dict[str, int] = defaultdict(int)
    for p in pairs:
        if p["kind"] == "leak":
            counts[f"{p['a']['split']}-{p['b']['split']}"] += 1
    return dict(sorted(counts.items()))


def outlier_scores(sims: np.ndarray, k: int = OUTLIER_K) -> np.ndarray:
    """One minus the mean similarity of each row's ``k`` nearest rows."""
    return 1.0 - sims[:, :k].mean(axis=1, dtype=np.float64)


def outliers(rows: Rows, sims: np.ndarray, idx: np.ndarray, top: int) -> list[dict]:
    """The ``top`` rows farthest from their neighbours, farthest first, with their nearest row."""
    scores = outlier_scores(sims)
    order = np.argsort(-scores, kind="stable")[:top]
    return [{**rows.describe(int(i)), "row": int(i), "score": round(float(scores[i]), 5),
             "nearest": rows.describe(int(idx[i, 0])) | {"similarity": round(float(sims[i, 0]), 5)}}
            for i in order]
