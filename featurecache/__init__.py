"""featurecache: pay for the pretrained backbone once, try many heads in seconds.

The public API mirrors the ``fc`` commands::

    import featurecache as fc
    res = fc.extract("path/to/images", backbone="mobilenet_v2")
    X, y, paths = fc.load_features(res.cache, "train")

Heavy modules (torch, h5py, scikit-learn) load on first use, so importing the
package, and ``fc --help``, stay fast. The functions are listed in
:mod:`featurecache.stages`.
"""

from __future__ import annotations

from .errors import FeatureCacheError
from .stages import BY_NAME

__version__ = "0.1.0"

__all__ = ["FeatureCacheError", "__version__", *BY_NAME]


def __getattr__(name: str):
    if name in BY_NAME:
        value = BY_NAME[name].load()
        globals()[name] = value
        return value
    raise AttributeError(f"module 'featurecache' has no attribute {name!r}")
