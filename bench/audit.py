"""fc audit on planted faults: leaks, label flips, and what excluding them is worth.

Steps (each one a subcommand; ``all`` runs them in order)::

    python bench/audit.py plant      # copies of hymenoptera and of Fashion-MNIST (--limit 10000) with faults
    python bench/audit.py extract    # their MobileNetV2 (IMAGENET1K_V1) features, and the unmodified ones
    python bench/audit.py threshold  # cosine of planted re-encodings and crops against other neighbours
    python bench/audit.py measure    # recall, precision, top-2x recall and AUROC of fc audit
    python bench/audit.py exclude    # test accuracy of the default sweep with and without --exclude

The planted faults, as the acceptance of ``fc audit`` asks: the labels of 5% of the train images
flipped (the file moved into another class's folder), 20 held-out images copied into train
re-encoded as JPEG quality 70 at 90% of their size, and 10 more copied into train byte for byte.
The held-out split is ``test`` (Fashion-MNIST) or ``val`` (hymenoptera, which has no test).
Everything goes under ``--work`` (default /tmp/fc-audit-bench); ``truth.json`` in each planted
copy lists what was planted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

HYMENOPTERA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera_data"
FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
EXTRACT = dict(backbone="mobilenet_v2", weights="IMAGENET1K_V1", progress=True)


def load(path: Path):
    return json.loads(Path(path).read_text())


def uptime() -> str:
    return "load averages " + " ".join(f"{x:.2f}" for x in os.getloadavg())


# --------------------------------------------------------------------------- planting


def export_fashion(out: Path, limit: int = 10000) -> Path:
    """Fashion-MNIST as ``fc extract torchvision:FashionMNIST --limit`` sees it, written as PNG files."""
    from featurecache.data.sources import open_dataset

    if (out / ".done").is_file():
        return out
    ds = open_dataset("torchvision:FashionMNIST", root=FASHION_ROOT, limit=limit)
    names = [c.replace("/", "-") for c in ds.classes]
    for rec in ds.records:
        split, idx = rec.path.split("/")
        target = out / split / names[rec.label] / f"{split}-{idx}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        ds.loader(rec).save(target)
    (out / ".done").write_text("")
    return out


def _images(root: Path, split: str) -> list[Path]:
    from featurecache.data.sources import IMAGE_EXTENSIONS

    return sorted(p for p in (root / split).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def plant(source: Path, out: Path, seed: int = 0, flips: float = 0.05, reencoded: int = 20, copies: int = 10) -> dict:
    """A copy of ``source`` with planted faults; returns (and writes) ``truth.json``."""
    from PIL import Image

    if (out / "truth.json").is_file():
        return load(out / "truth.json")
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(source, out, ignore=shutil.ignore_patterns(".done"))
    rng = np.random.default_rng(seed)
    held = "test" if (out / "test").is_dir() else "val"
    train = _images(out, "train")
    classes = sorted(p.name for p in (out / "train").iterdir() if p.is_dir())
    truth: dict = {"held_out": held, "leaks": [], "flips": []}
    picked = rng.choice(_images(out, held), size=reencoded + copies, replace=False)
    for i, src in enumerate(picked):
        cls = src.parent.name
        if i < reencoded:
            dest = out / "train" / cls / f"{src.stem}-copy.jpg"
            with Image.open(src) as img:
                img = img.convert("RGB" if img.mode not in ("L", "RGB") else img.mode)
                size = (max(1, round(img.width * 0.9)), max(1, round(img.height * 0.9)))
                img.resize(size, Image.BICUBIC).save(dest, quality=70)
            kind = "re-encoded"
        else:
            dest = out / "train" / cls / f"{src.stem}-copy{src.suffix}"
            shutil.copyfile(src, dest)
            kind = "byte copy"
        truth["leaks"].append({"train": dest.relative_to(out).as_posix(), "held": src.relative_to(out).as_posix(),
                               "kind": kind})
    for src in rng.choice(train, size=round(flips * len(train)), replace=False):
        cls = src.parent.name
        other = rng.choice([c for c in classes if c != cls])
        dest = out / "train" / other / src.name
        if dest.exists():
            dest = dest.with_name(f"{src.stem}-x{src.suffix}")
        src.rename(dest)
        truth["flips"].append({"path": dest.relative_to(out).as_posix(), "given": other, "true": cls})
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def cmd_plant(args) -> None:
    work = Path(args.work)
    fashion = export_fashion(work / "fashion-mnist")
    for name, source in (("hymenoptera", HYMENOPTERA), ("fashion-mnist", fashion)):
        truth = plant(source, work / f"{name}-planted")
        print(f"{name}: planted {len(truth['flips'])} label flips and {len(truth['leaks'])} leaks "
              f"into {work / (name + '-planted')}")


# --------------------------------------------------------------------------- extracting


def caches(work: Path) -> dict:
    path = work / "caches.json"
    return load(path) if path.is_file() else {}


def cmd_extract(args) -> None:
    import featurecache as fc

    work = Path(args.work)
    found = caches(work)
    data = {"hymenoptera": HYMENOPTERA, "hymenoptera-planted": work / "hymenoptera-planted",
            "fashion-mnist": work / "fashion-mnist", "fashion-mnist-planted": work / "fashion-mnist-planted"}
    for name, root in data.items():
        if args.only and name not in args.only:
            continue
        res = fc.extract(str(root), cache_dir=str(work / "cache"), **EXTRACT)
        config = load_config(res.cache)
        share = config.get("hash_seconds", float("nan")) / max(config["seconds"], 1e-9)
        found[name] = res.cache
        print(f"{name}: {res.cache} ({'reused' if res.reused else f'{res.seconds:.1f} s'}; content hash "
              f"{config.get('hash_seconds', float('nan')):.2f} s of {config['seconds']:.1f} s = {share:.2%}; "
              f"{uptime()})")
        (work / "caches.json").write_text(json.dumps(found, indent=1))


def load_config(cache: str) -> dict:
    from featurecache import store

    return store.info(cache)["config"]


# --------------------------------------------------------------------------- the threshold


def _variants(source: Path, out: Path, n: int = 40, seed: int = 1) -> list[tuple[str, str, str]]:
    """``n`` of hymenoptera's val images with re-encodings and crops beside them: ``(original, variant, kind)``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    chosen = rng.choice(_images(source, "val"), size=n, replace=False)
    kinds = {
        "q70 at 90%": lambda im: (im.resize((round(im.width * .9), round(im.height * .9)), Image.BICUBIC), 70),
        "q50": lambda im: (im, 50),
        "crop 90%": lambda im: (im.crop(_box(im, .9)), 90),
        "crop 80%": lambda im: (im.crop(_box(im, .8)), 90),
        "crop 70%": lambda im: (im.crop(_box(im, .7)), 90),
        "q70 at 50%": lambda im: (im.resize((round(im.width * .5), round(im.height * .5)), Image.BICUBIC), 70),
    }
    pairs = []
    for i, src in enumerate(chosen):
        folder = out / "train" / src.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        original = folder / f"{i:03d}-original{src.suffix}"
        shutil.copyfile(src, original)
        with Image.open(src) as img:
            img = img.convert("RGB")
            for j, (kind, make) in enumerate(kinds.items()):
                variant, quality = make(img)
                dest = folder / f"{i:03d}-v{j}.jpg"
                variant.save(dest, quality=quality)
                pairs.append((original.relative_to(out).as_posix(), dest.relative_to(out).as_posix(), kind))
    return pairs


def _box(img, share: float) -> tuple[int, int, int, int]:
    w, h = round(img.width * share), round(img.height * share)
    left, top = (img.width - w) // 2, (img.height - h) // 2
    return left, top, left + w, top + h


def cmd_threshold(args) -> None:
    """Cosine of each planted variant to its original, against each unmodified image's most similar other image."""
    import featurecache as fc
    from featurecache import store
    from featurecache.auditing.neighbours import normalize, search

    work = Path(args.work)
    folder = work / "threshold-variants"
    shutil.rmtree(folder, ignore_errors=True)
    pairs = _variants(HYMENOPTERA, folder)
    cache = fc.extract(str(folder), cache_dir=str(work / "cache"), **{**EXTRACT, "progress": False}).cache
    X, _, paths = store.load_features(cache, "train")
    X, row = normalize(X), {p: i for i, p in enumerate(paths)}
    by_kind: dict[str, list[float]] = {}
    for original, variant, kind in pairs:
        by_kind.setdefault(kind, []).append(float(X[row[original]] @ X[row[variant]]))
    print(f"cosine of a variant to its original (40 hymenoptera val images, MobileNetV2; {uptime()}):")
    for kind, values in by_kind.items():
        v = np.array(values)
        print(f"  {kind:12s} min {v.min():.3f}  5% {np.quantile(v, .05):.3f}  median {np.median(v):.3f}  "
              f"share >= 0.90: {(v >= .90).mean():.2f}  >= 0.85: {(v >= .85).mean():.2f}")
    for name in ("hymenoptera", "fashion-mnist"):
        if name not in caches(work):
            continue
        parts = [store.load_features(caches(work)[name], s)[0] for s in store.info(caches(work)[name])["splits"]]
        sims, _, method = search(np.vstack(parts), 1)
        s = sims[:, 0]
        print(f"  {name} unmodified, each image's most similar other image ({method}): median {np.median(s):.3f}  "
              f"99% {np.quantile(s, .99):.3f}  99.9% {np.quantile(s, .999):.3f}  max {s.max():.3f}  "
              f"pairs >= 0.90: {(s >= .90).sum()}")


# --------------------------------------------------------------------------- measuring


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, scores))


def measure_one(name: str, cache: str, truth: dict, threshold: float | None) -> dict:
    import featurecache as fc

    kwargs = {} if threshold is None else {"threshold": threshold}
    started = time.perf_counter()
    res = fc.audit(cache, **kwargs)
    seconds = time.perf_counter() - started
    r = res.report
    leaks = {(p["a"]["path"], p["b"]["path"]) for p in r["pairs"] if p["kind"] == "leak"}
    planted = {(x["train"], x["held"]): x["kind"] for x in truth["leaks"]}
    found = {k for k in planted if k in leaks}
    by_kind = {kind: f"{sum(1 for k, v in planted.items() if v == kind and k in found)}/"
                     f"{sum(1 for v in planted.values() if v == kind)}" for kind in set(planted.values())}
    flips = {x["path"] for x in truth["flips"]}
    flagged = {i["path"] for i in r["label_issues"] if i["split"] == "train"}
    ranking = r["train_ranking"]
    top = {row[0] for row in ranking[:2 * len(flips)]}
    scores = np.array([row[1] for row in ranking])
    positive = np.array([row[0] in flips for row in ranking])
    out = {
        "data": name, "seconds": round(seconds, 2), "head": r["head"], "threshold": r["options"]["threshold"],
        "leaks_found": len(leaks), "planted_leaks": len(planted), "leak_recall": len(found) / len(planted),
        "leak_precision": len(found) / max(1, len(leaks)), "leak_recall_by_kind": by_kind,
        "flips": len(flips), "flagged_train": len(flagged), "flip_recall_flagged": len(flips & flagged) / len(flips),
        "flip_precision_flagged": len(flips & flagged) / max(1, len(flagged)),
        "flip_recall_top2x": len(flips & top) / len(flips), "flip_auroc": auroc(scores, positive),
        "counts": r["counts"],
    }
    for t in (0.925, 0.95, 0.975, 0.99):  # the same pairs at higher thresholds (byte-identical ones always count)
        kept = {(p["a"]["path"], p["b"]["path"]) for p in r["pairs"] if p["kind"] == "leak"
                and (p["similarity"] >= t or p["found_by"] == "identical bytes")}
        out[f"at {t}"] = {"leaks": len(kept), "recall": len(set(planted) & kept) / len(planted),
                          "precision": len(set(planted) & kept) / max(1, len(kept))}
    print(json.dumps(out))
    return out


def describe_unmodified(name: str, cache: str) -> None:
    import featurecache as fc

    r = fc.audit(cache).report
    c = r["counts"]
    print(f"{name} unmodified: leaks {c['leaks'] or 'none'}, conflicts {c['conflicts']}, duplicates {c['duplicates']} "
          f"({c['identical_bytes']} byte-identical), label issues {c['label_issues']}; top outliers: "
          + ", ".join(f"{o['path']} ({o['score']:.3f})" for o in r["outliers"][:5]))
    for p in r["pairs"][:8]:
        print(f"  {p['kind']}: {p['a']['path']} ~ {p['b']['path']} ({p['similarity']:.4f}, {p['found_by']})")
    for i in r["label_issues"][:8]:
        print(f"  label: {i['path']} given {i['label']}, suggested {i['suggested']} ({i['score']:.3f})")
    print(f"  most confused: {r['confused'][:3]}")


def cmd_measure(args) -> None:
    work = Path(args.work)
    found = caches(work)
    print(uptime())
    results = []
    for name in ("hymenoptera", "fashion-mnist"):
        if f"{name}-planted" in found:
            truth = load(work / f"{name}-planted" / "truth.json")
            results.append(measure_one(name, found[f"{name}-planted"], truth, args.threshold))
        if name in found:
            describe_unmodified(name, found[name])
    (work / "measure.json").write_text(json.dumps(results, indent=1))
    print(uptime())


# --------------------------------------------------------------------------- acting on it


def _test_correct(run_dir: str, cache: str, rows: np.ndarray) -> np.ndarray:
    from featurecache import store
    from featurecache.metrics import class_probabilities
    from featurecache.sweep.runs import load_head

    estimator, _ = load_head(run_dir, "best")
    features = json.loads((Path(run_dir) / "run.json").read_text()).get("features", "penultimate")
    X, y, _ = store.load_features(cache, "test", features=features)  # the feature set the run learnt from
    proba = class_probabilities(estimator, X[rows], len(store.info(cache)["classes"]))
    return proba.argmax(axis=1) == y[rows]


def cmd_exclude(args) -> None:
    """Test accuracy of the default sweep on planted Fashion-MNIST, with and without --exclude of the flagged
    labels and the leaks, on the same test images (those the exclusion keeps), with the paired-bootstrap
    interval of the difference."""
    import featurecache as fc
    from featurecache import store
    from featurecache.metrics import paired_difference

    work = Path(args.work)
    cache = caches(work)["fashion-mnist-planted"]
    threshold = args.threshold or 0.975
    from featurecache.auditing.stage import AUDIT_FILE, AuditResult, audit_dir_of

    saved = audit_dir_of(cache) / AUDIT_FILE  # the default audit that measure wrote, else a new one
    result = (AuditResult(str(saved.parent), load(saved)) if saved.is_file() else fc.audit(cache))
    leaks = [f"{p['a']['path']}\t{p['b']['path']}" for p in result.report["pairs"] if p["kind"] == "leak"
             and (p["similarity"] >= threshold or p["found_by"] == "identical bytes")]
    listing = work / f"exclude-labels-leaks-{threshold}.txt"
    lines = result.lines("labels") + leaks
    listing.write_text(f"# fc audit --threshold {threshold}: labels, leaks\n" + "\n".join(lines) + "\n")
    print(f"{uptime()}; excluding {len(result.lines('labels'))} flagged labels and {len(leaks)} leaks "
          f"(cosine >= {threshold} or byte-identical)")
    started = time.perf_counter()
    plain = fc.fit_head(cache, progress=True)
    t_plain = time.perf_counter() - started
    excluded = fc.fit_head(cache, exclude=str(listing), progress=True)
    t_excluded = time.perf_counter() - started - t_plain
    left_out = json.loads((Path(excluded.run_dir) / "run.json").read_text())["exclude"]
    test_paths = store.load_paths(cache, "test")
    dropped = {p for line in lines for p in line.split("\t")}
    rows = np.array([i for i, p in enumerate(test_paths) if p not in dropped])
    a, b = _test_correct(excluded.run_dir, cache, rows), _test_correct(plain.run_dir, cache, rows)
    diff = paired_difference(a, b)
    out = {"threshold": threshold, "excluded": left_out, "test_rows": len(rows),
           "plain": {"best": plain.best, "test_accuracy": float(b.mean()), "seconds": round(t_plain, 1)},
           "excluded_run": {"best": excluded.best, "test_accuracy": float(a.mean()), "seconds": round(t_excluded, 1)},
           "difference": diff, "load": uptime()}
    print(json.dumps(out, indent=1))
    (work / "exclude.json").write_text(json.dumps(out, indent=1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=[*sorted(STEPS), "all"])
    parser.add_argument("--work", default="/tmp/fc-audit-bench")
    parser.add_argument("--only", nargs="*", help="extract: these data sets only")
    parser.add_argument("--threshold", type=float, default=None,
                        help="measure: fc audit --threshold (default: its default); exclude: default 0.975")
    args = parser.parse_args(argv)
    for step in (list(STEPS) if args.step == "all" else [args.step]):
        STEPS[step](args)


STEPS = {"plant": cmd_plant, "extract": cmd_extract, "threshold": cmd_threshold, "measure": cmd_measure,
         "exclude": cmd_exclude}

if __name__ == "__main__":
    main()
