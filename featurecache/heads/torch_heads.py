"""Torch heads as real scikit-learn estimators.

:class:`TorchLinearClassifier` is softmax regression, :class:`TorchMLPClassifier` a
small multi-layer perceptron. Both train with AdamW and a cosine learning-rate
schedule (from ``lr`` down to zero over ``epochs``), with mini-batches of
``batch_size`` rows drawn in a seeded order, on CUDA when there is one and on the CPU
otherwise (:func:`featurecache.runtime.resolve_device`). The same ``random_state``
gives the same model: initialization, shuffling and dropout draw from a seeded
generator, forked so the global torch state is left alone.

After ``fit``, ``module_`` is the trained ``nn.Module`` (on the CPU, in eval mode)
mapping N x D float32 features to N x C logits, and ``predict_proba`` is the
softmax of those logits. Weight decay applies to every parameter.
"""

from __future__ import annotations

import itertools
import math
from numbers import Integral, Real
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn

from ..runtime import resolve_device

PREDICT_CHUNK = 65536


def encode_targets(y) -> tuple[np.ndarray, np.ndarray]:
    """``(classes_, y_encoded)`` for classification targets."""
    check_classification_targets(y)
    classes, encoded = np.unique(y, return_inverse=True)
    return classes, encoded.astype(np.int64)


def class_weights(class_weight, classes: np.ndarray, y_encoded: np.ndarray) -> np.ndarray | None:
    """Loss weight per class (in ``classes`` order) for ``class_weight``: None, "balanced" or {label: weight}."""
    if class_weight is None:
        return None
    return compute_class_weight(class_weight, classes=classes, y=classes[y_encoded])


def derive_seed(random_state) -> int:
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Row ranges of one epoch; a trailing batch of one row joins the previous batch
    (batch norm needs two rows, and one row carries almost no gradient anyway)."""
    bounds = [*range(0, n, batch_size), n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return list(itertools.pairwise(bounds))


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [torch.cuda.current_device() if device.index is None else device.index]


class ArrayRows:
    """Training rows held in memory: ``X`` (N x D) and encoded labels ``y``; each epoch visits
    the rows in a seeded order, in mini-batches."""

    def __init__(self, X: np.ndarray, y: np.ndarray):
        self.X, self.labels = X, y

    @property
    def n_features(self) -> int:
        return self.X.shape[1]

    def batches(self, batch_size: int, seed: int, device: torch.device):
        """``(epoch, steps per epoch)``: ``epoch()`` yields the ``(xb, yb)`` tensors of one pass."""
        X_t = torch.from_numpy(np.require(self.X, dtype=np.float32, requirements=["C", "W"])).to(device)
        y_t = torch.from_numpy(np.require(self.labels, dtype=np.int64, requirements=["C", "W"])).to(device)
        n = len(y_t)
        bounds = batch_bounds(n, batch_size)
        generator = torch.Generator().manual_seed(seed)

        def epoch():
            order = torch.randperm(n, generator=generator).to(device) if len(bounds) > 1 else None
            for start, stop in bounds:
                if order is None:
                    yield X_t, y_t
                else:
                    idx = order[start:stop]
                    yield X_t[idx], y_t[idx]

        return epoch, len(bounds)


def train(param_groups, forward, rows, *, weight, epochs: int, batch_size: int, seed: int,
          device: torch.device) -> None:
    """AdamW with a cosine schedule over ``epochs`` passes of seeded mini-batches of ``rows``
    (:class:`ArrayRows`, or row chunks read from a file: :class:`featurecache.heads.chunked.RowChunks`).

    ``forward(xb)`` returns G x B x C logits: G independent heads trained at once,
    each head's loss the (class-weighted) mean cross-entropy over the batch, summed
    over heads so their gradients stay separate. ``param_groups`` carry each head's
    lr and weight decay.
    """
    epoch, steps = rows.batches(batch_size, seed, device)
    optimize(param_groups, forward, epoch, epochs=epochs, steps=steps, weight=weight, device=device)


def optimize(param_groups, forward, epoch, *, epochs: int, steps: int, weight, device: torch.device) -> None:
    """The training loop: ``epochs`` passes of ``epoch()`` (an iterator of ``(xb, yb)`` batches,
    ``steps`` of them per pass), AdamW with a cosine schedule, losses as :func:`train` says."""
    w_t = None if weight is None else torch.as_tensor(weight, dtype=torch.float32, device=device)
    total = epochs * steps
    optimizer = torch.optim.AdamW(param_groups)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * step / total)))
    for _ in range(epochs):
        for xb, yb in epoch():
            logits = forward(xb)
            heads, rows, n_classes = logits.shape
            losses = F.cross_entropy(logits.reshape(heads * rows, n_classes), yb.repeat(heads),
                                     weight=w_t, reduction="none")
            denominator = rows if w_t is None else w_t[yb].sum()
            loss = losses.sum() / denominator
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()


def train_linear_heads(rows, classes: np.ndarray, lrs, weight_decays, *, epochs: int,
                       batch_size: int, class_weight=None, random_state=0, device="auto"):
    """Train one softmax regression per (lr, weight_decay) pair in a single pass over ``rows``
    (:class:`ArrayRows` or row chunks; labels encoded as indices into ``classes``).

    The weights of all heads form one D x (G*C) matrix so that each batch costs one
    matrix product; each head has its own AdamW parameter group. Weights start at
    zero (the problem is convex), so a head's result depends on the seed only through
    the batch order, which all heads share. Returns a list of G ``(weight C x D,
    bias C)`` float32 tensors on the CPU.
    """
    dev = resolve_device(device)
    n_features, n_classes = rows.n_features, len(classes)
    weights = [torch.zeros(n_features, n_classes, device=dev, requires_grad=True) for _ in lrs]
    biases = [torch.zeros(n_classes, device=dev, requires_grad=True) for _ in lrs]
    groups = [{"params": [w, b], "lr": float(lr), "weight_decay": float(wd)}
              for w, b, lr, wd in zip(weights, biases, lrs, weight_decays)]

    def forward(xb):
        out = torch.addmm(torch.cat(biases), xb, torch.cat(weights, dim=1))
        return out.view(len(xb), len(weights), n_classes).transpose(0, 1)

    train(groups, forward, rows, weight=class_weights(class_weight, classes, rows.labels), epochs=epochs,
          batch_size=batch_size, seed=derive_seed(random_state), device=dev)
    return [(w.detach().T.contiguous().cpu(), b.detach().cpu()) for w, b in zip(weights, biases)]


class _TorchClassifier(ClassifierMixin, BaseEstimator):
    """Shared fit/predict of the torch heads; subclasses build and train ``module_``."""

    _parameter_constraints: ClassVar[dict] = {
        "lr": [Interval(Real, 0, None, closed="neither")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "epochs": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "class_weight": [StrOptions({"balanced"}), dict, None],
        "random_state": ["random_state"],
        "device": [str, torch.device, None],
    }

    def fit(self, X, y):
        """Train on ``X`` (N x D) and labels ``y``; returns self."""
        self._validate_params()
        X, y = validate_data(self, X, y, dtype=np.float32)
        self.classes_, y_encoded = encode_targets(y)
        self.module_ = self._train(ArrayRows(X, y_encoded)).cpu().eval().requires_grad_(False)
        return self

    def fit_rows(self, rows, classes):
        """Train on ``rows`` read in chunks (labels encoded as indices into ``classes``); returns self."""
        self._validate_params()
        self.classes_, self.n_features_in_ = np.asarray(classes), rows.n_features
        self.module_ = self._train(rows).cpu().eval().requires_grad_(False)
        return self

    def _logits(self, X) -> np.ndarray:
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=np.float32)
        with torch.no_grad():
            chunks = [self.module_(torch.from_numpy(np.ascontiguousarray(X[i:i + PREDICT_CHUNK]))).numpy()
                      for i in range(0, len(X), PREDICT_CHUNK)]
        return np.concatenate(chunks).astype(np.float64)

    def predict_proba(self, X) -> np.ndarray:
        """Softmax of the module's logits, N x C, columns in ``classes_`` order."""
        return softmax(self._logits(X), axis=1)

    def predict(self, X) -> np.ndarray:
        logits = self._logits(X)
        return self.classes_[logits.argmax(axis=1)]

    def restore(self, classes, n_features: int, state_dict: dict):
        """Adopt a trained ``module_`` from its weights (a safetensors state dict), without refitting."""
        module = self._empty_module(n_features, len(classes))
        module.load_state_dict(state_dict)
        self.classes_ = np.asarray(classes)
        self.n_features_in_ = n_features
        self.module_ = module.eval().requires_grad_(False)
        return self


class TorchLinearClassifier(_TorchClassifier):
    """Softmax regression trained with AdamW; ``module_`` is an ``nn.Linear``."""

    def __init__(self, lr=1e-3, weight_decay=1e-4, epochs=100, batch_size=256, class_weight=None,
                 random_state=None, device="auto"):
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.class_weight = class_weight
        self.random_state = random_state
        self.device = device

    def _train(self, rows):
        [(weight, bias)] = train_linear_heads(
            rows, self.classes_, [self.lr], [self.weight_decay], epochs=self.epochs, batch_size=self.batch_size,
            class_weight=self.class_weight, random_state=self.random_state, device=self.device)
        return linear_module(weight, bias)

    def _empty_module(self, n_features: int, n_classes: int) -> nn.Linear:
        return nn.Linear(n_features, n_classes)

    def _set_fitted(self, classes, weight, bias, n_features):
        """Adopt weights trained elsewhere (the batched grid trainer)."""
        return self.restore(classes, n_features, {"weight": weight, "bias": bias})


def linear_module(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    out_features, in_features = weight.shape
    module = nn.Linear(in_features, out_features)
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
    return module


class TorchMLPClassifier(_TorchClassifier):
    """Multi-layer perceptron: per hidden layer Linear, [BatchNorm1d], ReLU, [Dropout]; then Linear.

    ``hidden`` is one width (``512``) or a tuple of widths (``(512, 256)``).
    """

    _parameter_constraints: ClassVar[dict] = {
        **_TorchClassifier._parameter_constraints,
        "hidden": [Interval(Integral, 1, None, closed="left"), tuple, list],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "batch_norm": ["boolean"],
    }

    def __init__(self, hidden=512, dropout=0.2, batch_norm=False, lr=1e-3, weight_decay=1e-4, epochs=100,
                 batch_size=256, class_weight=None, random_state=None, device="auto"):
        self.hidden = hidden
        self.dropout = dropout
        self.batch_norm = batch_norm
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.class_weight = class_weight
        self.random_state = random_state
        self.device = device

    def _validate_params(self):
        super()._validate_params()
        self._widths()

    def _widths(self) -> tuple[int, ...]:
        widths = (self.hidden,) if isinstance(self.hidden, Integral) else tuple(self.hidden)
        if not widths or not all(isinstance(h, Integral) and h >= 1 for h in widths):
            raise ValueError(f"hidden must be a positive width or a tuple of them, got {self.hidden!r}")
        return widths

    def _empty_module(self, n_features: int, n_classes: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        width = n_features
        for h in self._widths():
            layers.append(nn.Linear(width, h))
            if self.batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            if self.dropout:
                layers.append(nn.Dropout(self.dropout))
            width = h
        layers.append(nn.Linear(width, n_classes))
        return nn.Sequential(*layers)

    def _train(self, rows):
        if self.batch_norm and len(rows.labels) < 2:
            raise ValueError("batch_norm needs more than 1 sample to train")
        device = resolve_device(self.device)
        seed = derive_seed(self.random_state)
        with torch.random.fork_rng(devices=_rng_devices(device)):
            torch.manual_seed(seed)
            module = self._empty_module(rows.n_features, len(self.classes_)).to(device).train()
            groups = [{"params": list(module.parameters()), "lr": float(self.lr),
                       "weight_decay": float(self.weight_decay)}]
            train(groups, lambda xb: module(xb).unsqueeze(0), rows,
                  weight=class_weights(self.class_weight, self.classes_, rows.labels), epochs=self.epochs,
                  batch_size=self.batch_size, seed=seed, device=device)
        return module
