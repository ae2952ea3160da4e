"""``--seeds K``: how much a head's score owes to its seed.

A head is a candidate when the registry says its factory takes ``random_state`` (torch
heads, forests, boosting, linear SVMs, ...) or its ``pre`` is ``pca:K``. A candidate is
fitted again from scratch on the same rows with seeds ``seed`` and ``seed + 1`` (with
cross-validation, on the same folds as the sweep). If the two fits give exactly the same
probabilities, the seed does not matter for this head on these data (L-BFGS logistic
regression, say) and it is left there. Otherwise it is fitted with ``seed + 2``, ...
``seed + K - 1`` too, and every split's accuracy is summarized over the K fits. The
fits start cold, so they can differ slightly from the saved head, which may have
started from its neighbour on a warm-start path.

Each entry gets ``seeds = {"seeds": [...], "stochastic": bool, "accuracy": {split:
{"mean", "std", "min", "max", "values"}}}``; the ranking itself is unchanged.
"""

from __future__ import annotations

import numpy as np

from ..heads import HeadConfig, head_type, make_estimator
from ..metrics import class_probabilities, spread
from ..progress import Progress
from ..store import VIEWS

FIT_ERRORS = (ValueError, ArithmeticError, np.linalg.LinAlgError, RuntimeError)


def is_candidate(spec: str) -> bool:
    """Whether the registry says that a head's fit can depend on its seed."""
    cfg = HeadConfig.parse(spec)
    return "random_state" in head_type(cfg.name).context or cfg.pre.startswith("pca:")


def _folds(y: np.ndarray, cv: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The sweep's folds: stratified, shuffled with the sweep's seed."""
    from sklearn.model_selection import StratifiedKFold

    return list(StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def _training(data: dict, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` a head learns from: the training images ``rows`` (None: all), and their augmented views."""
    X, y = data["train"]
    if rows is not None:
        X, y = X[rows], y[rows]
    if VIEWS not in data:
        return X, y
    Xv, yv, source = data[VIEWS]
    keep = slice(None) if rows is None else np.isin(source, rows)
    return np.vstack([X, Xv[keep]]), np.concatenate([y, yv[keep]])


def _refit(spec: str, data: dict, splits: list[str], n_classes: int, seed: int, *, device, folds: list) -> dict:
    """``split -> probabilities`` of the head refitted with ``seed`` (``cv``: out of fold)."""
    cfg = HeadConfig.parse(spec)
    X, y = data["train"]
    out = {}
    if any(s != "cv" for s in splits):
        model = make_estimator(cfg, random_state=seed, device=device).fit(*_training(data))
        out = {s: class_probabilities(model, data[s][0], n_classes) for s in splits if s != "cv"}
    if "cv" in splits:
        oof = np.zeros((len(y), n_classes))
        for fit_rows, rows in folds:
            model = make_estimator(cfg, random_state=seed, device=device).fit(*_training(data, fit_rows))
            oof[rows] = class_probabilities(model, X[rows], n_classes)
        out["cv"] = oof
    return out


def _accuracies(probas: dict, labels: dict) -> dict:
    return {s: float((p.argmax(axis=1) == labels[s]).mean()) for s, p in probas.items()}


def _spread_of(entry: dict, labels: dict, refit, k: int, seed: int, bar: Progress) -> dict:
    """The ``seeds`` record of one entry; ``refit(seed)`` gives the probabilities of one fit."""
    first, second = refit(seed), refit(seed + 1)
    bar.update(2, current=entry["head"])
    if all(np.array_equal(first[s], second[s]) for s in first):
        bar.update(k - 2)
        return {"seeds": [seed], "stochastic": False, "accuracy": {}}
    runs = [_accuracies(first, labels), _accuracies(second, labels)]
    for offset in range(2, k):
        runs.append(_accuracies(refit(seed + offset), labels))
        bar.update(1)
    return {"seeds": list(range(seed, seed + k)), "stochastic": True,
            "accuracy": {s: spread([r[s] for r in runs]) for s in first}}


def seed_spread(entries: list[dict], probas: dict, data: dict, labels: dict, k: int, seed: int = 0,
                cv: int | None = None, device="auto", progress: bool = False) -> None:
    """Add ``seeds`` to every ranked entry: candidates refitted with ``k`` seeds in all, the others as they are.

    ``probas``: head spec -> split -> the saved head's probabilities (for their shape);
    ``data``: split -> (X, y); ``labels``: split -> labels (``cv``: train's).
    """
    ranked = [e for e in entries if e.get("selection_split") in e.get("metrics", {})]
    todo = [e for e in ranked if is_candidate(e["head"])]
    folds = _folds(data["train"][1], cv, seed) if cv and any("cv" in e["metrics"] for e in todo) else []
    for entry in ranked:
        entry["seeds"] = {"seeds": [seed], "stochastic": False, "accuracy": {}}
    with Progress(len(todo) * k, f"refitting {len(todo)} heads with {k} seeds", "fit", progress) as bar:
        for entry in todo:
            saved = probas[entry["head"]]
            splits = [s for s, m in entry["metrics"].items() if m.get("n")]
            n_classes = saved[entry["selection_split"]].shape[1]

            def refit(s: int, spec=entry["head"], splits=splits, n_classes=n_classes) -> dict:
                return _refit(spec, data, splits, n_classes, s, device=device, folds=folds)

            try:
                entry["seeds"] = _spread_of(entry, labels, refit, k, seed, bar)
            except FIT_ERRORS as exc:
                entry["seeds"] = {"seeds": [seed], "stochastic": None, "accuracy": {},
                                  "error": " ".join(f"{type(exc).__name__}: {exc}".split())}
