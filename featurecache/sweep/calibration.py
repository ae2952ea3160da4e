"""Temperature scaling: one number per head that makes its probabilities honest.

A head's probabilities ``p`` become ``softmax(log p / T)``. ``T > 1`` softens an
over-confident head, ``T < 1`` sharpens a timid one; the predicted class never changes,
so accuracy does not either. ``T`` minimizes the negative log-likelihood of the
selection split's labels: ``val``, or with cross-validation the out-of-fold
probabilities on train, so no test image takes part.

For a head that is a torch module (its output is logits ``z`` with ``p = softmax(z)``),
``softmax(log p / T) = softmax(z / T)``: the exported network divides its logits by
``T`` (:class:`featurecache.finetuning.network.Exported`) and predicts what :func:`apply_temperature`
gives.
"""

from __future__ import annotations

import numpy as np

from ..errors import UsageError, suggest
from ..metrics import EPS, calibration_metrics, tempered

METHODS = ("temperature",)
NONE = "none"  # what turns calibration off (the default is temperature scaling)
BOUNDS = (1e-2, 1e2)  # the temperatures searched


def check_method(calibrate: str | None) -> str | None:
    """The method ``calibrate`` names (None for ``"none"`` or None: no calibration), else a UsageError."""
    if calibrate is None or calibrate == NONE:
        return None
    if calibrate in METHODS:
        return calibrate
    raise UsageError(f"unknown calibration {calibrate!r}{suggest(str(calibrate), (*METHODS, NONE))}; "
                     f"use {', '.join(METHODS)} or {NONE}")


def _log_probabilities(proba) -> np.ndarray:
    return np.log(np.clip(np.asarray(proba, dtype=np.float64), EPS, 1.0))


def apply_temperature(proba, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` row by row; ``T = 1`` returns the probabilities as they are."""
    return tempered(proba, float(temperature))


def fit_temperature(proba, y) -> float:
    """The temperature that minimizes the negative log-likelihood of labels ``y`` under ``proba``."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    logp = _log_probabilities(proba)
    rows, y = np.arange(len(logp)), np.asarray(y, dtype=np.int64)

    def nll(log_t: float) -> float:
        return float(-log_softmax(logp / np.exp(log_t), axis=1)[rows, y].mean())

    found = minimize_scalar(nll, bounds=np.log(BOUNDS), method="bounded", options={"xatol": 1e-6})
    best = float(np.exp(found.x))
    return best if nll(found.x) < nll(0.0) else 1.0


def calibrate_entries(entries: list[dict], probas: dict, labels: dict) -> None:
    """Give every ranked entry ``calibration``: its temperature and the calibration metrics after it.

    ``calibration = {"method": "temperature", "temperature", "fitted_on": split, "metrics":
    {split: {"log_loss", "ece", "brier", "reliability"}}}``; the metrics before it are the entry's own.
    """
    for entry in entries:
        split = entry.get("selection_split")
        if split not in entry.get("metrics", {}):
            continue
        head_probas = probas[entry["head"]]
        temperature = fit_temperature(head_probas[split], labels[split])
        after = {s: calibration_metrics(labels[s], apply_temperature(head_probas[s], temperature))
                 for s, m in entry["metrics"].items() if m.get("n")}
        entry["calibration"] = {"method": "temperature", "temperature": temperature, "fitted_on": split,
                                "metrics": after}


def head_temperature(head_meta: dict) -> float:
    """The temperature a saved head's probabilities are divided by (1 when it was not calibrated)."""
    return float((head_meta.get("calibration") or {}).get("temperature", 1.0))
