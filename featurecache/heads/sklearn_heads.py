"""Probabilities for scikit-learn classifiers that lack consistent ones."""

from __future__ import annotations

import warnings
from numbers import Integral, Real
from typing import ClassVar

import numpy as np
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin, MetaEstimatorMixin, clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import pairwise_distances
from sklearn.metrics.pairwise import rbf_kernel
from sklearn.neighbors import NearestCentroid
from sklearn.utils import check_random_state, get_tags
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
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


class KernelMapClassifier(ClassifierMixin, BaseEstimator):
    """An RBF kernel map followed by multinomial logistic regression: an RBF SVM's inductive
    bias at a cost linear in the rows.

    The map is a Nystroem approximation: the RBF kernel against ``n_components`` training
    rows drawn at random (the centers), whitened by the inverse square root of the
    kernel among the centers (eigenvalues under 1e-6 of the largest are dropped, which
    keeps the map well conditioned in float32). ``gamma="scale"`` is ``1 / (D * X.var())``,
    as in :class:`sklearn.svm.SVC`. The map is a fixed layer and the model a linear one, so
    the fitted head converts exactly to a torch module.
    """

    _parameter_constraints: ClassVar[dict] = {
        "C": [Interval(Real, 0, None, closed="neither")],
        "gamma": [StrOptions({"scale"}), Interval(Real, 0, None, closed="neither")],
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "class_weight": [StrOptions({"balanced"}), dict, None],
        "random_state": ["random_state"],
    }

    def __init__(self, C=1.0, gamma="scale", n_components=1000, max_iter=1000, class_weight=None,
                 random_state=None):
        self.C = C
        self.gamma = gamma
        self.n_components = n_components
        self.max_iter = max_iter
        self.class_weight = class_weight
        self.random_state = random_state

    def fit(self, X, y):
        self._validate_params()
        X, y = validate_data(self, X, y, dtype=[np.float32, np.float64])
        rng = check_random_state(self.random_state)
        picked = np.sort(rng.choice(len(X), size=min(self.n_components, len(X)), replace=False))
        self.centers_ = np.asarray(X[picked], dtype=np.float64)
        variance = float(X.var())
        self.gamma_ = float(1.0 / (X.shape[1] * variance) if variance > 0 else 1.0) \
            if self.gamma == "scale" else float(self.gamma)
        values, vectors = np.linalg.eigh(rbf_kernel(self.centers_, gamma=self.gamma_))
        keep = values > 1e-6 * values.max()
        self.normalization_ = vectors[:, keep] / np.sqrt(values[keep])
        self.linear_ = LogisticRegression(C=self.C, max_iter=self.max_iter, class_weight=self.class_weight,
                                          random_state=self.random_state).fit(self.transform(X), y)
        self.classes_ = self.linear_.classes_
        return self

    def transform(self, X) -> np.ndarray:
        """The kernel map of ``X`` (N x kept components, float32), computed in blocks of rows."""
        check_is_fitted(self, "normalization_")
        X = validate_data(self, X, reset=False, dtype=[np.float32, np.float64])
        out = np.empty((len(X), self.normalization_.shape[1]), dtype=np.float32)
        for start in range(0, len(X), 8192):
            block = rbf_kernel(np.asarray(X[start:start + 8192], dtype=np.float64), self.centers_, gamma=self.gamma_)
            out[start:start + 8192] = block @ self.normalization_
        return out

    def decision_function(self, X) -> np.ndarray:
        return self.linear_.decision_function(self.transform(X))

    def predict_proba(self, X) -> np.ndarray:
        return self.linear_.predict_proba(self.transform(X))

    def predict(self, X) -> np.ndarray:
        return self.linear_.predict(self.transform(X))
