"""Exact conversion of a fitted head pipeline into a torch module.

:func:`to_torch` returns an ``nn.Module`` mapping raw cached features (N x D float32)
to logits whose softmax is the pipeline's ``predict_proba``. The head estimator
becomes a module by its registered ``to_module`` (the functions below serve the
built-in heads); ``standardize`` and ``pca:K`` are affine maps, folded into the first
``nn.Linear``; ``l2`` becomes an explicit :class:`L2Normalize` layer in front. The
arithmetic of the fold is done in float64 and stored as float32. A kernel-map head
becomes :class:`KernelMapNet`: the map as a layer with fixed weights (:class:`RBFKernel`),
then an ``nn.Linear``; it folds the preprocessing into the map itself.
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
from .mixture import WeightedMixture
from .registry import HEADS, head_type, head_type_of
from .torch_heads import linear_module


class Columns(nn.Module):
    """Columns ``[start, stop)`` of the features, as :class:`~featurecache.heads.preprocessing.FeatureColumns`."""

    def __init__(self, start: int, stop: int):
        super().__init__()
        self.start, self.stop = int(start), int(stop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.start:self.stop]


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


class RBFKernel(nn.Module):
    """``exp(-gamma * ||x * scale - center||^2)`` against fixed centers: a layer with fixed weights (buffers).
    Distances are taken directly, not by the expansion ``|z|^2 - 2 z.c + |c|^2``, which cancels in float32."""

    def __init__(self, centers: np.ndarray, gamma: float):
        super().__init__()
        self.register_buffer("centers", torch.tensor(np.asarray(centers), dtype=torch.float32))  # a copy
        self.register_buffer("scale", torch.ones(self.centers.shape[1]))
        self.gamma = float(gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.to(self.centers.dtype) * self.scale
        d = torch.cdist(z, self.centers, compute_mode="donot_use_mm_for_euclid_dist")
        return torch.exp(-self.gamma * d * d)


class KernelMapNet(nn.Module):
    """A kernel-map head: optional input projection, :class:`RBFKernel`, then ``nn.Linear`` on the kernel values."""

    def __init__(self, kernel: RBFKernel, linear: nn.Linear):
        super().__init__()
        self.project, self.kernel, self.linear = nn.Identity(), kernel, linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.kernel(self.project(x)))

    def fold_pre(self, pre) -> KernelMapNet:
        """Absorb a fitted ``standardize`` (into the kernel's scale and centers) or ``pca`` (as the projection)."""
        return _fold_distance_pre(self, self.kernel.centers, self.kernel.scale, pre)


def _fold_distance_pre(owner: nn.Module, centers: torch.Tensor, scale: torch.Tensor, pre) -> nn.Module:
    """Fold a fitted ``standardize`` into the ``scale`` and ``centers`` of a layer that measures distances from
    ``x * scale`` to ``centers``, or set ``pca`` as ``owner.project`` in front of it; returns ``owner``."""
    if isinstance(pre, StandardScaler):
        mean = np.zeros(centers.shape[1]) if pre.mean_ is None else pre.mean_
        spread = np.ones_like(mean) if pre.scale_ is None else pre.scale_
        with torch.no_grad():
            scale.copy_(torch.from_numpy(1.0 / spread))
            centers.add_(torch.from_numpy(mean / spread).float())
        return owner
    if isinstance(pre, PCA):
        identity = np.eye(pre.n_components_)
        weight, bias = _fold_pca(pre, identity, np.zeros(pre.n_components_))
        owner.project = linear_module(torch.from_numpy(weight).float(), torch.from_numpy(bias).float())
        return owner
    raise HeadError(f"preprocessing {type(pre).__name__} cannot be folded into a distance layer")


class CentroidNet(nn.Module):
    """The nearest class prototype as a layer: logits ``-||x * scale - c||^2`` against trainable centers
    ``c``, the softmax of which is :class:`~featurecache.heads.sklearn_heads.SoftmaxNearestCentroid`'s
    probabilities. Distances are taken directly: the expansion ``2 x.c - |c|^2`` cancels in float32."""

    def __init__(self, centroids: np.ndarray):
        super().__init__()
        self.project = nn.Identity()
        self.centers = nn.Parameter(torch.tensor(np.asarray(centroids), dtype=torch.float32))
        self.register_buffer("scale", torch.ones(self.centers.shape[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in float64: squared distances of standardized features reach 1e5 and more, where float32 keeps
        # too few digits of their differences, which are what the softmax sees
        z = self.project(x).double() * self.scale.double()
        d = torch.cdist(z, self.centers.double(), compute_mode="donot_use_mm_for_euclid_dist")
        return (-(d * d)).to(x.dtype)

    def fold_pre(self, pre) -> CentroidNet:
        """``standardize`` as a layer in front that subtracts before it divides (features of almost no spread
        make ``x / s - m / s`` cancel in float32); ``pca`` as the projection."""
        if isinstance(pre, StandardScaler):
            self.project = Standardize(pre)
            return self
        return _fold_distance_pre(self, self.centers, self.scale, pre)


class Standardize(nn.Module):
    """``(x - mean) / scale`` of a fitted ``StandardScaler``, as fixed buffers."""

    def __init__(self, scaler: StandardScaler):
        super().__init__()
        width = scaler.n_features_in_
        mean = np.zeros(width) if scaler.mean_ is None else scaler.mean_
        scale = np.ones(width) if scaler.scale_ is None else scaler.scale_
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.double() - self.mean.double()) / self.scale.double()


def centroid_module(head) -> CentroidNet:
    """A :class:`~featurecache.heads.sklearn_heads.SoftmaxNearestCentroid` as :class:`CentroidNet`."""
    return CentroidNet(head.centroids_)


def kernel_map_module(head) -> KernelMapNet:
    """A :class:`~featurecache.heads.sklearn_heads.KernelMapClassifier` as :class:`KernelMapNet`: the whitening
    of the map is folded into the linear layer (float64 arithmetic), so the logits are the model's decision."""
    linear = head.linear_
    coef = np.atleast_2d(linear.coef_) @ head.normalization_.T
    intercept = np.resize(linear.intercept_, coef.shape[0])
    if coef.shape[0] == 1:
        coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.array([0.0, intercept[0]])
    layer = linear_module(torch.from_numpy(coef).float(), torch.from_numpy(intercept).float())
    return KernelMapNet(RBFKernel(head.centers_, head.gamma_), layer)


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
    """``module`` with the affine ``pre`` folded into its first ``nn.Linear`` (or by the module's own ``fold_pre``)."""
    if hasattr(module, "fold_pre"):
        return module.fold_pre(pre).eval()
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


class MixtureNet(nn.Module):
    """A :class:`~featurecache.heads.mixture.WeightedMixture` as one module: its logits are
    ``log(sum_i w_i * softmax(z_i / T_i))``, whose softmax is the mixture's probabilities."""

    def __init__(self, members: list[nn.Module], weights, temperatures):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("log_weights", torch.log(torch.tensor(weights, dtype=torch.float32)))
        self.register_buffer("temperatures", torch.tensor(temperatures, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [F.log_softmax(member(x) / self.temperatures[i], dim=1) + self.log_weights[i]
                 for i, member in enumerate(self.members)]
        return torch.logsumexp(torch.stack(parts), dim=0)


def _mixture_module(mixture: WeightedMixture) -> MixtureNet:
    members = [to_torch(member, name) for member, name in zip(mixture.members, mixture.names)]
    return MixtureNet(members, mixture.weights, mixture.temperatures).eval().requires_grad_(True)


def to_torch(pipeline, head: str | None = None) -> nn.Module:
    """A trainable ``nn.Module`` (CPU, eval mode) mapping raw features to the logits of a fitted head pipeline.

    ``head`` is the name of the pipeline's head type (``logreg``); without it, the
    registered transferable head whose estimators are of the same type is used.
    Raises HeadError for heads that have no exact torch form (trees, neighbours, kernels).
    A :class:`~featurecache.heads.mixture.WeightedMixture` becomes a :class:`MixtureNet` when every member converts.
    """
    if isinstance(pipeline, WeightedMixture):
        return _mixture_module(pipeline)
    if "cols" in pipeline.named_steps:  # a head that reads some of the columns
        cols = pipeline.named_steps["cols"]
        return nn.Sequential(Columns(cols.start, cols.stop), to_torch(pipeline[1:], head)).eval()
    pre, estimator = pipeline.named_steps["pre"], pipeline.named_steps["head"]
    module = _converter(estimator, head)(estimator).cpu().eval().requires_grad_(True)
    if pre is None or pre == "passthrough":
        return module
    if isinstance(pre, Normalizer) and pre.norm == "l2":
        return nn.Sequential(L2Normalize(), module).eval()
    return _fold(pre, module)
