"""One prepared check of the GPU path: stage one, fine-tuning and prediction, in a few minutes.

It runs from the working tree on a machine with only torch, torchvision, h5py and
scikit-learn, and fetches nothing::

    PYTHONPATH=. python bench/device_check.py [--hub build/hub] [--images 3000]
    PYTHONPATH=. python bench/device_check.py --device cpu --quick      # the dry run of the tests

It writes its own photo-sized JPEGs (about 500x375, smooth colour fields with sensor-like
noise) so that decoding costs what it costs on photos, and prints, measured in one run:

1. the pure-forward limit: MobileNetV2 at batch 256 (``--quick``: 16), channels_last, the
   precision ``fc extract`` picks (fp16 autocast on a GPU), over tensors already on the device;
2. end-to-end ``featurecache.extract`` with CPU decoding and with GPU decoding, and their
   ratios to the limit;
3. the cosine of AMP features (fp16 autocast; bf16 on a CPU) against fp32;
4. one fine-tuning epoch (backbone and a linear head) with AMP and with fp32: seconds and loss;
5. one ``--unfreeze last:2`` epoch from images and one from the stored input of the first trained
   block (fc's own split of the network, as ``fc finetune --from-activations`` trains), with the
   one-time cost of storing those maps;
6. ``featurecache.predict`` throughput with an exported model.

The MobileNetV2 ImageNet weights are read from ``--hub`` (a torch hub folder holding
``checkpoints/mobilenet_v2-b0353104.pth``) or torch's own hub folder; without them the
weights are random, and the script says so.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree, also without PYTHONPATH

import featurecache
from featurecache import runtime
from featurecache.backbones import models as backbones
from featurecache.data.images import ImageTensors, image_loader, normalize_batch
from featurecache.data.preprocess import Preprocess
from featurecache.data.sources import open_dataset

WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's MobileNet_V2_Weights.IMAGENET1K_V1


# --------------------------------------------------------------------------- the images


def _photo(path: Path, seed: int, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
    noisy = np.asarray(field, dtype=np.float32) + rng.normal(0, 12, size=(size[1], size[0], 3))
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)


def write_photos(root: Path, n: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> Path:
    """``n`` photo-like JPEGs in ``root/{train,val}/{a,b}/`` (four in five in train)."""
    paths = [root / ("val" if i % 5 == 4 else "train") / ("ab"[i % 2]) / f"{i:05d}.jpg" for i in range(n)]
    for folder in {p.parent for p in paths}:
        folder.mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(runtime.usable_cores()) as pool:
        list(pool.map(lambda i: _photo(paths[i], seed + i, size), range(n)))
    return root


# --------------------------------------------------------------------------- the measurements


@dataclass
class Check:
    """What every measurement shares: the device, the weights, the photos and the sizes."""

    device: torch.device
    weights: str
    data: Path
    tmp: Path
    quick: bool
    batch_size: int | None  # fc extract's (None: fc's default)

    @property
    def pre(self) -> dict:
        """fc extract's preprocessing options: the weights' own, or small crops for a dry run."""
        return {"resize": 64, "crop": 56} if self.quick else {}

    @property
    def amp(self) -> str:
        return "fp16" if self.device.type == "cuda" else "bf16"

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def network(self) -> tuple[torch.nn.Module, Preprocess]:
        """MobileNetV2 and a seeded linear head on the device, and the preprocessing."""
        from featurecache.finetuning.network import Network

        pre = backbones.resolve_preprocess("mobilenet_v2", self.weights, **self.pre)
        net = backbones.build("mobilenet_v2", weights=self.weights, preprocess=pre)
        torch.manual_seed(0)
        return Network(net.model, torch.nn.Linear(net.feature_dim, 2)).to(self.device), pre

    def extract(self, name: str, **options) -> tuple[float, object]:
        """End-to-end images/s of featurecache.extract into a fresh cache, and its result."""
        start = time.perf_counter()
        res = featurecache.extract(str(self.data), weights=self.weights, device=str(self.device),
                                   cache_dir=str(self.tmp / name), progress=False, **self.pre, **options)
        n = sum(s["n"] + s["skipped"] for s in res.splits.values())
        return n / (time.perf_counter() - start), res


def forward_limit(check: Check) -> float:
    """Images/s of the backbone alone over a batch already on the device."""
    precision = runtime.resolve_precision("auto", check.device)
    batch, seconds = (8, 0.0) if check.quick else (256, 3.0)
    network, pre = check.network()
    model = network.backbone.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, pre.crop, pre.crop, device=check.device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), runtime.autocast(check.device, precision):
        for _ in range(1 if check.quick else 5):
            model(x)
        check.sync()
        start, n = time.perf_counter(), 0
        while n == 0 or time.perf_counter() - start < seconds:
            model(x)
            n += 1
            if n % 10 == 0:
                check.sync()
        check.sync()
    rate = n * batch / (time.perf_counter() - start)
    print(f"pure forward limit      {rate:9.1f} images/s  (batch {batch}, {precision}, channels_last, "
          f"{pre.crop}x{pre.crop}, on {check.device})")
    return rate


def extraction(check: Check, limit: float) -> None:
    """fc extract with CPU and with GPU decoding, against the limit and against each other."""
    caches = {}
    for decode in ("cpu", "gpu"):
        if decode == "gpu" and check.device.type != "cuda":
            print("fc extract, gpu decode  skipped: no CUDA device")
            continue
        rate, res = check.extract(f"decode-{decode}", decode=decode, batch_size=check.batch_size)
        caches[decode] = res.cache
        print(f"fc extract, {decode} decode  {rate:9.1f} images/s  end to end ({res.images_per_s:.1f} in the loop); "
              f"{rate / limit:.2f} of the limit")
    if len(caches) == 2:
        print(f"gpu decode against cpu  cosine {_cosine(caches['cpu'], caches['gpu']):.6f} (goal >= 0.999)")


def _cosine(a: str, b: str) -> float:
    """The smallest cosine between the rows of two caches of the same images."""
    worst = 1.0
    for split in ("train", "val"):
        (x, _, pa), (y, _, pb) = featurecache.load_features(a, split), featurecache.load_features(b, split)
        if pa != pb:
            raise SystemExit(f"{a} and {b} hold other images")
        cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
        worst = min(worst, float(cos.min()))
    return worst


def amp_cosine(check: Check) -> None:
    limit = 8 if check.quick else 256
    runs = {p: check.extract(f"precision-{p}", precision=p, limit=limit, decode="cpu")[1] for p in (check.amp, "fp32")}
    print(f"{check.amp} autocast vs fp32   cosine {_cosine(runs[check.amp].cache, runs['fp32'].cache):.6f} "
          "(goal >= 0.999)")


# --------------------------------------------------------------------------- fine-tuning and prediction


def finetune_epoch(check: Check, network, pre: Preprocess, precision: str) -> tuple[float, float]:
    """Seconds and mean loss of one epoch over the train split, every layer trained."""
    dataset = open_dataset(str(check.data))
    train = np.array([i for i, r in enumerate(dataset.records) if r.split == "train"])
    labels = torch.tensor([r.label for r in dataset.records])
    loader = image_loader(ImageTensors(dataset, train, pre, None), 8 if check.quick else 64, runtime.usable_cores(),
                          check.device, order=range(len(train)))
    network = network.to(memory_format=torch.channels_last).train().requires_grad_(True)
    opt = torch.optim.AdamW(network.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(check.device.type, enabled=precision == "fp16")
    losses, start = [], time.perf_counter()
    for index, images, _ in loader:
        x = normalize_batch(images.to(check.device, non_blocking=True), pre)
        with runtime.autocast(check.device, precision):
            loss = torch.nn.functional.cross_entropy(network(x).float(), labels[index].to(check.device))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss))
    check.sync()
    return time.perf_counter() - start, float(np.mean(losses))


def finetuning(check: Check) -> None:
    network, pre = check.network()
    seconds = {}
    for precision in (check.amp, "fp32"):
        seconds[precision], loss = finetune_epoch(check, copy.deepcopy(network), pre, precision)
        print(f"fine-tune epoch, {precision:4s}  {seconds[precision]:7.2f} s  loss {loss:.4f}")
    print(f"AMP speed-up            {seconds['fp32'] / seconds[check.amp]:.2f}x")


def _last_blocks(network, n: int) -> list[torch.nn.Parameter]:
    """Freeze the backbone but its last ``n`` blocks (``fc finetune --unfreeze last:N``); their parameters
    and the head's, to train."""
    from featurecache.finetuning.blocks import named_blocks

    network.requires_grad_(False)
    blocks = [network.backbone.get_submodule(name) for name in list(named_blocks(network.backbone))[-n:]]
    params = [p for block in blocks for p in block.parameters()] + list(network.head.parameters())
    for param in params:
        param.requires_grad_(True)
    return params


def _train_epoch(check: Check, model, params, batches, precision: str) -> tuple[float, float]:
    """Seconds and mean loss of one AdamW epoch of ``model`` over ``batches`` of ``(inputs, labels)``."""
    opt = torch.optim.AdamW(params, lr=1e-4)
    scaler = torch.amp.GradScaler(check.device.type, enabled=precision == "fp16")
    losses, start = [], time.perf_counter()
    for x, y in batches:
        with runtime.autocast(check.device, precision):
            loss = torch.nn.functional.cross_entropy(model(x()).float(), y.to(check.device))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(float(loss))
    check.sync()
    return time.perf_counter() - start, float(np.mean(losses))


def from_activations(check: Check) -> None:
    """One ``last:2`` epoch from images and one from the stored input of the first trained block (what
    ``fc finetune --from-activations`` does, with fc's own block split), and the one-time store."""
    from featurecache.finetuning.activations import block_input, first_trained_block, tail
    from featurecache.finetuning.network import Network

    dataset = open_dataset(str(check.data))
    train = np.array([i for i, r in enumerate(dataset.records) if r.split == "train"])
    labels = torch.tensor([r.label for r in dataset.records])
    size, precision = 8 if check.quick else 64, check.amp

    def images(pre):
        loader = image_loader(ImageTensors(dataset, train, pre, None), size, runtime.usable_cores(), check.device,
                              order=range(len(train)))
        for index, batch, _ in loader:
            yield (lambda b=batch: normalize_batch(b.to(check.device, non_blocking=True), pre)), labels[index]

    network, pre = check.network()
    block = first_trained_block(network.backbone, "last:2")
    network = network.to(memory_format=torch.channels_last).eval()
    start, stored = time.perf_counter(), []
    with torch.no_grad(), runtime.autocast(check.device, precision):  # not inference tensors: they are trained on
        for x, y in images(pre):
            stored.append((block_input(network.backbone, block, x()).to(torch.float16), y))
    check.sync()
    store_s = time.perf_counter() - start
    per_image = stored[0][0][0].numel() * 2
    seconds = {}
    live = copy.deepcopy(network).train()
    seconds["images"], loss = _train_epoch(check, live, _last_blocks(live, 2), images(pre), precision)
    print(f"last:2 epoch from images       {seconds['images']:7.2f} s  loss {loss:.4f}")
    cached = copy.deepcopy(network).train()
    params = _last_blocks(cached, 2)
    part = Network(tail(cached.backbone, block), cached.head)
    batches = [((lambda m=m: m.float().contiguous(memory_format=torch.channels_last)), y) for m, y in stored]
    seconds["activations"], loss = _train_epoch(check, part, params, batches, precision)
    print(f"last:2 epoch from activations  {seconds['activations']:7.2f} s  loss {loss:.4f}; stored "
          f"{len(train)} maps of {per_image:,} bytes once in {store_s:.2f} s")
    print(f"from activations        {seconds['images'] / seconds['activations']:.2f}x faster per epoch")


def prediction(check: Check) -> None:
    from featurecache.finetuning.network import export
    from featurecache.finetuning.prediction import predict

    network, pre = check.network()
    path = export(network.eval(), pre, ["a", "b"], check.tmp / "model.pt", {"check": "device_check"})
    start = time.perf_counter()
    out = predict(str(path), [str(check.data)], device=str(check.device), progress=False)
    wall = time.perf_counter() - start
    print(f"fc predict              {len(out['predictions']) / wall:9.1f} images/s  end to end "
          f"({len(out['predictions'])} images, {len(out['skipped'])} skipped)")


# --------------------------------------------------------------------------- the script


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: cuda)")
    parser.add_argument("--hub", type=Path, default=None, help="a torch hub folder with the MobileNetV2 weights")
    parser.add_argument("--images", type=int, default=3000, help="photos to write (default: 3000)")
    parser.add_argument("--batch-size", type=int, default=None, help="fc extract's batch (default: fc's)")
    parser.add_argument("--quick", action="store_true", help="a dry run in seconds: few small images and crops")
    return parser.parse_args()


def _weights(hub: Path | None) -> str:
    if hub is not None:
        torch.hub.set_dir(str(hub))
    if (Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE).is_file():
        return "IMAGENET1K_V1"
    print(f"no {WEIGHTS_FILE} in {torch.hub.get_dir()}/checkpoints: random weights (pass --hub)")
    return "none"


def main() -> None:
    args = _arguments()
    device = runtime.resolve_device(args.device)
    weights = _weights(args.hub)
    n, size = (24, (160, 120)) if args.quick else (args.images, (500, 375))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{runtime.usable_cores()} CPU cores"
    print(f"torch {torch.__version__}, {name}, python {sys.version.split()[0]}, weights {weights}")
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        data = write_photos(Path(folder) / "photos", n, size)
        print(f"{n} JPEGs of {size[0]}x{size[1]} written in {time.perf_counter() - start:.1f} s")
        check = Check(device, weights, data, Path(folder), args.quick, args.batch_size)
        extraction(check, forward_limit(check))
        amp_cosine(check)
        finetuning(check)
        from_activations(check)
        prediction(check)
    print("device check done")


if __name__ == "__main__":
    warnings.simplefilter("ignore")  # TorchScript's deprecation, random weights, ...
    main()
