"""Names that several layers share and no layer owns: the splits and the feature sets.

The store writes them, backbones refuse a layer that would collide with them, the sweep
selects on them. They live here, once, so that no layer imports a higher one for a word.
"""

from __future__ import annotations

SPLITS = ("train", "val", "test")  # in this order wherever splits are listed
FEATURE_SETS = ("penultimate", "concat")  # besides the name of any stored layer
AUTO = "auto"  # fit-head --features auto: concat and penultimate side by side (when the cache has layers)
