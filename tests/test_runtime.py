"""The CPU fast path: a frozen TorchScript graph only where it is exact, and eager mode otherwise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from featurecache import runtime
from featurecache.backbones import models as backbones
from featurecache.errors import UsageError

CPU = torch.device("cpu")


def _example(n: int = 3, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0)).contiguous(
        memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet18"])
def test_frozen_graph_computes_the_eager_features(monkeypatch, name):
    monkeypatch.setattr(runtime, "_COMPILE_GAIN", 0.0)  # keep the frozen graph whatever the timing
    net = backbones.build(name, weights="none")
    eager = net.model.to(memory_format=torch.channels_last)
    model, mode = runtime.inference_model(eager, CPU, "fp32", _example())
    assert mode == "torchscript-frozen"
    other = _example(5)  # another batch size and other images than the example it was traced on
    with torch.inference_mode():
        got, expected = model(other).numpy(), eager(other).numpy()
    assert got.shape == expected.shape == (5, net.feature_dim)
    cos = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
    assert cos.min() > 0.99999
    assert np.abs(got - expected).max() <= 1e-3 * np.abs(expected).max()


def test_eager_mode_when_the_frozen_graph_is_not_faster(monkeypatch):
    monkeypatch.setattr(runtime, "_COMPILE_GAIN", float("inf"))
    eager = backbones.build("resnet18", weights="none").model
    assert runtime.inference_model(eager, CPU, "fp32", _example()) == (eager, "eager")


class _Untraceable(nn.Module):
    def forward(self, x):
        return {"mean": x.mean()}, "not a tensor"


class _Wrong(nn.Module):
    """Gives the right shape, but a traced copy would disagree with it: it stands for a graph
    that does not compute what eager mode does."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x.flatten(1)[:, :4] * self.calls


@pytest.mark.parametrize("module", [_Untraceable(), _Wrong()], ids=["untraceable", "disagrees"])
def test_eager_mode_when_the_graph_cannot_be_trusted(monkeypatch, module):
    monkeypatch.setattr(runtime, "_COMPILE_GAIN", 0.0)
    model, mode = runtime.inference_model(module, CPU, "fp32", _example())
    assert (model, mode) == (module, "eager")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_runs_eager(precision):
    eager = nn.Conv2d(3, 4, 3)
    assert runtime.inference_model(eager, CPU, precision, _example()) == (eager, "eager")


def test_default_batch_size():
    assert runtime.default_batch_size(CPU) == 4
    assert runtime.default_batch_size(torch.device("cuda")) == 64


def test_the_cores_are_split_by_measured_costs():
    forward = {1: 0.010, 2: 0.0055}.__getitem__  # seconds per image on one and on two threads
    # Fashion-MNIST: decoding a 28x28 image costs almost nothing, so both cores run the model
    assert runtime.split_cores(CPU, 2, None, 0.0003, forward) == (0, 2)
    # photos that cost about as much to decode as to run: one decoding worker, one model thread
    assert runtime.split_cores(CPU, 2, None, 0.008, forward) == (1, 1)
    # more cores: every one busy, the costlier the decoding the more workers
    many = {1: 0.016, 16: 0.0015}.__getitem__
    cheap, dear = runtime.split_cores(CPU, 16, None, 0.002, many), runtime.split_cores(CPU, 16, None, 0.02, many)
    assert sum(cheap) == sum(dear) == 16 and 1 <= cheap[0] < dear[0]
    assert runtime.split_cores(CPU, 1, None, 0.02, many) == (0, 1)


def test_given_workers_and_gpus_are_not_measured():
    def unmeasured(_threads):
        raise AssertionError("nothing to measure")

    assert runtime.split_cores(CPU, 8, 3, 0.01, unmeasured) == (3, 5)
    assert runtime.split_cores(CPU, 8, 0, 0.01, unmeasured) == (0, 8)
    assert runtime.split_cores(CPU, 2, 4, 0.01, unmeasured) == (4, 1)
    assert runtime.split_cores(torch.device("cuda"), 8, None, 0.01, unmeasured) == (8, torch.get_num_threads())
    before = torch.get_num_threads()
    with runtime.num_threads():
        torch.set_num_threads(1)
    assert torch.get_num_threads() == before


def test_torchrun_ranks_share_the_cores(monkeypatch):
    monkeypatch.setattr(runtime, "usable_cores", lambda: 8)
    assert [runtime.cores_per_process(n) for n in (1, 2, 3, 16)] == [8, 4, 2, 1]


def test_devices_by_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.resolve_device("auto") == runtime.resolve_device("cpu") == CPU
    for bad in ("tpu", "meta", "cuda:x", "gpu"):
        with pytest.raises(UsageError, match="unknown device"):
            runtime.resolve_device(bad)
    with pytest.raises(UsageError, match="this machine has no CUDA device"):
        runtime.resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert runtime.resolve_device("auto") == torch.device("cuda")
    assert runtime.resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(UsageError, match=r"device cuda:1 asked for, but this machine has 1 GPU$"):
        runtime.resolve_device("cuda:1")
    # a torchrun rank's GPU is its local rank's
    assert runtime.resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    assert runtime.resolve_device("cuda:0", local_rank=3) == torch.device("cuda", 0)
    with pytest.raises(UsageError, match=r"^local rank 1 has no GPU of its own: this machine has 1 GPU; start at most"):
        runtime.resolve_device("auto", local_rank=1)


def test_precision_and_workers():
    assert runtime.resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert runtime.resolve_precision("auto", CPU) == "fp32"
    with pytest.raises(UsageError, match="unknown precision 'fp8'"):
        runtime.resolve_precision("fp8", CPU)
    assert runtime.resolve_workers(None) == runtime.usable_cores()
    assert runtime.resolve_workers(0) == 0
    with pytest.raises(UsageError, match="--workers must be 0"):
        runtime.resolve_workers(-1)
