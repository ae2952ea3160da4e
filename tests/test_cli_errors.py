"""Every command answers bad input with one line on stderr and the documented exit code.

2: an unusable option, argument or input file; 3: a missing, locked, damaged or inconsistent
cache or run; 4: a write the machine refused (tests/test_faults.py); 1 only for an unexpected
error. Each leaf command of ``fc`` has cases here, and a new command without one fails
:func:`test_every_command_has_a_case`.
"""

from __future__ import annotations

import re
import warnings

import click
import pytest
from conftest import FAST, make_split_folder, run_cli

from featurecache.cli import cli

# (command path, arguments, exit code, pattern the message matches). {images}: a folder of
# images; {cache} and {run}: a small cache and a run fitted on it; {tmp}: an empty folder.
CASES = [
    ("extract", "{images} --batch-size 0", 2, r"Invalid value for '--batch-size': 0 is not in the range x>=1"),
    ("extract", "{images} --device tpu", 2, r"unknown device 'tpu'"),
    ("extract", "{images} --backbone mobilenet_v9", 2, r"unknown backbone 'mobilenet_v9'"),
    ("extract", "{tmp}/no-such-folder", 2, r"no-such-folder"),
    ("extract", "{images}/train --split train=lots", 2, r"train=lots"),
    ("extract", "{images} --layers features.99", 2, r"unknown layer 'features.99' for mobilenet_v2 in --layers "
                                                    r"\(did you mean: features.9"),
    ("extract", "{images} --layers features.14,concat", 2, r"'concat' names a set of the cache's features"),
    ("extract", "{images} --layers features.14,features.14", 2, r"--layers names features.14 twice"),
    ("extract", "{images} --tta mirror", 2, r"Invalid value for '--tta': 'mirror' is not one of 'none', 'flip'"),
    ("extract", "{images} --augment-views -1", 2, r"Invalid value for '--augment-views': -1 is not in the range x>=0"),
    ("extract", "{images}/val --split val=1 --augment-views 2", 2, r"--augment-views makes views of the train split"),
    ("backbones", "--no-such-option", 2, r"No such option '--no-such-option'"),
    ("cache list", "--cache-dir {images}/train/cats/cats_0.jpg", 2, r"is a file"),
    ("cache info", "no-such-cache", 3, r"no cache matches 'no-such-cache'"),
    ("cache rm", "no-such-cache", 3, r"no cache matches 'no-such-cache'"),
    ("cache verify", "no-such-cache", 3, r"no cache matches 'no-such-cache'"),
    ("cache verify", "{tmp}/good.toml", 3, r"good.toml is not a readable HDF5 cache"),
    ("weights import", "{tmp}/missing.pth --backbone mobilenet_v2", 2, r"weights file not found"),
    ("weights import", "{tmp}/missing.pth --backbone mobilenet_v9", 2, r"mobilenet_v9"),
    ("fit-head", "{cache} --head nosuchhead", 2, r"nosuchhead"),
    ("fit-head", "{cache} --head logreg:D=1", 2, r"\bD\b"),
    ("fit-head", "{cache} --cv 1", 2, r"Invalid value for '--cv': 1 is not in the range x>=2"),
    ("fit-head", "{cache} --device tpu", 2, r"unknown device 'tpu'"),
    ("fit-head", "no-such-cache", 3, r"no cache matches 'no-such-cache'"),
    ("heads", "no-such-command", 2, r"No such command 'no-such-command'"),
    ("heads show", "no-such-run", 3, r"no run matches 'no-such-run'"),
    ("finetune", "{run} --epochs 0", 2, r"Invalid value for '--epochs': 0 is not in the range x>=1"),
    ("finetune", "{run} --unfreeze last:x", 2, r"--unfreeze 'last:x'"),
    ("finetune", "{run} --optimizer adamx", 2, r"unknown --optimizer 'adamx'"),
    ("finetune", "{run} --device tpu", 2, r"unknown device 'tpu'"),
    ("finetune", "no-such-run", 3, r"no run matches 'no-such-run'"),
    ("predict", "{run} {images} --topk 0", 2, r"Invalid value for '--topk': 0 is not in the range x>=1"),
    ("predict", "{run} {tmp}/no-such-image.jpg", 2, r"no such file or folder: .*no-such-image\.jpg"),
    ("predict", "{run} {images} --device tpu", 2, r"unknown device 'tpu'"),
    ("predict", "no-such-run {images}", 3, r"no run matches 'no-such-run'"),
    ("run", "{tmp}/no-such-pipeline.toml", 2, r"no such pipeline file"),
    ("run", "{tmp}/malformed.toml", 2, r"not a valid TOML file"),
    ("run", "{tmp}/good.toml --set nonsense", 2, r"--set 'nonsense': expected KEY=VALUE"),
    ("run", "{tmp}/good.toml --set extract.batch_size=0", 2, r"batch.size must be at least 1"),  # no click here
    ("demo", "--set nonsense", 2, r"--set 'nonsense': expected KEY=VALUE"),
    ("demo", "--set extract.batch_sise=8", 2, r"extract\.batch_sise \(from --set\): unknown option"),
    ("report", "{run} --samples -1", 2, r"Invalid value for '--samples': -1 is not in the range x>=0"),
    ("report", "no-such-run", 3, r"no run matches 'no-such-run'"),
    ("curve", "no-such-run", 3, r"no run matches 'no-such-run'"),
    ("curve", "{run} --seeds 0", 2, r"Invalid value for '--seeds'"),
    ("curve", "{run} --head no-such-head", 3, r"has no head 'no-such-head'"),
    ("report", "{run} {run}", 2, r"pass --compare"),
    ("runs", "--cache-dir {images}/train/cats/cats_0.jpg", 2, r"is a file"),
    ("fit-head", "{cache} --seeds 0", 2, r"'--seeds'"),
    ("extract", "webdataset:{images}", 2, r"no \.tar shards in"),
    ("extract", "{images} --label-column species", 2, r"--label-column is for .*parquet:.* data, not folder data"),
    ("export", "{cache} {tmp}/f.xlsx --format xlsx", 2, r"Invalid value for '--format': 'xlsx' is not one of"),
    ("export", "{cache} {tmp}/f.parquet --views", 2, r"has no augmented views \(extract with --augment-views K\)"),
    ("export", "no-such-cache {tmp}/f.parquet", 3, r"no cache matches 'no-such-cache'"),
    ("fit-head", "{cache} --exclude {tmp}/no-such-list.txt", 2, r"--exclude: no such file .*no-such-list\.txt"),
    ("fit-head", "{cache} --exclude {tmp}/good.toml", 2, r"--exclude: none of the 2 paths in .*good\.toml"),
    ("audit", "no-such-cache", 3, r"no cache matches 'no-such-cache'"),
    ("audit", "{cache} --threshold 1.5", 2, r"Invalid value for '--threshold': 1.5 is not in the range 0<x<=1"),
    ("audit", "{cache} --list everything", 2, r"Invalid value for '--list': 'everything' is not one of"),
    ("audit", "{cache} --run {tmp}/no-such-run", 3, r"no run matches"),
]


def _leaf_commands(group: click.Group, prefix: str = ""):
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        if not isinstance(command, click.Group) or command.invoke_without_command:
            yield path
        if isinstance(command, click.Group):
            yield from _leaf_commands(command, path + " ")


@pytest.fixture(scope="module")
def places(tmp_path_factory) -> dict[str, str]:
    """The folders and files the cases point at: one small cache and a run, made once."""
    import featurecache
    from featurecache.errors import FeatureCacheWarning

    tmp = tmp_path_factory.mktemp("cli-errors")
    images = make_split_folder(tmp / "images")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FeatureCacheWarning)  # random weights: FAST features need none
        cache = featurecache.extract(str(images), cache_dir=str(tmp / "cache"), **FAST).cache
    run = featurecache.fit_head(cache, head=["logreg:C=1"], jobs=1, cache_dir=str(tmp / "cache"), progress=False)
    empty = tmp / "empty"
    empty.mkdir()
    (empty / "malformed.toml").write_text("data = \n[extract\n")
    (empty / "good.toml").write_text(f'data = "{images}"\n[extract]\n')
    return {"images": str(images), "cache": str(cache), "run": str(run.run_dir), "tmp": str(empty)}


def test_every_command_has_a_case():
    assert set(_leaf_commands(cli)) == {command for command, *_ in CASES}


@pytest.mark.parametrize("command, args, code, pattern", CASES,
                         ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_input_is_one_line_and_the_documented_exit_code(command, args, code, pattern, places, cli_runner):
    argv = [*command.split(), *args.format(**places).split()]
    result = run_cli(cli_runner, *argv)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert result.exit_code == code, f"exit code {result.exit_code}, documented {code}: {lines[0]}"
    assert result.stdout == ""


@pytest.mark.parametrize(("n", "word", "said"), [(1, "epoch", "1 epoch"), (2, "epoch", "2 epochs"),
                                                 (3, "batch", "3 batches"), (1, "batch", "1 batch"),
                                                 (1000, "image", "1,000 images"), (2, "class", "2 classes")])
def test_counts_are_said_in_english(n, word, said):
    from featurecache.errors import plural

    assert plural(n, word) == said
