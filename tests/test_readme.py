"""The README's quick start works as written, and no page shows `fc` before saying how to reach it.

``fc`` is also a builtin of bash, zsh and ksh (history editing), found before PATH: in a
script ``fc extract ...`` exits 0 and does nothing. The quick start says how to get the
real command first; here its shell block runs, line by line as written, in a
non-interactive bash up to ``fc --version``.
"""

from __future__ import annotations

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
