"""Batched training of many ``linear`` heads in one pass over the features.

As in DINOv2's linear evaluation, a whole grid of learning rates and weight decays
trains at once: every batch is read once and multiplied by the weights of all heads
stacked side by side, and each head keeps its own AdamW parameter group. Heads that
share ``pre``, ``epochs``, ``batch_size`` and ``class_weight`` form one pass; the
results are ordinary fitted pipelines, the same kind :func:`make_estimator` builds.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections import defaultdict

import numpy as np
import torch
from sklearn.pipeline import Pipeline
from sklearn.utils import check_array, check_consistent_length

from ..errors import HeadError
from ..runtime import resolve_device
from .preprocessing import FeatureColumns, make_pre
from .registry import HeadConfig, make_estimator
from .threads import thread_limit
from .torch_heads import ArrayRows, encode_targets, train_linear_heads


def fit_linear_grid(X, y, configs, random_state: int = 0, device="auto") -> list[Pipeline]:
    """Fit every ``linear`` config in ``configs``, one pass per group; pipelines in input order."""
    configs = list(configs)
    if not configs:
        raise HeadError("the linear head grid is empty")
    other = [cfg.spec for cfg in configs if cfg.name != "linear"]
    if other:
        raise HeadError(f"batched training takes linear heads only, got {', '.join(other)}")
    X = check_array(X, dtype=[np.float32, np.float64])
    check_consistent_length(X, y)
    classes, y_encoded = encode_targets(y)
    groups: dict[tuple, list[tuple[int, Pipeline]]] = defaultdict(list)
    for i, cfg in enumerate(configs):
        pipeline = make_estimator(cfg, random_state=random_state, device=device)
        head = pipeline.named_steps["head"]
        head._validate_params()
        groups[(cfg.cols, cfg.pre, head.epochs, head.batch_size, head.class_weight)].append((i, pipeline))
    fitted: list[Pipeline | None] = [None] * len(configs)
    for (cfg_cols, cfg_pre, epochs, batch_size, class_weight), members in groups.items():
        cols = [] if cfg_cols is None else [("cols", FeatureColumns(*cfg_cols).fit(X))]
        pre = make_pre(cfg_pre, random_state)
        Xc = cols[0][1].transform(X) if cols else X
        Xt = Xc if pre == "passthrough" else pre.fit_transform(Xc)
        heads = [pipeline.named_steps["head"] for _, pipeline in members]
        trained = train_linear_heads(ArrayRows(Xt, y_encoded), classes, [h.lr for h in heads],
                                     [h.weight_decay for h in heads], epochs=epochs, batch_size=batch_size,
                                     class_weight=class_weight, random_state=random_state, device=device)
        for (i, _), head, (weight, bias) in zip(members, heads, trained):
            head._set_fitted(classes, weight, bias, Xt.shape[1])
            fitted[i] = Pipeline([*copy.deepcopy(cols), ("pre", copy.deepcopy(pre)), ("head", head)])
    return fitted


def structured_features(n: int, d: int, n_classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic CNN-like features: class means in a 64-dim latent space, a random
    linear map to ``d`` dims, Gaussian noise and a ReLU (non-negative, sparse-ish)."""
    rng = np.random.default_rng(seed)
    latent = 64
    y = rng.integers(0, n_classes, size=n)
    means = rng.normal(0.0, 1.0, size=(n_classes, latent))
    z = means[y] + rng.normal(0.0, 3.0, size=(n, latent))
    mix = rng.normal(0.0, 1.0 / np.sqrt(latent), size=(latent, d))
    X = np.maximum(z @ mix + rng.normal(0.0, 0.5, size=(n, d)), 0.0)
    return X.astype(np.float32), y.astype(np.int64)


def benchmark_grid(n: int = 50000, d: int = 1280, n_classes: int = 10, lrs=(1e-4, 1e-3, 1e-2),
                   weight_decays=(0.0, 1e-4, 1e-3, 1e-2), epochs: int = 5, batch_size: int = 256,
                   device="auto", seed: int = 0, threads: int | None = 1) -> dict:
    """Heads per minute of :func:`fit_linear_grid` against fitting the same grid one by one.

    Trains len(lrs) x len(weight_decays) ``linear`` heads on :func:`structured_features`
    (80% of the rows; the other 20% measure that both ways reach the same accuracy).
    ``threads`` caps BLAS and torch threads for both (1: as each job of a parallel
    sweep; None: as they are). Two threads on a busy two-core machine make these small
    matrix products erratic and many times slower.
    """
    X, y = structured_features(n, d, n_classes, seed)
    cut = int(0.8 * n)
    X_train, y_train, X_val, y_val = X[:cut], y[:cut], X[cut:], y[cut:]
    configs = [HeadConfig("linear", {"lr": lr, "weight_decay": wd, "epochs": epochs, "batch_size": batch_size})
               for lr in lrs for wd in weight_decays]

    with contextlib.nullcontext() if threads is None else thread_limit(threads):
        start = time.perf_counter()
        batched = fit_linear_grid(X_train, y_train, configs, random_state=seed, device=device)
        batched_seconds = time.perf_counter() - start

        start = time.perf_counter()
        single = [make_estimator(cfg, random_state=seed, device=device).fit(X_train, y_train) for cfg in configs]
        single_seconds = time.perf_counter() - start

    batched_accuracy = [float(p.score(X_val, y_val)) for p in batched]
    single_accuracy = [float(p.score(X_val, y_val)) for p in single]
    heads = len(configs)
    return {
        "n": n, "d": d, "classes": n_classes, "heads": heads, "epochs": epochs, "batch_size": batch_size,
        "device": str(resolve_device(device)), "threads": threads if threads is not None else torch.get_num_threads(),
        "batched_seconds": batched_seconds,
        "one_by_one_seconds": single_seconds,
        "batched_heads_per_minute": 60.0 * heads / batched_seconds,
        "one_by_one_heads_per_minute": 60.0 * heads / single_seconds,
        "speedup": single_seconds / batched_seconds,
        "best_accuracy_batched": max(batched_accuracy),
        "best_accuracy_one_by_one": max(single_accuracy),
        "max_accuracy_gap": max(abs(a - b) for a, b in zip(batched_accuracy, single_accuracy)),
    }
