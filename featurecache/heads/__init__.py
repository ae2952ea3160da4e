"""Heads fitted on cached features: the registry, specs, estimators and their torch form.

::

    from featurecache.heads import parse_grid, make_estimator, to_torch
    for cfg in parse_grid("logreg:C=0.1,1;pre=standardize"):
        pipeline = make_estimator(cfg).fit(X_train, y_train)
        module = to_torch(pipeline)          # raw features -> logits, exactly
"""

from .batched import benchmark_grid, fit_linear_grid
from .convert import L2Normalize, to_torch
from .preprocessing import PRE_CHOICES, make_pre, parse_pre
from .registry import (
    DEFAULT_SWEEP,
    HEADS,
    HeadConfig,
    HeadType,
    head_type,
    list_heads,
    make_estimator,
    parse_grid,
)
from .threads import thread_limit, threads_per_job
from .torch_heads import TorchLinearClassifier, TorchMLPClassifier

__all__ = [
    "DEFAULT_SWEEP",
    "HEADS",
    "PRE_CHOICES",
    "HeadConfig",
    "HeadType",
    "L2Normalize",
    "TorchLinearClassifier",
    "TorchMLPClassifier",
    "benchmark_grid",
    "fit_linear_grid",
    "head_type",
    "list_heads",
    "make_estimator",
    "make_pre",
    "parse_grid",
    "parse_pre",
    "thread_limit",
    "threads_per_job",
    "to_torch",
]
