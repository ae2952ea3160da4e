"""The ``fc`` command line: a thin layer over the Python API.

Each command turns its options into one call of a public function with the same
parameter names. Errors derived from :class:`FeatureCacheError` become one line on
stderr and a non-zero exit code here, in :class:`FcGroup`, and nowhere else.
Heavy modules (torch, h5py, scikit-learn) are imported inside the commands.
"""

from __future__ import annotations

import json
import sys

import click

from .errors import FeatureCacheError


class FcGroup(click.Group):
    """Turns library errors into one-line messages and exit codes."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FeatureCacheError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)


class FloatTriple(click.ParamType):
    name = "R,G,B"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            parts = tuple(float(v) for v in str(value).split(","))
        except ValueError:
            parts = ()
        if len(parts) != 3:
            self.fail(f"{value!r} is not three comma-separated numbers", param, ctx)
        return parts


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@click.group(cls=FcGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="featurecache")
def cli():
    """featurecache: extract features once, try many heads in seconds, fine-tune what wins."""


# --------------------------------------------------------------------------- stage one

_cache_dir = click.option("--cache-dir", type=click.Path(file_okay=False), default=None, envvar="FC_CACHE_DIR",
                          help="Where caches and runs live (default ./cache, env FC_CACHE_DIR).")
_json = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")


@cli.command()
@click.argument("data")
@click.option("--backbone", default="mobilenet_v2", show_default=True, help="Model name (fc backbones), or timm/NAME.")
@click.option("--weights", default="DEFAULT", show_default=True, help="Weights enum name (IMAGENET1K_V1, DEFAULT, ...) or none.")
@click.option("--weights-file", type=click.Path(dir_okay=False), default=None, help="A state dict file (needs --resize and --crop).")
@click.option("--layer", default=None, help="Named module to read, globally average-pooled (default: the penultimate layer).")
@click.option("--split", default=None, help="Split fractions for a single folder or manifest, e.g. train=0.8,val=0.2.")
@click.option("--root", default=None, help="Files of a torchvision:NAME dataset.")
@click.option("--seed", default=0, show_default=True, help="Seed of the stratified split and --limit sample.")
@click.option("--limit", type=int, default=None, help="Use at most N images per split (a stratified sample).")
@click.option("--resize", type=int, default=None, help="Resize the shorter side to this (default: from the weights).")
@click.option("--crop", type=int, default=None, help="Center crop size (default: from the weights).")
@click.option("--mean", type=FloatTriple(), default=None, help="Normalization mean R,G,B.")
@click.option("--std", type=FloatTriple(), default=None, help="Normalization std R,G,B.")
@click.option("--interpolation", type=click.Choice(["nearest", "bilinear", "bicubic"]), default=None)
@click.option("--draft/--no-draft", default=False, show_default=True,
              help="Decode large JPEGs at reduced size (faster; features differ slightly).")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--workers", type=int, default=None, help="DataLoader workers (default: usable cores).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True,
              help="auto: AMP (fp16) on CUDA, fp32 on CPU.")
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Storage type of the features.")
@_cache_dir
@click.option("--strict", is_flag=True, help="Fail on the first unusable image instead of skipping it.")
@click.option("--max-image-pixels", type=int, default=None, help="Skip images larger than this (default: PIL's bomb limit).")
@click.option("--lock-timeout", type=float, default=None,
              help="Seconds to wait for another run on the same cache (default: wait).")
@_json
def extract(as_json, **options):
    """Extract penultimate-layer features of DATA into the cache.

    DATA is a folder with train/ val/ test/ class folders, one folder of class
    folders (with --split), a CSV manifest (path,label[,split]) or torchvision:NAME.
    """
    from .extractor import extract as run_extract

    result = run_extract(**options, progress=not as_json and sys.stderr.isatty())
    if as_json:
        emit_json(result.to_dict())
        return
    state = "reused" if result.reused else f"{result.images_per_s:.1f} images/s"
    click.echo(f"{result.cache}  ({state}, {result.seconds:.1f} s, {result.feature_dim} features)")
    click.echo(table([{"split": k, **v} for k, v in result.splits.items()], ["split", "n", "skipped"]))
    for split, path, reason in result.skipped[:10]:
        click.echo(f"skipped {split}/{path}: {reason}", err=True)
    if len(result.skipped) > 10:
        click.echo(f"... and {len(result.skipped) - 10} more skipped (fc cache info lists them)", err=True)


@cli.command()
@click.option("--timm", "include_timm", is_flag=True, help="Also list timm models (timm/NAME).")
@click.option("--dims/--no-dims", default=True, show_default=True, help="Compute each model's feature dimension.")
@_json
def backbones(include_timm, dims, as_json):
    """List backbones and the size of their features."""
    from . import backbones as bb

    rows = []
    for name in bb.list_backbones(include_timm=include_timm):
        row = {"name": name}
        if dims and not name.startswith(bb.TIMM_PREFIX):
            row["feature_dim"] = bb.feature_dim(name)
            row["weights"] = ",".join(w for w in bb.weight_names(name) if w != "DEFAULT")
        rows.append(row)
    if as_json:
        emit_json(rows)
    else:
        click.echo(table(rows, ["name", "feature_dim", "weights"] if dims else ["name"]))


@cli.group()
def cache():
    """List, inspect and remove feature caches."""


@cache.command("list")
@_cache_dir
@_json
def cache_list(cache_dir, as_json):
    """Every cache with its backbone, data and size."""
    from . import store

    entries = store.list_caches(cache_dir)
    if as_json:
        emit_json(entries)
        return
    rows = []
    for e in entries:
        cfg = e.get("config", {})
        rows.append({
            "cache": e["path"].rsplit("/", 1)[-1],
            "state": "complete" if e["complete"] else "incomplete",
            "backbone": cfg.get("backbone", ""),
            "data": cfg.get("data", {}).get("root", ""),
            "splits": " ".join(f"{k}={v['n']}" for k, v in e.get("splits", {}).items()),
            "size": _human_bytes(e["bytes"]),
        })
    click.echo(table(rows, ["cache", "state", "backbone", "splits", "size", "data"]) if rows else "no caches")


@cache.command("info")
@click.argument("cache_ref", metavar="CACHE")
@_cache_dir
@_json
def cache_info(cache_ref, cache_dir, as_json):
    """Provenance, splits and skipped images of one cache (path, name or key prefix)."""
    from . import store

    path = store.resolve(cache_ref, cache_dir)
    meta = store.info(path)
    meta["skipped"] = {s: store.load_skipped(path, s) for s in meta["splits"]}
    if as_json:
        emit_json(meta)
        return
    cfg = meta["config"]
    click.echo(f"cache     {meta['path']}")
    click.echo(f"key       {meta['key']}")
    click.echo(f"backbone  {cfg['backbone']} ({cfg['layer']}), weights {json.dumps(cfg['weights'])}")
    click.echo(f"features  {cfg.get('feature_dim')} x {cfg['dtype']}, precision {cfg['precision']}")
    click.echo(f"preproc   {json.dumps(cfg['preprocess'])}")
    click.echo(f"data      {cfg['data'].get('root')} ({cfg['data'].get('kind')})")
    click.echo(f"classes   {', '.join(meta['classes'])}")
    click.echo(f"created   {cfg.get('created')} with {json.dumps(cfg.get('versions', {}))}")
    click.echo(table([{"split": k, **v} for k, v in meta["splits"].items()], ["split", "n", "skipped", "dim", "dtype"]))
    for split, items in meta["skipped"].items():
        for path_, reason in items:
            click.echo(f"skipped {split}/{path_}: {reason}")


@cache.command("rm")
@click.argument("cache_refs", metavar="CACHE...", nargs=-1, required=True)
@_cache_dir
def cache_rm(cache_refs, cache_dir):
    """Delete caches (with their partial shards)."""
    from . import store

    for ref in cache_refs:
        for removed in store.remove(store.resolve(ref, cache_dir)):
            click.echo(f"removed {removed}")


@cli.group()
def weights():
    """Manage pretrained weights for offline use."""


@weights.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--backbone", required=True, help="The torchvision model the file belongs to.")
@click.option("--weights", default="DEFAULT", show_default=True, help="The weights enum member it is.")
def weights_import(file, backbone, weights):
    """Check FILE against torchvision's hash and put it into the torch hub cache."""
    from .backbones import import_weights

    out = import_weights(file, backbone=backbone, weights=weights)
    click.echo(f"{out['weights']} -> {out['path']}")


def main() -> None:
    cli(prog_name="fc")


if __name__ == "__main__":
    main()
