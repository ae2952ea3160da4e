"""The head registry, head specs and the estimators they build.

A grid spec is ``NAME[:PARAM=V1,V2,...[;PARAM=V...]]``; :func:`parse_grid` expands
it into the Cartesian product of :class:`HeadConfig` objects. ``NAME`` is a key of
:data:`HEADS` or the dotted path of any scikit-learn classifier, e.g.
``sklearn.ensemble.ExtraTreesClassifier:n_estimators=100,300``. Two parameters are
reserved for every head: ``pre`` (``none|standardize|l2|pca:K``) and
``class_weight`` (``balanced`` or ``none``).

:func:`make_estimator` turns a config into ``Pipeline([("pre", ...), ("head", ...)])``;
every head has ``predict_proba``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import itertools
import re
from dataclasses import dataclass, field
from typing import Callable

from sklearn.base import BaseEstimator, is_classifier
from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.svm import SVC, LinearSVC

from ..errors import HeadError, suggest
from .preprocessing import make_pre, parse_pre
from .sklearn_heads import DecisionSoftmaxClassifier, SoftmaxNearestCentroid
from .torch_heads import TorchLinearClassifier, TorchMLPClassifier

RESERVED = ("pre", "class_weight")
_CONTEXT = ("class_weight", "random_state", "device")  # supplied by the caller, not by the spec
SPEC_FORMAT = "NAME[:PARAM=V1,V2,...[;PARAM=V...]]"


# --------------------------------------------------------------------------- head types


@dataclass(frozen=True)
class HeadType:
    """One kind of head: ``factory(**params, <context>)`` returns an unfitted estimator.

    ``defaults`` lists every parameter a spec may set, with its default;
    ``context`` names the arguments among class_weight, random_state and device that
    the factory takes from the caller; ``transferable`` says :func:`to_torch` can turn
    a fitted head into an exact ``nn.Module``.
    """

    name: str
    family: str
    kind: str  # "torch" | "sklearn"
    factory: Callable[..., BaseEstimator]
    defaults: dict
    context: tuple[str, ...]
    transferable: bool = False
    description: str = ""

    @property
    def class_weight(self) -> bool:
        """Whether the head accepts ``class_weight="balanced"``."""
        return "class_weight" in self.context

    def check_names(self, names, reserved=()) -> None:
        """Raise HeadError for a parameter name the head does not take, with the closest ones."""
        allowed = [*self.defaults, *reserved]
        for key in names:
            if key not in allowed:
                raise HeadError(f"unknown parameter {key!r} for head {self.name}{suggest(key, allowed)}; "
                                f"parameters: {', '.join(allowed)}")

    def build(self, params: dict, *, class_weight=None, random_state=0, device="auto") -> BaseEstimator:
        self.check_names(params)
        if class_weight is not None and not self.class_weight:
            raise HeadError(f"head {self.name} does not support class_weight")
        given = {"class_weight": class_weight, "random_state": random_state, "device": device}
        return self.factory(**params, **{k: given[k] for k in self.context})


def _head(name: str, family: str, kind: str, factory, transferable: bool = False) -> HeadType:
    signature = inspect.signature(factory).parameters
    defaults = {k: p.default for k, p in signature.items() if k not in _CONTEXT}
    context = tuple(k for k in _CONTEXT if k in signature)
    description = inspect.getdoc(factory).splitlines()[0]
    return HeadType(name, family, kind, factory, defaults, context, transferable, description)


def _logreg(*, C=1.0, max_iter=1000, class_weight=None, random_state=None):
    """Multinomial logistic regression (L-BFGS)."""
    return LogisticRegression(C=C, max_iter=max_iter, class_weight=class_weight, random_state=random_state)


def _linear_svm(*, C=1.0, max_iter=10000, class_weight=None, random_state=None):
    """Linear SVM (liblinear); probabilities: softmax of the decision function."""
    return DecisionSoftmaxClassifier(
        LinearSVC(C=C, max_iter=max_iter, class_weight=class_weight, random_state=random_state))


def _ridge(*, alpha=1.0, class_weight=None):
    """Ridge classifier; probabilities: softmax of the decision function."""
    return DecisionSoftmaxClassifier(RidgeClassifier(alpha=alpha, class_weight=class_weight))


def _svm(*, C=1.0, gamma="scale", class_weight=None, random_state=None):
    """RBF SVM; probabilities: Platt scaling on 5 folds, then one SVC on all rows."""
    # CalibratedClassifierCV(SVC(), ensemble=False) is what scikit-learn recommends
    # in place of SVC(probability=True), deprecated since 1.9; both Platt-scale 5-fold scores.
    return CalibratedClassifierCV(
        SVC(C=C, gamma=gamma, class_weight=class_weight, random_state=random_state),
        method="sigmoid", cv=5, ensemble=False)


def _knn(*, n_neighbors=5, weights="uniform", metric="euclidean"):
    """k nearest neighbours; probabilities: the (weighted) vote shares."""
    return KNeighborsClassifier(n_neighbors=n_neighbors, weights=weights, metric=metric)


def _nearest_centroid(*, shrink_threshold=None):
    """Nearest (shrunken) centroid; probabilities: softmax of minus squared distances."""
    return SoftmaxNearestCentroid(shrink_threshold=shrink_threshold)


def _random_forest(*, n_estimators=300, max_features="sqrt", max_depth=None, min_samples_leaf=1,
                   class_weight=None, random_state=None):
    """Random forest; probabilities: mean of the trees' leaf class shares."""
    return RandomForestClassifier(n_estimators=n_estimators, max_features=max_features, max_depth=max_depth,
                                  min_samples_leaf=min_samples_leaf, class_weight=class_weight,
                                  random_state=random_state, n_jobs=1)


def _hgb(*, learning_rate=0.1, max_iter=100, max_leaf_nodes=31, l2_regularization=0.0, max_features=1.0,
         class_weight=None, random_state=None):
    """Histogram gradient boosting."""
    return HistGradientBoostingClassifier(learning_rate=learning_rate, max_iter=max_iter,
                                          max_leaf_nodes=max_leaf_nodes, l2_regularization=l2_regularization,
                                          max_features=max_features, class_weight=class_weight,
                                          random_state=random_state)


HEADS: dict[str, HeadType] = {
    h.name: h
    for h in [
        _head("linear", "linear", "torch", TorchLinearClassifier, transferable=True),
        _head("mlp", "mlp", "torch", TorchMLPClassifier, transferable=True),
        _head("logreg", "linear", "sklearn", _logreg, transferable=True),
        _head("linear-svm", "linear", "sklearn", _linear_svm, transferable=True),
        _head("ridge", "linear", "sklearn", _ridge, transferable=True),
        _head("svm", "kernel", "sklearn", _svm),
        _head("knn", "neighbors", "sklearn", _knn),
        _head("nearest-centroid", "neighbors", "sklearn", _nearest_centroid),
        _head("random-forest", "trees", "sklearn", _random_forest),
        _head("hgb", "trees", "sklearn", _hgb),
    ]
}


def list_heads() -> list[str]:
    return list(HEADS)


def _sklearn_classifier(cls, **params) -> BaseEstimator:
    estimator = cls(**params)
    if hasattr(estimator, "predict_proba"):
        return estimator
    if hasattr(estimator, "decision_function"):
        return DecisionSoftmaxClassifier(estimator)
    raise HeadError(f"{cls.__name__} with {params} has neither predict_proba nor decision_function")


@functools.lru_cache(maxsize=None)
def _public_classifier_paths() -> tuple[str, ...]:
    from sklearn.utils.discovery import all_estimators

    return tuple(f"sklearn.{cls.__module__.split('.')[1]}.{name}"
                 for name, cls in all_estimators(type_filter="classifier"))


@functools.lru_cache(maxsize=None)
def _dotted_head(path: str) -> HeadType:
    module_name, _, class_name = path.rpartition(".")
    hint = suggest(path, _public_classifier_paths())
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise HeadError(f"unknown scikit-learn module {module_name!r} in head {path!r}{hint}") from None
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, BaseEstimator):
        raise HeadError(f"{path!r} is not a scikit-learn estimator{hint}")
    try:
        instance = cls()
    except TypeError as exc:
        raise HeadError(f"{path} needs constructor arguments a head spec cannot give ({exc})") from None
    if not is_classifier(instance):
        raise HeadError(f"{path} is not a classifier{hint}")
    params = instance.get_params(deep=False)
    defaults = {k: v for k, v in params.items() if k not in _CONTEXT}
    context = tuple(k for k in _CONTEXT if k in params)
    return HeadType(path, module_name.split(".")[1], "sklearn", functools.partial(_sklearn_classifier, cls),
                    defaults, context, False, (inspect.getdoc(cls) or path).splitlines()[0])


def head_type(name: str) -> HeadType:
    """The :class:`HeadType` of a registered name or a ``sklearn.`` dotted class path."""
    if name in HEADS:
        return HEADS[name]
    if name.startswith("sklearn."):
        return _dotted_head(name)
    if "." in name:
        raise HeadError(f"head {name!r}: only scikit-learn classifiers can be named by path (sklearn.MODULE.CLASS)")
    raise HeadError(f"unknown head {name!r}{suggest(name, HEADS)}; heads: {', '.join(HEADS)}, "
                    "or a scikit-learn classifier path such as sklearn.ensemble.ExtraTreesClassifier")


# --------------------------------------------------------------------------- configs and specs


def parse_value(text: str):
    """A spec value: none, true/false, ``512x256`` (a tuple of ints), int, float, else the string."""
    low = text.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    if re.fullmatch(r"\d+(x\d+)+", low):
        return tuple(int(part) for part in low.split("x"))
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def format_value(value) -> str:
    """The inverse of :func:`parse_value`."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return "x".join(str(v) for v in value)
    return repr(value) if isinstance(value, float) else str(value)


def parse_class_weight(value) -> str | None:
    text = "none" if value is None else str(value).strip().lower()
    if text not in ("none", "balanced"):
        raise HeadError(f"class_weight must be balanced or none, got {value!r}")
    return None if text == "none" else text


@dataclass(frozen=True)
class HeadConfig:
    """One concrete head: its name, its non-reserved params, ``pre`` and ``class_weight``."""

    name: str
    params: dict = field(default_factory=dict)
    pre: str = "none"
    class_weight: str | None = None

    @property
    def spec(self) -> str:
        """The canonical spec string: parameters in sorted order, ``pre=none`` and no class weight left out."""
        items = {k: format_value(v) for k, v in self.params.items()}
        if self.pre != "none":
            items["pre"] = self.pre
        if self.class_weight is not None:
            items["class_weight"] = self.class_weight
        if not items:
            return self.name
        return self.name + ":" + ";".join(f"{k}={items[k]}" for k in sorted(items))

    def to_dict(self) -> dict:
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}
        return {"name": self.name, "params": params, "pre": self.pre, "class_weight": self.class_weight}

    @classmethod
    def from_dict(cls, data: dict) -> "HeadConfig":
        params = {k: tuple(v) if isinstance(v, list) else v for k, v in data.get("params", {}).items()}
        return cls(data["name"], params, parse_pre(data.get("pre")), parse_class_weight(data.get("class_weight")))

    @classmethod
    def parse(cls, spec: str) -> "HeadConfig":
        """The config of a concrete (single-valued) spec."""
        configs = parse_grid(spec)
        if len(configs) != 1:
            raise HeadError(f"{spec!r} names {len(configs)} heads; give one value per parameter")
        return configs[0]


def make_estimator(cfg: HeadConfig, random_state: int = 0, device="auto") -> Pipeline:
    """``Pipeline([("pre", transformer or "passthrough"), ("head", estimator)])``, unfitted."""
    head = head_type(cfg.name).build(cfg.params, class_weight=cfg.class_weight, random_state=random_state,
                                     device=device)
    return Pipeline([("pre", make_pre(cfg.pre, random_state)), ("head", head)])


def _check(cfg: HeadConfig) -> None:
    """Raise HeadError now for values the estimator would reject at fit time."""
    from sklearn.utils._param_validation import InvalidParameterError

    head = make_estimator(cfg).named_steps["head"]
    try:
        for estimator in (head, getattr(head, "estimator", None)):
            if estimator is not None:
                estimator._validate_params()
        if isinstance(head, TorchMLPClassifier):
            head._widths()
    except (InvalidParameterError, ValueError, TypeError) as exc:
        raise HeadError(f"bad value in head {cfg.spec}: {exc}") from None


def parse_grid(spec: str) -> list[HeadConfig]:
    """Expand ``NAME[:PARAM=V1,V2,...[;PARAM=V...]]`` into the product of its values."""
    text = spec.strip()
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise HeadError(f"empty head spec {spec!r}: expected {SPEC_FORMAT}")
    head = head_type(name)
    axes: dict[str, list[str]] = {}
    for part in rest.split(";"):
        if not part.strip():
            continue
        key, eq, values = part.partition("=")
        key = key.strip()
        if not eq or not key:
            raise HeadError(f"bad parameter {part.strip()!r} in head spec {spec!r}: expected PARAM=V1,V2,...")
        head.check_names([key], RESERVED)
        if key in axes:
            raise HeadError(f"parameter {key} given twice in head spec {spec!r}")
        axes[key] = [v.strip() for v in values.split(",") if v.strip()]
        if not axes[key]:
            raise HeadError(f"parameter {key} of head {name} has no values in {spec!r}")
    configs: dict[str, HeadConfig] = {}
    for combo in itertools.product(*axes.values()):
        raw = dict(zip(axes, combo))
        pre = parse_pre(raw.pop("pre", "none"))
        class_weight = parse_class_weight(raw.pop("class_weight", None))
        cfg = HeadConfig(name, {k: parse_value(v) for k, v in raw.items()}, pre, class_weight)
        _check(cfg)
        configs.setdefault(cfg.spec, cfg)
    return list(configs.values())


# The sweep run when no head is given: 22 heads in 5 families, strong on CNN features
# (the best reaches 0.967 on hymenoptera with MobileNetV2), about 5 s of one core on 245 rows and
# under two minutes of one core on 3,000 rows x 1,280 features. Gradient boosting
# runs on 64 principal components: as good there, and 15x faster than on all features.
DEFAULT_SWEEP: list[str] = [
    "logreg:C=0.01,0.1,1;pre=standardize",
    "logreg:C=1,10;pre=l2",
    "linear:lr=0.001,0.01;weight_decay=0.0001,0.05;pre=standardize",
    "linear-svm:C=0.0001,0.001;pre=standardize",
    "linear-svm:C=0.1;pre=l2",
    "ridge:alpha=1000,10000;pre=standardize",
    "mlp:hidden=512;dropout=0.3;epochs=50;pre=standardize",
    "svm:C=1,10;pre=standardize",
    "knn:n_neighbors=5,15;weights=distance;pre=l2",
    "nearest-centroid:pre=l2",
    "random-forest:n_estimators=300",
    "hgb:pre=pca:64",
]
