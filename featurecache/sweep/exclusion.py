"""``fc fit-head --exclude FILE``: rows left out of a sweep, by path.

The file lists paths as the cache stores them (relative to the data root), one per line, or
several on a line separated by tabs, as ``fc audit --list labels|leaks|duplicates|outliers``
prints them. Lines starting with ``#`` are comments; the first one is recorded as the reason.
A listed train image is left out of training (and of every score on train); a listed val or
test image is left out of the scores (the held-out side of a leak). Nothing on disk changes.
The run records the file, its hash, the reason and the counts, and the rows left out are part
of the run's address.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import store
from ..errors import UsageError


@dataclass(frozen=True)
class Exclusion:
    """The rows left out: of training (train rows) and of the scores (rows of the other splits)."""

    train: np.ndarray
    scores: dict = field(default_factory=dict)  # split -> sorted rows left out of its scores
    record: dict = field(default_factory=dict)  # what run.json says

    @property
    def address(self) -> str:
        """A hash of the rows left out: the same rows give the same run."""
        digest = hashlib.sha256(np.ascontiguousarray(self.train, dtype=np.int64).tobytes())
        for split in sorted(self.scores):
            digest.update(f"\0{split}\0".encode() + np.ascontiguousarray(self.scores[split], np.int64).tobytes())
        return digest.hexdigest()[:16]

    def kept(self, split: str, n: int) -> np.ndarray | None:
        """The rows of ``split`` (``n`` of them) that are scored; None when all are."""
        out = self.train if split == "train" else self.scores.get(split)
        if out is None or not len(out):
            return None
        return np.setdiff1d(np.arange(n), out)


def _read_lines(path: Path) -> tuple[list[str], str | None]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UsageError(f"--exclude: no such file {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--exclude: cannot read {path} ({exc})") from None
    paths, reason = [], None
    for line in text.splitlines():
        if line.startswith("#"):
            reason = reason or line.lstrip("#").strip() or None
            continue
        paths += [p for p in line.split("\t") if p.strip()]
    return paths, reason


def read_exclusion(exclude: str | os.PathLike, cache: Path, splits) -> Exclusion:
    """The rows of ``cache`` (``splits``: the names of its splits) that the file ``exclude`` lists; a
    UsageError when it lists none of them."""
    splits = list(splits)
    path = Path(exclude)
    listed, reason = _read_lines(path)
    where: dict[str, list[tuple[str, int]]] = {}
    for split in splits:
        for row, p in enumerate(store.load_paths(cache, split)):
            where.setdefault(p, []).append((split, row))
    rows: dict[str, set[int]] = {s: set() for s in splits}
    unmatched = 0
    for p in listed:
        found = where.get(p, [])
        unmatched += not found
        for split, row in found:
            rows[split].add(row)
    if listed and unmatched == len(listed):
        raise UsageError(f"--exclude: none of the {len(listed)} paths in {path} is in {cache.name} "
                         f"(paths as fc audit --list prints them, e.g. {next(iter(where), 'train/CLASS/x.jpg')})")
    as_arrays = {s: np.array(sorted(r), dtype=np.int64) for s, r in rows.items()}
    record = {"file": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "reason": reason,
              "paths": len(listed), "unmatched": unmatched, "train": len(as_arrays.get("train", ())),
              "scores": {s: len(r) for s, r in as_arrays.items() if s != "train" and len(r)}}
    return Exclusion(as_arrays.get("train", np.zeros(0, np.int64)),
                     {s: r for s, r in as_arrays.items() if s != "train"}, record)
