"""Heads fitted on cached features: the registry, specs, estimators, their files and their torch form.

::

    from featurecache.heads import parse_grid, make_estimator, to_torch
    for cfg in parse_grid("logreg:C=0.1,1;pre=standardize"):
        pipeline = make_estimator(cfg).fit(X_train, y_train)
        module = to_torch(pipeline, cfg.name)   # raw features -> logits, exactly

A new head is one call of :func:`register_head`; the built-in ones are in
:mod:`featurecache.heads.builtin`; grids and sweep files are parsed in
:mod:`featurecache.heads.grids`. Nothing here touches images.

Layer: heads. May import: the shared modules.
"""

from .batched import benchmark_grid, fit_linear_grid
from .builtin import DEFAULT_SWEEP
from .convert import L2Normalize, coef_module, to_torch
from .preprocessing import PRE_CHOICES, make_pre, parse_pre
from .registry import (
    HEADS,
    UNRANKED,
    HeadConfig,
    HeadType,
    head_type,
    list_heads,
    make_estimator,
    parse_grid,
    register_head,
    transferable_heads,
    trusted_types,
)
from .saving import dump_head, load_head_files
from .threads import thread_limit, threads_per_job
from .torch_heads import TorchLinearClassifier, TorchMLPClassifier

__all__ = [
    "DEFAULT_SWEEP",
    "HEADS",
    "PRE_CHOICES",
    "UNRANKED",
    "HeadConfig",
    "HeadType",
    "L2Normalize",
    "TorchLinearClassifier",
    "TorchMLPClassifier",
    "benchmark_grid",
    "coef_module",
    "dump_head",
    "fit_linear_grid",
    "head_type",
    "list_heads",
    "load_head_files",
    "make_estimator",
    "make_pre",
    "parse_grid",
    "parse_pre",
    "register_head",
    "thread_limit",
    "threads_per_job",
    "to_torch",
    "transferable_heads",
    "trusted_types",
]
