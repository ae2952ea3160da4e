"""A weighted mixture of fitted heads: what an ensemble of a sweep's heads predicts.

``WeightedMixture(members, weights, temperatures)`` holds fitted head pipelines that
learnt from the same features, and predicts ``sum_i w_i * softmax(log p_i / T_i)``:
each member's probabilities after its own temperature (1: as they are), weighted.
It is built from a run's saved heads (:func:`featurecache.sweep.runs.load_head`), not
fitted: an ensemble's members and weights are chosen by
:mod:`featurecache.sweep.ensemble` from the probabilities the sweep already has.
When every member is transferable, :func:`featurecache.heads.to_torch` turns the
mixture into one module whose logits are the log of the mixture's probabilities.
"""

from __future__ import annotations

import numpy as np

from ..metrics import tempered


def mix(probas: list, weights, temperatures=None) -> np.ndarray:
    """The weighted mixture of members' probabilities (each after its temperature)."""
    temperatures = [1.0] * len(probas) if temperatures is None else temperatures
    out = None
    for proba, weight, temperature in zip(probas, weights, temperatures):
        part = float(weight) * tempered(proba, float(temperature))
        out = part if out is None else out + part
    return out


class WeightedMixture:
    """Fitted head pipelines whose tempered probabilities are averaged with ``weights`` (they sum to 1);
    ``names``: the members' head types (``logreg``), for their torch form."""

    def __init__(self, members: list, weights: list, temperatures: list | None = None, names: list | None = None):
        self.members = list(members)
        self.names = [None] * len(self.members) if names is None else list(names)
        self.weights = [float(w) for w in weights]
        self.temperatures = [1.0] * len(self.members) if temperatures is None else [float(t) for t in temperatures]

    @property
    def classes_(self) -> np.ndarray:
        return self.members[0].classes_

    def predict_proba(self, X) -> np.ndarray:
        return mix([m.predict_proba(X) for m in self.members], self.weights, self.temperatures)

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]
