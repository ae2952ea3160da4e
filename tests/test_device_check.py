"""bench/device_check.py, the GPU check, passes its dry run on the CPU with only the packages
the device machine has (torch, torchvision, h5py, scikit-learn and their dependencies)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO

# What the device machine lacks: importing any of them there fails.
MISSING = ("click", "tqdm", "skops", "safetensors", "dask", "distributed", "matplotlib", "timm")
_RUN = """
import runpy, sys
for name in {missing!r}:
    sys.modules[name] = None  # import fails, as where the package is not installed
sys.argv = ["bench/device_check.py", "--device", "cpu", "--quick"]
runpy.run_path("bench/device_check.py", run_name="__main__")
"""


@pytest.mark.slow  # about 10 s
def test_device_check_dry_run_on_the_cpu():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", _RUN.format(missing=MISSING)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for label in ("pure forward limit", "fc extract, cpu decode", "fc extract, gpu decode  skipped: no CUDA device",
                  "bf16 autocast vs fp32", "fine-tune epoch, bf16", "fine-tune epoch, fp32",
                  "last:2 epoch from images", "last:2 epoch from activations", "x faster per epoch", "fc predict",
                  "device check done"):
        assert label in text, text
    rates = [float(r) for r in re.findall(r"([\d.]+) images/s", text)]
    assert len(rates) == 3 and min(rates) > 0, text
    cosine = float(re.search(r"autocast vs fp32 +cosine ([\d.]+)", text).group(1))
    assert cosine >= 0.99, text  # bf16 keeps 8 bits of mantissa; the GPU's fp16 goal is 0.999
    losses = [float(x) for x in re.findall(r"loss ([\d.]+)", text)]
    assert len(losses) == 4 and all(0 < x < 5 for x in losses), text  # two full epochs, two of last:2
    assert "24 images, 0 skipped" in text


@pytest.mark.slow  # about 40 s: it also starts torchrun twice
def test_extract_benchmark_smoke_run(hymenoptera):  # the bench reads the tutorial's photos (skipped without them)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "bench/extract.py", "--quick"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    for label in ("pure forward, eager, batch 4", "eager limit", "fc extract, hymenoptera_data",
                  "of the decode-inclusive limit (goal", "x the eager limit (goal", "AOTInductor: ", "bf16 autocast: ",
                  "torchrun, 1 process", "torchrun, 2 processes", "torchrun speed-up"):
        assert label in out.stdout, out.stdout
    limit = re.search(r"hymenoptera_data: decode \+ preprocess ([\d.]+) core-ms, forward \(\S+\) ([\d.]+) core-ms per "
                      r"image: limit (\d+) / \(\1 \+ \2\) ms = ([\d.]+) images/s", out.stdout)
    assert limit, out.stdout
    decode, forward, cores, rate = (float(x) for x in limit.groups())
    assert rate == pytest.approx(1000 * cores / (decode + forward), rel=0.01)  # the limit is the stated formula
