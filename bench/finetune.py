"""Stage three against the fine-tuning loop of the PyTorch transfer-learning tutorial.

Both sides train every layer of MobileNetV2 (IMAGENET1K_V1) on the train split and evaluate
on val after each epoch; the table gives the seconds of each epoch (training and evaluation)
and the val accuracy after it.

- tutorial: a new random last Linear layer, ImageFolder with RandomResizedCrop(224) + horizontal
  flip for train and Resize(256) + CenterCrop(224) for val, batch 4, 4 workers, fp32,
  SGD(lr=0.001, momentum=0.9) over all parameters, StepLR(7, 0.1), batch norm in train mode;
- featurecache: ``fc extract``, ``fc fit-head --head logreg`` and ``fc finetune RUN --epochs N``
  with its defaults, run as the commands a user types into a fresh temporary cache (the
  extraction and the head fit are one-off costs and printed apart). Epoch 0 is the step-0
  evaluation: the logreg head on the backbone, before any update.

    python bench/finetune.py [--data ../shared/data/hymenoptera_data] [--epochs 3] [--batch-size 8]

``--modes`` compares, in one run on one cache and one stage-two run, full fine-tuning
(``--unfreeze all``), ``--unfreeze last:2`` from images and ``--unfreeze last:2
--from-activations``: seconds per epoch, selection accuracy after each epoch, the one-time cost
of storing the activations, and the paired-bootstrap interval of the accuracy difference of the
exported (best-epoch) networks on the run's final split::

    python bench/finetune.py --modes [--epochs 3] [--augment-views 2]
    python bench/finetune.py --modes --data torchvision:FashionMNIST --root /usr/share/datasets/fashion-mnist \
        --limit 5000 --split train=0.8,val=0.2

Absolute times are noisy on shared machines: the load average is printed with them. Val
accuracy chose the best epoch on both sides; neither number is a held-out estimate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision import datasets, transforms

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hymenoptera_data"
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def fc(*args: str) -> dict:
    """Run one ``fc`` command as a user would and return its ``--json`` output (its stderr when it fails)."""
    out = subprocess.run([sys.executable, "-m", "featurecache", *args, "--json"], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"fc {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(out.stdout)


def featurecache_side(data: Path, epochs: int, batch_size: int | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="fc-bench-") as cache_dir:
        start = time.perf_counter()
        extracted = fc("extract", str(data), "--backbone", "mobilenet_v2", "--weights", "IMAGENET1K_V1",
                       "--cache-dir", cache_dir)
        # on the penultimate features: --from-activations stores one block's input, and a head on
        # stored layers would read blocks before it too
        run = fc("fit-head", extracted["cache"], "--head", "logreg", "--features", "penultimate",
                 "--cache-dir", cache_dir)
        prepared = time.perf_counter() - start
        start = time.perf_counter()
        extra = ["--batch-size", str(batch_size)] if batch_size else []
        tuned = fc("finetune", run["run_dir"], "--epochs", str(epochs), "--patience", "0", *extra,
                   "--cache-dir", cache_dir)
        wall = time.perf_counter() - start
        history = json.loads((Path(tuned["model"]).parent / "history.json").read_text())
    return {"prepare_seconds": prepared, "wall_seconds": wall, "result": tuned, "history": history}


def tutorial_side(data: Path, epochs: int, seed: int = 0) -> list[dict]:
    """The tutorial's ``train_model`` in fine-tuning mode, timed per epoch."""
    torch.manual_seed(seed)
    tf = {
        "train": transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                     transforms.ToTensor(), transforms.Normalize(MEAN, STD)]),
        "val": transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                                   transforms.ToTensor(), transforms.Normalize(MEAN, STD)]),
    }
    images = {s: datasets.ImageFolder(str(data / s), tf[s]) for s in ("train", "val")}
    loaders = {s: torch.utils.data.DataLoader(images[s], batch_size=4, shuffle=True, num_workers=4)
               for s in ("train", "val")}
    model = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")
    model.classifier[1] = nn.Linear(model.classifier[1].in_features, len(images["train"].classes))
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    history = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        model.train()
        loss_sum = 0.0
        for x, y in loaders["train"]:
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * x.size(0)
        scheduler.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in loaders["val"]:
                correct += int((model(x).argmax(1) == y).sum())
        history.append({"epoch": epoch, "seconds": time.perf_counter() - start,
                        "train_loss": loss_sum / len(images["train"]), "val_accuracy": correct / len(images["val"])})
    return history


MODES = {  # the pair the goal is about first, so that it is measured side by side
    "last:2 images": ["--unfreeze", "last:2", "--from-images"],
    "last:2 activations": ["--unfreeze", "last:2", "--from-activations"],
    "full": ["--unfreeze", "all"],
}


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def final_correct(folder: Path) -> tuple[str, np.ndarray]:
    """The final split of the run a fine-tuning folder belongs to, and whether its model.pt is right on each image."""
    from featurecache import store
    from featurecache.data.images import ImageTensors, image_loader
    from featurecache.finetuning.network import load_exported
    from featurecache.finetuning.trainer import cache_images

    run = json.loads((folder.parent.parent / "run.json").read_text())
    split = run.get("final_split", run["selection_split"])
    model, info = load_exported(folder / "model.pt")
    data, labels = cache_images(store.info(run["cache"]), split)
    from featurecache.data.preprocess import Preprocess

    images = ImageTensors(data, np.arange(len(labels)), Preprocess(**info["preprocess"]), None)
    predicted = np.zeros(len(labels), dtype=np.int64)
    with torch.inference_mode():
        for index, batch, _ in image_loader(images, 64, 0, torch.device("cpu")):
            predicted[index.numpy()] = model(batch).argmax(1).numpy()
    return split, predicted == labels


def modes_side(args) -> None:
    """Full fine-tuning, last:2 from images and last:2 from stored activations, side by side."""
    from featurecache.metrics import paired_difference

    source = ["--root", args.root] if args.root else []
    limit = ["--limit", str(args.limit)] if args.limit else []
    limit += ["--split", args.split] if args.split else []
    batch = ["--batch-size", str(args.batch_size)] if args.batch_size else []
    keep = contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory(prefix="fc-bench-")
    with keep as cache_dir:
        start = time.perf_counter()
        extracted = fc("extract", str(args.data), *source, *limit, "--backbone", "mobilenet_v2", "--weights",
                       "IMAGENET1K_V1", "--augment-views", str(args.augment_views), "--cache-dir", cache_dir)
        # on the penultimate features: --from-activations stores one block's input, and a head on
        # stored layers would read blocks before it too
        run = fc("fit-head", extracted["cache"], "--head", "logreg", "--features", "penultimate",
                 "--cache-dir", cache_dir)
        print(f"extract (with {args.augment_views} views per train image) + fit-head logreg "
              f"{time.perf_counter() - start:.1f} s (once); load {_load()}", flush=True)
        rows = {}
        for mode, extra in MODES.items():
            load_before = _load()
            start = time.perf_counter()
            tuned = fc("finetune", run["run_dir"], "--epochs", str(args.epochs), "--patience", "0", *extra, *batch,
                       "--cache-dir", cache_dir)
            folder = Path(tuned["model"]).parent
            history = json.loads((folder / "history.json").read_text())
            stored = folder / "activations.json"
            rows[mode] = {"wall": time.perf_counter() - start, "history": history, "folder": folder,
                          "load": f"{load_before} -> {_load()}",
                          "stored": json.loads(stored.read_text()) if stored.is_file() else None}
            trained = [h["seconds"] for h in history if h["epoch"] > 0]
            print(f"{mode}: {rows[mode]['wall']:.1f} s wall, {sum(trained) / len(trained):.2f} s per epoch, "
                  f"selection accuracy by epoch {[round(h['val_accuracy'], 4) for h in history]}; "
                  f"load {rows[mode]['load']}", flush=True)
        for row in rows.values():
            row["split"], row["correct"] = final_correct(row["folder"])
    _modes_table(args, rows, paired_difference)


def _modes_table(args, rows: dict, paired_difference) -> None:
    print()
    print(f"{'mode':<20} {'s/epoch':>8} {'wall s':>7}  {'selection accuracy by epoch':<32} {'final acc':>9}  load")
    for mode, row in rows.items():
        trained = [h for h in row["history"] if h["epoch"] > 0]
        row["per_epoch"] = sum(h["seconds"] for h in trained) / len(trained)
        accs = " ".join(f"{h['val_accuracy']:.4f}" for h in row["history"])
        print(f"{mode:<20} {row['per_epoch']:>8.2f} {row['wall']:>7.1f}  {accs:<32} {row['correct'].mean():>9.4f}  "
              f"{row['load']}")
    live, acts = rows["last:2 images"], rows["last:2 activations"]
    stored = acts["stored"]
    print()
    print(f"activations {stored['name']}: {stored['bytes_per_image']:,} bytes per image, {stored['bytes'] / 2**20:.1f} "
          f"MiB for {sum(stored['parts'].values()):,} rows {stored['parts']}; stored once in "
          f"{stored['store_seconds']:.1f} s")
    print(f"seconds per epoch, last:2 images / last:2 activations: {live['per_epoch'] / acts['per_epoch']:.2f}x "
          f"(full / last:2 activations: {rows['full']['per_epoch'] / acts['per_epoch']:.2f}x)")
    print(f"wall time of fc finetune, last:2 images / last:2 activations (storing included): "
          f"{live['wall'] / acts['wall']:.2f}x")
    epochs_to_pay = stored["store_seconds"] / max(1e-9, live["per_epoch"] - acts["per_epoch"])
    print(f"the one-time store pays for itself after {epochs_to_pay:.1f} epochs")
    for other in [m for m in ("last:2 images", "full") if m in rows]:
        paired = paired_difference(acts["correct"], rows[other]["correct"])
        low, high = paired["ci"]
        print(f"{acts['split']} accuracy, last:2 activations - {other}: {paired['difference']:+.4f} "
              f"[{low:+.4f}, {high:+.4f}] ({'within' if low <= 0 <= high else 'outside'} the paired interval)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="fc finetune --batch-size (default: its own default, 32; 8 is faster on small CPUs)")
    parser.add_argument("--modes", action="store_true",
                        help="compare full, last:2 from images and last:2 from stored activations instead")
    parser.add_argument("--root", default=None, help="--modes: fc extract --root (torchvision:NAME data)")
    parser.add_argument("--limit", type=int, default=None, help="--modes: fc extract --limit")
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="--modes: the cache folder to use and keep (default: a temporary one); a rerun reuses "
                             "its extraction, head and finished fine-tunings, whose seconds are the first run's")
    parser.add_argument("--split", default=None,
                        help="--modes: fc extract --split (train=0.8,val=0.2 carves a val split from a torchvision "
                             "dataset's train split, which fine-tuning needs to stop on)")
    parser.add_argument("--augment-views", type=int, default=2, help="--modes: fc extract --augment-views")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*worker.*")  # the tutorial's 4 workers on a smaller machine
    if args.modes:
        print(f"data {args.data}, {args.epochs} epochs, torch {torch.__version__}, {os.cpu_count()} CPUs, "
              f"load average {_load()}", flush=True)
        modes_side(args)
        return

    print(f"data {args.data}, {args.epochs} epochs, fc finetune batch size {args.batch_size or 'default'}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)
    args.data = Path(args.data)
    ours = featurecache_side(args.data, args.epochs, args.batch_size)
    print(f"featurecache: extract + fit-head logreg {ours['prepare_seconds']:.1f} s (once); "
          f"fc finetune wall time {ours['wall_seconds']:.1f} s; load average {os.getloadavg()[0]:.2f}", flush=True)
    tutorial = tutorial_side(args.data, args.epochs)
    print(f"tutorial done; load average {os.getloadavg()[0]:.2f}")

    by_epoch = {h["epoch"]: h for h in ours["history"]}
    print()
    print(f"{'epoch':>5}  {'tutorial s':>10}  {'tutorial val acc':>16}  {'fc s':>6}  {'fc val acc':>10}")
    start = by_epoch[0]
    print(f"{0:>5}  {'':>10}  {'':>16}  {start['seconds']:>6.1f}  {start['val_accuracy']:>10.4f}   "
          "(step 0: the logreg head, no update)")
    for t in tutorial:
        f = by_epoch.get(t["epoch"])
        fc_cells = f"{f['seconds']:>6.1f}  {f['val_accuracy']:>10.4f}" if f else f"{'':>6}  {'':>10}"
        print(f"{t['epoch']:>5}  {t['seconds']:>10.1f}  {t['val_accuracy']:>16.4f}  {fc_cells}")
    tut_s = sum(t["seconds"] for t in tutorial) / len(tutorial)
    trained = [h for h in ours["history"] if h["epoch"] > 0]
    fc_s = sum(h["seconds"] for h in trained) / len(trained)
    result = ours["result"]
    print()
    print(f"seconds per epoch: tutorial {tut_s:.1f}, featurecache {fc_s:.1f} ({tut_s / fc_s:.2f}x)")
    print(f"best val accuracy: tutorial {max(t['val_accuracy'] for t in tutorial):.4f}, "
          f"featurecache {result['best_accuracy']:.4f} (head {result['head_accuracy']:.4f}, "
          f"step 0 {result['start_accuracy']:.4f})")


if __name__ == "__main__":
    main()
