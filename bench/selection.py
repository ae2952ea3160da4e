"""Which entry should a sweep select? Tie-break rules and the ensemble, judged on held-out test images.

Every data set below has a ``val`` split that selects and a ``test`` split that no choice sees.
One default sweep (calibrated, with the ensemble) runs on each, and every rule picks an entry
of its leaderboard:

- ``most-accurate``: the highest val accuracy (equal ones: the leaderboard's order);
- ``log-loss``: the rule of earlier versions: among the single heads tied with the most accurate
  one, the lowest calibrated log-loss;
- ``simplicity``: among them, the simplest head type (the registry's ``simplicity``), then log-loss;
- ``tied-ensemble``: the greedy ensemble (:mod:`featurecache.sweep.ensemble`) of the tied heads only;
- ``before`` (caches with layers): the defaults before ``--features auto``: the sweep on the penultimate
  features alone, and among its heads tied with the most accurate one the lowest log-loss;
- ``default``: what the sweep selects (since ``paired-bootstrap/2``: the ensemble of the tied heads
  unless its cross-fitted score is significantly worse than the most accurate head's, else
  ``most-accurate``; when this comparison was first run, the ensemble of every head ranked first only
  when no head was tied with it, else ``log-loss``).

Data sets:

- ``hymenoptera``: the tutorial's train folder split 80/20 into train and val with ``--split-seeds``,
  its val folder as test (as ``bench/tricks.py`` does);
- ``fashion-mnist``: one extraction of ``--limit`` train images (default 20,000) and the 10,000 test
  images; for each of ``--sizes`` (train + val rows, 80/20) and ``--split-seeds``, a cache of that
  many rows drawn from its train rows, with every test image as test. With ``--defaults`` the
  extraction's own default sweep also runs (its selection is a holdout of train), timed, as the
  acceptance of the ensemble asks: extract seconds, sweep seconds, the selected entry and its test
  accuracy, with and without the ensemble.

For each data set the test accuracy of every rule is printed; then, per data group, each rule's mean
test accuracy and its difference to ``most-accurate`` over the pooled test images of the group, with a
95% paired bootstrap interval (a rule is better only where the interval is above 0).

    python bench/selection.py [--data hymenoptera,fashion-mnist] [--sizes 1000,4000] [--split-seeds 0,1,2]
    python bench/selection.py --data fashion-mnist --defaults --sizes '' [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from tricks import FASHION_MNIST, hymenoptera_manifest

import featurecache
from featurecache import store
from featurecache.heads.mixture import mix
from featurecache.metrics import paired_difference, tempered
from featurecache.sweep.calibration import head_temperature
from featurecache.sweep.ensemble import greedy_weights
from featurecache.sweep.leaderboard import calibrated, is_ensemble, rank_key, simplicity, tied_count
from featurecache.sweep.runs import load_head, load_run

RULES = ("most-accurate", "log-loss", "simplicity", "tied-ensemble", "default")


def _log_loss(entry: dict) -> float:
    return rank_key(entry)[1]  # on the selection split, after the temperature


def _probabilities(run_dir: str, entry: dict, X: dict) -> dict:
    """``split -> probabilities`` of one entry of a run, after its temperature, on the features ``X``."""
    model, _ = load_head(run_dir, entry["head"])
    return {s: tempered(model.predict_proba(x), head_temperature(entry)) for s, x in X.items()}


def choices(leaderboard: list[dict], right: dict) -> dict:
    """``rule -> entry`` (``tied-ensemble``: the list of tied single entries). The ties are recomputed against
    the most accurate single head from ``right`` (head -> per-image correctness on val), as the sweep computes
    them before it adds the ensemble, whatever the saved leaderboard marks relative to its first entry."""
    singles = [e for e in leaderboard if not is_ensemble(e) and e.get("status") != "pruned"]
    top = min(singles, key=lambda e: (-e["selection_accuracy"], _log_loss(e)))
    tied = [e for e in singles if paired_difference(right[top["head"]], right[e["head"]])["ci"][0] <= 0]
    return {"most-accurate": top, "log-loss": min(tied, key=_log_loss),
            "simplicity": min(tied, key=lambda e: (simplicity(e), _log_loss(e))),
            "tied-ensemble": tied, "default": leaderboard[0]}


def judge(cache: str, result) -> dict:
    """``rule -> per-test-image correctness`` of the entry each rule picks on one sweep."""
    features = load_run(result.run_dir).meta.get("features", "penultimate")
    X = {s: store.read_rows(cache, s, features=features) for s in ("val", "test")}
    y = {s: store.load_labels(cache, s) for s in ("val", "test")}
    memo = {}

    def probas(entry):
        if entry["head"] not in memo:
            memo[entry["head"]] = _probabilities(result.run_dir, entry, X)
        return memo[entry["head"]]

    right = {e["head"]: probas(e)["val"].argmax(axis=1) == y["val"] for e in result.leaderboard
             if not is_ensemble(e) and e.get("status") != "pruned"}
    correct = {}
    for rule, entry in choices(result.leaderboard, right).items():
        if rule == "tied-ensemble":
            members = [probas(e) for e in entry]
            weights = greedy_weights([m["val"] for m in members], y["val"]) if len(members) > 1 else [1.0]
            test = mix([m["test"] for m in members], weights)
        else:
            test = probas(entry)["test"]
        correct[rule] = test.argmax(axis=1) == y["test"]
    return correct


def _sweep(label: str, cache: str, cache_dir: str) -> dict:
    """Every rule's correctness on one default sweep; on a cache with layers (``--features auto``) also
    ``before``: what the defaults before ``auto`` selected, the sweep on the penultimate features alone
    with the lowest log-loss among the tied heads (the rule before ``paired-bootstrap/2``)."""
    started = time.perf_counter()
    result = featurecache.fit_head(cache, cache_dir=cache_dir)
    seconds = time.perf_counter() - started
    correct = judge(cache, result)
    if store.info(cache)["layers"]:
        correct["before"] = judge(cache, featurecache.fit_head(cache, cache_dir=cache_dir,
                                                               features="penultimate"))["log-loss"]
    best = result.leaderboard[0]
    ece = calibrated(best, "test").get("ece", best["metrics"]["test"].get("ece"))
    cells = "  ".join(f"{rule} {correct[rule].mean():.4f}" for rule in RULES)
    print(f"{label}: sweep {seconds:.1f} s{' (reused)' if result.reused else ''}, selected {best['head']}, "
          f"{tied_count(result.leaderboard)} tied, "
          f"test ECE {ece:.4f}; {cells}", flush=True)
    return correct


def pooled(label: str, rows: list[dict]) -> None:
    """Each rule's mean test accuracy over the data sets, and its paired difference to most-accurate."""
    print(f"\n{label}: {len(rows)} data sets, {sum(len(r['most-accurate']) for r in rows):,} test images pooled")
    base = np.concatenate([r["most-accurate"] for r in rows])
    for rule in [*RULES, *(["before"] if all("before" in r for r in rows) else [])]:
        this = np.concatenate([r[rule] for r in rows])
        mean_per_set = np.mean([r[rule].mean() for r in rows])
        diff = paired_difference(this, base)
        print(f"  {rule:14s} mean test {mean_per_set:.4f}  vs most-accurate {diff['difference']:+.4f} "
              f"[{diff['ci'][0]:+.4f}, {diff['ci'][1]:+.4f}]")
    if all("before" in r for r in rows):
        diff = paired_difference(np.concatenate([r["default"] for r in rows]),
                                 np.concatenate([r["before"] for r in rows]))
        print(f"  default vs before (penultimate, log-loss among the tied): {diff['difference']:+.4f} "
              f"[{diff['ci'][0]:+.4f}, {diff['ci'][1]:+.4f}]")


def subset_cache(source: str, folder: Path, size: int, seed: int) -> str:
    """A cache of ``size`` rows of ``source``'s train split (80% train, 20% val, stratified) and all its test rows."""
    from sklearn.model_selection import train_test_split

    meta = store.info(source)
    X, y, paths = featurecache.load_features(source, "train")
    rows, _ = train_test_split(np.arange(len(y)), train_size=size, stratify=y, random_state=seed)
    fit, val = train_test_split(rows, test_size=0.2, stratify=y[rows], random_state=seed)
    Xt, yt, pt = featurecache.load_features(source, "test")
    splits = {name: {"features": X[i], "labels": y[i], "paths": [paths[j] for j in i], "skipped": []}
              for name, i in (("train", np.sort(fit)), ("val", np.sort(val)))}
    splits["test"] = {"features": Xt, "labels": yt, "paths": list(pt), "skipped": []}
    config = {**meta["config"], "subset": {"of": meta["key"], "rows": size, "seed": seed}}
    return str(store.write_cache(folder / f"fm-{size}-{seed}.h5", meta["classes"], config, splits))


def fashion(tmp: Path, args) -> list[dict]:
    cache_dir = str(tmp / "fm")
    started = time.perf_counter()
    source = featurecache.extract("torchvision:FashionMNIST", root=FASHION_MNIST, limit=args.limit,
                                  weights="IMAGENET1K_V1", cache_dir=cache_dir, progress=False).cache
    print(f"Fashion-MNIST --limit {args.limit}: extract {time.perf_counter() - started:.1f} s", flush=True)
    if args.defaults:
        defaults(source, cache_dir)
    sizes = [int(size) for size in args.sizes.split(",") if size]
    return [_sweep(f"Fashion-MNIST {size} rows, seed {seed}", subset_cache(source, tmp, size, seed), cache_dir)
            for size in sizes for seed in map(int, args.split_seeds.split(","))]


def defaults(cache: str, cache_dir: str, features: str = "auto") -> None:
    """The extraction's own default sweep: its seconds, the selected entry, and without the ensemble; on a
    cache with layers, also each feature set's best entry of that run, then the sweep on the penultimate
    features alone (``--features penultimate``: without ``auto``)."""
    started = time.perf_counter()
    result = featurecache.fit_head(cache, cache_dir=cache_dir, features=features)
    seconds = time.perf_counter() - started
    print(f"--features {features}:", flush=True)
    best = result.leaderboard[0]
    single = next(e for e in result.leaderboard if not is_ensemble(e))
    ensemble = next((e for e in result.leaderboard if is_ensemble(e)), None)
    ece = calibrated(best, "test").get("ece", best["metrics"]["test"].get("ece"))
    acc = best["metrics"]["test"]

    def cell(e):
        return f"{e['head']} {e['metrics']['test']['accuracy']:.4f} {e['metrics']['test']['accuracy_ci']}"

    print(f"defaults: sweep {seconds:.1f} s on {result.selection_split}; selected {best['head']}: test "
          f"{acc['accuracy']:.4f} {acc['accuracy_ci']}, ECE {ece:.4f}, {tied_count(result.leaderboard)} tied",
          flush=True)
    print(f"  without the ensemble: {cell(single)}")
    if ensemble is not None:
        members = ", ".join(f"{m['weight']:.2f} {m['head']}" for m in ensemble["members"])
        print(f"  the ensemble: {cell(ensemble)}; {result.selection_split} {ensemble['selection_accuracy']:.4f} "
              f"(cross-fitted), tied {ensemble.get('tied')}; {members}", flush=True)
    sets = sorted({e.get("features", "penultimate") for e in result.leaderboard if not is_ensemble(e)})
    if len(sets) > 1:
        for name in sets:
            print(f"  best on {name}: {cell(next(e for e in result.leaderboard if e.get('features') == name))}")
    if features == "auto" and store.info(cache)["layers"]:
        defaults(cache, cache_dir, "penultimate")


def hymenoptera(tmp: Path, args) -> list[dict]:
    rows = []
    for seed in map(int, args.split_seeds.split(",")):
        cache_dir = str(tmp / f"hym-{seed}")
        started = time.perf_counter()
        cache = featurecache.extract(str(hymenoptera_manifest(tmp, seed)), weights="IMAGENET1K_V1",
                                     cache_dir=cache_dir, progress=False).cache
        print(f"hymenoptera split {seed}: extract {time.perf_counter() - started:.1f} s", flush=True)
        rows.append(_sweep(f"hymenoptera split {seed}", cache, cache_dir))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="hymenoptera,fashion-mnist")
    parser.add_argument("--split-seeds", default="0,1,2")
    parser.add_argument("--sizes", default="1000,4000", help="Fashion-MNIST: train + val rows of each data set.")
    parser.add_argument("--limit", type=int, default=20000, help="Fashion-MNIST: train images extracted.")
    parser.add_argument("--defaults", action="store_true",
                        help="Fashion-MNIST: also the default sweep on --limit rows.")
    parser.add_argument("--work-dir", default=None,
                        help="Keep the caches and runs here (default: a temporary folder, removed at the end).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fc-selection-") as scratch:
        tmp = Path(args.work_dir or scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        groups = {"hymenoptera": hymenoptera, "fashion-mnist": fashion}
        results = {name: groups[name](tmp, args) for name in args.data.split(",")}
        for name, rows in results.items():
            if rows:
                pooled(name, rows)


if __name__ == "__main__":
    main()
