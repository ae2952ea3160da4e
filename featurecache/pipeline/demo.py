"""``fc demo``: the demo pipeline that ships inside the package, run offline.

The pipeline (``featurecache/pipeline/demo.toml``, package data) writes scikit-learn's digits as a
folder of images (:func:`featurecache.pipeline.fetchers.write_digits`), extracts MobileNetV2
features, fits the default sweep, fine-tunes and reports. It needs no checkout: an
installed wheel runs it from any directory.
"""

from __future__ import annotations

from importlib import resources

from .run import run

DEMO_PIPELINE = "demo.toml"  # beside this module, in the package


def demo(set: tuple[str, ...] = (), progress: bool = True) -> dict:
    """Run the demo pipeline (``featurecache/pipeline/demo.toml``): what ``fc demo`` does."""
    with resources.as_file(resources.files(__package__) / DEMO_PIPELINE) as path:
        return run(path, set=set, progress=progress)
