"""The grid of a sweep: ``--head`` specs, TOML sweep files, or the default sweep.

A sweep file holds ``[[head]]`` tables: ``name`` picks the head, every other key is a
parameter and a list gives the values to try::

    [[head]]
    name = "logreg"
    C = [0.01, 0.1, 1, 10]
    pre = "standardize"

    [[head]]
    name = "mlp"
    hidden = [256, [512, 256]]     # a list of widths is one deeper network
    dropout = [0.0, 0.3]
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import replace
from pathlib import Path

from ..errors import HeadError, suggest
from .builtin import DEFAULT_SWEEP
from .registry import HeadConfig, head_type, parse_grid

CLASS_WEIGHTS = ("balanced",)


def _toml_value(value, where: str) -> str:
    if isinstance(value, list):  # a list of widths inside a list of values: one tuple
        return "x".join(_toml_value(v, where) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    if not isinstance(value, (int, float, str)):
        raise HeadError(f"{where}: unsupported value {value!r} (use numbers, strings, true/false)")
    text = repr(value) if isinstance(value, float) else str(value)
    if any(c in text for c in ",;:=") and not text.startswith("pca:"):
        raise HeadError(f"{where}: value {value!r} may not contain , ; : or =")
    return text


def read_sweep_file(path: str | os.PathLike) -> list[str]:
    """The grid specs of a TOML sweep file (one per ``[[head]]`` table)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise HeadError(f"no sweep file at {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise HeadError(f"{path} is not valid TOML: {exc}") from None
    unknown = [k for k in data if k != "head"]
    if unknown:
        raise HeadError(f"{path}: unknown key {unknown[0]!r}{suggest(unknown[0], ['head'])}; "
                        "a sweep file holds [[head]] tables")
    tables = data.get("head", [])
    if not isinstance(tables, list) or not tables:
        raise HeadError(f"{path} declares no heads: add [[head]] tables with name = \"...\"")
    specs = []
    for i, table in enumerate(tables, 1):
        where = f"{path} head #{i}"
        table = dict(table)
        name = table.pop("name", None)
        if not isinstance(name, str) or not name:
            raise HeadError(f"{where} has no name = \"...\"")
        parts = []
        for key, values in table.items():
            values = values if isinstance(values, list) else [values]
            if not values:
                raise HeadError(f"{where}: parameter {key} has no values")
            parts.append(f"{key}=" + ",".join(_toml_value(v, where) for v in values))
        specs.append(name + (":" + ";".join(parts) if parts else ""))
    return specs


def build_grid(head=(), sweep_file=None, class_weight: str | None = None) -> list[HeadConfig]:
    """The heads to fit: ``head`` specs and the sweep file's, or the default sweep."""
    if class_weight is not None and class_weight not in CLASS_WEIGHTS:
        raise HeadError(f"unknown class_weight {class_weight!r}: use balanced, or leave it out")
    specs = [*([head] if isinstance(head, str) else head), *(read_sweep_file(sweep_file) if sweep_file else [])]
    configs = list({c.spec: c for spec in specs or DEFAULT_SWEEP for c in parse_grid(spec)}.values())
    if not configs:
        raise HeadError("the head grid is empty")
    if class_weight is not None:  # heads that cannot weight classes are fitted as they are
        configs = [replace(c, class_weight=class_weight) if c.class_weight is None and head_type(c.name).class_weight
                   else c for c in configs]
        configs = list({c.spec: c for c in configs}.values())
    return configs
