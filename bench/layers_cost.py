"""What storing the stage ends costs `fc extract`: the same extraction with and without them,
side by side in one run.

``fc extract`` stores, by default, the pooled outputs of the blocks that end the backbone's
stages where its source names them (MobileNetV2: ``features.6``, ``features.13`` and
``features.17``; ``--layers none`` turns it off). They come from the same forward pass, so
the extra cost is the pooling and the wider rows written to the file. This extracts each data
set into fresh caches, alternating the two settings ``--repeats`` times, and prints the
fastest time of each and their ratio. The default is kept only while the ratio is at most 1.10.

Two data sets: the tutorial's photos (``--data``, both folders) and ``--fashion-images``
28-pixel Fashion-MNIST images (half per split), both at the backbone's 224-pixel crop.

    python bench/layers_cost.py [--repeats 3] [--fashion-images 4000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree, also without PYTHONPATH

import featurecache
from featurecache.backbones.models import default_layers

REPO = Path(__file__).resolve().parents[1]
HYMENOPTERA = REPO.parent / "shared" / "data" / "hymenoptera_data"
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
GOAL = 1.10


def seconds(data: str, cache_dir: str, layers, **options) -> float:
    start = time.perf_counter()
    featurecache.extract(data, cache_dir=cache_dir, layers=layers, progress=False, **options)
    return time.perf_counter() - start


def compare(label: str, data: str, args, **options) -> float:
    times: dict[str, list[float]] = {"none": [], "stage ends": []}
    for repeat in range(args.repeats):
        order = ["none", "stage ends"] if repeat % 2 == 0 else ["stage ends", "none"]
        for setting in order:
            with tempfile.TemporaryDirectory() as tmp:
                layers = "none" if setting == "none" else "auto"
                times[setting].append(seconds(data, tmp, layers, backbone=args.backbone, weights=args.weights,
                                              **options))
    plain, tapped = min(times["none"]), min(times["stage ends"])
    print(f"{label}: without {plain:.2f} s, with the stage ends {tapped:.2f} s (fastest of {args.repeats}); "
          f"ratio {tapped / plain:.3f} ({'within' if tapped / plain <= GOAL else 'above'} the {GOAL:.2f} limit)",
          flush=True)
    return tapped / plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default="IMAGENET1K_V1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fashion-images", type=int, default=4000, help="Fashion-MNIST images (both splits)")
    parser.add_argument("--data", type=Path, default=HYMENOPTERA)
    args = parser.parse_args()
    print(f"{args.backbone} stage ends: {', '.join(default_layers(args.backbone))}", flush=True)
    compare(f"photos ({args.data.name})", str(args.data), args)
    if args.fashion_images and Path(FASHION_MNIST).is_dir():
        compare(f"Fashion-MNIST, {args.fashion_images:,} images", "torchvision:FashionMNIST", args,
                root=FASHION_MNIST, limit=args.fashion_images // 2)


if __name__ == "__main__":
    main()
