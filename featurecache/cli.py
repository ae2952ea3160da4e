"""The ``fc`` command line (also installed as ``featurecache``): a thin layer over the Python API.

Each command turns its options into one call of a public function with the same
parameter names. Errors derived from :class:`FeatureCacheError`, and click's usage
errors, become one line on stderr and a non-zero exit code here, in :class:`FcGroup`,
and nowhere else: 2 for unusable input or options, 3 for a missing, locked, damaged or
inconsistent cache or run, 4 for a write the machine refused (a full disk, a quota, a
read-only file system, no permission). A closed stdout (``fc runs | head -1``) ends the
command quietly, with the exit code of a process killed by SIGPIPE (141), as other Unix
tools do. Heavy modules (torch, h5py, scikit-learn) are imported inside the commands.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import warnings
from typing import NoReturn

import click

from . import __version__
from .errors import FeatureCacheError, FeatureCacheWarning, plural

PROG_NAMES = ("fc", "featurecache")  # the console scripts; fc is also a shell builtin (see the README)
BROKEN_PIPE = 141  # the exit code of a process that SIGPIPE ended: 128 + 13

_show_warning = warnings.showwarning


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    if issubclass(category, FeatureCacheWarning):
        click.echo(f"Warning: {message}", err=True)
    else:
        _show_warning(message, category, filename, lineno, file, line)


class OneLineUsageError(click.ClickException):
    """A click usage error shown as one line (``Error: ...``), without the usage text; exit code 2."""

    exit_code = 2


def _one_line(exc: click.UsageError) -> click.ClickException:
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):
        return exc  # a group given no command: its help, as click shows it
    hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
    return OneLineUsageError(exc.format_message() + hint)


class FcGroup(click.Group):
    """Turns library errors and click's usage errors into one-line messages and exit codes."""

    group_class = type  # subgroups (fc cache, fc heads, ...) are FcGroups too

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:  # fc --no-such-option
            raise _one_line(exc) from None

    def invoke(self, ctx):
        warnings.showwarning = _one_line_warning
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # a subcommand's options or arguments
            raise _one_line(exc) from None
        except FeatureCacheError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                _quiet_broken_pipe()
            from .files import is_refused, refused_error

            if not is_refused(exc):
                raise
            error = refused_error(exc)  # what no stage turned into a StorageError
            click.echo(f"Error: {error}", err=True)
            sys.exit(error.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)


def _quiet_broken_pipe() -> NoReturn:
    """The reader of stdout has gone (``| head -1``): stop quietly, as a process that SIGPIPE ended."""
    with contextlib.suppress(OSError, ValueError):  # the flush of stdout at exit must not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    sys.exit(BROKEN_PIPE)


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


def call_stage(function, as_json: bool, options: dict, progress: bool | None = None):
    """Call a stage's API function with the command's options.

    ``progress`` None: a progress bar shows when stderr is a terminal and there is no --json.
    True: the stage shows a bar on a terminal and log lines otherwise (:mod:`featurecache.progress`).
    With --json the result is printed as JSON and None returned; otherwise the result is returned to print.
    """
    if progress is None:
        progress = not as_json and sys.stderr.isatty()
    result = function(**options, progress=progress)
    if not as_json:
        return result
    emit_json(result.to_dict())
    return None


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def _human_bytes(n: int) -> str:
    from .files import human_bytes

    return human_bytes(n)


@click.group(cls=FcGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__)
def cli():
    """featurecache: extract features once, try many heads in seconds, fine-tune what wins."""


# --------------------------------------------------------------------------- stage one

_cache_dir = click.option("--cache-dir", type=click.Path(file_okay=False), default=None, envvar="FC_CACHE_DIR",
                          help="Where caches and runs live (default ./cache, env FC_CACHE_DIR).")
_json = click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
_trust = click.option("--trust", is_flag=True,
                      help="Also load a run saved in the old pickle format (model.joblib). Loading a pickle can run "
                           "any code it holds: only for runs you made or whose author you trust.")
_workers = click.option("--workers", type=click.IntRange(min=0), default=None,
                        help="DataLoader workers (default: usable cores).")
_device = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
_precision = click.option("--precision", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto",
                          show_default=True, help="auto: AMP (fp16) on CUDA, fp32 on CPU.")
_count = click.IntRange(min=1)  # sizes and counts: 0 is never a usable value


@cli.command()
@click.argument("data")
@click.option("--backbone", default="mobilenet_v2", show_default=True, help="Model name (fc backbones), or timm:NAME.")
@click.option("--weights", default="DEFAULT", show_default=True,
              help="Weights enum name (IMAGENET1K_V1, DEFAULT, ...) or none.")
@click.option("--weights-file", type=click.Path(dir_okay=False), default=None,
              help="A state dict file (needs --resize and --crop).")
@click.option("--layer", default=None,
              help="Named module to read, globally average-pooled (default: the penultimate layer).")
@click.option("--layers", metavar="auto|none|NAME,...", default="auto", show_default=True,
              help="More named modules to store beside the main features, each globally average-pooled, from the "
                   "same forward pass (e.g. features.14,features.17). auto: the ends of the backbone's stages "
                   "where they are known (MobileNetV2: features.6,features.13,features.17); none: nothing more.")
@click.option("--tta", type=click.Choice(["none", "flip"]), default="none", show_default=True,
              help="flip: every stored feature is the mean over the image and its horizontal mirror.")
@click.option("--augment-views", type=click.IntRange(min=0), default=0, show_default=True, metavar="K",
              help="Also store K augmented views of each train image (random resized crop and flip, as fine-tuning's "
                   "light augmentation), each seeded by --seed, the image and the view.")
@click.option("--split", default=None, help="Split fractions for a single folder or manifest, e.g. train=0.8,val=0.2.")
@click.option("--root", default=None, help="Files of a torchvision:NAME dataset.")
@click.option("--label-key", default=None, metavar="cls|json:FIELD",
              help="webdataset: the label of a sample: its .cls member (default) or a field of its .json.")
@click.option("--image-column", default=None, help="parquet:, hf: the image column (default: found by its type).")
@click.option("--label-column", default=None, help="parquet:, hf: the label column (default: a ClassLabel, or label).")
@click.option("--seed", default=0, show_default=True, help="Seed of the stratified split and --limit sample.")
@click.option("--limit", type=_count, default=None, help="Use at most N images per split (a stratified sample).")
@click.option("--resize", type=_count, default=None,
              help="Resize the shorter side to this (default: from the weights).")
@click.option("--crop", type=_count, default=None, help="Center crop size (default: from the weights).")
@click.option("--mean", type=FloatTriple(), default=None, help="Normalization mean R,G,B.")
@click.option("--std", type=FloatTriple(), default=None, help="Normalization std R,G,B.")
@click.option("--interpolation", type=click.Choice(["nearest", "bilinear", "bicubic"]), default=None)
@click.option("--draft/--no-draft", default=False, show_default=True,
              help="Decode large JPEGs at reduced size (faster; features differ slightly).")
@click.option("--batch-size", type=_count, default=None,
              help="Images per batch [default: 64 on a GPU, 4 on a CPU; half that with --tta flip, whose forward "
                   "passes hold each image and its mirror].")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Decoding worker processes (default: on a CPU, the cores split between decoding and the model "
                   "by their measured costs; on a GPU, every core).")
@_device
@_precision
@click.option("--dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Storage type of the features.")
@click.option("--decode", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
              help="Where JPEGs are decoded: gpu (batched, on the CUDA device; part of the cache key), cpu (PIL in "
                   "the workers), auto (gpu on a CUDA device that can, else cpu).")
@click.option("--aoti", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Compile the forward pass with torch.export and AOTInductor (CPU, fp32; cached in "
                   "CACHE_DIR/compiled per machine, backbone, batch and shape): auto uses a cached artifact when "
                   "exact and faster, and compiles when the job is long enough to pay for it; on compiles whenever "
                   "none is cached; off never.")
@click.option("--shard", metavar="I/N", default=None,
              help="Compute slice I of N (0 <= I < N) for schedulers without torchrun (Slurm arrays); the last slice "
                   "to finish, or a later run without --shard, writes the cache.")
@_cache_dir
@click.option("--strict", is_flag=True, help="Fail on the first unusable image instead of skipping it.")
@click.option("--max-image-pixels", type=_count, default=None,
              help="Skip images larger than this (default: PIL's bomb limit).")
@click.option("--lock-timeout", type=click.FloatRange(min=0), default=None,
              help="Seconds to wait for another run on the same cache (default: wait).")
@click.option("--checkpoint-every", type=_count, default=256, show_default=True,
              help="Images between resumable checkpoints (there is one every 5 s too).")
@_json
def extract(as_json, **options):
    """Extract penultimate-layer features of DATA into the cache.

    DATA is a folder with train/ val/ test/ class folders, one folder of class
    folders (with --split), a CSV manifest (path,label[,split]), torchvision:NAME,
    webdataset:DIR (tar shards train-*.tar, val-*.tar, ...), hf:DIR or hf:NAME (a
    Hugging Face dataset) or parquet:DIR (train.parquet, val-*.parquet, ...).
    Under torchrun (torchrun --nproc-per-node N -m featurecache extract ...) every
    rank computes a share and the first writes the cache.
    """
    from .extraction.distributed import is_primary
    from .extraction.stage import extract as run_extract

    # Under torchrun the first rank speaks for the job; the others print progress only.
    result = call_stage(run_extract, as_json and is_primary(), options, progress=True)
    if result is None or not is_primary():
        return
    if not result.splits:  # a --shard slice whose cache is not written yet
        done = f"slice {options['shard']} done ({result.images_per_s:.1f} images/s, {result.seconds:.1f} s)"
        rest = (f"{plural(result.missing, 'image')} of other slices to go: the last slice to finish, or fc extract "
                "without --shard, writes" if result.missing else "another process is writing")
        click.echo(f"{done}; {rest} {result.cache}")
        return
    state = "reused" if result.reused else f"{result.images_per_s:.1f} images/s"
    click.echo(f"{result.cache}  ({state}, {result.seconds:.1f} s, {result.feature_dim} features)")
    if result.layers:
        click.echo("layers: " + ", ".join(f"{name} ({dim})" for name, dim in result.layers.items()))
    rows = [{"split": k, **v} for k, v in result.splits.items()]
    if options["augment_views"]:
        rows.append({"split": f"train views ({options['augment_views']} per image)", "n": result.views})
    click.echo(table(rows, ["split", "n", "skipped"]))
    for split, path, reason in result.skipped[:10]:
        click.echo(f"skipped {split}/{path}: {reason}", err=True)
    if len(result.skipped) > 10:
        click.echo(f"... and {len(result.skipped) - 10} more skipped (fc cache info lists them)", err=True)


@cli.command("export")
@click.argument("cache")
@click.argument("out")
@click.option("--format", "format", type=click.Choice(["parquet", "npy", "csv"]), default="parquet", show_default=True,
              help="parquet: one file, a list column of features; npy: a folder of arrays; csv: one file.")
@click.option("--layers", is_flag=True, help="Also each stored layer (fc extract --layers), as columns of its own.")
@click.option("--views", is_flag=True, help="Also the augmented training views (fc extract --augment-views).")
@_cache_dir
@_json
def export_command(cache, out, format, layers, views, cache_dir, as_json):
    """Write the features of every split of CACHE to OUT (path, label, class and split with each row)."""
    from .extraction.export import export

    result = export(cache, out, format=format, layers=layers, views=views, cache_dir=cache_dir)
    if as_json:
        emit_json(result)
        return
    rows = ", ".join(f"{split} {n}" for split, n in result["rows"].items())
    click.echo(f"{result['out']}  ({result['format']}; {rows}; columns {', '.join(result['columns'])})")


@cli.command()
@click.option("--timm", "include_timm", is_flag=True, help="Also list timm models (timm/NAME).")
@click.option("--dims/--no-dims", default=True, show_default=True, help="Compute each model's feature dimension.")
@_json
def backbones(include_timm, dims, as_json):
    """List backbones and the size of their features."""
    from .backbones import models as bb

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
    graph = ""
    if "graph" in cfg:
        graph = f", {cfg['graph']} on {cfg.get('device', '?')}, batch {cfg.get('batch_size', '?')}"
    tta = f", mean over the image and its mirror (tta {cfg['tta']})" if cfg.get("tta") else ""
    click.echo(f"features  {cfg.get('feature_dim')} x {cfg['dtype']}, precision {cfg['precision']}{graph}{tta}")
    if meta["layers"]:
        click.echo("layers    " + ", ".join(f"{name} ({dim})" for name, dim in meta["layers"].items()))
    if meta["views"]["n"] or cfg.get("augment_views"):
        augment = cfg.get("augment_views", {})
        click.echo(f"views     {meta['views']['n']} rows: {meta['views']['per_image']} per train image "
                   f"({augment.get('policy', '?')} augmentation, seed {augment.get('seed', '?')})")
    if meta["activations"]:
        click.echo(f"activations {', '.join(meta['activations'])} (fc finetune --from-activations)")
    click.echo(f"preproc   {json.dumps(cfg['preprocess'])}")
    click.echo(f"data      {cfg['data'].get('root')} ({cfg['data'].get('kind')})")
    click.echo(f"classes   {', '.join(meta['classes'])}")
    click.echo(f"created   {cfg.get('created')} with {json.dumps(cfg.get('versions', {}))}")
    click.echo(table([{"split": k, **v} for k, v in meta["splits"].items()], ["split", "n", "skipped", "dim", "dtype"]))
    for split, items in meta["skipped"].items():
        for path_, reason in items:
            click.echo(f"skipped {split}/{path_}: {reason}")


@cache.command("verify")
@click.argument("cache", metavar="CACHE")
@_cache_dir
@_json
def cache_verify(cache, cache_dir, as_json):
    """Read every number of CACHE, checking each chunk's checksum (path, name or key prefix).

    A damaged cache is an error (exit code 3); a cache written before featurecache checksummed
    its features is read through, and said to be unverifiable.
    """
    from .store import verify_cache

    report = verify_cache(cache=cache, cache_dir=cache_dir)
    if as_json:
        emit_json(report)
        return
    name = os.path.basename(report["cache"])
    if report["checksums"]:
        click.echo(f"{name}: sound ({report['values']:,} values in {report['datasets']} datasets, every checksum "
                   "verified)")
    else:
        click.echo(f"{name}: read through, but written without checksums (by an older featurecache): damage to "
                   f"its numbers cannot be told; fc cache rm {name}, then the same fc extract, adds them")


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
    from .backbones.models import import_weights

    out = import_weights(file, backbone=backbone, weights=weights)
    click.echo(f"{out['weights']} -> {out['path']}")


# --------------------------------------------------------------------------- stage three


@cli.command()
@click.argument("run")
@click.option("--head", default="best-transferable", show_default=True,
              help="The run's head to start from: best-transferable (the best-ranked head that can become a layer), "
                   "best, a spec or a slug.")
@click.option("--epochs", type=_count, default=5, show_default=True)
@click.option("--unfreeze", default="all", show_default=True, help="Backbone blocks to train: all, none or last:N.")
@click.option("--backbone-lr-mult", type=click.FloatRange(min=0), default=0.1, show_default=True,
              help="Backbone learning rate = lr x this.")
@click.option("--bn", default="frozen", show_default=True, help="Batch norm: frozen (pretrained statistics) or train.")
@click.option("--augment", default="light", show_default=True,
              help="none, light (random resized crop, flip) or strong (+ TrivialAugment).")
@click.option("--optimizer", default="adamw", show_default=True, help="adamw or sgd.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Head learning rate (default: 1e-4 adamw, 0.003 sgd).")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=None, help="Default: 0.05 adamw, 1e-4 sgd.")
@click.option("--warmup-epochs", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Linear warmup, then cosine decay.")
@click.option("--batch-size", type=_count, default=32, show_default=True,
              help="The global batch: under torchrun split across the processes (the learning rate needs no change).")
@click.option("--accumulate", type=_count, default=1, show_default=True, help="Batches per optimizer step.")
@_workers
@_device
@_precision
@click.option("--patience", type=click.IntRange(min=0), default=3, show_default=True,
              help="Epochs without improvement before stopping (0: never).")
@click.option("--checkpoint-every", type=_count, default=50, show_default=True,
              help="Optimizer steps between mid-epoch checkpoints.")
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint of the same configuration.")
@click.option("--seed", default=0, show_default=True)
@click.option("--from-activations/--from-images", default=None,
              help="With --unfreeze last:N: store the input of the first trained block once in the cache (float16) "
                   "and train from it, without decoding images or running the frozen blocks. Default: chosen by "
                   "timing a few batches both ways, and said.")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="The most the stored activations may take in memory, e.g. 2G (default: half the available).")
@_trust
@_cache_dir
@_json
def finetune(as_json, **options):
    """Fine-tune backbone and head of a stage-two RUN (a run directory, run id or unique prefix).

    The run's cache decides backbone, weights and preprocessing; the head starts where stage two
    left it, so step 0 reproduces the head's accuracy. Writes the best epoch under RUN/finetune/ as
    model.safetensors (the weights fc predict loads) and a self-contained TorchScript model.pt.
    Under torchrun (torchrun --nproc-per-node N -m featurecache finetune RUN) the ranks train with
    DistributedDataParallel, each on its share of every global --batch-size batch, so the learning
    rate stays right for any N; the first rank writes.
    """
    from .extraction.distributed import is_primary
    from .finetuning.trainer import finetune as run_finetune
    from .metrics import summary

    # Under torchrun the first rank speaks for the job; the others print nothing.
    result = call_stage(run_finetune, as_json and is_primary(), options, progress=True)
    if result is None or not is_primary():
        return
    rows = []
    for split, tuned in result.metrics["finetuned"].items():
        head_only = summary(result.metrics["head"].get(split, {}))
        for name, value in summary(tuned).items():
            before = head_only.get(name)
            rows.append({"split": split, "metric": name, "head only": "" if before is None else f"{before:.4f}",
                         "fine-tuned": f"{value:.4f}"})
    epochs = [{"epoch": h["epoch"], "train_loss": "" if h["train_loss"] is None else f"{h['train_loss']:.4f}",
               f"{result.split}_loss": f"{h['val_loss']:.4f}", f"{result.split}_accuracy": f"{h['val_accuracy']:.4f}",
               "seconds": f"{h['seconds']:.1f}"} for h in result.history]
    click.echo(f"{result.model}  ({'reused' if result.reused else plural(result.epochs, 'epoch')}, "
               f"best epoch {result.best_epoch}{', stopped early' if result.stopped_early else ''})")
    click.echo(table(epochs, list(epochs[0])))
    click.echo(f"head {result.head}: {result.split} accuracy {result.head_accuracy:.4f}, "
               f"step 0 {result.start_accuracy:.4f}, best {result.best_accuracy:.4f}")
    click.echo(table(rows, ["split", "metric", "head only", "fine-tuned"]))
    held_out = [split for split in result.metrics["finetuned"] if split != result.split]
    click.echo(f"the best epoch was chosen on {result.split}: its {result.split} scores are not a held-out estimate; "
               + (f"{', '.join(held_out)} is held out" if held_out else
                  "there is no test split, so no score here is (extract a test split to have one)"))


@cli.command()
@click.argument("model")
@click.argument("paths", metavar="PATH...", nargs=-1, required=True)
@click.option("--topk", type=_count, default=5, show_default=True)
@click.option("--head", default="best", show_default=True,
              help="With a run: which head (best, best-transferable, a spec or a slug).")
@click.option("--batch-size", type=_count, default=32, show_default=True)
@_workers
@_device
@_trust
@_cache_dir
@_json
def predict(as_json, **options):
    """Classify images (files or folders, recursively) with MODEL.

    MODEL is a fine-tuning folder (its model.safetensors, checked against its recorded hash), an
    exported model.pt, or a stage-two run directory or run id (its backbone and head, without
    fine-tuning). Prints CSV
    (path,class,probability,topk) or, with --json, {"predictions": [...]}.
    Unreadable images are reported on stderr and skipped.
    """
    from .finetuning.prediction import predict as run_predict
    from .finetuning.prediction import to_csv

    result = run_predict(**options, progress=True)
    if as_json:
        emit_json(result)
    else:
        click.echo(to_csv(result), nl=False)
    for item in result["skipped"]:
        click.echo(f"skipped {item['path']}: {item['reason']}", err=True)


# --------------------------------------------------------------------------- pipelines and reports

_set = click.option("--set", "set", multiple=True, metavar="KEY=VALUE",
                    help="Override a key of the file: data=/path, extract.backbone=resnet50, finetune.epochs=1, "
                         "finetune=false, ... (repeatable; values are TOML, else strings).")


def _echo_pipeline(result: dict) -> None:
    """The outcome of each branch, ending with where the reports are."""
    reports = []
    for branch in result["branches"]:
        stages = branch["stages"]
        prefix = f"[{branch['label']}] " if branch["label"] else ""
        if "fit-head" in stages:
            click.echo(f"{prefix}run {stages['fit-head']['run_dir']}, best head {stages['fit-head']['best']}")
        if "finetune" in stages:
            click.echo(f"{prefix}fine-tuned model {stages['finetune']['model']}")
        if "report" in stages:
            reports.append(f"{prefix}report: {stages['report']}")
    click.echo(f"done in {result['seconds']:.1f} s")
    for line in reports:
        click.echo(line)
    if result.get("comparison"):
        click.echo(f"comparison: {result['comparison']}")


@cli.command("run")
@click.argument("pipeline", type=click.Path(dir_okay=False))
@_set
@_json
def run_command(pipeline, set, as_json):
    """Run the stages a PIPELINE.toml file declares: extract, fit-head, finetune, report.

    Each stage is content-addressed, so an unchanged stage is looked up, not recomputed.
    """
    from .pipeline.run import run

    result = run(pipeline, set=set, progress=not as_json)
    if as_json:
        emit_json(result)
    else:
        _echo_pipeline(result)


@cli.command("demo")
@_set
@_json
def demo_command(set, as_json):
    """Run the offline demo (featurecache/pipeline/demo.toml): digits as images, MobileNetV2, the sweep, a report."""
    from .pipeline.demo import demo

    result = demo(set=set, progress=not as_json)
    if as_json:
        emit_json(result)
    else:
        _echo_pipeline(result)


@cli.command("report")
@click.argument("run", metavar="RUN...", nargs=-1, required=True)
@click.option("--head", default="best", show_default=True,
              help="The head to detail: best, best-transferable, a spec or a slug.")
@click.option("--samples", type=click.IntRange(min=0), default=16, show_default=True,
              help="Images in the grid of sample predictions (0: none).")
@click.option("--compare", is_flag=True,
              help="Compare the RUNs in one table of backbone x head family, with intervals and seconds.")
@_trust
@_cache_dir
@_json
def report_command(as_json, **options):
    """Write the Markdown and HTML report of a stage-two RUN under RUN/report/.

    RUN is a run directory, run id or unique prefix. With --compare, several RUNs go into one
    comparison under <cache dir>/comparisons/.
    """
    from .reporting.pages import report

    path = report(**options)
    if as_json:
        emit_json({"report": str(path)})
    else:
        click.echo(str(path))


# --------------------------------------------------------------------------- stage two


def _echo_leaderboard(leaderboard, selection_split, final_split, cv=None):
    from .sweep.leaderboard import leaderboard_table, selection_note

    rows, columns = leaderboard_table(leaderboard, final_split)
    click.echo(selection_note(selection_split, final_split, cv, leaderboard))
    click.echo(table(rows, columns))


@cli.command("fit-head")
@click.argument("cache")
@click.option("--head", multiple=True, metavar="SPEC",
              help="Grid spec NAME[:PARAM=V1,V2,...[;PARAM=V...]], e.g. 'logreg:C=0.1,1;pre=standardize' (repeatable).")
@click.option("--sweep-file", type=click.Path(dir_okay=False), default=None,
              help="A TOML file of [[head]] tables (name = ..., PARAM = [values]).")
@click.option("--jobs", type=_count, default=None, help="Heads fitted in parallel (default: usable cores).")
@click.option("--seed", default=0, show_default=True)
@click.option("--class-weight", type=click.Choice(["balanced"]), default=None,
              help="Weight classes inversely to their frequency (heads that support it).")
@click.option("--cv", type=click.IntRange(min=2), default=5, show_default=True,
              help="Folds of the cross-validation on train when there is no val split.")
@click.option("--device", default="auto", show_default=True, help="Torch heads: auto, cpu, cuda or cuda:N.")
@click.option("--seeds", type=_count, default=1, show_default=True,
              help="Refit the heads whose fit depends on a seed with K seeds and show the mean and spread.")
@click.option("--calibrate", type=click.Choice(["temperature", "none"]), default="temperature", show_default=True,
              help="Fit one temperature per head on the selection split; predict and export apply it "
                   "(none: the heads' own probabilities).")
@click.option("--ensemble/--no-ensemble", default=True, show_default=True,
              help="Add the ensemble of the heads tied with the most accurate one (greedy selection on the "
                   "selection split, scored by cross-fitting); it ranks first unless significantly worse.")
@click.option("--features", default="auto", show_default=True, metavar="SET",
              help="What heads learn from: penultimate, a layer stored with fc extract --layers, concat (all of "
                   "them side by side), or auto: on a cache with layers every head on concat and on penultimate, "
                   "chosen on the selection split; else penultimate.")
@click.option("--views/--no-views", default=None,
              help="Also learn from the augmented views stored with fc extract --augment-views "
                   "(default: when the cache has them). Scores never use views.")
@click.option("--exclude", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="Leave out the images a file lists (one path a line, as fc audit --list prints them): train "
                   "images out of training, val and test images out of the scores. The run records it.")
@click.option("--budget", type=click.FloatRange(min=0), default=210.0, show_default=True, metavar="SECONDS",
              help="Bound on the sweep's seconds above 4,000 training rows, kept by stand-ins and row samples "
                   "planned from timed small fits (0: no bound).")
@click.option("--halving/--no-halving", default=True, show_default=True,
              help="Above 4,000 training rows, fit every head on a sample first and move only a third on to "
                   "larger samples: those predicted best on all rows from their learning curves (successive "
                   "halving).")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Features held in memory, e.g. 4G (default: half the available memory); beyond it heads learn "
                   "from row chunks of the file or from a sample.")
@click.option("--backend", type=click.Choice(["local", "dask"]), default="local", show_default=True,
              help="Where the fits run: local threads, or a dask.distributed cluster (--scheduler).")
@click.option("--scheduler", default=None, metavar="ADDRESS", envvar="FC_DASK_SCHEDULER",
              help="The Dask scheduler for --backend dask, e.g. tcp://10.0.0.5:8786 (env FC_DASK_SCHEDULER).")
@_cache_dir
@_json
def fit_head(as_json, **options):
    """Fit a grid of heads on CACHE (path, name or key prefix), rank them and save them as a run.

    Without --head or --sweep-file a default sweep of heads across several families runs.
    Heads are selected on val, or by cross-validation on train when there is no val split
    (above 4,000 rows: a stratified holdout of train); test, when the cache has it, is held out.
    Every accuracy has a 95% bootstrap interval; heads not significantly worse than the most
    accurate one are tied; their ensemble ranks first unless significantly worse, then the most
    accurate (then the lowest log-loss after the temperature). Progress goes to stderr: a bar
    on a terminal, else a line every 30 s. `fc heads` lists the heads.
    """
    from .sweep.stage import fit_head as run_fit_head

    result = call_stage(run_fit_head, as_json, options, progress=True)
    if result is None:
        return
    singles = sum(e["head"] != "ensemble" for e in result.leaderboard)
    fitted = f"{singles} heads" + (" and their ensemble" if singles < len(result.leaderboard) else "")
    state = "reused" if result.reused else f"{fitted} in {result.seconds:.1f} s"
    click.echo(f"{result.run_dir}  (run id {_run_id(result.run_dir)}; {state})")
    cv = options["cv"] if result.selection_split == "cv" else None
    _echo_leaderboard(result.leaderboard, result.selection_split, result.final_split, cv)
    for failure in result.failed:
        click.echo(f"not fitted: {failure['head']}: {failure['error']}", err=True)
    for entry in result.leaderboard:
        if entry.get("members"):
            click.echo("ensemble: " + ", ".join(f"{m['weight']:.2f} {m['head']}" for m in entry["members"]))
        if entry.get("reason") and entry["status"] != "pruned":
            click.echo(f"{entry['status']}: {entry['head']}: {entry['reason']}", err=True)
    click.echo(f"best: {result.best}")


@cli.command("curve")
@click.argument("run")
@click.option("--head", default="best", show_default=True,
              help="The entry to refit: best (the run's selected entry, the ensemble too), a spec or a slug.")
@click.option("--seeds", type=_count, default=3, show_default=True,
              help="Stratified subsamples of each size below all the images (fewer at the largest sizes when "
                   "--budget requires it).")
@click.option("--budget", type=click.FloatRange(min=0), default=55.0, show_default=True, metavar="SECONDS",
              help="Seconds the curve should take: the largest sizes lose seeds first, down to one, then sizes "
                   "between the first two and all are skipped (0: no bound).")
@click.option("--device", default="auto", show_default=True, help="Torch heads: auto, cpu, cuda or cuda:N.")
@_cache_dir
@_json
def curve_command(as_json, **options):
    """How many labels are enough: refit RUN's selected head on 1, 2, 4, ... images per class, then all.

    RUN is a run directory, run id or unique prefix. Every size is scored on the run's selection rows
    (val, its holdout or its cv folds), never learnt from: the mean accuracy over the seeds with a 95%
    interval, and the slope of the last two sizes in words (what doubling the labels would add).
    Saved as RUN/curve.json, which the same command reads again and fc report draws.
    """
    from .sweep.curve import curve

    result = call_stage(curve, as_json, options, progress=True)
    if result is None:
        return
    state = "reused" if result.reused else f"{result.seconds:.1f} s"
    click.echo(f"{result.run_dir}  ({result.head}; selection on {result.selection_split}: "
               f"{result.scored:,} images; {state})")
    if result.members:
        click.echo("ensemble: " + ", ".join(f"{m['weight']:.2f} {m['head']}" for m in result.members))
    rows = [{"per class": "all" if p["per_class"] is None else p["per_class"], "images": f"{p['images']:,}",
             "seeds": p["seeds"], "accuracy": "" if p["accuracy"] is None else f"{p['accuracy']:.4f}",
             "95% interval": "" if p["ci"] is None else f"[{p['ci'][0]:.3f}, {p['ci'][1]:.3f}]",
             "seconds": f"{p['seconds']:.1f}", "note": _curve_note(p)} for p in result.points]
    click.echo(table(rows, ["per class", "images", "seeds", "accuracy", "95% interval", "seconds", "note"]))
    click.echo(result.sentence)


def _curve_note(point: dict) -> str:
    """What a point of ``fc curve`` lacks: its error, the ensemble members left out of its mixture."""
    notes = [point["error"]] if point.get("error") else []
    notes += [f"without {head}" for head in point.get("left_out", {})]
    return "; ".join(notes)


def _run_id(run_dir: str) -> str:
    """The id of a run, the last part of its folder's name: commands that take RUN take it, or a unique prefix."""
    return os.path.basename(run_dir).rpartition("-")[2]


# --------------------------------------------------------------------------- the audit


@cli.command("audit")
@click.argument("cache")
@click.option("--run", default=None, metavar="RUN",
              help="Score the labels with this stage-two run's best transferable head (default: a cross-validated "
                   "logistic regression).")
@click.option("--threshold", type=click.FloatRange(min=0, max=1, min_open=True), default=0.90, show_default=True,
              help="Cosine similarity from which two images are near-duplicates.")
@click.option("--outliers", type=click.IntRange(min=0), default=20, show_default=True,
              help="Images farthest from every other image to report.")
@click.option("--exact-max", type=click.IntRange(min=0), default=10_000, show_default=True, metavar="ROWS",
              help="Up to this many rows the neighbour search is exact; above, approximate (faiss).")
@click.option("--seed", default=0, show_default=True, help="Folds of the label scores.")
@click.option("--list", "listing", type=click.Choice(["labels", "leaks", "duplicates", "outliers"]), default=None,
              help="Print one finding a line instead: paths as the cache stores them; pairs as two paths and a tab.")
@click.option("--top", type=_count, default=None,
              help="With --list: at most N lines (labels: the N most suspicious train images, flagged or not).")
@_cache_dir
@_json
def audit_command(as_json, listing, top, **options):
    """Audit CACHE (path, name or key prefix) from its features: leaks across splits, duplicates, likely label
    errors and outliers.

    Writes audit.json and audit.html under <cache dir>/audits/<cache name>/ and prints the counts;
    fc report links the page. Pairs of byte-identical files (content hashes recorded by fc extract) or
    of cosine similarity at or above --threshold are leaks when they cross splits, conflicts when
    their labels differ within one. --list prints a list for scripts, such as fc fit-head --exclude.
    """
    from .auditing.stage import audit

    result = call_stage(audit, as_json and listing is None, options, progress=True)
    if result is None:
        return
    if listing is not None:
        for line in result.lines(listing, top):
            click.echo(line)
        return
    c = result.report["counts"]
    leaks = ", ".join(f"{pair} {n}" for pair, n in c["leaks"].items()) or "none"
    click.echo(f"{result.page}  ({'reused' if result.reused else f'{result.seconds:.1f} s'})")
    click.echo(f"leaks: {leaks}; conflicts: {c['conflicts']}; duplicates: {c['duplicates']}; "
               f"likely label errors: " + ", ".join(f"{s} {n}" for s, n in c["label_issues"].items())
               + f"; outliers shown: {c['outliers']}")
    for note in result.report.get("notes", []):
        click.echo(f"note: {note}", err=True)
    if not result.report["hashes"]:
        click.echo("this cache has no content hashes (written before fc recorded them): byte-identical copies are "
                   "found by their features alone; fc extract into a new cache directory records them", err=True)


@cli.command("runs")
@_cache_dir
@_json
def runs_command(cache_dir, as_json):
    """The runs of the cache directory: backbone, best head, its score with a 95% interval."""
    from .reporting.listing import list_runs
    from .sweep.leaderboard import format_interval as _ci

    rows = list_runs(cache_dir)
    if as_json:
        emit_json(rows)
        return
    for row in rows:
        row["selection"] = f"{row['selection_split']} {_ci(row['selection_accuracy'], row['selection_accuracy_ci'])}"
        held_out = row["final_split"] != row["selection_split"]
        row["held out"] = f"{row['final_split']} {_ci(row['final_accuracy'], row['final_accuracy_ci'])}" \
            if held_out else ""
        row["tied"] = "" if row["tied"] is None else row["tied"]
    for row in rows:
        row["id"] = _run_id(row["run"])
    columns = ["id", "run", "backbone", "weights", "best", "selection", "held out", "tied", "heads"]
    click.echo(table(rows, columns) if rows else "no runs")


@cli.group(invoke_without_command=True)
@_json
@click.pass_context
def heads(ctx, as_json):
    """List the heads (with `show RUN`: one run's leaderboard)."""
    if ctx.invoked_subcommand is not None:
        return
    from .sweep.stage import list_head_types

    rows = list_head_types()
    if as_json:
        emit_json(rows)
        return
    for row in rows:
        row["parameters"] = ", ".join(f"{k}={v}" for k, v in row["defaults"].items())
        row["transferable"] = "yes" if row["transferable"] else "no"
        row["class_weight"] = "yes" if row["class_weight"] else "no"
    click.echo(table(rows, ["name", "family", "kind", "transferable", "class_weight", "parameters"]))
    click.echo("any scikit-learn classifier by path too, e.g. sklearn.ensemble.ExtraTreesClassifier; "
               "every head also takes pre=none|standardize|l2|pca:K")


@heads.command("show")
@click.argument("run")
@_cache_dir
@_json
def heads_show(run, cache_dir, as_json):
    """The provenance and leaderboard of RUN (a run directory, run id or unique prefix)."""
    from .sweep.runs import load_run

    loaded = load_run(run=run, cache_dir=cache_dir)
    meta = loaded.meta
    if as_json:
        emit_json({"run_dir": str(loaded.path), **meta, "leaderboard": loaded.leaderboard})
        return
    cfg = meta["config"]
    click.echo(f"run       {loaded.path}")
    click.echo(f"cache     {meta['cache']}")
    weights = (cfg.get("weights") or {}).get("weights", "")
    features = f"{meta['cache_key'][:16]}  {cfg.get('backbone', '')} {weights} {cfg.get('layer', '')}"
    click.echo(f"features  {features.rstrip()}")
    click.echo(f"classes   {', '.join(meta['classes'])}")
    click.echo(f"seed      {meta['seed']}, class_weight {meta.get('class_weight')}, created {meta['created']}")
    _echo_leaderboard(loaded.leaderboard, meta["selection_split"], meta["final_split"], meta.get("cv"))
    for failure in meta.get("failed", []):
        click.echo(f"not fitted: {failure['head']}: {failure['error']}")
    best = loaded.leaderboard[0]
    final = best["metrics"][meta["final_split"]]
    click.echo(f"best: {meta['best']}  ({meta['final_split']} accuracy {final['accuracy']:.4f})")
    per_class = [{"class": name, **{k: f"{v:.4f}" if isinstance(v, float) else v for k, v in m.items()}}
                 for name, m in final["per_class"].items()]
    click.echo(table(per_class, ["class", "precision", "recall", "f1", "support"]))


def main() -> None:
    """The console scripts ``fc`` and ``featurecache``, and ``python -m featurecache``."""
    called = os.path.basename(sys.argv[0]) if sys.argv else ""
    try:
        cli(prog_name=called if called in PROG_NAMES else "fc")
    except SystemExit:
        try:
            sys.stdout.flush()  # what is still buffered, while a closed pipe can be told quietly
        except BrokenPipeError:
            _quiet_broken_pipe()
        raise


if __name__ == "__main__":
    main()
