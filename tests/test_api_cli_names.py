"""Each ``fc`` command and the public function it calls take parameters of the same names.

A command that gains an option its function lacks (or the reverse) fails here, and so does
a new command that is not paired with a function below.
"""

from __future__ import annotations

import importlib
import inspect

import click
import pytest

from featurecache.cli import cli
from featurecache.stages import BY_COMMAND, FUNCTIONS

# command path -> "module:function" it is a thin layer over: the public functions' commands
# (featurecache/stages.py), then the commands that wrap a helper of their own.
COMMANDS = {
    **{command: function.target for command, function in BY_COMMAND.items()},
    "demo": "featurecache.pipeline.demo:demo",
    "heads": "featurecache.sweep.stage:list_head_types",
    "heads show": "featurecache.sweep.runs:load_run",
    "backbones": "featurecache.backbones.models:list_backbones",
    "cache list": "featurecache.store:list_caches",
    "cache verify": "featurecache.store:verify_cache",
    "weights import": "featurecache.backbones.models:import_weights",
}
# Commands that combine a few store helpers instead of wrapping one function.
COMPOSED = {"cache info", "cache rm"}
# Presentation only: how the CLI prints, not what the function computes.
CLI_ONLY = {"as_json"}
CLI_ONLY_BY_COMMAND = {"backbones": {"dims"}}  # the feature-dimension column
API_ONLY = {"progress"}  # the CLI decides it from the terminal


def _leaf_commands(group: click.Group, prefix: str = ""):
    for name, command in sorted(group.commands.items()):
        path = f"{prefix}{name}"
        if isinstance(command, click.Group):
            if command.invoke_without_command:
                yield path, command
            yield from _leaf_commands(command, path + " ")
        else:
            yield path, command


LEAVES = dict(_leaf_commands(cli))


def test_every_command_is_paired_with_a_function():
    assert set(LEAVES) == set(COMMANDS) | COMPOSED


@pytest.mark.parametrize("path", sorted(COMMANDS))
def test_command_options_are_the_function_parameters(path):
    module, name = COMMANDS[path].split(":")
    function = getattr(importlib.import_module(module), name)
    api = set(inspect.signature(function).parameters) - API_ONLY
    command = {p.name for p in LEAVES[path].params} - CLI_ONLY - CLI_ONLY_BY_COMMAND.get(path, set())
    assert command == api, (f"fc {path}: only the CLI has {sorted(command - api)}, "
                            f"only {COMMANDS[path]} has {sorted(api - command)}")


def test_public_api_names():
    import featurecache

    assert {"extract", "load_features", "fit_head", "finetune", "predict", "report", "run"} <= set(featurecache.__all__)
    for function in FUNCTIONS:
        value = getattr(featurecache, function.name)
        assert callable(value) and value.__name__ == function.name and value.__module__ == function.module


def test_import_and_help_load_no_heavy_module():
    """``import featurecache`` and ``fc --help`` import neither torch nor h5py nor scikit-learn."""
    import subprocess
    import sys

    code = ("import sys, featurecache, featurecache.cli\n"
            "from click.testing import CliRunner\n"
            "assert CliRunner().invoke(featurecache.cli.cli, ['--help']).exit_code == 0\n"
            "print(' '.join(m for m in ('torch', 'h5py', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
