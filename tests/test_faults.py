"""Faults of the machine and of stored files: each is one line, the documented exit code, and nothing
left behind that a later command would trust.

- A write the machine refuses (here a mocked ``ENOSPC`` at every file a stage opens for writing, and,
  as root, a real 3 MB tmpfs) is ``Error: cannot write PATH: No space left on device (N free there)``,
  exit code 4, with no temporary file left, and the same command succeeds once there is room.
- A flipped byte in a cache's features fails its Fletcher-32 checksum on read (exit code 3), ``fc cache
  verify`` says so, and ``fc extract`` builds the cache again instead of reusing it.
- A flipped byte in ``model.pt`` or in a head file is refused; the command the advice names repairs it.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import FAST, make_split_folder, run_cli

import featurecache
from featurecache import files, store
from featurecache.errors import CacheError, FeatureCacheWarning, StorageError

# --------------------------------------------------------------------------- a full disk, mocked


class _FullFile:
    """A file opened for writing on a full disk: it opens, and every write fails with ENOSPC."""

    def __init__(self, fh):
        self._fh = fh

    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._fh.name)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()

    def __iter__(self):
        return iter(self._fh)


@pytest.fixture
def full_disk(monkeypatch):
    """``full_disk(root, pattern)``: writes to files under ``root`` whose name matches ``pattern`` fail with ENOSPC."""
    real_open = builtins.open

    def arm(root: Path, pattern: str = ".*"):
        def fake_open(file, mode="r", *args, **kwargs):
            fh = real_open(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and str(Path(file).absolute()).startswith(str(root)) \
                    and any(c in mode for c in "wax+") and re.search(pattern, Path(file).name):
                return _FullFile(fh)
            return fh

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(io, "open", fake_open)

    return arm


def _temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if files.is_temp_name(p)]


def _flip(path: Path) -> None:
    """Change one byte in the middle of a file."""
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def _one_line(result, code: int, *patterns: str, progress: bool = False) -> str:
    """The error line, after asserting it is the only line (``progress``: the last one, after progress lines)."""
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr and lines and lines[-1].startswith("Error: "), result.stderr
    assert progress or len(lines) == 1, result.stderr
    lines = lines[-1:]
    assert result.exit_code == code, f"exit code {result.exit_code}: {lines[0]}"
    for pattern in patterns:
        assert re.search(pattern, lines[0]), lines[0]
    return lines[0]


FULL = (r"No space left on device", r"free there")
FAST_ARGS = ["--backbone", "mobilenet_v2", "--weights", "none", "--resize", "48", "--crop", "40", "--workers", "0",
             "--batch-size", "8"]


# Files are written under temporary names (.NAME.tmp-PID-RANDOM): the patterns match those.
@pytest.mark.parametrize("pattern", [r"shard-.*\.tmp-", r"\.h5\.tmp-"], ids=["shards", "cache file"])
def test_extract_on_a_full_disk_is_one_line_and_a_rerun_with_room_succeeds(tmp_path, full_disk, cli_runner, pattern):
    images = make_split_folder(tmp_path / "images")
    cache_dir = tmp_path / "cache"
    full_disk(cache_dir, pattern)
    failed = run_cli(cli_runner, "extract", images, *FAST_ARGS, "--cache-dir", cache_dir)
    _one_line(failed, 4, *FULL, re.escape(str(cache_dir)))
    assert _temp_files(cache_dir) == [] and list(cache_dir.glob("*.h5")) == []
    full_disk(tmp_path / "elsewhere")  # room again
    again = run_cli(cli_runner, "extract", images, *FAST_ARGS, "--cache-dir", cache_dir)
    assert again.exit_code == 0, again.output
    assert store.is_sound(next(cache_dir.glob("*.h5")))


def test_a_cache_larger_than_the_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "free_space", lambda path: 1000)
    splits = {"train": {"features": np.ones((100, 8), np.float32), "labels": np.zeros(100), "paths": ["a"] * 100}}
    with pytest.raises(StorageError, match=r"the cache c\.h5 needs about 1\.0 MB in .*, and 1000 B is free"):
        store.write_cache(tmp_path / "c.h5", ["a"], {}, splits)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def small_cache(tmp_path) -> tuple[Path, str]:
    images = make_split_folder(tmp_path / "images", splits=(("train", 8), ("val", 4), ("test", 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FeatureCacheWarning)
        cache = featurecache.extract(str(images), cache_dir=str(tmp_path / "cache"), **FAST).cache
    return tmp_path / "cache", cache


@pytest.mark.parametrize("pattern", [r"fit\.json\.tmp-", r"run\.json\.tmp-"], ids=["finished fits", "run files"])
def test_fit_head_on_a_full_disk_is_one_line_and_a_rerun_succeeds(small_cache, full_disk, cli_runner, pattern):
    cache_dir, cache = small_cache
    full_disk(cache_dir / "runs", pattern)
    failed = run_cli(cli_runner, "fit-head", cache, "--head", "logreg:C=1", "--jobs", 1)
    _one_line(failed, 4, *FULL)
    assert _temp_files(cache_dir) == [] and list((cache_dir / "runs").glob("*/run.json")) == []
    full_disk(cache_dir / "nowhere")
    again = run_cli(cli_runner, "fit-head", cache, "--head", "logreg:C=1", "--jobs", 1)
    assert again.exit_code == 0 and "reused)" not in again.stdout, again.output


@pytest.fixture
def small_run(small_cache) -> tuple[Path, str, str]:
    cache_dir, cache = small_cache
    run = featurecache.fit_head(cache, head=["logreg:C=1"], jobs=1, cache_dir=str(cache_dir))
    return cache_dir, cache, run.run_dir


FINETUNE_ARGS = ["--epochs", "1", "--batch-size", "4", "--workers", "0", "--augment", "none"]


@pytest.mark.parametrize("pattern", [r"(last|best)\.pt\.tmp-", r"model\.safetensors\.tmp-", r"model\.pt\.tmp-"],
                         ids=["checkpoints", "weights", "export"])
def test_finetune_on_a_full_disk_is_one_line_and_a_rerun_succeeds(small_run, full_disk, cli_runner, pattern):
    cache_dir, _, run_dir = small_run
    full_disk(Path(run_dir) / "finetune", pattern)
    failed = run_cli(cli_runner, "finetune", run_dir, *FINETUNE_ARGS)
    _one_line(failed, 4, *FULL, progress=True)
    assert _temp_files(cache_dir) == [] and list(Path(run_dir).glob("finetune/*/result.json")) == []
    full_disk(cache_dir / "nowhere")
    again = run_cli(cli_runner, "finetune", run_dir, *FINETUNE_ARGS, "--json")
    assert again.exit_code == 0, again.output
    model = json.loads(again.stdout)["model"]
    assert featurecache.predict(model, [str(cache_dir.parent / "images" / "test")], workers=0, progress=False)


def test_report_on_a_full_disk_is_one_line_and_a_rerun_succeeds(small_run, full_disk, cli_runner):
    cache_dir, _, run_dir = small_run
    full_disk(Path(run_dir) / "report", r"\.html\.tmp-")
    failed = run_cli(cli_runner, "report", run_dir, "--samples", 0)
    _one_line(failed, 4, *FULL)
    assert _temp_files(cache_dir) == []
    full_disk(cache_dir / "nowhere")
    again = run_cli(cli_runner, "report", run_dir, "--samples", 0)
    assert again.exit_code == 0 and Path(again.stdout.strip()).is_file(), again.output


def test_a_refused_write_outside_any_stage_is_one_line(tmp_path, cli_runner, monkeypatch):
    """The CLI's last line of defence: an OSError of a refused write from anywhere is exit code 4, not a traceback."""
    from featurecache.sweep import stage

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "x"))

    monkeypatch.setattr(stage, "_plan", refuse)
    _one_line(run_cli(cli_runner, "fit-head", "anything"), 4, r"x: Permission denied; check that it can be read")


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


@pytest.fixture
def tiny_disk(tmp_path, request):
    """A real small file system (a tmpfs: root only), of ``request.param`` bytes (default 3 MB)."""
    folder = tmp_path / "tiny"
    if not _mount_tmpfs(folder, getattr(request, "param", "3m")):
        pytest.skip("mounting a tmpfs needs root")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def test_hdf5_never_sees_a_full_disk(tiny_disk):
    """Were HDF5 told of a failed write while it closes a file, the process would die of a segfault: the
    cache is written through a file that keeps the failure from it. Run in a child, where a crash shows."""
    code = f"""
import numpy as np
from featurecache import files, store
from featurecache.errors import StorageError
files.require_space = store.require_space = lambda *a: None  # straight to the disk, as when it fills meanwhile
X = np.random.default_rng(0).random((2000, 1280), dtype=np.float32)  # 10 MB
try:
    store.write_cache({str(tiny_disk / 'c.h5')!r}, ["a"], {{}}, {{"train": {{"features": X, "labels": np.zeros(2000),
                      "paths": ["a"] * 2000}}}})
except StorageError as exc:
    print(exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == "", out.stderr[-2000:]
    assert re.match(r"cannot write .*c\.h5: No space left on device \(.* free there\)", out.stdout), out.stdout
    assert list(tiny_disk.iterdir()) == []


@pytest.mark.parametrize("tiny_disk", ["100k"], indirect=True)
def test_extract_into_a_full_tmpfs_is_one_line(tiny_disk, tmp_path):
    images = make_split_folder(tmp_path / "images", splits=(("train", 10), ("val", 5)))  # 210 KB of features
    argv = [sys.executable, "-m", "featurecache", "extract", str(images), *FAST_ARGS, "--resize", "64", "--crop", "56"]
    out = subprocess.run([*argv, "--cache-dir", str(tiny_disk), "--layers", "features.14,features.17"],
                         capture_output=True, text=True, timeout=900)
    lines = [line for line in out.stderr.strip().splitlines() if not line.startswith("Warning: ")]  # random weights
    assert out.returncode == 4 and len(lines) == 1 and lines[0].startswith("Error: "), out.stderr[-2000:]
    assert "free" in lines[0] and not _temp_files(tiny_disk)


# --------------------------------------------------------------------------- stored numbers are verified


def _flip_chunk_byte(cache: str, dataset: str = "train/features") -> None:
    """Change one byte inside the first stored chunk of ``dataset`` (a finite value stays finite or not)."""
    with h5py.File(cache, "r") as f:
        offset = f[dataset].id.get_chunk_info(0).byte_offset
    with open(cache, "r+b") as fh:
        fh.seek(offset + 5)
        byte = fh.read(1)
        fh.seek(offset + 5)
        fh.write(bytes([byte[0] ^ 0x10]))


def test_a_flipped_feature_byte_is_refused_on_read_and_rebuilt_by_extract(tmp_path, cli_runner):
    images = make_split_folder(tmp_path / "images")
    cache_dir = tmp_path / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FeatureCacheWarning)
        first = featurecache.extract(str(images), cache_dir=str(cache_dir), **FAST)
    X, _, _ = featurecache.load_features(first.cache, "train")
    assert store.verify(first.cache)["checksums"]
    _flip_chunk_byte(first.cache)

    with pytest.raises(CacheError, match="is damaged"):
        featurecache.load_features(first.cache, "train")
    _one_line(run_cli(cli_runner, "cache", "verify", first.cache), 3, r"is damaged", r"run fc extract again")
    _one_line(run_cli(cli_runner, "fit-head", first.cache, "--head", "logreg:C=1"), 3, r"is damaged")

    with pytest.warns(FeatureCacheWarning, match="is damaged .*extracting it again"):
        again = featurecache.extract(str(images), cache_dir=str(cache_dir), **FAST)
    assert not again.reused and again.cache == first.cache
    assert np.array_equal(featurecache.load_features(again.cache, "train")[0], X)
    verified = run_cli(cli_runner, "cache", "verify", again.cache)
    assert verified.exit_code == 0 and "every checksum verified" in verified.stdout, verified.output


def test_a_cache_without_checksums_is_read_and_said_to_be_unverifiable(tmp_path, cli_runner):
    """Caches written before the checksums keep their key and load as before."""
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as f:
        f.attrs.update(format=store.FORMAT, key="k", classes='["a"]', config="{}", complete=True)
        g = f.create_group("train")
        g.create_dataset("features", data=np.ones((3, 4), np.float32), chunks=(3, 4))
        g.create_dataset("labels", data=np.zeros(3, np.int64))
        g.create_dataset("paths", data=np.array(["x"] * 3, dtype=object), dtype=h5py.string_dtype())
        g.create_dataset("skipped", shape=(0, 2), dtype=h5py.string_dtype())
    assert featurecache.load_features(path, "train")[0].shape == (3, 4)
    report = store.verify(path)
    assert not report["checksums"] and report["unchecked"] == ["/train/features", "/train/labels"]
    out = run_cli(cli_runner, "cache", "verify", path)
    assert out.exit_code == 0 and "without checksums" in out.stdout, out.output


def test_a_flipped_model_pt_byte_is_refused_and_finetune_trains_it_again(small_run, cli_runner):
    cache_dir, _, run_dir = small_run
    result = featurecache.finetune(run_dir, epochs=1, batch_size=4, workers=0, augment="none", progress=False)
    model = Path(result.model)
    assert json.loads((model.parent / "result.json").read_text())["export"]["sha256"] == files.sha256_file(model)
    _flip(model)
    test_images = cache_dir.parent / "images" / "test"
    line = _one_line(run_cli(cli_runner, "predict", model, test_images), 3, r"model\.pt does not match the sha256")
    assert "run the fc finetune that made it again" in line

    again = run_cli(cli_runner, "finetune", run_dir, "--epochs", "1", "--batch-size", "4", "--workers", "0",
                    "--augment", "none")
    assert again.exit_code == 0 and "damaged" in again.stderr and "(reused" not in again.stdout, again.output
    assert "the best epoch was chosen on val: its val scores are not a held-out estimate; test is held out" \
        in again.stdout and re.search(r"^test\s+accuracy\s", again.stdout, re.M), again.stdout
    assert run_cli(cli_runner, "predict", model, test_images).exit_code == 0


def test_a_damaged_reused_run_is_fitted_again_and_keeps_its_later_folders(small_run, cli_runner):
    cache_dir, cache, run_dir = small_run
    head_file = next(Path(run_dir).glob("heads/*/pipeline.skops"))
    (Path(run_dir) / "finetune" / "abc").mkdir(parents=True)
    _flip(head_file)
    test_images = cache_dir.parent / "images" / "test"
    line = _one_line(run_cli(cli_runner, "predict", run_dir, test_images), 3, r"sha256 mismatch")
    assert "run the fc fit-head that made it again" in line

    again = run_cli(cli_runner, "fit-head", cache, "--head", "logreg:C=1", "--jobs", 1)
    assert again.exit_code == 0 and "(reused" not in again.stdout, again.output
    assert re.search(r"Warning: run .* is damaged \(heads/.*pipeline\.skops is missing or differs", again.stderr)
    assert (Path(run_dir) / "finetune" / "abc").is_dir() and not _temp_files(cache_dir)
    assert run_cli(cli_runner, "predict", run_dir, test_images).exit_code == 0
    assert "reused)" in run_cli(cli_runner, "fit-head", cache, "--head", "logreg:C=1", "--jobs", 1).stdout


def test_a_half_written_finetune_folder_names_finetune(small_run, cli_runner):
    cache_dir, _, run_dir = small_run
    folder = Path(run_dir) / "finetune" / "0123456789ab"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    test_images = cache_dir.parent / "images" / "test"
    _one_line(run_cli(cli_runner, "predict", folder, test_images), 3, r"unfinished fine-tuning .*--resume")


# --------------------------------------------------------------------------- input that cannot be right


def _manifest(tmp_path: Path, rows: list[str]) -> Path:
    make_split_folder(tmp_path / "img", splits=(("train", 2),))
    path = tmp_path / "m.csv"
    path.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return path


GOOD = ["img/train/cats/cats_0.jpg,cats,train", "img/train/dogs/dogs_0.jpg,dogs,train"]


@pytest.mark.parametrize("rows, pattern", [
    (["missing/a.jpg,cats,train", "missing/b.jpg,dogs,train"], r"none of the 2 files of split 'train' exists"),
    ([*GOOD, "missing/a.jpg,cats,val"], r"none of the 1 files of split 'val' exists"),
    ([*GOOD, "img/train/cats/cats_1.png,,train"], r"line 4: empty label"),
    ([*GOOD, "img/train/cats/cats_1.png,cats,bogus"], r"line 4: split 'bogus' is not one of train, val, test"),
], ids=["no file exists", "no file of a split exists", "empty label", "unknown split"])
def test_bad_manifests_are_refused(tmp_path, cli_runner, rows, pattern):
    out = run_cli(cli_runner, "extract", _manifest(tmp_path, rows), *FAST_ARGS)
    _one_line(out, 2, pattern)
    assert not list((tmp_path / "fc-cache").glob("*.h5"))


def test_a_split_with_no_readable_image_is_refused(tmp_path, cli_runner):
    images = make_split_folder(tmp_path / "images")
    for path in (images / "val").rglob("*.*"):
        path.write_bytes(b"not an image")
    out = run_cli(cli_runner, "extract", images, *FAST_ARGS)
    _one_line(out, 2, r"no image of split 'val' .* could be read: 8 files skipped \(first: val/")


def test_split_fractions_name_train_val_or_test(tmp_path, cli_runner):
    images = make_split_folder(tmp_path / "images", splits=(("train", 4),))
    out = run_cli(cli_runner, "extract", images / "train", "--split", "train=0.5,holdout=0.5", *FAST_ARGS)
    _one_line(out, 2, r"'holdout' is not one of train, val, test")


def test_predict_with_no_image_is_refused(small_run, tmp_path, cli_runner):
    _, _, run_dir = small_run
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "fake.jpg").write_bytes(b"nope")
    out = run_cli(cli_runner, "predict", run_dir, tmp_path / "notes.txt", tmp_path / "fake.jpg")
    _one_line(out, 2, r"none of the 2 files given could be read as an image \(first: .*notes\.txt")
    assert out.stdout == ""


def test_predict_says_which_model_it_uses(small_run, cli_runner):
    cache_dir, _, run_dir = small_run
    test_images = cache_dir.parent / "images" / "test"
    plain = run_cli(cli_runner, "predict", run_dir, test_images)
    assert re.search(r"^model: head logreg:C=1 of run \S+, without fine-tuning$", plain.stderr, re.M), plain.stderr
    tuned = featurecache.finetune(run_dir, epochs=1, batch_size=4, workers=0, augment="none", progress=False)
    again = run_cli(cli_runner, "predict", run_dir, test_images)
    assert f"the run has 1 fine-tuned model: fc predict {tuned.output_dir} uses it" in again.stderr
    assert again.stdout == plain.stdout
    by_folder = run_cli(cli_runner, "predict", tuned.output_dir, test_images)
    assert f"model: the fine-tuned network of {tuned.output_dir}" in by_folder.stderr


# --------------------------------------------------------------------------- a closed stdout


def test_a_closed_stdout_ends_quietly(tmp_path):
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line, as with `| head -0`
    try:
        out = subprocess.run([sys.executable, "-m", "featurecache", "heads"], stdout=write, stderr=subprocess.PIPE,
                             text=True, timeout=120)
    finally:
        os.close(write)
    assert out.stderr == "" and out.returncode == 141
