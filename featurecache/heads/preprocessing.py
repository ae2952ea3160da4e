"""Per-head preprocessing, the first step of every head's pipeline.

``none`` (passthrough), ``standardize`` (zero mean, unit variance per feature),
``l2`` (each row scaled to unit Euclidean norm) and ``pca:K`` (the first K principal
components). The step is fitted by ``Pipeline.fit``, that is on the training rows only.
"""

from __future__ import annotations

from sklearn.decomposition import PCA
from sklearn.preprocessing import Normalizer, StandardScaler

from ..errors import HeadError


def _passthrough(arg, random_state):
    return "passthrough"


def _standardize(arg, random_state):
    return StandardScaler()


def _l2(arg, random_state):
    return Normalizer(norm="l2")


def _pca(arg, random_state):
    return PCA(n_components=arg, random_state=random_state)


# name -> (takes an integer argument, factory(arg, random_state))
PREPROCESSORS = {
    "none": (False, _passthrough),
    "standardize": (False, _standardize),
    "l2": (False, _l2),
    "pca": (True, _pca),
}
PRE_CHOICES = "none|standardize|l2|pca:K"


def parse_pre(pre) -> str:
    """Validate a ``pre`` value and return its canonical string (``None`` means ``none``)."""
    text = "none" if pre is None else str(pre).strip().lower()
    name, colon, arg = text.partition(":")
    if name not in PREPROCESSORS:
        raise HeadError(f"unknown pre {pre!r}: choose {PRE_CHOICES}")
    takes_arg, _ = PREPROCESSORS[name]
    if not takes_arg:
        if colon:
            raise HeadError(f"pre={name} takes no argument, got {pre!r}")
        return name
    if not arg.isdigit() or int(arg) < 1:
        raise HeadError(f"pre={name} needs a positive number of components, e.g. {name}:64 (got {pre!r})")
    return f"{name}:{int(arg)}"


def make_pre(pre: str, random_state: int = 0):
    """The unfitted transformer for a ``pre`` string, or ``"passthrough"``."""
    name, _, arg = parse_pre(pre).partition(":")
    takes_arg, factory = PREPROCESSORS[name]
    return factory(int(arg) if takes_arg else None, random_state)
