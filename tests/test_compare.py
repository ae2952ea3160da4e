"""Runs side by side: fc runs, fc report --compare, and a pipeline of several backbones ending with the table."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import run_cli
from test_pipeline import write_pipeline
from test_report import render_image_widths
from test_sweep import digits_cache

import featurecache
from featurecache.errors import UsageError
from featurecache.pipeline import run as pipeline
from featurecache.reporting.compare import family_of
from featurecache.reporting.listing import list_runs
from featurecache.sweep.leaderboard import with_interval

HEADS = ("logreg:C=0.1;pre=standardize", "knn:n_neighbors=3", "nearest-centroid")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, list]:
    """Two runs on the same digits, as if from two backbones (alpha and beta: the features differ in order)."""
    folder = tmp_path_factory.mktemp("compare") / "fc-cache"
    runs = [featurecache.fit_head(digits_cache(folder, name=name, tag=name, seed=seed), head=HEADS, jobs=1)
            for name, seed in (("alpha", 0), ("beta", 1))]
    return folder, runs


def test_list_runs_shows_backbone_best_head_and_interval(two_runs, cli_runner):
    folder, runs = two_runs
    rows = list_runs(str(folder))
    assert [(r["backbone"], r["best"]) for r in rows] == [("alpha", runs[0].best), ("beta", runs[1].best)]
    for row, run in zip(rows, runs):
        best = run.leaderboard[0]["metrics"]
        assert row["selection_accuracy_ci"] == best["val"]["accuracy_ci"]
        assert (row["final_split"], row["final_accuracy"]) == ("test", best["test"]["accuracy"])
        top = run.leaderboard[0]["gap"]["to"]  # the most accurate entry; the ensemble is not a head here
        assert row["tied"] == sum(e["tied"] and e["head"] not in ("ensemble", top) for e in run.leaderboard)
        assert row["heads"] == sum(e["head"] != "ensemble" for e in run.leaderboard)
    out = run_cli(cli_runner, "runs", "--cache-dir", folder)
    assert out.exit_code == 0
    name = Path(runs[1].run_dir).name
    line = next(line for line in out.output.splitlines() if line.startswith(f"{name.rpartition('-')[2]}  {name}"))
    assert f"val {with_interval(runs[1].leaderboard[0]['metrics']['val'])}" in line and "beta" in line
    as_json = run_cli(cli_runner, "runs", "--cache-dir", folder, "--json")
    assert json.loads(as_json.output) == json.loads(json.dumps(rows))
    assert run_cli(cli_runner, "runs", "--cache-dir", folder / "empty").output.strip() == "no runs"


def test_compare_writes_one_table_of_backbone_by_head_family(two_runs):
    folder, runs = two_runs
    path = featurecache.report([r.run_dir for r in runs], compare=True)
    assert path.name == "comparison.html" and path.parent.parent == folder / "comparisons"
    md = (path.parent / "comparison.md").read_text()
    table = md.split("## Backbone × head family")[1].split("## ")[0]
    assert "| backbone | weights | run | extract s | fit s | linear | neighbors | ensemble | best head |" in table
    for run, name in zip(runs, ("alpha", "beta")):
        first = {}
        for entry in run.leaderboard:
            first.setdefault(family_of(entry["head"]), entry)
        cells = [with_interval(first[f]["metrics"]["test"]) for f in ("linear", "neighbors", "ensemble")]
        assert re.search(rf"\| {name} \| none \| {Path(run.run_dir).name} \|  \| [\d.]+ \| "
                         rf"{re.escape(' | '.join(cells))} \| {re.escape(run.best)} \|", table), table
    assert "test accuracy with its 95% bootstrap interval" in md and "held out from selection" in md
    assert "do not record their extraction seconds" in md
    stamp = json.loads((path.parent / "comparison.json").read_text())
    assert [r["run"] for r in stamp["runs"]] == [Path(r.run_dir).name for r in runs]
    before = path.stat().st_mtime_ns
    assert featurecache.report([r.run_dir for r in runs], compare=True) == path  # a lookup
    assert path.stat().st_mtime_ns == before


def test_compare_needs_two_runs_and_report_needs_one(two_runs, cli_runner):
    _, runs = two_runs
    with pytest.raises(UsageError, match="at least two different runs, got 1"):
        featurecache.report([runs[0].run_dir, runs[0].run_dir], compare=True)
    out = run_cli(cli_runner, "report", runs[0].run_dir, runs[1].run_dir)
    assert out.exit_code == 2 and out.stderr.count("\n") == 1 and "pass --compare" in out.stderr
    ok = run_cli(cli_runner, "report", "--compare", runs[0].run_dir, runs[1].run_dir, "--json")
    assert ok.exit_code == 0 and json.loads(ok.output)["report"].endswith("comparison.html")


@pytest.mark.slow
def test_a_pipeline_of_two_backbones_ends_with_the_comparison_rendered_in_chromium(tmp_path):
    path = write_pipeline(tmp_path)
    result = pipeline.run(path, set=('extract.backbone=["mobilenet_v2", "resnet18"]',), progress=False)
    assert len(result["branches"]) == 2
    page = Path(result["comparison"])
    md = (page.parent / "comparison.md").read_text()
    for branch in result["branches"]:
        run = branch["stages"]["fit-head"]["run_dir"]
        assert f"| {branch['options']['extract']['backbone']} | none | {Path(run).name} |" in md
    widths = render_image_widths(page, tmp_path)
    assert len(widths) == 1 and widths[0] > 0
    again = pipeline.run(path, set=('extract.backbone=["mobilenet_v2", "resnet18"]',), progress=False)
    assert again["comparison"] == result["comparison"]
    alone = pipeline.run(path, set=('extract.backbone=["mobilenet_v2", "resnet18"]', "report=false"), progress=False)
    assert "comparison" not in alone
