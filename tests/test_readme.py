"""The README's quick start works as written, and no page shows `fc` before saying how to reach it.

``fc`` is also a builtin of bash, zsh and ksh (history editing), found before PATH: in a
script ``fc extract ...`` exits 0 and does nothing. The quick start says how to get the
real command first; here its shell block runs, line by line as written, in a
non-interactive bash up to ``fc --version``.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import REPO

import featurecache

README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
INSTRUCTION = "enable -n fc"  # the bash line; the same paragraph gives zsh's `disable fc` and the long name
FC_COMMAND = re.compile(r"^\s*(?:\$\s+)?fc\s+\S|`fc\s+[a-z-]")  # a command line in a block, or inline code


def _quick_start_lines() -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```(?:sh|bash|console)\n(.*?)^```", section, re.S | re.M)
    assert block, "the quick start has no shell block"
    return block.group(1).splitlines()


def _set_up() -> bool:
    """Whether ``make setup`` has nothing left to do here (its stamp exists)."""
    return subprocess.run(["make", "-q", "setup"], cwd=REPO, capture_output=True).returncode == 0


def test_quick_start_runs_verbatim_in_bash_and_fc_is_the_command():
    lines = _quick_start_lines()
    until = next(i for i, line in enumerate(lines) if line.split("#")[0].strip() == "fc --version")
    assert any(INSTRUCTION in line for line in lines[:until]), "the block must switch the builtin off before fc"
    if not _set_up():
        pytest.skip("make setup has not run in this checkout (no .venv/.installed): the quick start would install")
    script = "\n".join(lines[: until + 1])
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == f"fc, version {featurecache.__version__}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_fc_command_before_the_page_says_how_to_reach_it(page: Path):
    lines = page.read_text(encoding="utf-8").splitlines()
    told = next((i for i, line in enumerate(lines) if INSTRUCTION in line), len(lines))
    early = [line for line in lines[:told] if FC_COMMAND.search(line)]
    assert early == [], f"{page.name}: fc commands before '{INSTRUCTION}': {early}"


def test_every_docs_page_is_linked_from_the_readme():
    text = README.read_text(encoding="utf-8")
    pages = sorted((REPO / "docs").glob("*.md"))
    assert pages and [p.name for p in pages if f"(docs/{p.name})" not in text] == []


def _example_lines() -> list[str]:
    """The commands of the README's "one example of each" block, in order."""
    text = README.read_text(encoding="utf-8")
    section = text.split("One example of each", 1)[1]
    block = re.search(r"^```sh\n(.*?)^```", section, re.S | re.M)
    assert block, "the README has no block of examples"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_examples_name_every_command():
    from featurecache.cli import cli

    named = {" ".join(line.split()[1:3]) for line in _example_lines()} | {line.split()[1] for line in _example_lines()}
    leaves = {name for name, command in cli.commands.items() if not hasattr(command, "commands")}
    groups = {f"{name} {sub}" for name, command in cli.commands.items() for sub in getattr(command, "commands", {})}
    assert leaves | groups <= named, sorted((leaves | groups) - named)


@pytest.mark.slow
def test_the_examples_run_in_order_as_pasted(tmp_path, hymenoptera, real_weights):
    """Line by line from the top, in bash, on the tutorial's data: every line succeeds, and the run
    that fit-head prints is the one the later lines name."""
    if not Path("~/.cache/torch/hub/checkpoints/mobilenet_v2-b0353104.pth").expanduser().is_file():
        pytest.skip("the weights file the block imports is not where make setup puts it")
    if REPO.parent / "shared" / "data" / "hymenoptera_data" != hymenoptera:
        pytest.skip("the block names the tutorial's data by its place beside the clone")
    env = {**os.environ, "FC_CACHE_DIR": str(tmp_path / "cache"),
           "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}"}
    # a checkout of its own, so that files the lines write (fc export's features.parquet) stay out of the repo
    clone = tmp_path / "clone"
    clone.mkdir()
    (clone / "pipelines").symlink_to(REPO / "pipelines")
    (tmp_path / "shared").symlink_to(REPO.parent / "shared")
    outputs = {}
    for line in _example_lines():
        out = subprocess.run(["bash", "-c", f"enable -n fc\nset -euo pipefail\n{line}"], cwd=clone, env=env,
                             capture_output=True, text=True, timeout=3600)  # fine-tuning on a loaded machine
        assert out.returncode == 0, f"{line}\n{out.stderr[-3000:]}"
        outputs[line.split()[1]] = outputs.get(line.split()[1], "") + out.stdout
    assert (clone / "features.parquet").stat().st_size > 0  # fc export wrote where the line says
    run_id = re.search(r"\(run id ([0-9a-f]{12});", outputs["fit-head"]).group(1)
    assert re.search(rf"^{run_id}\s+mobilenet_v2-hymenoptera_data-", outputs["runs"], re.M), outputs["runs"]
