"""Every number a user sees about a classifier is computed here, once.

The CLI, the JSON output, the leaderboard and the report all read what
:func:`classification_metrics` returns, so they always agree.

Uncertainty. Every accuracy comes with a 95% interval from a bootstrap over the
split's images: ``BOOTSTRAP`` resamples of N images drawn with replacement, with the
fixed seed ``BOOTSTRAP_SEED``, so the same predictions always give the same interval.
A statistic that depends only on how many resampled images fall in each of a few
categories (right or wrong; right or wrong per class; which of two heads is right) is
drawn directly as those counts: counting N draws with replacement by category is one
draw of Multinomial(N, category counts / N), exactly the distribution an index matrix
of resamples gives, at the cost of B x categories instead of B x N.

Calibration. ``ece`` is the expected calibration error over ``ECE_BINS`` equal-width
bins of the top probability (the mean gap between confidence and accuracy, weighted by
the share of images in each bin); ``reliability`` holds the bins it is made of.
``brier`` is the mean squared distance between the probability vector and the one-hot
label (0 is perfect, 2 the worst).
"""

from __future__ import annotations

import numpy as np

SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy", "log_loss", "ece", "brier")
BOOTSTRAP = 1000  # resamples
BOOTSTRAP_SEED = 0
LEVEL = 0.95  # of every interval
ECE_BINS = 15
EPS = 1e-15  # probabilities are clipped to [EPS, 1] before a logarithm, as scikit-learn's log_loss does


# --------------------------------------------------------------------------- the bootstrap


def resampled_counts(counts, n_resamples: int = BOOTSTRAP, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    """``n_resamples x K`` category counts of bootstrap resamples of the images counted by ``counts`` (K)."""
    counts = np.asarray(counts, dtype=np.float64)
    n = int(counts.sum())
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, counts / n, size=n_resamples)


def interval(values: np.ndarray) -> list[float]:
    """The central ``LEVEL`` percentile interval of bootstrap ``values``."""
    tail = (1 - LEVEL) / 2
    low, high = np.quantile(values, [tail, 1 - tail])
    return [float(low), float(high)]


def proportion_interval(hits: np.ndarray) -> list[float]:
    """Interval of the share of true values in ``hits`` (one bool per image)."""
    hits = np.asarray(hits, dtype=bool)
    resampled = resampled_counts([len(hits) - hits.sum(), hits.sum()])
    return interval(resampled[:, 1] / len(hits))


def mean_interval(values) -> list[float]:
    """Interval of the mean of per-image ``values`` that take a few distinct values: the share of
    several fits that got an image right (0, 1/3, 2/3, 1), or the difference of two such shares.
    A bootstrap over images, drawn as counts per distinct value; for 0/1 values it is
    :func:`proportion_interval`."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return [0.0, 0.0]
    distinct, counts = np.unique(values, return_counts=True)
    return interval(resampled_counts(counts) @ distinct / len(values))


def balanced_accuracy_interval(y_true: np.ndarray, y_pred: np.ndarray) -> list[float]:
    """Interval of the mean per-class recall (over the classes present in each resample)."""
    classes = np.unique(y_true)
    right = np.array([np.sum((y_true == c) & (y_pred == c)) for c in classes])
    support = np.array([np.sum(y_true == c) for c in classes])
    resampled = resampled_counts(np.stack([support - right, right], axis=1).ravel()).reshape(-1, len(classes), 2)
    totals = resampled.sum(axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(totals > 0, resampled[:, :, 1] / totals, np.nan)
    return interval(np.nanmean(recall, axis=1))


def paired_difference(correct_a, correct_b) -> dict:
    """Accuracy of a minus accuracy of b on the same images, with its paired-bootstrap interval.

    Each resample draws images (not heads), so what the two heads share cancels out:
    ``{"difference", "ci": [low, high]}``. b is significantly worse than a when ``low > 0``.
    """
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    n = len(a)
    if n == 0:
        return {"difference": 0.0, "ci": [0.0, 0.0]}
    resampled = resampled_counts([np.sum(a & ~b), np.sum(~a & b), np.sum(a == b)])
    return {"difference": float(a.mean() - b.mean()), "ci": interval((resampled[:, 0] - resampled[:, 1]) / n)}


def class_probabilities(estimator, X, n_classes: int) -> np.ndarray:
    """``predict_proba`` with one column per class of the cache, also for classes the fit never saw."""
    out = np.zeros((len(X), n_classes))
    if len(X):
        out[:, np.asarray(estimator.classes_, dtype=np.int64)] = estimator.predict_proba(X)
    return out


def spread(values) -> dict:
    """Mean, standard deviation (ddof 0), smallest and largest of a few values, and the values."""
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max()), "values": [float(v) for v in values]}


# --------------------------------------------------------------------------- calibration


def reliability(y_true, proba, bins: int = ECE_BINS) -> dict:
    """Per bin of the top probability: ``count``, mean ``confidence`` and ``accuracy`` (None when empty)."""
    y_true, proba = np.asarray(y_true, dtype=np.int64), np.asarray(proba, dtype=np.float64)
    confidence = proba.max(axis=1)
    right = (proba.argmax(axis=1) == y_true).astype(np.float64)
    index = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, confidence, minlength=bins) / count
        accuracy = np.bincount(index, right, minlength=bins) / count
    return {"bins": bins, "count": count.tolist(),
            "confidence": [None if c == 0 else float(v) for c, v in zip(count, mean_conf)],
            "accuracy": [None if c == 0 else float(v) for c, v in zip(count, accuracy)]}


def expected_calibration_error(bins: dict) -> float:
    """ECE of a :func:`reliability` table: the share-weighted mean of ``|accuracy - confidence|``."""
    count = np.asarray(bins["count"], dtype=np.float64)
    gaps = [abs(a - c) if n else 0.0 for n, a, c in zip(count, bins["accuracy"], bins["confidence"])]
    return float(np.dot(count, gaps) / count.sum()) if count.sum() else 0.0


def calibration_metrics(y_true, proba) -> dict:
    """``log_loss``, ``ece``, ``brier`` and the ``reliability`` bins of probabilities ``proba`` (N x C)."""
    y_true, proba = np.asarray(y_true, dtype=np.int64), np.asarray(proba, dtype=np.float64)
    clipped = np.clip(proba, EPS, 1.0)
    clipped /= clipped.sum(axis=1, keepdims=True)
    onehot = np.eye(proba.shape[1])[y_true]
    bins = reliability(y_true, proba)
    return {"log_loss": float(-np.log(clipped[np.arange(len(y_true)), y_true]).mean()),
            "ece": expected_calibration_error(bins), "brier": float(((proba - onehot) ** 2).sum(axis=1).mean()),
            "reliability": bins}


# --------------------------------------------------------------------------- all of them


def _label_metrics(y_true: np.ndarray, y_pred: np.ndarray, labels: np.ndarray, names: list[str]) -> dict:
    """Scores of the predicted labels: balanced accuracy, macro-F1, confusion matrix and per class."""
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix, precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "balanced_accuracy_ci": balanced_accuracy_interval(y_true, y_pred),
        "macro_f1": float(f1.mean()),  # over every class of the cache, as f1_score(average="macro") does
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for name, p, r, f, s in zip(names, precision, recall, f1, support)},
    }


def classification_metrics(y_true, proba, classes: list[str] | None = None) -> dict:
    """Metrics for integer labels ``y_true`` and class probabilities ``proba`` (N x C).

    Returns n, accuracy and balanced_accuracy with their 95% bootstrap intervals
    (``accuracy_ci``, ``balanced_accuracy_ci``: ``[low, high]``), macro_f1, top5_accuracy
    and its interval (only with at least 5 classes), log_loss, ece, brier, the
    reliability bins, the confusion matrix (rows: true class) and per-class precision,
    recall, f1 and support.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    labels = np.arange(proba.shape[1])
    names = list(classes) if classes is not None else [str(i) for i in labels]
    out: dict = {"n": len(y_true)}
    if len(y_true) == 0:
        return out
    y_pred = proba.argmax(axis=1)
    out["accuracy"] = float((y_pred == y_true).mean())
    out["accuracy_ci"] = proportion_interval(y_pred == y_true)
    labelled = _label_metrics(y_true, y_pred, labels, names)
    out.update({k: labelled[k] for k in ("balanced_accuracy", "balanced_accuracy_ci", "macro_f1")})
    if len(labels) >= 5:
        top5 = (np.argsort(-proba, axis=1)[:, :5] == y_true[:, None]).any(axis=1)
        out["top5_accuracy"], out["top5_accuracy_ci"] = float(top5.mean()), proportion_interval(top5)
    out.update(calibration_metrics(y_true, proba))
    out.update({k: labelled[k] for k in ("confusion_matrix", "per_class")})
    return out


def summary(metrics: dict) -> dict:
    """The scalar metrics only (for tables)."""
    return {k: metrics[k] for k in SUMMARY_KEYS if k in metrics}


def tempered(proba, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` row by row (``T = 1``: ``p`` as float64)."""
    proba = np.asarray(proba, dtype=np.float64)
    if temperature == 1.0:
        return proba
    logp = np.log(np.clip(proba, EPS, 1.0)) / temperature
    logp -= logp.max(axis=1, keepdims=True)
    out = np.exp(logp)
    return out / out.sum(axis=1, keepdims=True)
