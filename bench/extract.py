"""End-to-end `fc extract` throughput against the pure-forward limit and the tutorial's loop.

Measured side by side in one run (absolute times are noisy on shared machines; read the ratios):

1. pure forward over pre-decoded tensors, twice: the usual loop (eager, channels_last, batch 32)
   and the same backbone in the form and batch size `fc extract` runs it (on a CPU a frozen
   TorchScript graph at batch 4, when that is faster): the limit of fc's own configuration;
2. `featurecache.extract` end to end, into a fresh cache (decode, resize, forward, write);
3. the PyTorch transfer-learning tutorial's loop: ImageFolder + transforms, batch 4, 4 workers,
   default memory layout, fp32, a forward pass over every image (what its fixed-feature-extractor
   mode pays per epoch before the tiny linear layer).

    python bench/extract.py [--data ../shared/data/hymenoptera_data] [--backbone mobilenet_v2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torchvision import datasets, transforms

import featurecache
from featurecache import backbones, runtime
from featurecache.data import open_dataset
from featurecache.images import ImageTensors, normalize_batch

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hymenoptera_data"


def pure_forward(model, tensors: list[torch.Tensor], preprocess, batch_size: int, repeats: int) -> float:
    """Images per second of ``model`` alone over pre-decoded uint8 tensors."""
    batches = [torch.stack(tensors[i:i + batch_size]) for i in range(0, len(tensors), batch_size)]
    with torch.inference_mode():
        model(normalize_batch(batches[0], preprocess))  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            for batch in batches:
                model(normalize_batch(batch, preprocess))
        seconds = time.perf_counter() - start
    return repeats * len(tensors) / seconds


def tutorial_loop(data: Path, backbone: str, weights: str) -> tuple[float, int]:
    """The tutorial's data pipeline and model call, forward only over train and val."""
    tf = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    model = torchvision.models.get_model(backbone, weights=None if weights == "none" else weights).eval()
    n, start = 0, time.perf_counter()
    with torch.no_grad():
        for split in ("train", "val"):
            loader = torch.utils.data.DataLoader(datasets.ImageFolder(str(data / split), tf), batch_size=4,
                                                 shuffle=True, num_workers=4)
            for x, _ in loader:
                model(x)
                n += len(x)
    return n / (time.perf_counter() - start), n


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default="IMAGENET1K_V1")
    parser.add_argument("--batch-size", type=int, default=None, help="fc extract --batch-size (default: fc's)")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=1, help="passes of the pure forward loops")
    parser.add_argument("--skip-tutorial", action="store_true")
    return parser.parse_args()


def forward_limits(args: argparse.Namespace, batch_size: int) -> tuple[float, float]:
    """Images/s of the pure forward pass: the usual loop, and fc's form of the backbone."""
    cpu = torch.device("cpu")
    net = backbones.build(args.backbone, weights=args.weights)
    dataset = open_dataset(args.data)
    images = ImageTensors(dataset, list(range(len(dataset.records))), net.preprocess, None)
    tensors = [t for _, t, reason in (images[i] for i in range(len(images))) if not reason]
    eager = net.model.to(memory_format=torch.channels_last)
    usual = pure_forward(eager, tensors, net.preprocess, 32, args.repeats)
    print(f"pure forward, usual     {usual:7.1f} images/s  "
          f"({len(tensors)} pre-decoded images, eager, batch 32, channels_last)")
    example = normalize_batch(torch.stack(tensors[:batch_size]), net.preprocess)
    model, mode = runtime.inference_model(eager, cpu, "fp32", example)
    limit = pure_forward(model, tensors, net.preprocess, batch_size, args.repeats)
    print(f"pure forward, fc's form {limit:7.1f} images/s  ({mode}, batch {batch_size})")
    return usual, limit


def main() -> None:
    args = _arguments()
    batch_size = args.batch_size or runtime.default_batch_size(torch.device("cpu"))
    print(f"torch {torch.__version__}, {runtime.usable_cores()} cores, {torch.get_num_threads()} threads")
    usual, limit = forward_limits(args, batch_size)
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        res = featurecache.extract(str(args.data), backbone=args.backbone, weights=args.weights,
                                   batch_size=args.batch_size, workers=args.workers, cache_dir=cache_dir,
                                   progress=False)
        wall = time.perf_counter() - start
    n = sum(s["n"] + s["skipped"] for s in res.splits.values())
    end_to_end = n / wall
    print(f"fc extract              {end_to_end:7.1f} images/s  end to end "
          f"({n} images in {wall:.1f} s, incl. start-up and writing)")
    print(f"                        {res.images_per_s:7.1f} images/s  "
          "extraction loop (compile + decode + forward + shard writes)")
    print(f"ratio to fc's form      {end_to_end / limit:.2f} end to end, "
          f"{res.images_per_s / limit:.2f} extraction loop  (goal >= 0.85)")
    print(f"ratio to usual forward  {end_to_end / usual:.2f} end to end, "
          f"{res.images_per_s / usual:.2f} extraction loop")
    if not args.skip_tutorial:
        tutorial, n_tut = tutorial_loop(args.data, args.backbone, args.weights)
        print(f"tutorial loop           {tutorial:7.1f} images/s  (batch 4, 4 workers, default layout, {n_tut} images)")
        print(f"speed-up over tutorial  {end_to_end / tutorial:.2f}x end to end")


if __name__ == "__main__":
    main()
