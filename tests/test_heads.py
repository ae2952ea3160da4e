import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.svm import LinearSVC
from sklearn.utils.estimator_checks import parametrize_with_checks
from threadpoolctl import threadpool_info

from featurecache.errors import HeadError
from featurecache.heads import (
    DEFAULT_SWEEP,
    HEADS,
    UNRANKED,
    HeadConfig,
    TorchLinearClassifier,
    TorchMLPClassifier,
    benchmark_grid,
    fit_linear_grid,
    head_type,
    list_heads,
    make_estimator,
    parse_grid,
    register_head,
    thread_limit,
    to_torch,
)
from featurecache.heads.sklearn_heads import DecisionSoftmaxClassifier

# Small budgets so every head fits digits in well under a second.
FAST = {
    "linear": {"epochs": 30, "lr": 0.01},
    "mlp": {"epochs": 30, "hidden": 64},
    "random-forest": {"n_estimators": 30},
    "hgb": {"max_iter": 20},
}


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    train, test = order[:1200], order[1200:]
    return X[train], y[train], X[test], y[test]


def _fit(name, digits, pre="standardize", **extra):
    X_train, y_train, _, _ = digits
    cfg = HeadConfig(name, {**FAST.get(name, {}), **extra}, pre)
    return make_estimator(cfg, random_state=0).fit(X_train, y_train)


@pytest.fixture(autouse=True)
def one_thread():
    """Heads run one thread each, as in a parallel sweep (and robust on a busy CI machine)."""
    with thread_limit(1):
        yield


# --------------------------------------------------------------------------- every head


@pytest.mark.filterwarnings("ignore:self.within_class_std_dev_:UserWarning")  # digits' constant pixels
@pytest.mark.parametrize("name", list_heads())
def test_every_head_fits_digits_with_probabilities(name, digits):
    _, _, X_test, y_test = digits
    pipeline = _fit(name, digits)
    assert isinstance(pipeline, Pipeline) and [s for s, _ in pipeline.steps] == ["pre", "head"]
    proba = pipeline.predict_proba(X_test)
    assert proba.shape == (len(X_test), 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    assert (proba >= 0).all()
    np.testing.assert_array_equal(pipeline.predict(X_test), pipeline.classes_[proba.argmax(axis=1)])
    assert (pipeline.predict(X_test) == y_test).mean() > 0.85


@pytest.mark.parametrize("name", [n for n, h in HEADS.items() if h.class_weight])
def test_class_weight_balanced_reaches_the_estimator(name, digits):
    X_train, y_train, X_test, y_test = digits
    cfg = parse_grid(f"{name}:class_weight=balanced;pre=standardize")[0]
    assert cfg.class_weight == "balanced" and cfg.spec.endswith("class_weight=balanced;pre=standardize")
    cfg = HeadConfig(name, FAST.get(name, {}), cfg.pre, cfg.class_weight)
    pipeline = make_estimator(cfg).fit(X_train, y_train)
    params = pipeline.named_steps["head"].get_params(deep=True)
    assert "balanced" in [v for k, v in params.items() if k.endswith("class_weight")]
    assert pipeline.score(X_test, y_test) > 0.85


def test_class_weight_balanced_helps_the_minority_class():
    rng = np.random.default_rng(0)
    n_major, n_minor = 950, 50
    X = np.vstack([rng.normal(0.0, 1.0, (n_major, 5)), rng.normal(1.0, 1.0, (n_minor, 5))]).astype(np.float32)
    y = np.array([0] * n_major + [1] * n_minor)
    recalls = {}
    for class_weight in (None, "balanced"):
        cfg = HeadConfig("linear", {"epochs": 50, "lr": 0.01}, "none", class_weight)
        pred = make_estimator(cfg).fit(X, y).predict(X)
        recalls[class_weight] = (pred[y == 1] == 1).mean()
    assert recalls["balanced"] > recalls[None] + 0.3


def test_heads_without_class_weight_refuse_it():
    with pytest.raises(HeadError, match="knn does not support class_weight"):
        parse_grid("knn:class_weight=balanced")


# --------------------------------------------------------------------------- torch heads


@parametrize_with_checks([
    TorchLinearClassifier(epochs=20, lr=0.05, random_state=0),
    TorchMLPClassifier(hidden=16, epochs=20, lr=0.01, random_state=0),
    TorchMLPClassifier(hidden=(16, 8), batch_norm=True, dropout=0.1, epochs=20, lr=0.01, random_state=0),
    DecisionSoftmaxClassifier(LinearSVC()),
])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.mark.parametrize("name", ["linear", "mlp"])
def test_torch_heads_are_deterministic_per_seed(name, digits):
    X_train, y_train, X_test, _ = digits
    params = {**FAST[name], "dropout": 0.3} if name == "mlp" else FAST[name]
    cfg = HeadConfig(name, {**params, "batch_size": 128}, "standardize")
    first, again, other = (make_estimator(cfg, random_state=seed).fit(X_train, y_train) for seed in (0, 0, 1))
    np.testing.assert_array_equal(first.predict_proba(X_test), again.predict_proba(X_test))
    assert not np.array_equal(first.predict_proba(X_test), other.predict_proba(X_test))


def test_torch_head_module_maps_features_to_logits(digits):
    X_train, y_train, _, _ = digits
    head = TorchMLPClassifier(hidden=(32, 16), epochs=5, random_state=0).fit(X_train, y_train)
    assert head.module_(torch.from_numpy(X_train[:3])).shape == (3, 10)
    assert not head.module_.training and next(head.module_.parameters()).device.type == "cpu"


# --------------------------------------------------------------------------- specs


def test_parse_grid_expands_the_product_with_canonical_specs():
    configs = parse_grid("logreg: C=0.01,0.1 ; pre=standardize,pca:8")
    assert [c.spec for c in configs] == [
        "logreg:C=0.01;pre=standardize",
        "logreg:C=0.01;pre=pca:8",
        "logreg:C=0.1;pre=standardize",
        "logreg:C=0.1;pre=pca:8",
    ]
    assert parse_grid("logreg")[0].spec == "logreg"
    assert parse_grid("logreg:pre=none")[0].spec == "logreg"


def test_parse_grid_values_and_round_trips():
    cfg = HeadConfig.parse("mlp:hidden=512x256;dropout=0;batch_norm=true;lr=1e-3")
    assert cfg.params == {"hidden": (512, 256), "dropout": 0, "batch_norm": True, "lr": 0.001}
    assert cfg.spec == "mlp:batch_norm=true;dropout=0;hidden=512x256;lr=0.001"
    assert HeadConfig.parse(cfg.spec) == cfg
    assert HeadConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    forest = HeadConfig.parse("random-forest:max_depth=none;max_features=sqrt")
    assert forest.params == {"max_depth": None, "max_features": "sqrt"}


def test_parse_grid_drops_duplicates():
    assert [c.spec for c in parse_grid("knn:n_neighbors=3,5,3;pre=none,none")] == [
        "knn:n_neighbors=3", "knn:n_neighbors=5"]


@pytest.mark.parametrize("spec, message", [
    ("logre:C=1", r"unknown head 'logre' \(did you mean: logreg"),
    ("logreg:c=1", r"unknown parameter 'c' for head logreg \(did you mean: C.*parameters: C, max_iter"),
    ("logreg:C=-1", r"bad value in head logreg:C=-1: The 'C' parameter"),
    ("logreg:C=abc", "bad value in head logreg:C=abc"),
    ("mlp:hidden=0", "bad value in head mlp:hidden=0"),
    ("logreg:C=", "parameter C of head logreg has no values"),
    ("logreg:C", "expected PARAM=V1,V2"),
    ("logreg:C=1;C=2", "given twice"),
    ("", "empty head spec"),
    ("  ", "empty head spec"),
    ("logreg:pre=zscore", "unknown pre 'zscore': choose none|standardize|l2|pca:K"),
    ("logreg:pre=pca:0", "positive number of components"),
    ("logreg:class_weight=auto", "class_weight must be balanced or none"),
    ("os.system", "only scikit-learn classifiers"),
    ("sklearn.ensemble.ExtraTreeClassifier", r"did you mean: sklearn.ensemble.ExtraTreesClassifier"),
    ("sklearn.ensembles.ExtraTreesClassifier", r"unknown scikit-learn module 'sklearn.ensembles'.*did you mean"),
    ("sklearn.preprocessing.StandardScaler", "is not a classifier"),
    ("sklearn.ensemble.ExtraTreesClassifier:n_estimator=5", r"did you mean: n_estimators"),
])
def test_bad_specs_raise_head_errors(spec, message):
    with pytest.raises(HeadError, match=message):
        parse_grid(spec)


def test_sklearn_classifiers_by_dotted_path(digits):
    _, _, X_test, y_test = digits
    cfg = HeadConfig.parse("sklearn.ensemble.ExtraTreesClassifier:n_estimators=30")
    assert head_type(cfg.name).family == "ensemble"
    trees = _fit(cfg.name, digits, n_estimators=30)
    assert trees.named_steps["head"].random_state == 0
    assert (trees.predict(X_test) == y_test).mean() > 0.9
    # no predict_proba: a softmax over the decision function
    perceptron = _fit("sklearn.linear_model.Perceptron", digits)
    assert isinstance(perceptron.named_steps["head"], DecisionSoftmaxClassifier)
    np.testing.assert_allclose(perceptron.predict_proba(X_test).sum(axis=1), 1.0)


def test_default_sweep_is_broad():
    configs = [cfg for spec in DEFAULT_SWEEP for cfg in parse_grid(spec)]
    assert len({cfg.spec for cfg in configs}) == len(configs) >= 20
    assert len({head_type(c.name).family for c in configs}) >= 5


# --------------------------------------------------------------------------- torch conversion


@pytest.mark.parametrize("pre", ["none", "standardize", "l2", "pca:8"])
@pytest.mark.parametrize("name", [n for n, h in HEADS.items() if h.transferable])
@pytest.mark.parametrize("n_classes", [10, 2])
def test_to_torch_is_exact(name, pre, n_classes, digits):
    X_train, y_train, X_test, _ = digits
    keep = y_train < n_classes
    extra = {"batch_norm": True, "dropout": 0.2} if name == "mlp" else {}
    cfg = HeadConfig(name, {**FAST.get(name, {}), **extra}, pre)
    pipeline = make_estimator(cfg).fit(X_train[keep], y_train[keep])
    module = to_torch(pipeline)
    assert isinstance(module, torch.nn.Module) and not module.training
    with torch.no_grad():
        proba = torch.softmax(module(torch.from_numpy(X_test)).double(), dim=1).numpy()
    expected = pipeline.predict_proba(X_test)
    assert proba.shape == expected.shape == (len(X_test), n_classes)
    np.testing.assert_allclose(proba, expected, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(proba.argmax(axis=1), expected.argmax(axis=1))


def test_to_torch_gives_plain_linear_layers_and_refuses_other_heads(digits):
    assert isinstance(to_torch(_fit("logreg", digits, pre="standardize")), torch.nn.Linear)
    assert isinstance(to_torch(_fit("linear", digits, pre="pca:8"), "linear"), torch.nn.Linear)
    only = "only linear, mlp, logreg, linear-svm, ridge, rbf-map, sgd, nearest-centroid heads convert to torch"
    with pytest.raises(HeadError, match=f"head KNeighborsClassifier is not transferable: {only}"):
        to_torch(_fit("knn", digits))
    with pytest.raises(HeadError, match=f"head knn is not transferable: {only}"):
        to_torch(_fit("knn", digits), "knn")


def test_to_torch_by_name_matches_the_inferred_conversion(digits):
    X_test = torch.from_numpy(digits[2])
    pipeline = _fit("ridge", digits, pre="l2")
    with torch.no_grad():
        np.testing.assert_array_equal(to_torch(pipeline, "ridge")(X_test).numpy(), to_torch(pipeline)(X_test).numpy())
    with pytest.raises(HeadError, match=r"head sklearn\.linear_model\.RidgeClassifier is not transferable"):
        to_torch(pipeline, "sklearn.linear_model.RidgeClassifier")  # heads named by path never are


# --------------------------------------------------------------------------- the registry


def test_every_fact_about_a_head_is_in_its_record():
    assert [n for n, h in HEADS.items() if h.transferable] == ["linear", "mlp", "logreg", "linear-svm", "ridge",
                                                               "rbf-map", "sgd", "nearest-centroid"]
    assert {n: h.transfer is not None for n, h in HEADS.items() if not h.transferable} == {
        "svm": True, "knn": True, "random-forest": False, "hgb": False}
    assert {n: h.warm_path for n, h in HEADS.items() if h.warm_path} == {
        "logreg": "C", "random-forest": "n_estimators", "hgb": "max_iter"}
    assert head_type("nearest-centroid").simplicity < head_type("logreg").simplicity < head_type("hgb").simplicity
    assert head_type("hgb").cost > head_type("svm").cost > head_type("knn").cost
    dotted = head_type("sklearn.ensemble.ExtraTreesClassifier")  # neutral facts
    assert (dotted.simplicity, dotted.cost, dotted.warm_path, dotted.transferable) == (UNRANKED, 1, None, False)
    assert UNRANKED > max(h.simplicity for h in HEADS.values())


def _naive_bayes(*, var_smoothing=1e-9):
    """Gaussian naive Bayes."""
    from sklearn.naive_bayes import GaussianNB

    return GaussianNB(var_smoothing=var_smoothing)


@pytest.mark.parametrize("name, facts, message", [
    ("logreg", {}, "a head named 'logreg' is already registered"),
    ("sklearn.naive_bayes.GaussianNB", {}, "no dots"),
    ("naive bayes", {}, "no dots, colons or spaces"),
    ("naive-bayes", {"warm_path": "C"}, "warm_path 'C' is not one of its parameters var_smoothing"),
    ("naive-bayes", {"kind": "jax"}, "kind must be one of sklearn, torch"),
])
def test_register_head_refuses_what_specs_and_files_cannot_handle(name, facts, message):
    before = dict(HEADS)
    with pytest.raises(HeadError, match=message):
        register_head(name, _naive_bayes, family="bayes", **facts)
    assert HEADS == before


# --------------------------------------------------------------------------- batched linear heads


def test_fit_linear_grid_matches_one_by_one(digits):
    X_train, y_train, X_test, y_test = digits
    configs = parse_grid("linear:lr=0.001,0.01;weight_decay=0,0.01;epochs=20;batch_size=128;pre=standardize,none")
    batched = fit_linear_grid(X_train, y_train, configs, random_state=0)
    assert len(batched) == len(configs) == 8
    for cfg, pipeline in zip(configs, batched):
        single = make_estimator(cfg, random_state=0).fit(X_train, y_train)
        assert type(pipeline.named_steps["head"]) is TorchLinearClassifier
        assert pipeline.named_steps["head"].get_params() == single.named_steps["head"].get_params()
        assert abs(pipeline.score(X_test, y_test) - single.score(X_test, y_test)) <= 0.005
        np.testing.assert_allclose(pipeline.predict_proba(X_test), single.predict_proba(X_test), atol=1e-3)
        assert isinstance(to_torch(pipeline), torch.nn.Linear)


def test_fit_linear_grid_takes_linear_heads_only(digits):
    X_train, y_train, _, _ = digits
    with pytest.raises(HeadError, match="linear heads only, got logreg"):
        fit_linear_grid(X_train, y_train, parse_grid("logreg"))


def test_benchmark_grid_reports_heads_per_minute():
    result = benchmark_grid(n=2000, d=32, n_classes=3, lrs=(1e-3, 1e-2), weight_decays=(0.0,), epochs=2)
    assert result["heads"] == 2
    assert result["batched_heads_per_minute"] > 0 and result["one_by_one_heads_per_minute"] > 0
    assert result["max_accuracy_gap"] <= 0.01


# --------------------------------------------------------------------------- threads


def test_thread_limit_caps_and_restores():
    before = torch.get_num_threads()
    with thread_limit(2):
        assert torch.get_num_threads() == 2
        with thread_limit(1):
            assert torch.get_num_threads() == 1
            assert all(pool["num_threads"] == 1 for pool in threadpool_info())
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before


def test_make_estimator_refuses_unknown_params():
    with pytest.raises(HeadError, match=r"unknown parameter 'Cee' for head logreg \(did you mean: C"):
        make_estimator(HeadConfig.from_dict({"name": "logreg", "params": {"Cee": 1}}))


def test_logreg_head_is_lbfgs_logistic_regression():
    head = make_estimator(HeadConfig("logreg", {"C": 0.5})).named_steps["head"]
    assert isinstance(head, LogisticRegression) and head.solver == "lbfgs" and head.C == 0.5


# --------------------------------------------------------------------------- learning from row chunks


@pytest.mark.parametrize("spec, exact", [("nearest-centroid:pre=l2", True), ("linear:epochs=30;lr=0.01;pre=standardize",
                                                                          False), ("sgd:pre=standardize", False)])
def test_heads_learn_from_row_chunks_as_from_memory(digits, spec, exact):
    from featurecache.heads.chunked import RowChunks, can_learn_from_chunks, fit_chunked

    X_train, y_train, X_test, y_test = digits
    cfg = parse_grid(spec)[0]
    reads = []

    def read(rows):
        reads.append(len(rows))
        return X_train[rows]

    chunked = fit_chunked(cfg, RowChunks(read, np.arange(len(y_train)), y_train, X_train.shape[1], 100))
    in_memory = make_estimator(cfg).fit(X_train, y_train)
    assert can_learn_from_chunks(cfg) and max(reads) == 100  # never more than one chunk at a time
    if exact:
        np.testing.assert_allclose(chunked.predict_proba(X_test), in_memory.predict_proba(X_test), atol=1e-9)
    else:
        assert (chunked.predict(X_test) == y_test).mean() > (in_memory.predict(X_test) == y_test).mean() - 0.03
    if cfg.pre == "standardize":  # running moments: the scaler of all rows
        np.testing.assert_allclose(chunked.named_steps["pre"].mean_, X_train.mean(axis=0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(chunked.named_steps["pre"].var_, X_train.var(axis=0), rtol=1e-4, atol=1e-4)


def test_heads_that_need_every_row_refuse_chunks():
    from featurecache.heads.chunked import can_learn_from_chunks

    assert not can_learn_from_chunks(parse_grid("logreg")[0])
    assert not can_learn_from_chunks(parse_grid("linear:pre=pca:8")[0])
