"""featurecache: pay for the pretrained backbone once, try many heads in seconds.

The public API mirrors the ``fc`` commands::

    import featurecache as fc
    res = fc.extract("path/to/images", backbone="mobilenet_v2")
    X, y, paths = fc.load_features(res.cache, "train")

Heavy modules (torch, h5py, scikit-learn) load on first use, so importing the
package, and ``fc --help``, stay fast.
"""

from __future__ import annotations

import importlib

from .errors import FeatureCacheError

__version__ = "0.1.0"

_API = {
    "extract": "featurecache.extractor",
    "load_features": "featurecache.store",
    "fit_head": "featurecache.sweep",
    "finetune": "featurecache.finetuning",
    "predict": "featurecache.prediction",
    "report": "featurecache.reporting",
    "run": "featurecache.pipeline",
}

__all__ = ["FeatureCacheError", "__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        module = importlib.import_module(_API[name])
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'featurecache' has no attribute {name!r}")

# Stage modules are named extractor, sweep, finetuning, prediction, reporting and pipeline
# so that importing them never shadows the functions of the same name above.
