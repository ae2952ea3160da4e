"""Probabilities for scikit-learn classifiers that lack consistent ones."""

from __future__ import annotations

import warnings
from typing import ClassVar

import numpy as np
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin, MetaEstimatorMixin, clone
from sklearn.metrics import pairwise_distances
from sklearn.neighbors import NearestCentroid
from sklearn.utils import get_tags
from sklearn.utils._param_validation import HasMethods
from sklearn.utils.validation import check_is_fitted, validate_data


def decision_logits(scores: np.ndarray) -> np.ndarray:
    """N x C logits from a decision function: a binary score z becomes ``[0, z]``."""
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        return np.column_stack([np.zeros_like(scores), scores])
    return scores


class DecisionSoftmaxClassifier(MetaEstimatorMixin, ClassifierMixin, BaseEstimator):
    """Wrap a classifier so that ``predict_proba`` is the softmax of its decision function.

    Multiclass: softmax over the per-class scores. Binary: the score z becomes the
    logits ``[0, z]``, so P(class 1) = sigmoid(z), the mapping logistic regression
    uses. The scores are margins, not calibrated log-odds (no temperature is fitted):
    the probabilities rank and argmax exactly like the wrapped model, and a linear
    model wrapped this way converts to an ``nn.Linear`` whose softmax is exactly
    this ``predict_proba``.
    """

    _parameter_constraints: ClassVar[dict] = {"estimator": [HasMethods(["fit", "decision_function"])]}

    def __init__(self, estimator):
        self.estimator = estimator

    def fit(self, X, y):
        self._validate_params()
        self.estimator_ = clone(self.estimator).fit(X, y)
        self.classes_ = self.estimator_.classes_
        self.n_features_in_ = self.estimator_.n_features_in_
        return self

    def decision_function(self, X) -> np.ndarray:
        check_is_fitted(self)
        return self.estimator_.decision_function(X)

    def predict_proba(self, X) -> np.ndarray:
        return softmax(decision_logits(self.decision_function(X)), axis=1)

    def predict(self, X) -> np.ndarray:
        logits = decision_logits(self.decision_function(X))
        return self.classes_[logits.argmax(axis=1)]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = get_tags(self.estimator).input_tags.sparse
        return tags


class SoftmaxNearestCentroid(NearestCentroid):
    """Nearest centroid whose probabilities are the softmax of minus the squared
    Euclidean distances to the class centroids.

    ``predict`` (with uniform priors) picks the nearest centroid; scikit-learn's own
    ``predict_proba`` scores distances scaled by the per-feature within-class spread
    and can disagree with it. These probabilities always agree with ``predict``.
    They depend on the feature scale (no temperature is fitted): soft after ``l2``,
    nearly one-hot on large raw features.
    """

    def fit(self, X, y):
        # Features that are constant within every class (dead ReLU channels of a CNN are
        # common) make scikit-learn warn about a zero within-class spread. The spread
        # only matters to shrinkage; without it the warning is noise.
        with warnings.catch_warnings():
            if self.shrink_threshold is None:
                warnings.filterwarnings("ignore", message=".*within_class_std_dev_ has at least 1 zero")
            return super().fit(X, y)

    def _decision_function(self, X) -> np.ndarray:
        check_is_fitted(self, "centroids_")
        X = validate_data(self, X, reset=False, accept_sparse="csr", dtype=np.float64)
        return -pairwise_distances(X, self.centroids_, metric="sqeuclidean")
