"""Stage three under torchrun (gloo on the CPU): two ranks train one process's weights, only the first
rank writes, and a killed group resumes in one process from its last checkpoint.

The data make every part of the split count: 15 train images in global batches of 7 are batches of
7, 7 and 1, so the ranks take shares of 3 and 4 images and, of the last batch, none and one. The run
under test stops itself (test_crash's STOPPING_FC) at a moment the test chooses; the test waits for
that state, never for a time.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO
from safetensors.torch import load_file
from test_crash import STOPPING_FC, _kill
from test_finetune import tiny_run
from test_torchrun import _children, _wait_for

import featurecache

pytestmark = pytest.mark.slow  # each test starts torchrun and two ranks: several seconds

SPLITS = (("train", 5), ("val", 3))  # per class, 3 classes
OPTIONS = dict(epochs=2, batch_size=7, workers=0, augment="none", patience=0, checkpoint_every=2, optimizer="sgd",
               lr=0.001)  # a larger rate makes the random network diverge, and the comparison chaotic
CLI = ["--epochs", "2", "--batch-size", "7", "--workers", "0", "--augment", "none", "--patience", "0",
       "--checkpoint-every", "2", "--optimizer", "sgd", "--lr", "0.001"]
# Measured: 2 ranks against 1 process (and the killed pair resumed by 1) differ by at most 6.2e-8 of a tensor's
# largest value (float32 sums in another order); 1e-4 leaves room for other machines.
TOLERANCE = 1e-4

# Rank 1 fails at once if it renames a file into the run's folder: only the first rank writes.
_RANK_1_WRITES_NOTHING = """
import os
guarded = os.environ["FC_TEST_GUARD"]
if os.environ["RANK"] != "0":
    replace = os.replace
    def refuse(src, dst, *args, **kwargs):
        if os.path.abspath(os.fspath(dst)).startswith(guarded):
            raise RuntimeError(f"rank {os.environ['RANK']} wrote {dst}")
        return replace(src, dst, *args, **kwargs)
    os.replace = refuse
from featurecache.cli import main
main()
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> str:
    """A run of a seeded random MobileNetV2 (no download) on 3 classes of tiny images."""
    base = tmp_path_factory.mktemp("finetune-torchrun")
    return tiny_run(base, 3, ["logreg:pre=standardize"], "none", SPLITS)[0]


def _weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The last step's network (last.pt) and the exported best epoch (model.safetensors) of a folder."""
    last = torch.load(folder / "last.pt", map_location="cpu", weights_only=True)["model"]
    return {"last": last, "export": load_file(folder / "model.safetensors")}


def _forget(run_dir: str) -> None:
    """Remove the run's fine-tunings: the next one, with any world size, trains in the same folder again."""
    shutil.rmtree(Path(run_dir) / "finetune", ignore_errors=True)


@pytest.fixture(scope="module")
def reference(run) -> tuple[featurecache.FinetuneResult, dict]:
    """One process: its result and weights."""
    _forget(run)
    result = featurecache.finetune(run, progress=False, **OPTIONS)
    weights = _weights(Path(result.output_dir))
    _forget(run)
    return result, weights


def _torchrun(program: list[str], run_dir: str, *extra: str, env: dict | None = None) -> subprocess.Popen:
    environ = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {}),
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *program,
         "finetune", run_dir, *CLI, "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ,
    )


def _script(tmp_path: Path, name: str, code: str) -> list[str]:
    path = tmp_path / name
    path.write_text(code)
    return [str(path)]


@pytest.fixture(scope="module")
def two_ranks(run, reference, tmp_path_factory) -> tuple[dict, dict, list[str]]:
    """Two gloo ranks of the reference's job, rank 1 refusing to write: (JSON out, weights, files written)."""
    script = _script(tmp_path_factory.mktemp("scripts"), "guard.py", _RANK_1_WRITES_NOTHING)
    proc = _torchrun(script, run, env={"FC_TEST_GUARD": str(Path(run).resolve())})
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out)  # one object: the first rank speaks for the job
    folders = list((Path(run) / "finetune").iterdir())
    assert len(folders) == 1
    files = sorted(p.name for p in folders[0].rglob("*"))
    weights = _weights(folders[0])
    _forget(run)
    return result, weights, files


def _max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest difference of two state dicts, relative to each tensor's largest value."""
    assert a.keys() == b.keys() and not any(k.startswith("module.") for k in a)
    return max(float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp(min=1e-12))
               for k in a if b[k].is_floating_point())


def _assert_equal_weights(got: dict, expected: dict) -> None:
    for kind in ("last", "export"):
        difference = _max_relative_difference(got[kind], expected[kind])
        print(f"{kind}: max relative difference {difference:.3g}")
        assert difference < TOLERANCE, kind


def test_two_ranks_train_the_weights_of_one_process(reference, two_ranks):
    expected, expected_weights = reference
    result, weights, _ = two_ranks
    assert result["epochs"] == 2 and result["best_accuracy"] == expected.best_accuracy
    assert Path(result["model"]).parent.name == Path(expected.output_dir).name, "the address ignores the world size"
    first, last = expected.history[0]["val_loss"], expected.history[-1]["val_loss"]
    assert abs(last - first) > 100 * TOLERANCE * first, "training moved the network: the comparison means something"
    _assert_equal_weights(weights, expected_weights)


def test_the_first_rank_alone_writes_one_export(two_ranks):
    _, _, files = two_ranks  # rank 1 would have failed the job by renaming anything into the run
    assert files == ["best.pt", "config.json", "history.json", "last.pt", "model.pt", "model.safetensors",
                     "result.json"]


def _stopped(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


def test_sigkill_the_group_then_resume_with_one_process(run, reference, tmp_path):
    expected, expected_weights = reference
    _forget(run)
    # Rank 0 stops itself before its third checkpoint: step 0 and the one after step 2 are written.
    stopping = _script(tmp_path, "stopping_fc.py", STOPPING_FC)
    job = _torchrun(stopping, run, env={"FC_TEST_STOP": "replace|last.pt|3", "FC_TEST_STOP_RANK": "0"})
    _wait_for(lambda: any(_stopped(pid) for pid in _children(job.pid)), job)
    for pid in _children(job.pid):
        os.kill(pid, signal.SIGKILL)
    _kill(job)
    folder = next((Path(run) / "finetune").iterdir())
    saved = torch.load(folder / "last.pt", map_location="cpu", weights_only=True)
    assert saved["state"]["epoch"] == 0 and saved["state"]["batch"] == 2 and saved["state"]["step"] == 2
    assert not any(k.startswith("module.") for k in saved["model"])
    assert not (folder / "result.json").exists()  # (the checkpoint it was writing is left under a temporary name)

    resumed = featurecache.finetune(run, resume=True, progress=False, **OPTIONS)  # world size 1
    assert resumed.resumed_from == {"epoch": 0, "batch": 2, "step": 2}
    assert resumed.output_dir == str(folder) and resumed.epochs == 2
    assert [h["val_accuracy"] for h in resumed.history] == [h["val_accuracy"] for h in expected.history]
    for got, want in zip(resumed.history[1:], expected.history[1:], strict=True):
        assert got["train_loss"] == pytest.approx(want["train_loss"], rel=TOLERANCE)
    _assert_equal_weights(_weights(folder), expected_weights)


def test_from_activations_two_ranks_store_once_and_train_as_one_process(run):
    """The first rank stores the activations while the other waits; then both train on their shares as one
    process does from the stored activations."""
    _forget(run)
    proc = _torchrun(["-m", "featurecache"], run, "--from-activations", "--unfreeze", "last:2")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert err.count("stored the activations") == 1, "the first rank alone stores them, and says so"
    folder = Path(json.loads(out)["model"]).parent
    ranks = _weights(folder)
    shutil.rmtree(folder)
    single = featurecache.finetune(run, progress=False, from_activations=True, unfreeze="last:2", **OPTIONS)
    assert single.output_dir == str(folder)
    _assert_equal_weights(ranks, _weights(folder))


_RANK_1_SEEDS_OTHERWISE = """
import os, sys
from featurecache.cli import main
if os.environ["RANK"] == "1":
    sys.argv += ["--seed", "1"]
main()
"""


def test_ranks_with_different_settings_fail_in_one_line_each(run, tmp_path):
    _forget(run)
    proc = _torchrun(_script(tmp_path, "differ.py", _RANK_1_SEEDS_OTHERWISE), run)
    out, err = proc.communicate(timeout=600)
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert proc.returncode != 0 and out == "" and len(errors) == 2 and errors[0] == errors[1], err[-3000:]
    assert errors[0].startswith("Error: the ranks were started with different settings (seed): rank 1 has seed 1"), err
    assert not (Path(run) / "finetune").exists(), "nothing is written"


_RANK_1_FAILS = """
import os
from featurecache.errors import FinetuneError
from featurecache.finetuning import trainer
if os.environ["RANK"] == "1":
    def fail(self, state, done):
        raise FinetuneError("rank 1 fails on purpose")
    trainer._Trainer.optimizer_step = fail
from featurecache.cli import main
main()
"""


def test_an_error_on_one_rank_ends_the_group(run, tmp_path):
    """Rank 0 waits for rank 1 in the gradients' all-reduce when rank 1 fails: the job ends (gloo sees the
    peer gone, torchrun stops the rest) instead of waiting forever, with rank 1's error in one line."""
    _forget(run)
    proc = _torchrun(_script(tmp_path, "fail.py", _RANK_1_FAILS), run)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode != 0 and out == ""
    assert [line for line in err.splitlines() if line.startswith("Error: ")] == ["Error: rank 1 fails on purpose"]
    assert not list((Path(run) / "finetune").glob("*/result.json"))
