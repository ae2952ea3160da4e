"""The head registry, head specs and the estimators they build.

Every fact about a kind of head is one :class:`HeadType` record, registered under
its name by one call of :func:`register_head` (the built-in heads are in
:mod:`featurecache.heads.builtin`)::

    @register_head("lda", family="linear", simplicity=1, to_module=coef_module)
    def lda(*, solver="svd", shrinkage=None):
        '''Linear discriminant analysis.'''
        return LinearDiscriminantAnalysis(solver=solver, shrinkage=shrinkage)

A grid spec is ``NAME[:PARAM=V1,V2,...[;PARAM=V...]]``; :func:`parse_grid` expands
it into the Cartesian product of :class:`HeadConfig` objects. ``NAME`` is a key of
:data:`HEADS` or the dotted path of any scikit-learn classifier, e.g.
``sklearn.ensemble.ExtraTreesClassifier:n_estimators=100,300``. Two parameters are
reserved for every head: ``pre`` (``none|standardize|l2|pca:K``),
``class_weight`` (``balanced`` or ``none``) and ``cols`` (``START:STOP``: the columns of the
features the head reads; all of them when not given).

:func:`make_estimator` turns a config into ``Pipeline([("pre", ...), ("head", ...)])``, with a
``("cols", FeatureColumns)`` step first when ``cols`` is set; every head has ``predict_proba``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from sklearn.base import BaseEstimator, is_classifier
from sklearn.pipeline import Pipeline

from ..errors import HeadError, suggest
from .preprocessing import FeatureColumns, format_cols, make_pre, parse_cols, parse_pre
from .sklearn_heads import DecisionSoftmaxClassifier

RESERVED = ("pre", "class_weight", "cols")
_CONTEXT = ("class_weight", "random_state", "device")  # supplied by the caller, not by the spec
SPEC_FORMAT = "NAME[:PARAM=V1,V2,...[;PARAM=V...]]"
KINDS = ("sklearn", "torch")  # how a fitted head is saved: skops, or safetensors weights plus JSON
UNRANKED = 5  # simplicity of a head that declares none: after every ranked one


def type_name(cls: type) -> str:
    """The fully qualified name of a class, as skops names the types in a file."""
    return f"{cls.__module__}.{cls.__qualname__}"


# --------------------------------------------------------------------------- head types


@dataclass(frozen=True)
class HeadType:
    """Everything about one kind of head, under its name.

    ``factory(**params, <context>)`` returns an unfitted estimator; ``defaults`` lists
    every parameter a spec may set, with its default; ``context`` names the arguments
    among class_weight, random_state and device that the factory takes from the caller.
    ``simplicity`` breaks leaderboard ties (lower first), ``cost`` is the relative cost
    of one fit (the costly heads start first), ``warm_path`` the parameter along which
    a fit can continue from its neighbour with a smaller value, ``to_module`` turns the
    fitted head estimator into an exact ``nn.Module``, and ``trusted`` names the types
    beyond skops' defaults that a saved fitted head holds.

    For large data: ``growth`` is how the cost of a fit grows with the rows (seconds
    proportional to ``rows ** growth``: 1 for linear models, 2 for a kernel SVM); the
    sweep times a small fit and scales it by this. ``learning_curve`` is how fast its error
    falls as the rows grow (error proportional to ``rows ** -learning_curve``): successive
    halving predicts a head's score on all rows from its own rungs, and uses this prior
    when the head and its family have too few rungs to fit one. ``stand_in(cfg, shrink)`` returns
    a config of the same inductive bias that costs about ``shrink`` (< 1) times as
    much, or None; and ``chunked(pipeline, chunks)`` fits the head from row chunks
    (:mod:`featurecache.heads.chunked`) when the features do not fit in memory.

    For stage three: ``transfer(cfg)`` returns the config of a transferable head of the same
    inductive bias (an RBF SVM: an RBF kernel map; k nearest neighbours: the class prototypes),
    which the sweep fits beside a selected head that cannot become a layer, so that fine-tuning
    can start from it.
    """

    name: str
    family: str
    kind: str  # one of KINDS
    factory: Callable[..., BaseEstimator]
    defaults: dict
    context: tuple[str, ...]
    description: str = ""
    simplicity: int = UNRANKED
    cost: int = 1
    warm_path: str | None = None
    to_module: Callable | None = None
    trusted: tuple[str, ...] = ()
    growth: float = 1.0
    learning_curve: float = 0.15
    stand_in: Callable | None = None
    chunked: Callable | None = None
    transfer: Callable | None = None

    @property
    def transferable(self) -> bool:
        """Whether :func:`featurecache.heads.to_torch` can turn a fitted head into an exact ``nn.Module``."""
        return self.to_module is not None

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


HEADS: dict[str, HeadType] = {}


def _check_registration(name: str, kind: str, defaults: dict, warm_path: str | None, growth: float,
                        learning_curve: float = 0.15) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_+-]*", name):
        raise HeadError(f"head name {name!r}: use letters, digits, -, _ and + (no dots, colons or spaces)")
    if name in HEADS:
        raise HeadError(f"a head named {name!r} is already registered")
    if kind not in KINDS:
        raise HeadError(f"head {name}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if warm_path is not None and warm_path not in defaults:
        raise HeadError(f"head {name}: warm_path {warm_path!r} is not one of its parameters {', '.join(defaults)}")
    if not isinstance(growth, (int, float)) or not 0 < growth <= 4:
        raise HeadError(f"head {name}: growth must be a number in (0, 4] (seconds ~ rows ** growth), got {growth!r}")
    if isinstance(learning_curve, bool) or not isinstance(learning_curve, (int, float)) or \
            not 0 <= learning_curve <= 1:
        raise HeadError(f"head {name}: learning_curve must be a number in [0, 1] (error ~ rows ** -learning_curve), "
                        f"got {learning_curve!r}")


def register_head(name: str, factory: Callable[..., BaseEstimator] | None = None, *, family: str,
                  kind: str = "sklearn", simplicity: int = UNRANKED, cost: int = 1, warm_path: str | None = None,
                  to_module: Callable | None = None, trusted=(), growth: float = 1.0, learning_curve: float = 0.15,
                  stand_in: Callable | None = None, chunked: Callable | None = None,
                  transfer: Callable | None = None):
    """Register a head under ``name``: everything about it in one call. Returns its :class:`HeadType`.

    ``factory`` takes the head's parameters as keyword arguments with defaults (those a
    spec may set), plus any of class_weight, random_state and device it uses; its
    docstring's first line describes the head. The other arguments are the fields of
    :class:`HeadType`. A ``torch`` head's estimator is a featurecache torch classifier
    (``module_`` after fit, ``restore`` to rebuild it from saved weights). Without
    ``factory``, returns a decorator that registers the function it decorates and gives it back.
    """
    facts = dict(family=family, kind=kind, simplicity=simplicity, cost=cost, warm_path=warm_path,
                 to_module=to_module, trusted=tuple(trusted), growth=growth, learning_curve=learning_curve,
                 stand_in=stand_in, chunked=chunked, transfer=transfer)
    if factory is None:
        def decorate(function):
            register_head(name, function, **facts)
            return function

        return decorate
    signature = inspect.signature(factory).parameters
    defaults = {k: p.default for k, p in signature.items() if k not in _CONTEXT}
    _check_registration(name, kind, defaults, warm_path, growth, learning_curve)
    context = tuple(k for k in _CONTEXT if k in signature)
    description = (inspect.getdoc(factory) or name).splitlines()[0]
    HEADS[name] = HeadType(name=name, factory=factory, defaults=defaults, context=context, description=description,
                           **facts)
    return HEADS[name]


def list_heads() -> list[str]:
    return list(HEADS)


def transferable_heads() -> list[str]:
    """The registered heads that convert exactly to a torch module."""
    return [name for name, htype in HEADS.items() if htype.transferable]


def trusted_types() -> list[str]:
    """The allow-list of types a saved head may hold beyond skops' defaults: those the registered
    heads declare, and the wrapper given to scikit-learn classifiers without ``predict_proba``."""
    names = {type_name(DecisionSoftmaxClassifier), type_name(FeatureColumns)}
    for htype in HEADS.values():
        names.update(htype.trusted)
    return sorted(names)


def head_type_of(estimator) -> HeadType | None:
    """The registered transferable head whose estimators are of ``estimator``'s kind (type and wrapped type)."""
    def shape(est):
        return type(est), type(getattr(est, "estimator", None))

    target = shape(estimator)
    return next((h for h in HEADS.values() if h.transferable and shape(h.build({})) == target), None)


def _sklearn_classifier(cls, **params) -> BaseEstimator:
    estimator = cls(**params)
    if hasattr(estimator, "predict_proba"):
        return estimator
    if hasattr(estimator, "decision_function"):
        return DecisionSoftmaxClassifier(estimator)
    raise HeadError(f"{cls.__name__} with {params} has neither predict_proba nor decision_function")


@functools.cache
def _public_classifier_paths() -> tuple[str, ...]:
    from sklearn.utils.discovery import all_estimators

    return tuple(f"sklearn.{cls.__module__.split('.')[1]}.{name}"
                 for name, cls in all_estimators(type_filter="classifier"))


def _classifier_class(path: str) -> type:
    """The scikit-learn classifier class at a dotted path, or a HeadError with the closest paths."""
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
    return cls


@functools.cache
def _dotted_head(path: str) -> HeadType:
    """A scikit-learn classifier named by path, with neutral facts: unranked, cost 1, no warm path,
    not transferable."""
    cls = _classifier_class(path)
    params = cls().get_params(deep=False)
    defaults = {k: v for k, v in params.items() if k not in _CONTEXT}
    context = tuple(k for k in _CONTEXT if k in params)
    return HeadType(path, path.split(".")[1], "sklearn", functools.partial(_sklearn_classifier, cls),
                    defaults, context, (inspect.getdoc(cls) or path).splitlines()[0])


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
    """One concrete head: its name, its non-reserved params, ``pre``, ``class_weight`` and ``cols``."""

    name: str
    params: dict = field(default_factory=dict)
    pre: str = "none"
    class_weight: str | None = None
    cols: tuple[int, int] | None = None

    @property
    def spec(self) -> str:
        """The canonical spec string: parameters in sorted order, ``pre=none``, no class weight and all
        columns left out."""
        items = {k: format_value(v) for k, v in self.params.items()}
        if self.pre != "none":
            items["pre"] = self.pre
        if self.class_weight is not None:
            items["class_weight"] = self.class_weight
        if self.cols is not None:
            items["cols"] = format_cols(self.cols)
        if not items:
            return self.name
        return self.name + ":" + ";".join(f"{k}={items[k]}" for k in sorted(items))

    def to_dict(self) -> dict:
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}
        out = {"name": self.name, "params": params, "pre": self.pre, "class_weight": self.class_weight}
        return {**out, "cols": list(self.cols)} if self.cols is not None else out

    @classmethod
    def from_dict(cls, data: dict) -> HeadConfig:
        params = {k: tuple(v) if isinstance(v, list) else v for k, v in data.get("params", {}).items()}
        return cls(data["name"], params, parse_pre(data.get("pre")), parse_class_weight(data.get("class_weight")),
                   parse_cols(data.get("cols")))

    @classmethod
    def parse(cls, spec: str) -> HeadConfig:
        """The config of a concrete (single-valued) spec."""
        configs = parse_grid(spec)
        if len(configs) != 1:
            raise HeadError(f"{spec!r} names {len(configs)} heads; give one value per parameter")
        return configs[0]


def make_estimator(cfg: HeadConfig, random_state: int = 0, device="auto") -> Pipeline:
    """``Pipeline([("pre", transformer or "passthrough"), ("head", estimator)])``, unfitted, after a
    ``("cols", FeatureColumns)`` step when ``cfg.cols`` is set."""
    head = head_type(cfg.name).build(cfg.params, class_weight=cfg.class_weight, random_state=random_state,
                                     device=device)
    cols = [("cols", FeatureColumns(*cfg.cols))] if cfg.cols is not None else []
    return Pipeline([*cols, ("pre", make_pre(cfg.pre, random_state)), ("head", head)])


def _check(cfg: HeadConfig) -> None:
    """Raise HeadError now for values the estimator would reject at fit time."""
    from sklearn.utils._param_validation import InvalidParameterError

    head = make_estimator(cfg).named_steps["head"]
    try:
        for estimator in (head, getattr(head, "estimator", None)):
            if estimator is not None:
                estimator._validate_params()
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
        cols = parse_cols(raw.pop("cols", None))
        cfg = HeadConfig(name, {k: parse_value(v) for k, v in raw.items()}, pre, class_weight, cols)
        _check(cfg)
        configs.setdefault(cfg.spec, cfg)
    return list(configs.values())
