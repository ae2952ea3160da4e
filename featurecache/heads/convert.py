"""Exact conversion of a fitted head pipeline into a torch module.

:func:`to_torch` returns an ``nn.Module`` mapping raw cached features (N x D float32)
to logits whose softmax is the pipeline's ``predict_proba``. ``standardize`` and
``pca:K`` are affine maps, folded into the first ``nn.Linear``; ``l2`` becomes an
explicit :class:`L2Normalize` layer in front. The arithmetic of the fold is done in
float64 and stored as float32.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.linear_model._base import LinearClassifierMixin
from sklearn.preprocessing import Normalizer, StandardScaler
from torch import nn

from ..errors import HeadError
from .sklearn_heads import DecisionSoftmaxClassifier
from .torch_heads import TorchLinearClassifier, TorchMLPClassifier, linear_module


class L2Normalize(nn.Module):
    """Rows scaled to unit Euclidean norm (zero rows stay zero), as ``Normalizer(norm="l2")``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2.0, dim=1)


def _coef_linear(estimator) -> nn.Linear:
    """``nn.Linear`` from ``coef_``/``intercept_``; one binary row z becomes the logits ``[0, z]``."""
    coef = np.atleast_2d(np.asarray(estimator.coef_, dtype=np.float64))
    intercept = np.resize(np.asarray(estimator.intercept_, dtype=np.float64), coef.shape[0])
    if coef.shape[0] == 1:
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.array([0.0, intercept[0]])
    return linear_module(torch.from_numpy(coef).float(), torch.from_numpy(intercept).float())


def _logreg_module(head: LogisticRegression) -> nn.Linear:
    if head.solver == "liblinear" and len(head.classes_) > 2:
        raise HeadError("a one-vs-rest (liblinear) logistic regression has no exact softmax form")
    return _coef_linear(head)


def _decision_softmax_module(head: DecisionSoftmaxClassifier) -> nn.Linear:
    if not isinstance(head.estimator_, LinearClassifierMixin):
        raise HeadError(f"{type(head.estimator_).__name__} is not a linear model; it cannot become an nn.Linear")
    return _coef_linear(head.estimator_)


def _torch_module(head) -> nn.Module:
    return copy.deepcopy(head.module_)


# head estimator type -> fitted head -> module mapping the head's input to logits
HEAD_MODULES = {
    TorchLinearClassifier: _torch_module,
    TorchMLPClassifier: _torch_module,
    LogisticRegression: _logreg_module,
    DecisionSoftmaxClassifier: _decision_softmax_module,
}


def _fold_standardize(scaler: StandardScaler, weight: np.ndarray, bias: np.ndarray):
    mean = scaler.mean_ if scaler.mean_ is not None else 0.0
    scale = scaler.scale_ if scaler.scale_ is not None else 1.0
    weight = weight / scale
    return weight, bias - weight @ np.broadcast_to(mean, weight.shape[1:])


def _fold_pca(pca: PCA, weight: np.ndarray, bias: np.ndarray):
    components = pca.components_.astype(np.float64)
    if pca.whiten:
        components = components / np.sqrt(pca.explained_variance_)[:, None]
    weight = weight @ components
    return weight, bias - weight @ pca.mean_


# fitted affine preprocessing type -> fold(transformer, W, b) -> (W', b') acting on raw features
AFFINE_FOLDS = {StandardScaler: _fold_standardize, PCA: _fold_pca}


def _first_linear(module: nn.Module) -> nn.Linear:
    return module if isinstance(module, nn.Linear) else next(m for m in module.modules() if isinstance(m, nn.Linear))


def to_torch(pipeline) -> nn.Module:
    """A trainable ``nn.Module`` (CPU, eval mode) mapping raw features to the logits of a fitted head pipeline.

    Raises HeadError for heads that have no exact torch form (trees, neighbours, kernels).
    """
    pre, head = pipeline.named_steps["pre"], pipeline.named_steps["head"]
    convert = HEAD_MODULES.get(type(head))
    if convert is None:
        raise HeadError(f"head {type(head).__name__} is not transferable: only linear, mlp, logreg, "
                        "linear-svm and ridge heads convert to torch")
    module = convert(head).cpu().eval().requires_grad_(True)
    if pre is None or pre == "passthrough":
        return module
    if isinstance(pre, Normalizer) and pre.norm == "l2":
        return nn.Sequential(L2Normalize(), module).eval()
    fold = AFFINE_FOLDS.get(type(pre))
    if fold is None:
        raise HeadError(f"preprocessing {type(pre).__name__} cannot be folded into a torch module")
    first = _first_linear(module)
    weight, bias = fold(pre, first.weight.detach().double().numpy(), first.bias.detach().double().numpy())
    folded = linear_module(torch.from_numpy(np.ascontiguousarray(weight)).float(), torch.from_numpy(bias).float())
    if first is module:
        return folded.eval()
    first.in_features = folded.in_features
    first.weight = folded.weight
    first.bias = folded.bias
    return module
