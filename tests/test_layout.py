"""The layout of the package is the architecture: stages as packages, imports only downwards.

The order of the layers is stated once, in the docstring of ``featurecache/__init__.py``, and
every package's docstring ends with its own layer. The import graph is built from the source
with ``ast`` (imports inside functions included), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import featurecache

PACKAGE = Path(featurecache.__file__).parent
MAX_LINES = 60  # a function of this many lines or more is a list of steps that wants names
MAX_POSITIONAL = 6  # a private function that needs more takes an options object


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = [package.name, *path.relative_to(package).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {_module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The featurecache modules ``name`` imports, anywhere in its source."""
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
            found |= {target} | {f"{target}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {t for t in found if t in known and t != name}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = _modules(package)
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (a package importing its own submodules is not one)."""
    def edges(m):
        return sorted(d for d in graph[m] if not d.startswith(m + ".") and not m.startswith(d + "."))

    state, found = {}, []

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for d in edges(m):
            if state.get(d) == "open":
                found.append([*stack[stack.index(d):], d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    return found


def stated_order(package: Path = PACKAGE) -> list[str]:
    """The layers, lowest first, as the package's docstring states them (``shared < data < ...``)."""
    doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
    line = next(line for line in doc.splitlines() if line.strip().startswith("shared <"))
    return [part.strip() for part in line.split("<")]


def layer_of(module: str, order: list[str]) -> str:
    """``featurecache.sweep.stage`` -> ``sweep``; a top-level module is ``shared`` unless it is a layer."""
    parts = module.split(".")
    if len(parts) == 1:
        return "shared"  # the package root: __version__ and the lazy API
    if parts[1] == "__main__":
        return order[-1]  # python -m featurecache is the command line
    return parts[1] if parts[1] in order else "shared"


def layering_violations(graph: dict[str, set[str]], order: list[str]) -> list[str]:
    rank = {name: i for i, name in enumerate(order)}
    bad = []
    for module, deps in sorted(graph.items()):
        for dep in sorted(deps):
            if rank[layer_of(dep, order)] > rank[layer_of(module, order)]:
                bad.append(f"{module} ({layer_of(module, order)}) imports {dep} ({layer_of(dep, order)})")
    return bad


def test_there_is_no_import_cycle():
    assert cycles(import_graph()) == []


def test_imports_go_only_downwards_in_the_stated_order():
    assert layering_violations(import_graph(), stated_order()) == []


def test_every_stage_package_states_its_layer():
    order = stated_order()
    packages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert set(packages) <= set(order), "every package is a layer of the stated order"
    for name in packages:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and re.search(rf"^Layer: {name}\. May import: .+", doc, re.M), name


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    """A planted cycle and a planted upward import are found (so the two tests above can fail)."""
    pkg = tmp_path / "featurecache"
    (pkg / "data").mkdir(parents=True)
    (pkg / "sweep").mkdir()
    (pkg / "__init__.py").write_text('"""The order::\n\n    shared < data < sweep\n"""\n')
    (pkg / "errors.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "sweep" / "__init__.py").write_text("")
    (pkg / "data" / "a.py").write_text("def f():\n    from ..sweep import b\n")
    (pkg / "sweep" / "b.py").write_text("from ..data import a\nfrom .. import errors\n")
    graph = import_graph(pkg)
    assert cycles(graph) == [["featurecache.data.a", "featurecache.sweep.b", "featurecache.data.a"]]
    assert "featurecache.data.a (data) imports featurecache.sweep.b (sweep)" in layering_violations(
        graph, stated_order(pkg))


def _functions():
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield path.relative_to(PACKAGE.parent), node


@pytest.mark.parametrize("check", ["length", "positional"])
def test_functions_are_short_and_private_ones_take_few_positional_parameters(check):
    bad = []
    for where, fn in _functions():
        lines = fn.end_lineno - fn.lineno + 1
        positional = [a for a in fn.args.posonlyargs + fn.args.args if a.arg not in ("self", "cls")]
        if check == "length" and lines >= MAX_LINES:
            bad.append(f"{where}:{fn.lineno} {fn.name} has {lines} lines")
        if check == "positional" and fn.name.startswith("_") and not fn.name.startswith("__") \
                and len(positional) > MAX_POSITIONAL:
            bad.append(f"{where}:{fn.lineno} {fn.name} takes {len(positional)} positional parameters")
    assert bad == []


@pytest.mark.parametrize("name", ["extract", "fit_head", "curve", "finetune"])
def test_a_stage_takes_exactly_the_fields_of_its_options(name):
    """The public function's parameters are its options dataclass's fields, defaults included, and
    an unknown keyword is refused by name before anything runs."""
    import dataclasses
    import inspect

    function = getattr(featurecache, name)
    fields = {f.name: f.default for f in dataclasses.fields(function.options)}
    params = {p.name: p.default for p in inspect.signature(function).parameters.values()}
    assert params == {k: (inspect.Parameter.empty if v is dataclasses.MISSING else v) for k, v in fields.items()}
    assert dataclasses.is_dataclass(function.options) and function.options.__dataclass_params__.frozen
    with pytest.raises(TypeError, match=rf"{name}\(\): .*no_such_option"):
        function("x", no_such_option=1)


def test_no_file_holds_the_markers_of_an_unresolved_merge():
    repo = PACKAGE.parent
    folders = ("featurecache", "docs", "tests", "bench", "pipelines")
    suffixes = {".py", ".md", ".toml", ".txt"}
    tracked = [p for folder in folders for p in (repo / folder).rglob("*") if p.suffix in suffixes]
    tracked += [repo / name for name in ("README.md", "Makefile", "pyproject.toml")]
    bad = [f"{p.relative_to(repo)}:{i}" for p in tracked for i, line in enumerate(p.read_text().splitlines(), 1)
           if line.startswith(("<<<<<<< ", ">>>>>>> ")) or line == "======="]
    assert bad == []
