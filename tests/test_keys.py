"""The addresses of caches, runs and fine-tunes are pinned: code changes must not move them.

A cache's key, a run's directory and a fine-tune's folder are hashes of what made them, so a
user's existing caches and runs are found again only while those hashes stay the same. The
values below were computed before the stages took options objects, on data whose bytes and
modification times are fixed; a change that moves one of them silently orphans every cache
or run of that kind. The run addresses moved once on purpose, when the ranking's version
(``featurecache.sweep.postpass.RANKING``) became ``paired-bootstrap/2`` with calibration and the
ensemble by default: a run ranked by the earlier rule is fitted again, not reused. Budgeted runs on
many rows or views moved again when the budget's policy (``featurecache.sweep.halving.BUDGET_POLICY``:
families that could still win move on, the last rung shared by lanes) joined their address.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import FAST, make_split_folder

import featurecache as fc

FIXED_NS = 1_700_000_000_000_000_000
PINNED = {
    "plain": "d430a67aa941f944ff441f3ee0cdab2e86d9f9d36340b72f445bd0355337cb2f",
    "tricks": "c27cc26b3aaac1048b5013b0a3c2eaa1033b7a1d9d1cefdec23ae551b11d3e43",
    "csv": "f4737534e92caa6f8703dab081b0d548428487ea988f96727c3177d6ed365121",
    "run": "mobilenet_v2-images-d430a67aa941f944-68d5181b08b0",
    "run_calibrated_seeds": "mobilenet_v2-images-d430a67aa941f944-a9a890b8abc3",
    "run_concat_views": "mobilenet_v2-images-c27cc26b3aaac104-6cbf1ffc2d14",  # the budget policy joined it
    "finetune": "e7d72592f45d",
    "run_default": "mobilenet_v2-images-d430a67aa941f944-f9aecbb1d9cc",  # calibrated, with the ensemble
}
HEADS = ["logreg:C=0.1;pre=standardize", "knn:n_neighbors=3"]


def _fixed(root: Path) -> Path:
    make_split_folder(root, splits=(("train", 6), ("val", 4), ("test", 2)))
    for path in sorted(root.rglob("*")):
        os.utime(path, ns=(FIXED_NS, FIXED_NS))
    return root


def _manifest(tmp_path: Path, root: Path) -> Path:
    rows = ["path,label,split"] + [f"{p.relative_to(tmp_path).as_posix()},{p.parent.name},{p.parent.parent.name}"
                                   for p in sorted(root.rglob("*.jpg"))]
    csv = tmp_path / "m.csv"
    csv.write_text("\n".join(rows) + "\n")
    os.utime(csv, ns=(FIXED_NS, FIXED_NS))
    return csv


@pytest.fixture(scope="module")
def addresses(tmp_path_factory) -> dict:
    tmp_path = tmp_path_factory.mktemp("keys")
    os.environ["FC_CACHE_DIR"] = str(tmp_path / "cache")
    root = _fixed(tmp_path / "images")
    plain = fc.extract(str(root), **FAST)
    tricks = fc.extract(str(root), **{**FAST, "layers": "features.13"}, tta="flip", augment_views=2)
    run = fc.fit_head(plain.cache, head=HEADS, calibrate="none", ensemble=False, progress=False)
    out = {
        "plain": plain.key,
        "tricks": tricks.key,
        "csv": fc.extract(str(_manifest(tmp_path, root)), **FAST).key,
        "run": Path(run.run_dir).name,
        "run_calibrated_seeds": Path(fc.fit_head(plain.cache, head=HEADS[:1], calibrate="temperature", seeds=2,
                                                 ensemble=False, progress=False).run_dir).name,
        "run_concat_views": Path(fc.fit_head(tricks.cache, head=HEADS[:1], features="concat", calibrate="none",
                                             ensemble=False, progress=False).run_dir).name,
        "run_default": Path(fc.fit_head(plain.cache, head=HEADS, progress=False).run_dir).name,
        "finetune": Path(fc.finetune(run.run_dir, epochs=1, batch_size=4, workers=0,
                                     progress=False).output_dir).name,
    }
    del os.environ["FC_CACHE_DIR"]
    return out


@pytest.mark.parametrize("name", sorted(PINNED))
def test_the_address_is_the_pinned_one(addresses, name):
    assert addresses[name] == PINNED[name]
