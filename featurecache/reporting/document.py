"""Markdown and HTML for every page fc writes: one document model, two renderings.

A page is a list of ``(kind, title, payload)`` blocks: a ``title``, a ``list`` of lines, a
``table`` (columns, rows) or a ``figure`` (a :class:`Chart`). :func:`write_document` writes
``<stem>.md`` beside its PNG figures and a self-contained ``<stem>.html`` with the figures
embedded. The run report (:mod:`featurecache.reporting.pages`) and the comparison of runs
(:mod:`featurecache.reporting.compare`) both use it, so neither imports the other for it.
"""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import atomic_write


@dataclass
class Chart:
    name: str  # file stem
    title: str
    png: bytes

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def png(fig) -> bytes:
    """The PNG bytes of a matplotlib figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, bbox_inches="tight")
    return buf.getvalue()


def interval_chart(labels: list[str], series: dict[str, list[tuple[float, list]]],
                   shaded: list[bool] | None = None) -> bytes:
    """Points with horizontal 95% intervals, one row per label (top first), one marker per series
    (``name -> [(value, [low, high]), ...]``); ``shaded`` rows get a green band."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 1.4 + 0.3 * len(labels)), dpi=100)
    ax = fig.add_subplot()
    rows = np.arange(len(labels))
    for i, flag in enumerate(shaded or []):
        if flag:
            ax.axhspan(i - 0.5, i + 0.5, color="tab:green", alpha=0.1, linewidth=0)
    for k, (name, points) in enumerate(series.items()):
        value = np.array([p[0] for p in points])
        ci = np.array([p[1] if p[1] else [p[0], p[0]] for p in points])
        offset = (k - (len(series) - 1) / 2) * 0.25
        ax.errorbar(value, rows + offset, xerr=[value - ci[:, 0], ci[:, 1] - value], fmt="o", capsize=3,
                    markersize=4, label=name)
    ax.set_yticks(rows, labels, fontsize=8)
    ax.set_ylim(len(labels) - 0.5, -0.5)
    ax.set_xlabel("accuracy (95% bootstrap interval)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return png(fig)


# --------------------------------------------------------------------------- the document


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _md_table(columns: list, rows: list[list]) -> str:
    def line(cells) -> str:
        return "| " + " | ".join(_md_cell(c) for c in cells) + " |"

    return "\n".join([line(columns), "|" + "---|" * len(columns), *map(line, rows)]) + "\n"


def _html_table(columns: list, rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>"


# block kind -> (title, payload) -> text, for each format
_MARKDOWN = {
    "title": lambda title, _: f"# {title}\n",
    "list": lambda title, lines: f"## {title}\n\n" + "".join(f"- {_md_cell(line)}\n" for line in lines),
    "table": lambda title, payload: f"## {title}\n\n" + _md_table(*payload),
    "figure": lambda title, chart: f"## {title}\n\n![{title}]({chart.name}.png)\n",
    "link": lambda title, link: f"## {title}\n\n[{link[0]}]({link[1]})\n",
}
_HTML = {
    "title": lambda title, _: f"<h1>{html.escape(title)}</h1>",
    "list": lambda title, lines: f"<h2>{html.escape(title)}</h2>\n<ul>"
                                 + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>",
    "table": lambda title, payload: f"<h2>{html.escape(title)}</h2>\n" + _html_table(*payload),
    "figure": lambda title, chart: f'<h2>{html.escape(title)}</h2>\n<img alt="{html.escape(title)}" '
                                   f'src="{chart.data_uri}">',
    "link": lambda title, link: f'<h2>{html.escape(title)}</h2>\n<p><a href="{html.escape(link[1])}">'
                                f"{html.escape(link[0])}</a></p>",
}


def markdown_document(blocks: list[tuple]) -> str:
    """The Markdown of ``(kind, title, payload)`` blocks: title, list, table or figure."""
    return "\n".join(_MARKDOWN[kind](title, payload) for kind, title, payload in blocks)


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
tr:nth-child(even) td { background: #fafafa; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0 1.5em; }
td { word-break: break-word; }
"""


def html_document(blocks: list[tuple]) -> str:
    """The self-contained HTML page of the same blocks, figures embedded."""
    title = html.escape(next(t for kind, t, _ in blocks if kind == "title"))
    body = "\n".join(_HTML[kind](heading, payload) for kind, heading, payload in blocks)
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")


def up_to_date(html_path: Path, stamp: Path, key: str) -> bool:
    """Whether the page at ``html_path`` was written for ``key`` (recorded in the JSON ``stamp``)."""
    return html_path.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("key") == key


def write_document(out_dir: Path, stem: str, blocks: list[tuple], charts) -> Path:
    """``<stem>.md`` next to its PNG ``charts`` and the self-contained ``<stem>.html``; returns the latter."""
    for fig in charts:
        atomic_write(out_dir / f"{fig.name}.png", fig.png)
    atomic_write(out_dir / f"{stem}.md", markdown_document(blocks).encode("utf-8"))
    return atomic_write(out_dir / f"{stem}.html", html_document(blocks).encode("utf-8"))
