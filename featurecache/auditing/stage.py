"""``fc audit CACHE``: leaks, duplicates, likely label errors and outliers, from the cached features.

:func:`audit` reads every split of the cache (features, labels, paths and the content hashes
stage one records), searches the nearest neighbours of every row (:mod:`.neighbours`), pairs
duplicates and classes them (:mod:`.duplicates`), scores the labels (:mod:`.labels`), and writes
``audit.json`` and ``audit.html`` under ``<cache dir>/audits/<cache name>/``, where ``fc report``
finds them. The same inputs reuse the saved audit.

:meth:`AuditResult.lines` gives the lists ``fc audit --list`` prints, paths as the cache stores them,
which ``fc fit-head --exclude FILE`` reads back.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__, store
from ..errors import FeatureCacheError, RunError, UsageError
from ..files import sha256_file, write_json
from ..progress import Progress
from . import duplicates as dup
from . import labels as lab
from .neighbours import EXACT_MAX_ROWS, search

AUDIT_DIR = "audits"
AUDIT_FILE = "audit.json"
PAGE_FILE = "audit.html"
FORMAT = "featurecache-audit/1"
NEIGHBOURS = 10  # nearest rows searched per row: pairs beyond the 10th neighbour of both rows are not seen
LISTS = ("labels", "leaks", "duplicates", "outliers")
TOP_CONFUSED = 10
NEAR_SHARE_WARNING = 0.10  # images with a neighbour at the threshold, above which the audit warns


@dataclass
class AuditResult:
    """Where the audit went, and what it found (the content of ``audit.json``)."""

    audit_dir: str
    report: dict
    reused: bool = False
    seconds: float = 0.0
    page: str = ""

    @property
    def json_path(self) -> Path:
        return Path(self.audit_dir) / AUDIT_FILE

    def to_dict(self) -> dict:
        """What ``audit.json`` holds (``fc audit --json``)."""
        return self.report

    def summary(self) -> dict:
        """Where the audit is and its counts (what a pipeline keeps)."""
        return {"audit_dir": self.audit_dir, "page": self.page, "reused": self.reused,
                "seconds": round(self.seconds, 3), "counts": self.report["counts"]}

    def lines(self, kind: str, top: int | None = None) -> list[str]:
        """The lines ``fc audit --list KIND [--top N]`` prints (see :data:`LISTS`)."""
        if kind not in LISTS:
            raise UsageError(f"unknown list {kind!r}: choose {', '.join(LISTS)}")
        if top is not None and top < 1:
            raise UsageError(f"--top must be at least 1, not {top}")
        r = self.report
        if kind == "labels":
            ranking = r["train_ranking"]
            chosen = ranking[:top] if top is not None else [row for row in ranking if row[2]]
            return [row[0] for row in chosen]
        if kind == "outliers":
            return [o["path"] for o in r["outliers"]][:top]
        wanted = ("leak",) if kind == "leaks" else ("duplicate", "conflict")
        return [f"{p['a']['path']}\t{p['b']['path']}" for p in r["pairs"] if p["kind"] in wanted][:top]


def audit_dir_of(cache: str | Path) -> Path:
    """Where the audit of a cache file goes."""
    cache = Path(cache)
    return cache.parent / AUDIT_DIR / cache.stem


def saved_audit(cache: str | Path) -> dict | None:
    """The ``audit.json`` of a cache file, or None when it has not been audited (or its audit is of other features)."""
    path = audit_dir_of(cache) / AUDIT_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        key = store.info(cache)["key"]
    except FeatureCacheError:
        return None
    return saved if saved.get("cache_key") == key else None


def leaks_into_test(report: dict) -> int:
    """Leaks whose held-out side is in test."""
    return sum(n for pair, n in report["counts"]["leaks"].items() if pair.endswith("-test"))


@dataclass
class _Data:
    """Every split of the cache side by side, and what the label scores need."""

    rows: dup.Rows
    X: np.ndarray
    split_rows: dict = field(default_factory=dict)  # split -> its row indices in X
    views: tuple | None = None  # (features, labels, source row) of the augmented views


def _read(cache: Path, meta: dict, features: str) -> _Data:
    splits, paths, labels, hashes, parts, split_rows = [], [], [], [], [], {}
    has_hashes = True
    for split in meta["splits"]:
        X, y, p = store.load_features(cache, split, features=features)
        h = store.load_hashes(cache, split)
        has_hashes = has_hashes and h is not None
        split_rows[split] = np.arange(len(paths), len(paths) + len(p))
        splits += [split] * len(p)
        paths += p
        labels.append(y)
        hashes += h or [""] * len(p)
        parts.append(X)
    rows = dup.Rows(splits, paths, np.concatenate(labels), hashes if has_hashes else None, meta["classes"])
    views = None
    if meta["views"]["n"]:
        Xv, yv, _ = store.load_features(cache, store.VIEWS, features=features)
        views = (Xv, yv, store.view_sources(cache))
    return _Data(rows, np.vstack(parts), split_rows, views)


def _head_of_run(run: str | None, meta: dict, cache_dir) -> tuple[str | None, str, str | None]:
    """``(spec, features, run id)``: the run's best transferable single head (an ensemble is not refitted fold by
    fold) and its features, or the defaults."""
    if run is None:
        return None, "penultimate", None
    from ..sweep.leaderboard import is_ensemble
    from ..sweep.runs import best_transferable, load_run

    loaded = load_run(run, cache_dir)
    if loaded.meta["cache_key"] != meta["key"]:
        raise RunError(f"run {loaded.path.name} was fitted on another cache ({Path(loaded.meta['cache']).name}), "
                       f"not on {Path(meta['path']).name}")
    spec = best_transferable([e for e in loaded.leaderboard if not is_ensemble(e)])  # a head to refit out of fold
    if spec is None:
        raise RunError(f"run {loaded.path.name} has no transferable head to score the labels with")
    return spec, loaded.meta.get("features", "penultimate"), loaded.path.name


def _key(meta: dict, options: dict) -> str:
    code = sorted(sha256_file(p) for p in Path(__file__).parent.glob("*.py"))
    return store.cache_key({"cache": meta["key"], "options": options, "code": code, "version": __version__})


def _saved(audit_dir: Path, key: str) -> dict | None:
    path = audit_dir / AUDIT_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return saved if saved.get("key") == key else None


def audit(
    cache: str,
    run: str | None = None,
    threshold: float = dup.DEFAULT_THRESHOLD,
    outliers: int = 20,
    exact_max: int = EXACT_MAX_ROWS,
    seed: int = 0,
    cache_dir: str | None = None,
    progress: bool = False,
) -> AuditResult:
    """Audit ``cache`` (a path, name or key prefix): leaks, conflicts and duplicates (content hash, or cosine
    similarity at least ``threshold``), likely label errors (cleanlab on the out-of-fold probabilities of
    ``run``'s best transferable head, else of :data:`.labels.DEFAULT_HEAD`), and the ``outliers`` rows
    farthest from their neighbours. The neighbour search is exact up to ``exact_max`` rows, approximate
    (faiss) above. Writes ``audit.json`` and ``audit.html`` under ``<cache dir>/audits/<cache name>/``."""
    started = time.perf_counter()
    if not 0.0 < threshold <= 1.0:
        raise UsageError(f"--threshold is a cosine similarity in (0, 1], not {threshold}")
    if outliers < 0 or exact_max < 0:
        raise UsageError("--outliers and --exact-max must be 0 or more")
    path = store.resolve(cache, cache_dir).resolve()
    meta = store.info(path)
    spec, features, run_id = _head_of_run(run, meta, cache_dir)
    options = {"threshold": threshold, "outliers": outliers, "exact_max": exact_max, "seed": seed, "run": run_id}
    audit_dir = audit_dir_of(path)
    key = _key(meta, options)
    saved = _saved(audit_dir, key)
    if saved is not None:
        return AuditResult(str(audit_dir), saved, True, time.perf_counter() - started, str(audit_dir / PAGE_FILE))
    data = _read(path, meta, features)
    if "train" not in data.split_rows:
        raise UsageError(f"{path.name} has no train split: the label audit learns from train")
    spec = spec or lab.default_head(len(data.split_rows["train"]))
    report = _findings(data, spec, options, progress)
    report.update(format=FORMAT, key=key, cache=str(path), cache_key=meta["key"], head=spec, features=features,
                  options=options, hashes=data.rows.hashes is not None, seconds=round(time.perf_counter() - started, 3),
                  created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    write_json(audit_dir / AUDIT_FILE, report)
    from .page import write_page

    page = write_page(audit_dir / PAGE_FILE, report, meta["config"])
    return AuditResult(str(audit_dir), report, False, time.perf_counter() - started, str(page))


def _findings(data: _Data, spec: str, options: dict, progress: bool) -> dict:
    """Pairs, label issues, outliers and the summaries, with progress on stderr."""
    rows, n = data.rows, len(data.X)
    train = data.split_rows["train"]
    fits = lab.FOLDS + 1
    clock = time.perf_counter()
    with Progress(n + fits, "audit", unit="steps", enabled=progress) as bar, bar.heartbeat():
        bar.set_current(f"nearest neighbours of {n:,} rows")
        sims, idx, method = search(data.X, NEIGHBOURS, options["exact_max"], on_block=bar.update)
        pairs = dup.find_pairs(rows, data.X, sims, idx, options["threshold"])
        timings = {"neighbours": round(time.perf_counter() - clock, 3)}
        bar.set_current(f"label scores ({spec}, {lab.FOLDS} folds)")
        split_data = {s: (data.X[r], rows.labels[r]) for s, r in data.split_rows.items()}
        scores = lab.label_scores(spec, split_data, len(rows.classes), data.views, options["seed"],
                                  on_fold=lambda: bar.update(1))
        timings["labels"] = round(time.perf_counter() - clock - timings["neighbours"], 3)
    issues = _label_issues(data, scores)
    nearest = sims[:, 0].astype(np.float64)
    report = {
        "neighbours": {"method": method, "k": int(sims.shape[1]), "rows": n,
                       "nearest_similarity": {q: round(float(np.quantile(nearest, float(q))), 4)
                                              for q in ("0.5", "0.9", "0.99")}},
        "notes": _notes(nearest, options["threshold"]),
        "timings": timings,
        "pairs": pairs,
        "label_issues": issues,
        "train_ranking": _ranking(data, scores["train"], train),
        "outliers": dup.outliers(rows, sims, idx, options["outliers"]),
    }
    report["counts"] = _counts(data, pairs, issues, scores, report["outliers"])
    report["classes"] = _classes(data, pairs, issues)
    report["confused"] = _confused(rows.classes, rows.labels[train], scores["train"].suggested)
    return report


def _notes(nearest: np.ndarray, threshold: float) -> list[str]:
    """A warning when most images have a neighbour at the threshold: near-duplicates are not told apart."""
    share = float((nearest >= threshold).mean())
    if share < NEAR_SHARE_WARNING:
        return []
    return [f"{share:.0%} of the images have a neighbour at cosine >= {threshold}: in these features near-duplicates "
            f"are not told apart from similar images (the median nearest neighbour is at "
            f"{float(np.median(nearest)):.3f}, the 99th percentile at {float(np.quantile(nearest, 0.99)):.3f}); "
            "raise --threshold, or trust only the byte-identical pairs"]


def _label_issues(data: _Data, scores: dict) -> list[dict]:
    """Every flagged row, most suspicious first: given and suggested label, score (1 - self-confidence)."""
    out = []
    for split, s in scores.items():
        rows = data.split_rows[split]
        for j in np.flatnonzero(s.flagged):
            i = int(rows[j])
            out.append({**data.rows.describe(i), "row": i, "suggested": data.rows.classes[int(s.suggested[j])],
                        "score": round(1.0 - float(s.quality[j]), 5),
                        "confidence": round(float(s.proba[j, s.suggested[j]]), 5)})
    out.sort(key=lambda x: (x["split"] != "train", -x["score"], x["row"]))
    return out


def _ranking(data: _Data, s: lab.LabelScores, rows: np.ndarray) -> list[list]:
    """Every train row, most suspicious first: ``[path, score, flagged]``."""
    order = np.argsort(s.quality, kind="stable")
    return [[data.rows.paths[int(rows[j])], round(1.0 - float(s.quality[j]), 5), bool(s.flagged[j])] for j in order]


def _counts(data: _Data, pairs: list[dict], issues: list[dict], scores: dict, outliers: list) -> dict:
    kinds = Counter(p["kind"] for p in pairs)
    return {
        "rows": {s: len(r) for s, r in data.split_rows.items()},
        "leaks": dup.leak_counts(pairs),
        "leak_pairs": kinds["leak"], "conflicts": kinds["conflict"], "duplicates": kinds["duplicate"],
        "identical_bytes": sum(p["found_by"] == "identical bytes" for p in pairs),
        "label_issues": {s: int(v.flagged.sum()) for s, v in scores.items()},
        "outliers": len(outliers),
    }


def _classes(data: _Data, pairs: list[dict], issues: list[dict]) -> list[dict]:
    """Per class: its rows per split, its flagged labels, and the pairs its rows are in."""
    rows = data.rows
    out = []
    for c, name in enumerate(rows.classes):
        size = {s: int((rows.labels[r] == c).sum()) for s, r in data.split_rows.items()}
        in_pairs = Counter(p["kind"] for p in pairs if name in (p["a"]["label"], p["b"]["label"]))
        out.append({"class": name, "size": size, "flagged": sum(i["label"] == name for i in issues),
                    "leaks": in_pairs["leak"], "conflicts": in_pairs["conflict"], "duplicates": in_pairs["duplicate"]})
    return out


def _confused(classes: list[str], y: np.ndarray, predicted: np.ndarray) -> list[dict]:
    """The pairs of classes the out-of-fold predictions mix up most, both directions counted together."""
    counts: Counter = Counter()
    for a, b in zip(y[y != predicted], predicted[y != predicted]):
        counts[tuple(sorted((int(a), int(b))))] += 1
    return [{"classes": [classes[a], classes[b]], "count": n} for (a, b), n in counts.most_common(TOP_CONFUSED)]
