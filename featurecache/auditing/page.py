"""The audit as one self-contained HTML page: counts at the top, then thumbnails side by side.

Each leak and conflict shows both images with their splits, labels and similarity; each likely
label error its image with the given and the suggested label; then the outliers and the plain
duplicates, the most suspicious first, and the summary per class. Thumbnails are JPEG data URIs
(:data:`THUMB` pixels), decoded from the data root the cache records (or its torchvision dataset);
an image that cannot be read shows why.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from ..data.images import ImageSkipped, load_rgb
from ..data.sources import TORCHVISION_PREFIX, Dataset, Record, open_dataset
from ..files import atomic_write

THUMB = 112
SHOWN = 60  # items per section on the page; audit.json has them all

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em}
.counts{display:flex;flex-wrap:wrap;gap:.6em}
.count{border:1px solid #ccc;border-radius:6px;padding:.4em .8em}
.count b{font-size:1.3em;display:block}
.warn{background:#fde8e8;border-color:#e99} .note{background:#fff6dd;padding:.4em}
.items{display:flex;flex-wrap:wrap;gap:.8em}
.item{border:1px solid #ddd;border-radius:6px;padding:.4em;font-size:.8em;max-width:260px}
.pair{display:flex;gap:.3em}
.item img,.missing{width:112px;height:112px;object-fit:contain;background:#f4f4f4;display:block}
.missing{display:flex;align-items:center;justify-content:center;color:#888;text-align:center}
.path{word-break:break-all;color:#555}
table{border-collapse:collapse} td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}
td:first-child,th:first-child{text-align:left}
"""


def _dataset(config: dict) -> Dataset:
    data = config.get("data", {})
    source, root = data.get("source", ""), data.get("root", "")
    if source.startswith(TORCHVISION_PREFIX):
        try:
            return open_dataset(source, root=root)
        except Exception:  # the dataset moved: no thumbnails
            return Dataset(root, [], [], source)
    return Dataset(root, [], [], source)


class _Thumbs:
    def __init__(self, config: dict):
        self.dataset = _dataset(config)
        self.done: dict[str, str] = {}

    def __call__(self, item: dict) -> str:
        path = item["path"]
        if path not in self.done:
            self.done[path] = self._tag(path, item.get("split", ""))
        return self.done[path]

    def _tag(self, path: str, split: str) -> str:
        try:
            img = load_rgb(self.dataset, Record(path, 0, split))
        except ImageSkipped as exc:
            return f'<div class="missing">{html.escape(str(exc))}</div>'
        except Exception as exc:  # any decoder failure: the page is still written
            return f'<div class="missing">{html.escape(type(exc).__name__)}</div>'
        img.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        return f'<img alt="{html.escape(path)}" src="data:image/jpeg;base64,{data}">'


def _side(item: dict, thumbs: _Thumbs) -> str:
    e = html.escape
    return (f'<div>{thumbs(item)}<div>{e(item["split"])} · <b>{e(item["label"])}</b></div>'
            f'<div class="path">{e(item["path"])}</div></div>')


def _pairs(pairs: list[dict], thumbs: _Thumbs) -> str:
    cells = [f'<div class="item pair-item"><div class="pair">{_side(p["a"], thumbs)}{_side(p["b"], thumbs)}</div>'
             f'<div>similarity {p["similarity"]:.4f} · {html.escape(p["found_by"])}</div></div>'
             for p in pairs[:SHOWN]]
    return _items(cells, len(pairs))


def _labels(issues: list[dict], thumbs: _Thumbs) -> str:
    e = html.escape
    cells = [f'<div class="item label-item">{thumbs(i)}<div>{e(i["split"])} · given <b>{e(i["label"])}</b>, '
             f'suggested <b>{e(i["suggested"])}</b></div><div>score {i["score"]:.3f}</div>'
             f'<div class="path">{e(i["path"])}</div></div>' for i in issues[:SHOWN]]
    return _items(cells, len(issues))


def _outliers(outliers: list[dict], thumbs: _Thumbs) -> str:
    e = html.escape
    cells = [f'<div class="item outlier-item">{thumbs(o)}<div>{e(o["split"])} · <b>{e(o["label"])}</b></div>'
             f'<div>score {o["score"]:.3f}</div><div class="path">{e(o["path"])}</div></div>' for o in outliers[:SHOWN]]
    return _items(cells, len(outliers))


def _items(cells: list[str], total: int) -> str:
    if not total:
        return "<p>None found.</p>"
    more = f"<p>{total - len(cells):,} more in audit.json.</p>" if total > len(cells) else ""
    return f'<div class="items">{"".join(cells)}</div>{more}'


def _counts(report: dict) -> str:
    c = report["counts"]
    leaks = ", ".join(f"{k}: {v}" for k, v in c["leaks"].items()) or "none"
    tests = sum(v for k, v in c["leaks"].items() if "test" in k)
    boxes = [("leaks", c["leak_pairs"], leaks, tests > 0), ("conflicts", c["conflicts"], "same split, other label",
             c["conflicts"] > 0), ("duplicates", c["duplicates"], "same split, same label", False),
             ("likely label errors", sum(c["label_issues"].values()),
              ", ".join(f"{k}: {v}" for k, v in c["label_issues"].items()), False),
             ("outliers shown", c["outliers"], "farthest from every other image", False)]
    return '<div class="counts">' + "".join(
        f'<div class="count{" warn" if warn else ""}" id="count-{name.split()[0]}"><b>{n:,}</b>{html.escape(name)}'
        f'<div>{html.escape(note)}</div></div>' for name, n, note, warn in boxes) + "</div>"


def _classes(report: dict) -> str:
    splits = list(report["counts"]["rows"])
    head = "".join(f"<th>{html.escape(s)}</th>" for s in splits)
    rows = "".join(
        f"<tr><td>{html.escape(c['class'])}</td>" + "".join(f"<td>{c['size'].get(s, 0)}</td>" for s in splits)
        + f"<td>{c['flagged']}</td><td>{c['leaks']}</td><td>{c['conflicts']}</td><td>{c['duplicates']}</td></tr>"
        for c in report["classes"])
    confused = "".join(f"<li>{html.escape(' ↔ '.join(p['classes']))}: {p['count']}</li>" for p in report["confused"])
    return (f"<table><tr><th>class</th>{head}<th>flagged labels</th><th>leaks</th><th>conflicts</th>"
            f"<th>duplicates</th></tr>{rows}</table><h3>Most confused classes (out of fold, train)</h3>"
            f"<ul>{confused or '<li>none</li>'}</ul>")


def render(report: dict, config: dict) -> str:
    thumbs = _Thumbs(config)
    pairs = report["pairs"]
    sections = [
        ("Leaks across splits", _pairs([p for p in pairs if p["kind"] == "leak"], thumbs)),
        ("Conflicts: duplicates with different labels", _pairs([p for p in pairs if p["kind"] == "conflict"], thumbs)),
        ("Likely label errors", _labels(report["label_issues"], thumbs)),
        ("Outliers", _outliers(report["outliers"], thumbs)),
        ("Duplicates within a split", _pairs([p for p in pairs if p["kind"] == "duplicate"], thumbs)),
        ("Per class", _classes(report)),
    ]
    n = report["neighbours"]
    about = (f"{Path(report['cache']).name}: {n['rows']:,} rows, neighbours by {n['method']} search, near-duplicates "
             f"at cosine ≥ {report['options']['threshold']}, labels scored by {report['head']} "
             f"({'content hashes recorded' if report['hashes'] else 'no content hashes: exact copies by features'})")
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in report.get("notes", []))
    body = notes + "".join(f'<h2 id="{html.escape(t.split()[0].lower())}">{html.escape(t)}</h2>{s}'
                           for t, s in sections)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>fc audit</title><style>{_STYLE}</style>"
            f"</head><body><h1>Audit of {html.escape(Path(report['cache']).name)}</h1><p>{html.escape(about)}</p>"
            f"{_counts(report)}{body}</body></html>")


def write_page(path: Path, report: dict, config: dict) -> Path:
    return atomic_write(path, render(report, config))
