"""Reports: Markdown and self-contained HTML, checked as files and rendered in headless Chromium."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import FAST, make_split_folder, run_cli

from featurecache.errors import RunError, UsageError

CLASSES = ("ants", "bees", "wasps")
HEADS = ("logreg:C=1", "knn:n_neighbors=3", "nearest-centroid")


def _make_run(root: Path, splits=(("train", 6), ("val", 4), ("test", 3)), cv=5, weights="none", **extract):
    import featurecache

    data = make_split_folder(root / "images", splits=splits, classes=CLASSES)
    cache_dir = root / "cache"
    res = featurecache.extract(str(data), **{**FAST, "weights": weights, **extract}, cache_dir=str(cache_dir))
    run = featurecache.fit_head(res.cache, head=HEADS, jobs=1, cv=cv, cache_dir=str(cache_dir))
    return Path(run.run_dir), data


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    run_dir, _ = _make_run(tmp_path_factory.mktemp("report-run"))
    return run_dir


@pytest.fixture(scope="session")
def tiny_report(tiny_run) -> Path:
    from featurecache import report

    return report(tiny_run, samples=6)


def _img_sources(html: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]*)"', html)


# --------------------------------------------------------------------------- content


def test_report_files(tiny_report, tiny_run):
    folder = tiny_run / "report"
    assert tiny_report == folder / "report.html"
    names = {p.name for p in folder.iterdir()}
    assert {"report.html", "report.md", "report.json", "confusion_matrix.png", "samples.png", "intervals.png",
            "reliability.png"} <= names
    assert "finetune_curves.png" not in names  # no fine-tune under this run
    md = (folder / "report.md").read_text()
    for png in re.findall(r"\]\(([^)]+\.png)\)", md):
        assert (folder / png).is_file()


def test_report_shows_the_leaderboard_metrics_and_provenance(tiny_report, tiny_run):
    run_meta = json.loads((tiny_run / "run.json").read_text())
    best = json.loads((tiny_run / "heads" / (tiny_run / "best").read_text().strip() / "head.json").read_text())
    md = (tiny_run / "report" / "report.md").read_text()
    leaderboard = md.split("## Leaderboard")[1].split("## ")[0]
    assert all(f"| {head} |" in leaderboard for head in run_meta["heads"])
    test = best["metrics"]["test"]
    assert f"test accuracy {test['accuracy']:.4f}" in md
    per_class = md.split("## Per-class metrics on test")[1].split("## ")[0]
    for name in CLASSES:
        m = test["per_class"][name]
        assert f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |" in per_class
    leaderboard = json.loads((tiny_run / "leaderboard.json").read_text())
    tied = sum(e["tied"] for e in leaderboard) - 1
    ties = "no other head is" if tied == 0 else ("1 other head is" if tied == 1 else f"{tied} other heads are")
    assert f"- Heads selected on val; test is held out: quote its scores; {ties} tied with the most accurate one" in md
    for rank, entry in enumerate(leaderboard, 1):  # the intervals fit-head computed
        val, held_out = entry["metrics"]["val"], entry["metrics"]["test"]
        assert (f"| {rank} | {entry['head']} | val | {val['accuracy']:.4f} [{val['accuracy_ci'][0]:.3f}, "
                f"{val['accuracy_ci'][1]:.3f}] | {'tied' if entry['tied'] else ''} | {held_out['accuracy']:.4f} "
                f"[{held_out['accuracy_ci'][0]:.3f}, {held_out['accuracy_ci'][1]:.3f}] |") in md
    assert f"test accuracy {test['accuracy']:.4f} [{test['accuracy_ci'][0]:.3f}, {test['accuracy_ci'][1]:.3f}]" in md
    config = run_meta["config"]
    for value in (run_meta["cache_key"], config["data"]["fingerprint"], config["backbone"], "scikit-learn",
                  "matplotlib", config["versions"]["torch"]):
        assert value in md
    stamp = json.loads((tiny_run / "report" / "report.json").read_text())
    assert stamp["head"] == run_meta["best"] and stamp["metrics"]["accuracy"] == test["accuracy"]


def test_html_is_self_contained(tiny_report):
    from PIL import Image

    html = tiny_report.read_text()
    sources = _img_sources(html)
    assert len(sources) == 4  # intervals, reliability diagram, confusion matrix and samples
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True))) as img:
            img.verify()
            assert img.format == "PNG" and img.width > 0 and img.height > 0
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing to fetch from anywhere


def test_a_calibrated_run_reports_its_temperature_and_ece(tiny_run, tmp_path):
    import featurecache

    cache = tmp_path / "cache" / "copy.h5"  # the session's features, in a cache directory of this test's own
    cache.parent.mkdir()
    shutil.copyfile(json.loads((tiny_run / "run.json").read_text())["cache"], cache)
    run_dir = Path(featurecache.fit_head(str(cache), head=HEADS, jobs=1, calibrate="temperature").run_dir)
    path = featurecache.report(run_dir, samples=0)
    md = (path.parent / "report.md").read_text()
    best = json.loads((run_dir / "leaderboard.json").read_text())[0]
    cal, before = best["calibration"], best["metrics"]["test"]
    after = cal["metrics"]["test"]
    assert cal["fitted_on"] == "val" and cal["temperature"] > 0
    assert (f"- Calibration: temperature {cal['temperature']:.3g} fitted on val; test ECE {before['ece']:.4f} "
            f"before, {after['ece']:.4f} after; test log-loss {before['log_loss']:.4f} before, "
            f"{after['log_loss']:.4f} after") in md
    assert "| test ECE | test ECE calibrated |" in md
    assert f"## Reliability diagram of {best['head']} on test (15 bins of the top probability)" in md
    assert (path.parent / "reliability.png").is_file()


def test_report_is_reused_until_its_inputs_change(tiny_report, tiny_run):
    from featurecache import report

    before = tiny_report.stat().st_mtime_ns
    assert report(tiny_run, samples=6) == tiny_report
    assert tiny_report.stat().st_mtime_ns == before
    report(tiny_run, samples=0)
    assert "Sample " not in (tiny_run / "report" / "report.md").read_text()
    report(tiny_run, samples=6)
    assert "Sample test images" in (tiny_run / "report" / "report.md").read_text()


def test_report_of_another_head(tiny_run):
    from featurecache import report

    meta = json.loads((tiny_run / "run.json").read_text())
    other = next(h for h in meta["heads"] if h != meta["best"])
    path = report(tiny_run, head=other, samples=2)
    md = (path.parent / "report.md").read_text()
    assert f"Head: {other}, test accuracy" in md and f"the best is {meta['best']}" in md
    assert f"## Confusion matrix of {other} on test" in md
    with pytest.raises(RunError, match="has no head 'svm'"):
        report(tiny_run, head="svm")
    report(tiny_run, samples=6)


def test_missing_images_become_placeholders(tmp_path):
    from featurecache import report

    run_dir, data = _make_run(tmp_path)
    shutil.rmtree(data / "test")
    path = report(run_dir, samples=40)
    assert path.is_file() and (path.parent / "samples.png").stat().st_size > 0


def test_cross_validated_run_shows_training_images(tmp_path):
    from featurecache import report

    run_dir, _ = _make_run(tmp_path, splits=(("train", 6),), cv=3)
    md = (report(run_dir, samples=4).parent / "report.md").read_text()
    assert "cv accuracy" in md
    assert "Sample train images" in md and "training images: the head was fitted on them" in md
    assert "not a held-out estimate" in md


def test_fc_report_cli(tiny_report, tiny_run, cli_runner):
    cache_dir = tiny_run.parent.parent
    result = run_cli(cli_runner, "report", tiny_run.name[:20], "--samples", 6, "--cache-dir", cache_dir, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"report": str(tiny_report)}
    missing = run_cli(cli_runner, "report", "no-such-run", "--cache-dir", cache_dir)
    assert missing.exit_code == 3
    assert missing.stderr.count("\n") == 1 and "no run matches 'no-such-run'" in missing.stderr
    unknown_head = run_cli(cli_runner, "report", tiny_run, "--head", "svm")
    assert unknown_head.exit_code == 3 and unknown_head.stderr.count("\n") == 1, unknown_head.stderr


def test_a_negative_sample_count_is_a_usage_error(tiny_run, cli_runner):
    from featurecache import report

    with pytest.raises(UsageError, match="--samples must be 0 or more"):
        report(tiny_run, samples=-1)
    out = run_cli(cli_runner, "report", tiny_run, "--samples", -1)
    assert out.exit_code == 2 and out.stderr.strip().splitlines()[-1].startswith("Error: "), out.stderr


# --------------------------------------------------------------------------- rendering


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    pytest.skip("Chromium is not installed (apt-get install chromium)")


PROBE = ('<script>window.addEventListener("load", () => document.body.setAttribute("data-widths", '
         'Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0).join(",")));</script></body>')


def render_image_widths(html_path: Path, work: Path) -> list[int]:
    """Open the page in headless Chromium; return the natural width of every image once loaded."""
    browser = _chromium()
    probe = work / "probe.html"
    probe.write_text(html_path.read_text().replace("</body>", PROBE))
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={work / 'profile'}",
              "--virtual-time-budget=10000"]
    dom = subprocess.run([*common, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    match = re.search(r'data-widths="([\d,]*)"', dom.stdout)
    assert match, dom.stderr[-2000:]
    shot = work / "page.png"
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1200,3000", html_path.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 0
    return [int(w) for w in match.group(1).split(",") if w]


@pytest.mark.slow
def test_html_renders_in_chromium_without_missing_images(tiny_report, tmp_path):
    widths = render_image_widths(tiny_report, tmp_path)
    assert len(widths) == len(_img_sources(tiny_report.read_text())) == 4
    assert all(w > 0 for w in widths), widths


@pytest.mark.slow
def test_the_chromium_check_catches_a_broken_image(tiny_report, tmp_path):
    html = tiny_report.read_text()
    broken = tmp_path / "broken.html"
    broken.write_text(html.replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    widths = render_image_widths(broken, tmp_path)
    assert widths[0] == 0 and all(w > 0 for w in widths[1:])


@pytest.mark.slow
def test_report_with_finetune_curves_renders(tmp_path, real_weights):
    from featurecache import finetune, report

    run_dir, _ = _make_run(tmp_path, weights=real_weights)
    tuned = finetune(run_dir, head="logreg:C=1", epochs=2, batch_size=8, workers=0, progress=False)
    path = report(run_dir)
    md = (path.parent / "report.md").read_text()
    assert "## Fine-tuning curves (loss and accuracy per epoch)" in md
    assert f"Fine-tuned logreg:C=1 ({Path(tuned.output_dir).name})" in md
    held_out = tuned.metrics["finetuned"]["test"]["accuracy"]
    assert f"after 2 epochs (best epoch {tuned.best_epoch}); test accuracy {held_out:.4f} fine-tuned" in md
    history = md.split("## Fine-tuning history")[1].split("## ")[0]
    assert len(re.findall(r"^\| \d+ \|", history, flags=re.M)) == 3  # epochs 0 (the head), 1 and 2
    widths = render_image_widths(path, tmp_path)
    assert len(widths) == 5 and all(w > 0 for w in widths), widths
