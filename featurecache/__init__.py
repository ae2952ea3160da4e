"""featurecache: pay for the pretrained backbone once, try many heads in seconds.

The public API mirrors the ``fc`` commands::

    import featurecache as fc
    res = fc.extract("path/to/images", backbone="mobilenet_v2")
    X, y, paths = fc.load_features(res.cache, "train")

Heavy modules (torch, h5py, scikit-learn) load on first use, so importing the
package, and ``fc --help``, stay fast. The functions are listed in
:mod:`featurecache.stages`.

The packages follow the stages, and each imports only from the layers below it, in this
order (``tests/test_layout.py`` checks it, with every import inside a function too)::

    shared < data < backbones < extraction < heads < sweep < auditing < finetuning < reporting < pipeline < cli

The shared modules are those at the top of the package that every stage uses: ``errors``,
``names``, ``files``, ``progress``, ``runtime``, ``metrics``, ``stages`` and ``store`` (the
only module that imports h5py). They import no stage. Each package's docstring says what
it owns, and ends with its layer.
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
