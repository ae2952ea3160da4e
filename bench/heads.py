"""Stage two against the PyTorch transfer-learning tutorial, and the batched linear trainer.

1. Wall time of ``fc extract`` (MobileNetV2 IMAGENET1K_V1, into a fresh temporary cache, so a
   real extraction) plus ``fc fit-head`` with the default sweep, both run as the commands a
   user types, against the tutorial's fixed-feature-extractor mode on the same data: the
   frozen backbone with a new last Linear layer, 25 epochs of ImageFolder with
   RandomResizedCrop(224) + horizontal flip for train and Resize(256) + CenterCrop(224) for
   val, batch 4, 4 workers, fp32, SGD(lr=0.001, momentum=0.9) on the new layer, StepLR(7, 0.1),
   keeping the epoch with the best val accuracy. Both sides pick their result on val (a
   head among the sweep, an epoch among 25); neither accuracy is a held-out estimate.
   ``--tutorial-epochs N`` runs N epochs and extrapolates the time to 25 (said so in the output).
2. Heads per minute of :func:`featurecache.heads.fit_linear_grid` (one pass trains the whole
   lr x weight-decay grid) against fitting the same ``linear`` heads one by one, on a
   50,000 x 1,280 feature matrix (:func:`featurecache.heads.benchmark_grid`).

    python bench/heads.py [--data ../shared/data/hymenoptera_data] [--tutorial-epochs 25]

Absolute times are noisy on shared machines: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision import datasets, transforms

from featurecache.heads import benchmark_grid

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hymenoptera_data"
TUTORIAL_EPOCHS = 25
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def fc(*args: str) -> dict:
    """Run one ``fc`` command as a user would and return its ``--json`` output."""
    out = subprocess.run([sys.executable, "-m", "featurecache", *args, "--json"], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout)


def featurecache_side(data: Path, jobs: int | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="fc-bench-") as cache_dir:
        start = time.perf_counter()
        extracted = fc("extract", str(data), "--backbone", "mobilenet_v2", "--weights", "IMAGENET1K_V1",
                       "--cache-dir", cache_dir)
        extract_seconds = time.perf_counter() - start
        assert not extracted["reused"], "the bench needs a real extraction"
        start = time.perf_counter()
        sweep = fc("fit-head", extracted["cache"], "--cache-dir", cache_dir, *(["--jobs", str(jobs)] if jobs else []))
        sweep_seconds = time.perf_counter() - start
    best = sweep["leaderboard"][0]
    return {"extract_seconds": extract_seconds, "sweep_seconds": sweep_seconds,
            "seconds": extract_seconds + sweep_seconds, "heads": len(sweep["leaderboard"]), "best": best["head"],
            "selection_split": best["selection_split"], "accuracy": best["selection_accuracy"]}


def tutorial_side(data: Path, epochs: int) -> dict:
    """The tutorial's ``train_model`` on a frozen MobileNetV2 with a new 2-class Linear layer."""
    start = time.perf_counter()
    tf = {
        "train": transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                     transforms.ToTensor(), transforms.Normalize(MEAN, STD)]),
        "val": transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
                                   transforms.Normalize(MEAN, STD)]),
    }
    image_datasets = {x: datasets.ImageFolder(str(data / x), tf[x]) for x in ("train", "val")}
    loaders = {x: torch.utils.data.DataLoader(image_datasets[x], batch_size=4, shuffle=True, num_workers=4)
               for x in ("train", "val")}
    model = torchvision.models.mobilenet_v2(weights="IMAGENET1K_V1")
    for param in model.parameters():
        param.requires_grad = False
    model.classifier[1] = nn.Linear(model.last_channel, len(image_datasets["train"].classes))
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.classifier[1].parameters(), lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    setup_seconds = time.perf_counter() - start

    best_acc, best_state, history = 0.0, copy.deepcopy(model.state_dict()), []
    epoch_seconds = []
    for _ in range(epochs):
        epoch_start = time.perf_counter()
        for phase in ("train", "val"):
            model.train() if phase == "train" else model.eval()
            corrects = 0
            for inputs, labels in loaders[phase]:
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                corrects += int((outputs.argmax(1) == labels).sum())
            if phase == "train":
                scheduler.step()
            else:
                acc = corrects / len(image_datasets["val"])
                history.append(acc)
                if acc > best_acc:
                    best_acc, best_state = acc, copy.deepcopy(model.state_dict())
        epoch_seconds.append(time.perf_counter() - epoch_start)
        print(f"  tutorial epoch {len(epoch_seconds)}/{epochs}: val acc {history[-1]:.4f}, "
              f"{epoch_seconds[-1]:.1f} s", file=sys.stderr)
    model.load_state_dict(best_state)
    measured = setup_seconds + sum(epoch_seconds)
    per_epoch = sum(epoch_seconds) / len(epoch_seconds)
    return {"epochs": epochs, "seconds_measured": measured,
            "seconds": setup_seconds + per_epoch * TUTORIAL_EPOCHS, "extrapolated": epochs != TUTORIAL_EPOCHS,
            "seconds_per_epoch": per_epoch, "accuracy": best_acc, "last_accuracy": history[-1]}


def compare_with_tutorial(data: Path, jobs: int | None, tutorial_epochs: int) -> None:
    """Run both sides and print their times, accuracies and the speed-up."""
    ours = featurecache_side(data, jobs)
    print(f"fc extract + fit-head (default sweep, {ours['heads']} heads): {ours['seconds']:.1f} s "
          f"(extract {ours['extract_seconds']:.1f} s, sweep {ours['sweep_seconds']:.1f} s); "
          f"best {ours['best']}: {ours['selection_split']} accuracy {ours['accuracy']:.4f}")
    print(f"tutorial fixed-feature-extractor, {tutorial_epochs} epochs ...", file=sys.stderr)
    tut = tutorial_side(data, tutorial_epochs)
    if tut["extrapolated"]:
        print(f"tutorial, {TUTORIAL_EPOCHS} epochs: {tut['seconds']:.1f} s EXTRAPOLATED from {tut['epochs']} "
              f"measured epochs ({tut['seconds_measured']:.1f} s, {tut['seconds_per_epoch']:.1f} s/epoch); "
              f"best val accuracy after {tut['epochs']} epochs (not 25) {tut['accuracy']:.4f}")
    else:
        print(f"tutorial, {TUTORIAL_EPOCHS} epochs: {tut['seconds']:.1f} s "
              f"({tut['seconds_per_epoch']:.1f} s/epoch); "
              f"best val accuracy {tut['accuracy']:.4f} (last epoch {tut['last_accuracy']:.4f})")
    speedup = tut["seconds"] / ours["seconds"]
    print(f"speed-up: {speedup:.1f}x{' (against the extrapolated time)' if tut['extrapolated'] else ''}; "
          f"val accuracy {ours['accuracy']:.4f} vs {tut['accuracy']:.4f} "
          f"({'equal or better' if ours['accuracy'] >= tut['accuracy'] else 'worse'})")


def report_grid(rows: int) -> None:
    """Heads per minute of the batched linear trainer against one by one."""
    grid = benchmark_grid(n=rows)
    print(f"batched linear trainer, {grid['heads']} heads x {grid['epochs']} epochs on {grid['n']} x {grid['d']} "
          f"({grid['classes']} classes, {grid['device']}): {grid['batched_seconds']:.1f} s = "
          f"{grid['batched_heads_per_minute']:.0f} heads/min; one by one {grid['one_by_one_seconds']:.1f} s = "
          f"{grid['one_by_one_heads_per_minute']:.0f} heads/min; ratio {grid['speedup']:.1f}x "
          f"(best held-out accuracy {grid['best_accuracy_batched']:.4f} vs {grid['best_accuracy_one_by_one']:.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--tutorial-epochs", type=int, default=TUTORIAL_EPOCHS,
                        help="Epochs of the tutorial to run; fewer than 25 are extrapolated to 25.")
    parser.add_argument("--jobs", type=int, default=None, help="fc fit-head --jobs (default: usable cores).")
    parser.add_argument("--skip-tutorial", action="store_true")
    parser.add_argument("--skip-grid", action="store_true")
    parser.add_argument("--grid-rows", type=int, default=50000)
    args = parser.parse_args()
    torch.manual_seed(0)
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # the tutorial's 4 workers, as it has them
    print(f"load average before: {', '.join(f'{x:.1f}' for x in os.getloadavg())}; "
          f"{len(os.sched_getaffinity(0))} cores, torch {torch.__version__}")
    if not args.skip_tutorial:
        compare_with_tutorial(args.data, args.jobs, args.tutorial_epochs)
    if not args.skip_grid:
        report_grid(args.grid_rows)
    print(f"load average after: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
