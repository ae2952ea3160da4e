"""Every number a user sees about a classifier is computed here, once.

The CLI, the JSON output, the leaderboard and the report all read what
:func:`classification_metrics` returns, so they always agree.
"""

from __future__ import annotations

import numpy as np

SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "macro_f1", "top5_accuracy", "log_loss")


def classification_metrics(y_true, proba, classes: list[str] | None = None) -> dict:
    """Metrics for integer labels ``y_true`` and class probabilities ``proba`` (N x C).

    Returns accuracy, balanced_accuracy, macro_f1, log_loss, top5_accuracy (only with at
    least 5 classes), n, the confusion matrix (rows: true class) and per-class
    precision, recall, f1 and support.
    """
    from sklearn.metrics import (
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        log_loss,
        precision_recall_fscore_support,
    )

    y_true = np.asarray(y_true, dtype=np.int64)
    proba = np.asarray(proba, dtype=np.float64)
    n_classes = proba.shape[1]
    labels = np.arange(n_classes)
    names = list(classes) if classes is not None else [str(i) for i in labels]
    y_pred = proba.argmax(axis=1)
    out: dict = {"n": len(y_true)}
    if len(y_true) == 0:
        return out
    out["accuracy"] = float((y_pred == y_true).mean())
    out["balanced_accuracy"] = float(balanced_accuracy_score(y_true, y_pred))
    out["macro_f1"] = float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))
    if n_classes >= 5:
        top5 = np.argsort(-proba, axis=1)[:, :5]
        out["top5_accuracy"] = float((top5 == y_true[:, None]).any(axis=1).mean())
    clipped = np.clip(proba, 1e-15, 1.0)
    out["log_loss"] = float(log_loss(y_true, clipped / clipped.sum(axis=1, keepdims=True), labels=labels))
    out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=labels).tolist()
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0
    )
    out["per_class"] = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(names, precision, recall, f1, support)
    }
    return out


def summary(metrics: dict) -> dict:
    """The scalar metrics only (for tables)."""
    return {k: metrics[k] for k in SUMMARY_KEYS if k in metrics}
