"""Stage two: fit a grid of heads on a cache, rank them, and keep every one as a run.

Owns planning and the entry point (:mod:`~featurecache.sweep.stage`, behind
``featurecache.fit_head``), the engines (:mod:`~featurecache.sweep.engine`), successive halving and
the budget (:mod:`~featurecache.sweep.halving`), the learning curve of a run's head
(:mod:`~featurecache.sweep.curve`, behind ``featurecache.curve``), ``--seeds`` and ``--calibrate``
(:mod:`~featurecache.sweep.seeds`, :mod:`~featurecache.sweep.calibration`,
:mod:`~featurecache.sweep.postpass`), the leaderboard and the run directories
(:mod:`~featurecache.sweep.runs`).

Layer: sweep. May import: the shared modules, data, backbones, extraction, heads.
"""
