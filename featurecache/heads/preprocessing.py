"""Per-head preprocessing, the first steps of every head's pipeline.

``pre``: ``none`` (passthrough), ``standardize`` (zero mean, unit variance per feature),
``l2`` (each row scaled to unit Euclidean norm) and ``pca:K`` (the first K principal
components). The step is fitted by ``Pipeline.fit``, that is on the training rows only.

``cols=START:STOP``: the head reads only those columns of the run's features
(:class:`FeatureColumns`, a step before ``pre``). With ``fit-head --features auto`` a sweep
over a cache that stores layers learns from their concatenation, and each head also
appears with ``cols`` set to the penultimate features' columns.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.utils.validation import check_is_fitted, validate_data

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


class FeatureColumns(TransformerMixin, BaseEstimator):
    """Columns ``[start, stop)`` of the features: a head that reads one feature set of several
    stored side by side. Stateless but for the width it was fitted on."""

    def __init__(self, start: int = 0, stop: int = 1):
        self.start = start
        self.stop = stop

    def fit(self, X, y=None):
        X = validate_data(self, X, dtype=[np.float32, np.float64])
        if not 0 <= self.start < self.stop <= X.shape[1]:
            raise HeadError(f"cols={self.start}:{self.stop} is outside the {X.shape[1]} feature columns")
        return self

    def transform(self, X):
        check_is_fitted(self, "n_features_in_")
        X = validate_data(self, X, dtype=[np.float32, np.float64], reset=False)
        return X[:, self.start:self.stop]


def parse_cols(cols) -> tuple[int, int] | None:
    """``cols``: None, ``none`` or ``START:STOP`` (whole numbers, START < STOP) as a pair."""
    if cols is None or (isinstance(cols, str) and cols.strip().lower() == "none"):
        return None
    if isinstance(cols, (tuple, list)) and len(cols) == 2:
        start, stop = cols
    else:
        start, _, stop = str(cols).strip().partition(":")
    try:
        start, stop = int(start), int(stop)
    except (TypeError, ValueError):
        raise HeadError(f"cols takes START:STOP column numbers (e.g. cols=0:1280), not {cols!r}") from None
    if not 0 <= start < stop:
        raise HeadError(f"cols={start}:{stop} needs 0 <= START < STOP")
    return start, stop


def format_cols(cols: tuple[int, int]) -> str:
    return f"{cols[0]}:{cols[1]}"
