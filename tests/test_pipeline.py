"""Pipelines: TOML files, --set overrides, branches, reuse, fetching data and their errors."""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from importlib import resources
from pathlib import Path

import pytest
from conftest import REPO, make_split_folder, run_cli

from featurecache.errors import PipelineError
from featurecache.pipeline import fetchers
from featurecache.pipeline import run as pipeline

DEMO = Path(str(resources.files("featurecache.pipeline") / "demo.toml"))  # package data: fc demo runs it
PIPELINES = [*sorted((REPO / "pipelines").glob("*.toml")), DEMO]

TINY = """
data = "{data}"
cache_dir = "{cache}"
{fetch}

[extract]
backbone = "mobilenet_v2"
weights = "{weights}"
resize = 48
crop = 40
workers = 0
batch_size = 8

[fit-head]
head = ["logreg:C=1", "knn:n_neighbors=3"]
jobs = 1
{extra}
[report]
samples = 4
"""


def write_pipeline(tmp_path: Path, weights="none", extra="", data=None, fetch=None) -> Path:
    if data is None:
        data = make_split_folder(tmp_path / "images", splits=(("train", 6), ("val", 4), ("test", 3)))
    path = tmp_path / "p.toml"
    path.write_text(TINY.format(data=data, cache=tmp_path / "cache", weights=weights, extra=extra,
                                fetch=f'fetch = "{fetch}"' if fetch else ""))
    return path


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time: what a rerun must leave alone."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- running


def test_run_end_to_end_then_every_stage_is_looked_up(tmp_path):
    path = write_pipeline(tmp_path)
    first = pipeline.run(path, progress=False)
    (branch,) = first["branches"]
    stages = branch["stages"]
    assert list(stages) == ["extract", "fit-head", "report"]
    assert stages["extract"]["reused"] is False
    assert Path(stages["extract"]["cache"]).parent == tmp_path / "cache"
    board = stages["fit-head"]["leaderboard"]
    # the grid on the stored stage ends and on the penultimate features (fit-head --features auto), the
    # ensemble, and the transferable form of a selected head that cannot become a layer
    assert {e["head"] for e in board if "transfer_of" not in e} == {
        "logreg:C=1", "knn:n_neighbors=3", "logreg:C=1;cols=0:1280", "knn:cols=0:1280;n_neighbors=3", "ensemble"}
    report = Path(stages["report"])
    assert report.is_file() and report.parent == Path(stages["fit-head"]["run_dir"]) / "report"
    before = _files(tmp_path / "cache")

    second = pipeline.run(path, progress=False)
    again = second["branches"][0]["stages"]
    assert again["extract"]["reused"] is True
    assert again["extract"]["cache"] == stages["extract"]["cache"]
    assert again["fit-head"]["run_dir"] == stages["fit-head"]["run_dir"]
    assert again["report"] == stages["report"]
    assert _files(tmp_path / "cache") == before  # looked up: not one file written again


def test_set_overrides_reach_the_stage_and_change_its_address(tmp_path):
    path = write_pipeline(tmp_path)
    base = pipeline.run(path, set=("report=false",), progress=False)["branches"][0]["stages"]
    assert "report" not in base
    other = pipeline.run(path, set=("extract.resize=44", "extract.crop=32", "fit-head.head=['logreg:C=1']",
                                    "report=false"), progress=False)["branches"][0]["stages"]
    assert other["extract"]["cache"] != base["extract"]["cache"]
    assert {e["head"] for e in other["fit-head"]["leaderboard"]} - {"ensemble"} == {"logreg:C=1",
                                                                                  "logreg:C=1;cols=0:1280"}


def test_fc_run_json_and_text(tmp_path, cli_runner):
    path = write_pipeline(tmp_path)
    result = run_cli(cli_runner, "run", path, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["pipeline"] == str(path)
    report = out["branches"][0]["stages"]["report"]
    text = run_cli(cli_runner, "run", path)
    assert text.exit_code == 0
    assert text.stdout.strip().splitlines()[-1] == f"report: {report}"
    assert "extract " in text.stderr and "(reused;" in text.stderr


def test_a_list_runs_one_branch_per_value(tmp_path):
    path = write_pipeline(tmp_path)
    out = pipeline.run(path, set=("extract.crop=[32, 40]", "report=false"), progress=False)
    assert [b["label"] for b in out["branches"]] == ["extract.crop=32", "extract.crop=40"]
    caches = {b["stages"]["extract"]["cache"] for b in out["branches"]}
    runs = {b["stages"]["fit-head"]["run_dir"] for b in out["branches"]}
    assert len(caches) == 2 and len(runs) == 2
    assert "comparison" not in out  # with a [report] stage, two runs end with their comparison (test_compare.py)


# --------------------------------------------------------------------------- the plan


def test_values_lists_and_branches_follow_the_signatures(tmp_path):
    path = write_pipeline(tmp_path)
    plan = pipeline.load(path, ["extract.backbone=['mobilenet_v2', 'resnet18']", "extract.mean=[0.5, 0.5, 0.5]",
                                "fit-head.head=[['logreg:C=1'], ['knn']]", "extract.batch-size=16",
                                "data=" + str(tmp_path / "images")])
    assert len(plan.branches) == 4  # 2 backbones x 2 head grids; mean is one value (a tuple parameter)
    assert {b["extract"]["backbone"] for b in plan.branches} == {"mobilenet_v2", "resnet18"}
    assert all(b["extract"]["mean"] == [0.5, 0.5, 0.5] for b in plan.branches)
    assert all(b["extract"]["batch_size"] == 16 for b in plan.branches)  # - and _ both name the option
    assert {tuple(b["fit-head"]["head"]) for b in plan.branches} == {("logreg:C=1",), ("knn",)}
    assert plan.labels[0] == "extract.backbone=mobilenet_v2, fit-head.head=['logreg:C=1']"


@pytest.mark.parametrize("text, value", [
    ("16", 16), ("0.5", 0.5), ("true", True), ("[1, 2]", [1, 2]), ("'quoted'", "quoted"),
    ("/some/path", "/some/path"), ("resnet50", "resnet50"), ("train=0.8,val=0.2", "train=0.8,val=0.2"),
])
def test_set_values_are_toml_else_strings(text, value):
    assert pipeline._parse_value(text) == value


@pytest.mark.parametrize("name", [stage.name for stage in pipeline.STAGES.values()])
def test_every_option_of_a_stage_is_a_key_of_its_table(name):
    import inspect

    stage = pipeline.STAGES[name]
    params = inspect.signature(stage.function()).parameters
    extra = {p.name for p in stage.extra}  # the pipeline's own keys, such as [audit] exclude
    assert set(stage.parameters()) == (set(params) - {stage.input, *pipeline.WIRED}) | extra


def test_the_demo_pipeline_ships_in_the_package_only():
    assert DEMO.is_file() and DEMO.parent == REPO / "featurecache" / "pipeline"
    assert not (REPO / "pipelines" / "demo.toml").exists()  # one copy
    assert 'fetch = "sklearn:digits"' in DEMO.read_text()


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.name)
def test_shipped_pipelines_are_valid(path, tmp_path):
    plan = pipeline.load(path, [f"data={tmp_path}"] if path.name == "folder-template.toml" else [])
    assert plan.stages[0] == "extract" and plan.stages[-1] == "report"


@pytest.mark.parametrize("path", [p for p in PIPELINES if p.name != "folder-template.toml"], ids=lambda p: p.name)
def test_shipped_finetune_heads_are_in_their_sweep(path):
    from featurecache.heads import DEFAULT_SWEEP, HEADS, parse_grid

    for options in pipeline.load(path).branches:
        if "finetune" in options:
            grid = options["fit-head"].get("head") or DEFAULT_SWEEP
            specs = [c.spec for spec in grid for c in parse_grid(spec)]
            head = options["finetune"]["head"]
            if head == "best-transferable":
                assert any(HEADS[spec.partition(":")[0]].transferable for spec in specs)
            else:
                assert head in specs and HEADS[head.partition(":")[0]].transferable


def test_template_documents_every_option():
    text = (REPO / "pipelines" / "folder-template.toml").read_text()
    tables = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"#?\s*\[([\w-]+)\]\s*$", line)
        if header:
            current = tables.setdefault(header.group(1), set())
        elif current is not None and (m := re.match(r"#\s*(\w+)\s*=", line)):
            current.add(m.group(1))
    for name, stage in pipeline.STAGES.items():
        assert tables.get(name) == set(stage.parameters()), name


def test_fashion_mnist_compares_several_backbones():
    plan = pipeline.load(REPO / "pipelines" / "fashion-mnist.toml")
    assert len({b["extract"]["backbone"] for b in plan.branches}) >= 2
    assert plan.data == "torchvision:FashionMNIST"


# --------------------------------------------------------------------------- bad files


BAD = {
    "unknown top-level key": ('dta = "x"\n[extract]\n', r"dta: unknown key \(did you mean: data\?\)"),
    "unknown option": ('data = "{data}"\n[extract]\nbackbon = "resnet18"\n',
                       r"extract\.backbon: unknown option of \[extract\] \(did you mean: backbone\?\)"),
    "unknown stage": ('data = "{data}"\n[extract]\n[fit-heads]\n',
                      r"fit-heads: unknown key \(did you mean: fit-head\?\)"),
    "wrong type": ('data = "{data}"\n[extract]\nbatch_size = "big"\n',
                   r"extract\.batch_size: expected an integer .*got 'big'"),
    "wrong type in a list": ('data = "{data}"\n[extract]\nbackbone = ["resnet18", 3]\n',
                             r"extract\.backbone: expected a string .*got 3"),
    "wrong top-level type": ('data = 3\n[extract]\n', r"data: expected a string, got 3"),
    "stage not a table": ('data = "{data}"\nextract = 3\n', r"extract: expected a table \(\[extract\]\) or false"),
    "missing data path": ('data = "/no/such/folder"\n[extract]\n',
                          r"data: /no/such/folder does not exist; expected a folder of images"),
    "no data key": ('[extract]\n', r"data: missing; expected the images"),
    "finetune without fit-head": ('data = "{data}"\n[extract]\n[finetune]\n', r"\[finetune\] needs \[fit-head\]"),
    "report without fit-head": ('data = "{data}"\n[extract]\n[report]\n', r"\[report\] needs \[fit-head\]"),
    "fit-head without extract": ('[fit-head]\n', r"\[fit-head\] needs \[extract\]"),
    "no stage": ('data = "{data}"\n', r"no stage to run"),
    "not TOML": ('data = \n', r"not a valid TOML file"),
    "unknown fetch": ('data = "/no/such"\nfetch = "sklearn:digit"\n[extract]\n',
                      r"fetch: unknown source 'sklearn:digit' \(did you mean: sklearn:digits\?\)"),
    "fetch scheme": ('data = "/no/such"\nfetch = "ftp://host/x.zip"\n[extract]\n', r"fetch: expected an http\(s\)://"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_pipeline_files_get_one_line_naming_file_and_key(case, tmp_path, cli_runner):
    text, pattern = BAD[case]
    path = tmp_path / "bad.toml"
    path.write_text(text.format(data=tmp_path))
    with pytest.raises(PipelineError, match=pattern):
        pipeline.load(path)
    result = run_cli(cli_runner, "run", path)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {path}: "), result.stderr
    assert "Traceback" not in result.output


@pytest.mark.parametrize("item, pattern", [
    ("extract.backbone", r"--set 'extract.backbone': expected KEY=VALUE"),
    ("a.b.c=1", r"keys are KEY or STAGE.KEY"),
    ("extract.crop=big", r"extract\.crop \(from --set\): expected an integer"),
    ("extract.cropp=1", r"extract\.cropp \(from --set\): unknown option of \[extract\] \(did you mean: crop\?\)"),
    ("data=/no/such/folder", r"data \(from --set\): /no/such/folder does not exist"),
    ("finetune.epochs=1", None),  # adds a stage: fine, the file has fit-head
])
def test_bad_overrides(item, pattern, tmp_path):
    path = write_pipeline(tmp_path)
    if pattern is None:
        assert pipeline.load(path, [item]).stages == ["extract", "fit-head", "finetune", "report"]
        return
    with pytest.raises(PipelineError, match=pattern):
        pipeline.load(path, [item])


def test_missing_pipeline_file(tmp_path, cli_runner):
    result = run_cli(cli_runner, "run", tmp_path / "nope.toml")
    assert result.exit_code == 2 and "nope.toml: no such pipeline file" in result.stderr


# --------------------------------------------------------------------------- fetching data


def _zip_of_images(tmp_path: Path) -> Path:
    folder = make_split_folder(tmp_path / "src" / "tiny_data", splits=(("train", 3), ("val", 2)))
    archive = tmp_path / "tiny_data.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, p.relative_to(folder.parent).as_posix())
        zf.writestr("__MACOSX/._junk", "x")
    return archive


def test_fetch_zip_unpacks_its_top_folder(tmp_path):
    archive = _zip_of_images(tmp_path)
    dest = fetchers.fetch_zip(archive.as_uri(), tmp_path / "datasets" / "tiny")
    assert sorted(p.name for p in dest.iterdir()) == ["train", "val"]
    assert len(list(dest.rglob("*.jpg"))) + len(list(dest.rglob("*.png"))) == 10
    assert [p.name for p in dest.parent.iterdir()] == ["tiny"]  # no leftovers


def test_pipeline_fetches_missing_data_once(tmp_path):
    archive = _zip_of_images(tmp_path)
    path = write_pipeline(tmp_path, data="{cache_dir}/datasets/tiny_data", fetch=archive.as_uri())
    out = pipeline.run(path, set=("fit-head=false", "report=false"), progress=False)
    root = tmp_path / "cache" / "datasets" / "tiny_data"
    assert out["branches"][0]["stages"]["extract"]["splits"] == {"train": {"n": 6, "skipped": 0},
                                                                 "val": {"n": 4, "skipped": 0}}
    archive.unlink()  # a second run finds the data and does not download again
    again = pipeline.run(path, set=("fit-head=false", "report=false"), progress=False)
    assert again["branches"][0]["stages"]["extract"]["reused"] is True and root.is_dir()


def test_fetch_failure_is_one_line(tmp_path):
    with pytest.raises(PipelineError, match=r"cannot download file://.*nothing\.zip"):
        fetchers.fetch_zip((tmp_path / "nothing.zip").as_uri(), tmp_path / "d")
    (tmp_path / "notzip.zip").write_text("hello")
    with pytest.raises(PipelineError, match="is not a zip file"):
        fetchers.fetch_zip((tmp_path / "notzip.zip").as_uri(), tmp_path / "d")
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- the demo


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            digest.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return digest.hexdigest()


def test_write_digits_is_deterministic_and_left_alone_when_complete(tmp_path):
    from PIL import Image

    from featurecache.pipeline.fetchers import write_digits

    a = write_digits(tmp_path / "a")
    b = write_digits(tmp_path / "b")
    assert _tree_digest(a) == _tree_digest(b)
    counts = {s: len(list((a / s).rglob("*.png"))) for s in ("train", "val", "test")}
    assert sum(counts.values()) == 1797 and counts["train"] > counts["val"] > 0 and counts["test"] > 0
    assert sorted(p.name for p in (a / "train").iterdir()) == [str(d) for d in range(10)]
    with Image.open(next((a / "val" / "3").iterdir())) as img:
        assert img.size == (32, 32) and img.mode == "L"
    stamp = next((a / "test" / "7").iterdir()).stat().st_mtime_ns
    write_digits(a)
    assert next((a / "test" / "7").iterdir()).stat().st_mtime_ns == stamp


def test_write_digits_refuses_a_foreign_folder(tmp_path):
    from featurecache.pipeline.fetchers import write_digits

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "file.txt").write_text("mine")
    with pytest.raises(PipelineError, match="not a complete digits folder"):
        write_digits(tmp_path / "x")


@pytest.mark.slow
def test_fc_demo_runs_offline_and_prints_the_report(tmp_path, cli_runner, real_weights, monkeypatch):
    # The demo pipeline as shipped, made small: a lower resolution, one head, one epoch.
    monkeypatch.chdir(tmp_path)
    result = run_cli(cli_runner, "demo", "--set", "extract.resize=32", "--set", "extract.crop=32",
                     "--set", "finetune.epochs=1",
                     "--set", "fit-head.head=['logreg:C=0.01;pre=standardize']")
    assert result.exit_code == 0, result.output
    last = result.stdout.strip().splitlines()
    assert last[-2].startswith("done in ") and last[-1].startswith("report: ")
    report = Path(last[-1].split("report: ", 1)[1])
    assert report.is_file() and report.is_relative_to(tmp_path / "fc-cache")
    assert (tmp_path / "fc-cache" / "datasets" / "digits" / ".complete").is_file()


@pytest.mark.slow
def test_pipeline_with_finetune_reuses_it(tmp_path, real_weights):
    path = write_pipeline(tmp_path, weights=real_weights,
                          extra='[finetune]\nhead = "logreg:C=1"\nepochs = 1\nbatch_size = 8\nworkers = 0\n')
    first = pipeline.run(path, progress=False)["branches"][0]["stages"]
    tuned = first["finetune"]
    assert tuned["head"] == "logreg:C=1" and tuned["epochs"] == 1
    assert tuned["start_accuracy"] == pytest.approx(tuned["head_accuracy"])
    assert Path(tuned["model"]).is_file()
    assert (Path(first["report"]).parent / "finetune_curves.png").is_file()
    before = _files(tmp_path / "cache")
    second = pipeline.run(path, progress=False)["branches"][0]["stages"]
    assert tuned["reused"] is False
    assert second["finetune"] == {**tuned, "reused": True} and second["report"] == first["report"]
    assert _files(tmp_path / "cache") == before  # looked up: not one file written again
