"""End-to-end `fc extract` against the pure-forward limits, measured side by side in one run.

Absolute figures swing by 2x on a shared machine: read the ratios, taken minutes apart on
the same machine.

1. The pure forward pass over pre-decoded hymenoptera images (nothing is decoded while timed):
   - the eager limit: the eager model in channels_last, the faster of batch 4 and batch 64;
   - fc's fastest form: what `fc extract` runs on this CPU, on all its cores
     (`runtime.inference_model` at fc's batch: a frozen TorchScript graph where that is faster);
   - the supported compilers, for the record: torch.compile (inductor, freezing) and torch.export
     with AOTInductor, with their compile time and the images it takes to pay it back;
2. `featurecache.extract` end to end into a fresh cache (start-up, decoding, forward, writing) on
   hymenoptera and on 10,000 Fashion-MNIST images (5,000 per split), with how it split the
   cores, against the goals: >= 0.85 of fc's form and >= 1.3x the eager limit;
3. hymenoptera under torchrun with 1 and with 2 processes (gloo), and the speed-up;
4. with ``--tutorial``, the PyTorch transfer-learning tutorial's loop on hymenoptera.

    python bench/extract.py [--data DIR] [--fashion-root DIR] [--quick] [--tutorial]

``--quick`` is a smoke test in well under a minute: a few images, no compilers.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree, also without PYTHONPATH

import featurecache
from featurecache import runtime, store
from featurecache.backbones import models as backbones
from featurecache.data.images import ImageTensors, normalize_batch
from featurecache.data.sources import open_dataset

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hymenoptera_data"
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
GOAL_OF_FC_FORM, GOAL_OF_EAGER = 0.85, 1.3


# --------------------------------------------------------------------------- the pure forward pass


def _batches(tensors: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Whole batches only: a compiled graph may be tied to its batch size."""
    return [torch.stack(tensors[i:i + batch_size]) for i in range(0, len(tensors) - batch_size + 1, batch_size)]


def pure_forward(model, batches: list[torch.Tensor], preprocess) -> float:
    """Images per second of ``model`` alone over pre-decoded uint8 batches."""
    with torch.inference_mode():
        model(normalize_batch(batches[0], preprocess))  # warm-up
        start = time.perf_counter()
        for batch in batches:
            model(normalize_batch(batch, preprocess))
        return sum(len(b) for b in batches) / (time.perf_counter() - start)


def best_rates(forms: dict, tensors: list[torch.Tensor], preprocess, passes: int) -> dict[str, float]:
    """The best of ``passes`` interleaved passes of every form: a busy moment spoils one pass, not a form."""
    rates: dict[str, float] = {}
    for _ in range(passes):
        for name, (model, batch_size) in forms.items():
            rate = pure_forward(model, _batches(tensors, batch_size), preprocess)
            rates[name] = max(rates.get(name, 0.0), rate)
    return rates


def decoded_images(data: Path, preprocess, limit: int | None) -> list[torch.Tensor]:
    dataset = open_dataset(data, limit=limit)
    images = ImageTensors(dataset, list(range(len(dataset.records))), preprocess, None)
    return [t for _, t, reason in (images[i] for i in range(len(images))) if not reason]


def forward_limits(args: argparse.Namespace, batch_size: int) -> tuple[float, float]:
    """The eager limit and fc's own fastest form; with the compilers unless --quick."""
    net = backbones.build(args.backbone, weights=args.weights)
    tensors = decoded_images(args.data, net.preprocess, args.limit)
    eager = net.model.to(memory_format=torch.channels_last)
    example = normalize_batch(torch.stack(tensors[:batch_size]), net.preprocess)
    fc_model, mode = runtime.inference_model(eager, torch.device("cpu"), "fp32", example)
    big = min(64, len(tensors))
    forms = {"eager, batch 4": (eager, 4), f"eager, batch {big}": (eager, big), f"fc: {mode}": (fc_model, batch_size)}
    rates = best_rates(forms, tensors, net.preprocess, args.passes)
    for name, rate in rates.items():
        print(f"pure forward, {name:24s} {rate:7.1f} images/s  ({len(tensors)} pre-decoded images)")
    eager_limit, fc_form = max(rates["eager, batch 4"], rates[f"eager, batch {big}"]), rates[f"fc: {mode}"]
    print(f"eager limit {eager_limit:.1f} images/s; fc's form {fc_form:.1f} images/s "
          f"({fc_form / eager_limit:.2f}x the eager limit)")
    if not args.quick:
        compilers(eager, example, tensors, net.preprocess, batch_size, fc_form)
    return eager_limit, fc_form


# --------------------------------------------------------------------------- the supported compilers


@contextlib.contextmanager
def _inductor_freezing():
    import torch._inductor.config as inductor

    before = inductor.freezing
    inductor.freezing = True
    try:
        yield
    finally:
        inductor.freezing = before


def _torch_compile(eager, example):
    model = torch.compile(eager)
    with torch.no_grad():
        model(example)
    return model


def _export_aoti(eager, example):
    with torch.no_grad():
        program = torch.export.export(eager, (example,))
        package = torch._inductor.aoti_compile_and_package(program, package_path=tempfile.mktemp(suffix=".pt2"))
    model = torch._inductor.aoti_load_package(package)
    model(example)
    return model


def compilers(eager, example, tensors, preprocess, batch_size: int, fc_form: float) -> None:
    """torch.compile and torch.export against fc's form: compile time counts."""
    for name, build in (("torch.compile, inductor", _torch_compile), ("torch.export + AOTInductor", _export_aoti)):
        start = time.perf_counter()
        try:
            with _inductor_freezing(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = build(eager, example)
        except Exception as exc:  # no compiler on this machine, an unsupported operator, ...
            print(f"pure forward, {name:24s} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}")
            continue
        compile_s = time.perf_counter() - start
        rate = best_rates({name: (model, batch_size)}, tensors, preprocess, 2)[name]
        gain = 1 / fc_form - 1 / rate  # seconds saved per image
        pays = f"pays back after {compile_s / gain:,.0f} images" if gain > 0 else "never pays back"
        print(f"pure forward, {name:24s} {rate:7.1f} images/s  ({rate / fc_form:.2f}x fc's form; "
              f"{compile_s:.1f} s to compile: {pays})")


# --------------------------------------------------------------------------- end to end


def end_to_end(label: str, data: str, args: argparse.Namespace, **options) -> float:
    """Images/s of featurecache.extract into a fresh cache, start-up and writing included."""
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        res = featurecache.extract(data, backbone=args.backbone, weights=args.weights, batch_size=args.batch_size,
                                   workers=args.workers, cache_dir=cache_dir, progress=False, **options)
        wall = time.perf_counter() - start
        config = store.info(res.cache)["config"]
    n = sum(s["n"] + s["skipped"] for s in res.splits.values())
    print(f"fc extract, {label:22s} {n / wall:7.1f} images/s  end to end ({n} images in {wall:.1f} s; "
          f"{res.images_per_s:.1f} in the loop; {config['graph']}; {config['cores']})")
    return n / wall


def _verdict(rate: float, eager_limit: float, fc_form: float) -> str:
    of_fc, of_eager = rate / fc_form, rate / eager_limit
    marks = ["met" if ok else "missed" for ok in (of_fc >= GOAL_OF_FC_FORM, of_eager >= GOAL_OF_EAGER)]
    return (f"{of_fc:.2f} of fc's form (goal >= {GOAL_OF_FC_FORM}: {marks[0]}), "
            f"{of_eager:.2f}x the eager limit (goal >= {GOAL_OF_EAGER}x: {marks[1]})")


def torchrun(processes: int, args: argparse.Namespace) -> float:
    """Wall seconds of `torchrun --nproc-per-node N -m featurecache extract` into a fresh cache."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    options = ["--backbone", args.backbone, "--weights", args.weights, "--device", "cpu", "--json"]
    if args.limit:
        options += ["--limit", str(args.limit)]
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                              str(processes), "-m", "featurecache", "extract", str(args.data), *options,
                              "--cache-dir", cache_dir], capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"torchrun with {processes} processes failed: {out.stderr[-2000:]}")
    n = sum(s["n"] + s["skipped"] for s in json.loads(out.stdout)["splits"].values())
    print(f"torchrun, {processes} process{'es' if processes > 1 else '':2s}         {n / wall:7.1f} images/s  "
          f"end to end ({n} images in {wall:.1f} s, start-up included)")
    return wall


def tutorial_loop(data: Path, backbone: str, weights: str) -> None:
    """The PyTorch transfer-learning tutorial's data pipeline and model call, forward only."""
    import torchvision
    from torchvision import datasets, transforms

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
    print(f"tutorial loop            {n / (time.perf_counter() - start):7.1f} images/s  (ImageFolder, batch 4, "
          f"4 workers, default layout, {n} images)")


# --------------------------------------------------------------------------- the script


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--fashion-root", type=Path, default=FASHION_ROOT, help="Fashion-MNIST's files")
    parser.add_argument("--fashion-images", type=int, default=10_000, help="Fashion-MNIST images (both splits)")
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--weights", default="IMAGENET1K_V1")
    parser.add_argument("--batch-size", type=int, default=None, help="fc extract --batch-size (default: fc's)")
    parser.add_argument("--workers", type=int, default=None, help="fc extract --workers (default: fc's)")
    parser.add_argument("--passes", type=int, default=2, help="interleaved passes of the pure forward loops")
    parser.add_argument("--quick", action="store_true", help="a smoke test: a few images, no compilers")
    parser.add_argument("--tutorial", action="store_true", help="also the PyTorch tutorial's loop on --data")
    args = parser.parse_args()
    args.limit = 12 if args.quick else None  # images per split of --data
    if args.quick:
        args.fashion_images, args.passes = 32, 1
    return args


def main() -> None:
    args = _arguments()
    warnings.simplefilter("ignore")  # TorchScript's deprecation, torch.compile's chatter
    batch_size = args.batch_size or runtime.default_batch_size(torch.device("cpu"))
    print(f"torch {torch.__version__}, {runtime.usable_cores()} cores, {torch.get_num_threads()} threads")
    eager_limit, fc_form = forward_limits(args, batch_size)
    rate = end_to_end(args.data.name, str(args.data), args, limit=args.limit)
    print(f"  {args.data.name}: {_verdict(rate, eager_limit, fc_form)}")
    if args.fashion_root.is_dir():
        rate = end_to_end("Fashion-MNIST", "torchvision:FashionMNIST", args,
                          root=str(args.fashion_root), limit=args.fashion_images // 2)
        print(f"  Fashion-MNIST: {_verdict(rate, eager_limit, fc_form)}")
    else:
        print(f"fc extract, Fashion-MNIST  skipped: no {args.fashion_root}")
    if args.tutorial:
        tutorial_loop(args.data, args.backbone, args.weights)
    one, two = torchrun(1, args), torchrun(2, args)
    print(f"torchrun speed-up        {one / two:.2f}x with 2 processes (reported, not a goal; "
          f"{runtime.usable_cores()} cores)")


if __name__ == "__main__":
    main()
