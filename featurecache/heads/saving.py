"""Fitted heads as files that cannot run code when they are loaded.

A ``sklearn`` head is saved as its whole pipeline in a skops file (``pipeline.skops``).
A ``torch`` head is saved as its pipeline with the head step left out (the fitted
preprocessing, ``pipeline.skops``), its module's weights (``module.safetensors``) and
a JSON record of the estimator (parameters, classes, number of features) that the
caller keeps in ``head.json``: the estimator is rebuilt from them, never unpickled.

A skops file is loaded only when every type it holds is one skops trusts by default
(numpy, scikit-learn estimators) or one of :func:`~featurecache.heads.registry.trusted_types`,
the allow-list the registered heads declare; a head whose file would hold any other
type is not saved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import skops.io
from sklearn.pipeline import Pipeline

from ..errors import HeadError, RunError
from .registry import HeadConfig, head_type, trusted_types, type_name

PIPELINE_FILE = "pipeline.skops"
WEIGHTS_FILE = "module.safetensors"


def _outside(untrusted: list[str]) -> list[str]:
    allowed = set(trusted_types())
    return [name for name in untrusted if name not in allowed]


def _dump_sklearn(pipeline: Pipeline) -> tuple[dict[str, bytes], None]:
    return {PIPELINE_FILE: skops.io.dumps(pipeline)}, None


def _dump_torch(pipeline: Pipeline) -> tuple[dict[str, bytes], dict]:
    from safetensors.torch import save

    estimator = pipeline.named_steps["head"]
    pre_only = Pipeline([*pipeline.steps[:-1], ("head", "passthrough")])  # cols (when set) and pre
    weights = {k: v.detach().cpu().contiguous() for k, v in estimator.module_.state_dict().items()}
    record = {"class": type_name(type(estimator)), "params": estimator.get_params(deep=False),
              "classes": estimator.classes_.tolist(), "n_features_in": int(estimator.n_features_in_)}
    return {PIPELINE_FILE: skops.io.dumps(pre_only), WEIGHTS_FILE: save(weights)}, record


# head kind -> pipeline -> ({file name: bytes}, estimator record for head.json or None)
DUMPERS = {"sklearn": _dump_sklearn, "torch": _dump_torch}


def dump_head(pipeline: Pipeline, cfg: HeadConfig) -> tuple[dict[str, bytes], dict | None]:
    """The files of a fitted head pipeline, and the estimator record a torch head needs in ``head.json``.

    Raises HeadError when the pipeline holds a type outside the allow-list: such a
    file could not be loaded safely, so it is not written.
    """
    files, record = DUMPERS[head_type(cfg.name).kind](pipeline)
    outside = _outside(skops.io.get_untrusted_types(data=files[PIPELINE_FILE]))
    if outside:
        raise HeadError(f"head {cfg.spec} holds {', '.join(outside)}, which featurecache does not load from "
                        "files; register the head with trusted=[...] to save it")
    return files, record


def _refit(folder: Path) -> str:
    """The advice for a head folder whose files are the ones the run wrote but cannot be loaded: its run
    must go (the same fc fit-head would reuse it as it is)."""
    return f"remove its run (rm -r {folder.parent.parent}) and run fc fit-head again"


def _load_pipeline(path: Path) -> Pipeline:
    outside = _outside(skops.io.get_untrusted_types(file=path))
    if outside:
        raise RunError(f"{path} holds {', '.join(outside)}, outside the types featurecache loads; refused, "
                       "since loading other types can run code")
    pipeline = skops.io.load(path, trusted=trusted_types())
    if not isinstance(pipeline, Pipeline) or list(pipeline.named_steps) not in (["pre", "head"],
                                                                               ["cols", "pre", "head"]):
        raise RunError(f"{path} does not hold a head pipeline ([cols,] pre, head); {_refit(path.parent)}")
    return pipeline


def _as_tuples(params: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()}


def _rebuild_torch(folder: Path, head_meta: dict):
    """The torch head estimator of ``head.json``, with the weights of ``module.safetensors``."""
    from safetensors.torch import load_file

    record = head_meta["estimator"]
    cfg = HeadConfig.from_dict(head_meta)
    estimator = head_type(cfg.name).build(cfg.params, class_weight=cfg.class_weight)
    if type_name(type(estimator)) != record["class"]:
        raise RunError(f"{folder}: head {cfg.name} builds {type_name(type(estimator))}, "
                       f"but the saved one is {record['class']}; {_refit(folder)}")
    estimator.set_params(**_as_tuples(record["params"]))
    try:
        state = load_file(folder / WEIGHTS_FILE)
        return estimator.restore(np.asarray(record["classes"]), int(record["n_features_in"]), state)
    except (OSError, RuntimeError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise RunError(f"{folder / WEIGHTS_FILE} does not hold this head's weights ({reason}); "
                       f"{_refit(folder)}") from None


def _load_sklearn(folder: Path, head_meta: dict) -> Pipeline:
    return _load_pipeline(folder / PIPELINE_FILE)


def _load_torch(folder: Path, head_meta: dict) -> Pipeline:
    pipeline = _load_pipeline(folder / PIPELINE_FILE)
    return pipeline.set_params(head=_rebuild_torch(folder, head_meta))


# head kind -> (folder, head.json) -> fitted pipeline
LOADERS = {"sklearn": _load_sklearn, "torch": _load_torch}


def load_head_files(folder: str | Path, head_meta: dict) -> Pipeline:
    """The fitted pipeline saved by :func:`dump_head` in ``folder``, described by its ``head.json``."""
    loader = LOADERS.get(head_meta.get("kind"))
    if loader is None:
        raise RunError(f"{folder}/head.json names an unknown head kind {head_meta.get('kind')!r}")
    return loader(Path(folder), head_meta)
