"""The built-in heads: one registration each, with everything about the head.

Simplicity ranks break leaderboard ties (the simpler head first): nearest centroid,
then the linear heads, neighbours, kernels and small networks, then trees. Cost is a
scheduling hint (the costly heads start first). A warm path is the parameter along
which a fit continues from its neighbour with a smaller value: logistic regression
along its regularization path (ascending C, from strong to weak regularization, as
scikit-learn's own path solver goes), forests and boosting by adding trees.
"""

from __future__ import annotations

import dataclasses

from sklearn.calibration import CalibratedClassifierCV
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.linear_model import LogisticRegression, RidgeClassifier, SGDClassifier
from sklearn.neighbors import KNeighborsClassifier
from sklearn.svm import SVC, LinearSVC

from .chunked import centroid_chunks, sgd_chunks, torch_chunks
from .convert import centroid_module, decision_softmax_module, kernel_map_module, logreg_module, torch_module
from .registry import HeadConfig, head_type, register_head, type_name
from .sklearn_heads import DecisionSoftmaxClassifier, KernelMapClassifier, SoftmaxNearestCentroid
from .torch_heads import TorchLinearClassifier, TorchMLPClassifier

# --------------------------------------------------------------------------- stand-ins


def _scaled(cfg: HeadConfig, param: str, shrink: float, floor: int) -> HeadConfig | None:
    """``cfg`` with the integer ``param`` (passes, trees, components) scaled by ``shrink``, at least ``floor``."""
    now = cfg.params.get(param, head_type(cfg.name).defaults[param])
    new = max(floor, int(now * shrink))
    return dataclasses.replace(cfg, params={**cfg.params, param: new}) if new < now else None


def _fewer_epochs(cfg, shrink):
    return _scaled(cfg, "epochs", shrink, 3)


def _fewer_iterations(cfg, shrink):
    return _scaled(cfg, "max_iter", shrink, 20)


def _fewer_components(cfg, shrink):
    return _scaled(cfg, "n_components", shrink, 100)


def _kernel_map(cfg, shrink):
    """An RBF SVM becomes an RBF kernel map (2,000 centers) plus logistic regression with the same gamma and
    ten times the C: the logistic loss needs the weaker regularization to fit as closely as the hinge
    (measured on MobileNetV2 features of Fashion-MNIST, where it then comes within 0.2 points of the SVM)."""
    params = {"C": 10 * float(cfg.params.get("C", 1.0)), "n_components": 2000,
              **{k: v for k, v in cfg.params.items() if k == "gamma"}}
    return dataclasses.replace(cfg, name="rbf-map", params=params)


def _kernel_map_layer(cfg):
    """The RBF SVM's transferable form: its kernel map at full size (see :func:`_kernel_map`)."""
    return _kernel_map(cfg, 1.0)


def _prototypes(cfg):
    """k nearest neighbours' transferable form: the nearest class prototype (mean), after the same preprocessing
    (``l2``: the cosine similarity to the class means)."""
    return dataclasses.replace(cfg, name="nearest-centroid", params={}, class_weight=None)


def _smaller_forest(cfg, shrink):
    """Fewer trees (down to 100), then a row sample per tree (down to 5% of the rows)."""
    trees = cfg.params.get("n_estimators", 300)
    fewer = max(min(trees, 100), int(trees * shrink))
    sample = min(1.0, shrink * trees / fewer)
    params = {**cfg.params, "n_estimators": fewer}
    if sample < 0.95:
        params["max_samples"] = round(max(0.05, sample * (cfg.params.get("max_samples") or 1.0)), 3)
    new = dataclasses.replace(cfg, params=params)
    return new if new != cfg else None


# --------------------------------------------------------------------------- the heads


register_head("linear", TorchLinearClassifier, family="linear", kind="torch", simplicity=1, to_module=torch_module,
              learning_curve=0.1, stand_in=_fewer_epochs, chunked=torch_chunks)
register_head("mlp", TorchMLPClassifier, family="mlp", kind="torch", simplicity=3, to_module=torch_module,
              learning_curve=0.3, stand_in=_fewer_epochs, chunked=torch_chunks)


@register_head("logreg", family="linear", simplicity=1, learning_curve=0.1, warm_path="C", to_module=logreg_module,
               stand_in=_fewer_iterations)
def _logreg(*, C=1.0, max_iter=1000, class_weight=None, random_state=None):
    """Multinomial logistic regression (L-BFGS)."""
    return LogisticRegression(C=C, max_iter=max_iter, class_weight=class_weight, random_state=random_state)


@register_head("linear-svm", family="linear", simplicity=1, learning_curve=0.1, to_module=decision_softmax_module,
               trusted=[type_name(DecisionSoftmaxClassifier)], growth=1.2, stand_in=_fewer_iterations)
def _linear_svm(*, C=1.0, max_iter=10000, dual=True, class_weight=None, random_state=None):
    """Linear SVM (liblinear); probabilities: softmax of the decision function. ``dual=True`` (dual coordinate
    descent) by default: with the small C of the default sweep it converges in tens of passes, where the primal
    Newton solver that scikit-learn's ``auto`` picks for more rows than features took 3x as long (4,000 x 1,728
    MobileNetV2 features of Fashion-MNIST, C=0.001: 7.2 s against 22 s), and its cost follows ``max_iter``,
    which the budget's stand-in shrinks."""
    return DecisionSoftmaxClassifier(
        LinearSVC(C=C, max_iter=max_iter, dual=dual, class_weight=class_weight, random_state=random_state))


@register_head("ridge", family="linear", simplicity=1, learning_curve=0.1, to_module=decision_softmax_module,
               trusted=[type_name(DecisionSoftmaxClassifier)])
def _ridge(*, alpha=1.0, class_weight=None):
    """Ridge classifier; probabilities: softmax of the decision function."""
    return DecisionSoftmaxClassifier(RidgeClassifier(alpha=alpha, class_weight=class_weight))


@register_head("svm", family="kernel", simplicity=3, learning_curve=0.3, cost=2, growth=2.0, stand_in=_kernel_map,
               transfer=_kernel_map_layer,
               trusted=["sklearn.calibration._CalibratedClassifier", "sklearn.calibration._SigmoidCalibration"])
def _svm(*, C=1.0, gamma="scale", class_weight=None, random_state=None):
    """RBF SVM; probabilities: Platt scaling on 5 folds, then one SVC on all rows."""
    # CalibratedClassifierCV(SVC(), ensemble=False) is what scikit-learn recommends
    # in place of SVC(probability=True), deprecated since 1.9; both Platt-scale 5-fold scores.
    return CalibratedClassifierCV(
        SVC(C=C, gamma=gamma, class_weight=class_weight, random_state=random_state),
        method="sigmoid", cv=5, ensemble=False)


@register_head("rbf-map", family="kernel", simplicity=3, learning_curve=0.3, cost=2, to_module=kernel_map_module,
               stand_in=_fewer_components, trusted=[type_name(KernelMapClassifier)])
def _rbf_map(*, C=1.0, gamma="scale", n_components=1000, max_iter=1000, class_weight=None, random_state=None):
    """RBF kernel map (Nystroem) + logistic regression: the RBF SVM's stand-in on many rows; transferable."""
    return KernelMapClassifier(C=C, gamma=gamma, n_components=n_components, max_iter=max_iter,
                               class_weight=class_weight, random_state=random_state)


@register_head("sgd", family="linear", simplicity=1, learning_curve=0.1, to_module=decision_softmax_module,
               stand_in=_fewer_iterations, chunked=sgd_chunks, trusted=[type_name(DecisionSoftmaxClassifier)])
def _sgd(*, loss="log_loss", alpha=0.001, max_iter=20, class_weight=None, random_state=None):
    """Linear model by stochastic gradient descent; probabilities: softmax of the decision function; learns
    from row chunks."""
    return DecisionSoftmaxClassifier(SGDClassifier(loss=loss, alpha=alpha, max_iter=max_iter, tol=None,
                                                   class_weight=class_weight, random_state=random_state))


# the search trees k nearest neighbours may build, and the metrics they hold
_NEIGHBOR_TYPES = ["sklearn.neighbors._kd_tree.KDTree", "sklearn.neighbors._ball_tree.BallTree",
                   *(f"sklearn.metrics._dist_metrics.{m}Distance64" for m in
                     ("Euclidean", "Manhattan", "Chebyshev", "Minkowski"))]


@register_head("knn", family="neighbors", simplicity=2, learning_curve=0.2, trusted=_NEIGHBOR_TYPES,
               transfer=_prototypes)
def _knn(*, n_neighbors=5, weights="uniform", metric="euclidean"):
    """k nearest neighbours; probabilities: the (weighted) vote shares."""
    return KNeighborsClassifier(n_neighbors=n_neighbors, weights=weights, metric=metric)


@register_head("nearest-centroid", family="neighbors", simplicity=0, learning_curve=0.0, to_module=centroid_module,
               trusted=[type_name(SoftmaxNearestCentroid)], chunked=centroid_chunks)
def _nearest_centroid(*, shrink_threshold=None):
    """Nearest (shrunken) centroid; probabilities: softmax of minus squared distances."""
    return SoftmaxNearestCentroid(shrink_threshold=shrink_threshold)


@register_head("random-forest", family="trees", simplicity=4, learning_curve=0.2, cost=3, warm_path="n_estimators",
               trusted=["sklearn.tree._tree.Tree"], growth=1.2, stand_in=_smaller_forest)
def _random_forest(*, n_estimators=300, max_features="sqrt", max_depth=None, min_samples_leaf=1, max_samples=None,
                   class_weight=None, random_state=None):
    """Random forest; probabilities: mean of the trees' leaf class shares."""
    return RandomForestClassifier(n_estimators=n_estimators, max_features=max_features, max_depth=max_depth,
                                  min_samples_leaf=min_samples_leaf, max_samples=max_samples,
                                  class_weight=class_weight, random_state=random_state, n_jobs=1)


@register_head("hgb", family="trees", simplicity=4, learning_curve=0.2, cost=3, warm_path="max_iter",
               stand_in=_fewer_iterations, trusted=["sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"])
def _hgb(*, learning_rate=0.1, max_iter=100, max_leaf_nodes=31, l2_regularization=0.0, max_features=1.0,
         class_weight=None, random_state=None):
    """Histogram gradient boosting."""
    return HistGradientBoostingClassifier(learning_rate=learning_rate, max_iter=max_iter,
                                          max_leaf_nodes=max_leaf_nodes, l2_regularization=l2_regularization,
                                          max_features=max_features, class_weight=class_weight,
                                          random_state=random_state)


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
