"""Exact conversion of a fitted head pipeline into a torch module.

:func:`to_torch` returns an ``nn.Module`` mapping raw cached features (N x D float32)
to logits whose softmax is the pipeline's ``predict_proba``. The head estimator
becomes a module by its registered ``to_module`` (the functions below serve the
built-in heads); ``standardize`` and ``pca:K`` are affine maps, folded into the first
``nn.Linear``; ``l2`` becomes an explicit :class:`L2Normalize` layer in front. The
arithmetic of the fold is done in float64 and stored as float32.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA
from sklearn.linear_model._base import LinearClassifierMixin
from sklearn.preprocessing import Normalizer, StandardScaler
from torch import nn

from ..errors import HeadError
from .registry import HEADS, head_type, head_type_of
from .torch_heads import linear_module


class L2Normalize(nn.Module):
    """Rows scaled to unit Euclidean norm (zero rows stay zero), as ``Normalizer(norm="l2")``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2.0, dim=1)


# --------------------------------------------------------------------------- head estimator -> module


def coef_module(estimator) -> nn.Linear:
    """``nn.Linear`` from ``coef_``/``intercept_``; one binary row z becomes the logits ``[0, z]``."""
    coef = np.atleast_2d(np.asarray(estimator.coef_, dtype=np.float64))
    intercept = np.resize(np.asarray(estimator.intercept_, dtype=np.float64), coef.shape[0])
    if coef.shape[0] == 1:
        coef = np.vstack([np.zeros_like(coef), coef])
        intercept = np.array([0.0, intercept[0]])
    return linear_module(torch.from_numpy(coef).float(), torch.from_numpy(intercept).float())


def logreg_module(head) -> nn.Linear:
    """A multinomial logistic regression as ``nn.Linear``."""
    if head.solver == "liblinear" and len(head.classes_) > 2:
        raise HeadError("a one-vs-rest (liblinear) logistic regression has no exact softmax form")
    return coef_module(head)


def decision_softmax_module(head) -> nn.Linear:
    """A :class:`~featurecache.heads.sklearn_heads.DecisionSoftmaxClassifier` around a linear model."""
    if not isinstance(head.estimator_, LinearClassifierMixin):
        raise HeadError(f"{type(head.estimator_).__name__} is not a linear model; it cannot become an nn.Linear")
    return coef_module(head.estimator_)


def torch_module(head) -> nn.Module:
    """A torch head's own trained module (a copy)."""
    return copy.deepcopy(head.module_)


# --------------------------------------------------------------------------- preprocessing folded in


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


def _fold(pre, module: nn.Module) -> nn.Module:
    """``module`` with the affine ``pre`` folded into its first ``nn.Linear``."""
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


def _converter(estimator, head: str | None):
    htype = head_type(head) if head is not None else head_type_of(estimator)
    if htype is None or not htype.transferable:
        which = head or type(estimator).__name__
        names = ", ".join(name for name, h in HEADS.items() if h.transferable)
        raise HeadError(f"head {which} is not transferable: only {names} heads convert to torch")
    return htype.to_module


def to_torch(pipeline, head: str | None = None) -> nn.Module:
    """A trainable ``nn.Module`` (CPU, eval mode) mapping raw features to the logits of a fitted head pipeline.

    ``head`` is the name of the pipeline's head type (``logreg``); without it, the
    registered transferable head whose estimators are of the same type is used.
    Raises HeadError for heads that have no exact torch form (trees, neighbours, kernels).
    """
    pre, estimator = pipeline.named_steps["pre"], pipeline.named_steps["head"]
    module = _converter(estimator, head)(estimator).cpu().eval().requires_grad_(True)
    if pre is None or pre == "passthrough":
        return module
    if isinstance(pre, Normalizer) and pre.norm == "l2":
        return nn.Sequential(L2Normalize(), module).eval()
    return _fold(pre, module)
