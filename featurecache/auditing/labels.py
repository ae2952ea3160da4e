"""Likely label errors: confident learning on out-of-fold probabilities.

A head (the run's best transferable head with ``--run``, else :data:`DEFAULT_HEAD`) is fitted
on :data:`FOLDS` stratified folds of train; each training image gets the probabilities of the
head that did not see it. The augmented views of an image (``--augment-views``) are fitted in
its fold and never predicted. val and test get the probabilities of the head fitted on all of
train. The probabilities are calibrated by one temperature fitted on the out-of-fold ones
(:func:`featurecache.sweep.calibration.fit_temperature`), then cleanlab's
``find_label_issues`` flags the likely errors of each split and
``get_label_quality_scores`` (self-confidence) ranks every row: the lower, the more suspicious.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import UsageError
from ..heads import HeadConfig, make_estimator
from ..sweep.calibration import apply_temperature, fit_temperature

# Strong on CNN features and fast: about 1 s of two cores per fold of 10,000 x 1,280 rows.
DEFAULT_HEAD = "logreg:C=0.1;pre=standardize"
# Above this many training rows, a torch linear head (four passes over the rows in batches of 1,024) fits in
# its place: the logistic regression costs minutes of two cores per fold there.
LARGE_ROWS = 15_000
LARGE_HEAD = "linear:lr=0.003;weight_decay=0.0001;epochs=4;batch_size=1024;pre=standardize"
FOLDS = 5


@dataclass
class LabelScores:
    """Per row of one split: the calibrated probabilities, the flag, the quality (lower: more suspect)."""

    proba: np.ndarray
    flagged: np.ndarray  # bool
    quality: np.ndarray

    @property
    def suggested(self) -> np.ndarray:
        return self.proba.argmax(axis=1)


def default_head(n_train: int) -> str:
    return DEFAULT_HEAD if n_train <= LARGE_ROWS else LARGE_HEAD


def _folds(y: np.ndarray, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedKFold

    counts = np.bincount(y)
    k = int(min(folds, counts[counts > 0].min()))
    if k < 2:
        raise UsageError("finding label errors needs at least two training images of every class")
    return list(StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y))


def _with_views(rows: np.ndarray, views_source: np.ndarray | None, n_train: int) -> np.ndarray:
    """Training rows ``rows`` and the rows of their views (stacked after train)."""
    if views_source is None:
        return rows
    return np.concatenate([rows, n_train + np.flatnonzero(np.isin(views_source, rows))])


def _predict(model, X: np.ndarray, n_classes: int) -> np.ndarray:
    out = np.zeros((len(X), n_classes))
    out[:, np.asarray(model.classes_, dtype=np.int64)] = model.predict_proba(X)
    return out


def out_of_fold(spec: str, X: np.ndarray, y: np.ndarray, n_classes: int, views: tuple | None = None,
                seed: int = 0, on_fold=None) -> tuple[np.ndarray, object]:
    """Out-of-fold probabilities of the ``len(y)`` training rows, and the head fitted on all of them.
    ``views``: ``(features, labels, source row)`` of augmented views, fitted with their image."""
    cfg = HeadConfig.parse(spec)
    source = None if views is None else views[2]
    X_all = X if views is None else np.vstack([X, views[0]])
    y_all = y if views is None else np.concatenate([y, views[1]])
    proba = np.zeros((len(y), n_classes))
    for fit, held in _folds(y, FOLDS, seed):
        rows = _with_views(fit, source, len(y))
        model = make_estimator(cfg, random_state=seed, device="cpu").fit(X_all[rows], y_all[rows])
        proba[held] = _predict(model, X[held], n_classes)
        if on_fold:
            on_fold()
    model = make_estimator(cfg, random_state=seed, device="cpu").fit(X_all, y_all)
    if on_fold:
        on_fold()
    return proba, model


def score(proba: np.ndarray, y: np.ndarray) -> LabelScores:
    """cleanlab's flags and self-confidence qualities of labels ``y`` under ``proba``."""
    try:
        from cleanlab.filter import find_label_issues
        from cleanlab.rank import get_label_quality_scores
    except ImportError:
        raise UsageError("finding label errors needs cleanlab: pip install 'featurecache[audit]'") from None

    n_classes = proba.shape[1]
    quality = get_label_quality_scores(y, proba, method="self_confidence")
    present = np.unique(y)
    if len(y) < 2 * n_classes or len(present) < 2:  # too few rows for confident learning's counts
        return LabelScores(proba, np.zeros(len(y), dtype=bool), quality)
    # cleanlab needs every class among the labels: score on the classes present
    sub = proba[:, present]
    sub = sub / np.maximum(sub.sum(axis=1, keepdims=True), 1e-12)
    remap = np.searchsorted(present, y)
    flagged = find_label_issues(remap, sub, filter_by="prune_by_noise_rate")
    return LabelScores(proba, np.asarray(flagged, dtype=bool), quality)


def label_scores(spec: str, data: dict, n_classes: int, views: tuple | None = None, seed: int = 0,
                 on_fold=None) -> dict[str, LabelScores]:
    """Per split of ``data`` (split -> (X, y); train first): calibrated probabilities and cleanlab's verdicts."""
    X, y = data["train"]
    oof, model = out_of_fold(spec, X, y, n_classes, views, seed, on_fold)
    temperature = fit_temperature(oof, y)
    out = {"train": score(apply_temperature(oof, temperature), y)}
    for split, (Xs, ys) in data.items():
        if split != "train" and len(ys):
            out[split] = score(apply_temperature(_predict(model, Xs, n_classes), temperature), ys)
    return out
