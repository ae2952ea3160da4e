"""The wheel works away from the checkout: installed into a fresh environment, ``featurecache demo`` runs.

The new environment reuses this one's packages (torch and the rest) through a ``.pth`` file
that names their folder. Python does not run the ``.pth`` files inside a folder named that
way, so the editable install's finder, which would bring the checkout back, stays off.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

import featurecache

pytestmark = pytest.mark.slow


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert out.returncode == 0, f"{' '.join(map(str, args))}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the sources: no build/ left in the checkout, and no stale one read from it."""
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "featurecache", src / "featurecache", ignore=shutil.ignore_patterns("__pycache__"))
    _run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, src, cwd=src)
    (built,) = dist.glob("featurecache-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> Path:
    """A fresh environment with the wheel installed (nothing else first), then this one's packages."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", root)
    python = root / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel,
         env=_clean_env())
    purelib = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                   env=_clean_env()).stdout.strip()
    Path(purelib, "_reuse_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return root


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, **extra}


def test_the_wheel_holds_the_demo_pipeline_and_the_license(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "featurecache/pipeline/demo.toml" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "fc = featurecache.cli:main" in text and "featurecache = featurecache.cli:main" in text


def test_installed_package_is_the_wheel_not_the_checkout(venv, tmp_path):
    out = _run(venv / "bin" / "python", "-c", "import featurecache; print(featurecache.__file__)",
               cwd=tmp_path, env=_clean_env())
    assert Path(out.stdout.strip()).is_relative_to(venv)
    for name in ("fc", "featurecache"):
        version = _run(venv / "bin" / name, "--version", cwd=tmp_path, env=_clean_env()).stdout.strip()
        assert version == f"{name}, version {featurecache.__version__}"


def test_featurecache_demo_runs_from_the_installed_wheel(venv, tmp_path, real_weights):
    # The demo pipeline as shipped, made small: a lower resolution, one head, one epoch.
    work, cache = tmp_path / "elsewhere", tmp_path / "fc-cache"
    work.mkdir()
    out = _run(venv / "bin" / "featurecache", "demo", "--set", "extract.resize=32", "--set", "extract.crop=32",
               "--set", "finetune.epochs=1", "--set", "fit-head.head=['logreg:C=0.01;pre=standardize']",
               cwd=work, env=_clean_env(FC_CACHE_DIR=str(cache)))
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("report: "), out.stdout
    report = Path(last.removeprefix("report: "))
    assert report.is_file() and report.is_relative_to(cache)
    assert (cache / "datasets" / "digits" / ".complete").is_file()
    assert list(work.iterdir()) == []  # nothing written to the current directory
