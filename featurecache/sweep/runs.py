"""Run directories: where a sweep's heads, leaderboard and provenance live.

Every run lives in a content-addressed directory next to its cache::

    <cache dir>/runs/<cache stem>-<12 hex>/
        run.json  leaderboard.csv  leaderboard.json  best
        heads/<slug>/head.json  pipeline.skops  [module.safetensors]

The directory is built under a temporary name with ``run.json`` last and then renamed,
so a complete run is a lookup. While a sweep runs, every finished fit is written at once
(atomically) under ``<run id>.partial/``: a sweep killed at any moment and run again
reuses those fits and redoes only the others. No file holds a pickle:
scikit-learn heads are skops files loaded with an allow-list of types, torch heads
safetensors, and ``run.json`` records the sha256 of every head file, checked on loading
and before a run is reused (:func:`run_problem`): the same ``fc fit-head`` fits a damaged
run again, keeping the folders later stages added to it (``finetune/``, ``report/``).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np

from .. import files, store
from ..errors import RunError, suggest
from ..heads import HEADS, HeadConfig, head_type, load_head_files, transferable_heads
from ..heads.mixture import WeightedMixture
from .leaderboard import ENSEMBLE, csv_rows, is_ensemble

RUNS = "runs"
RUN_FILE = "run.json"
HEAD_FILE = "head.json"
RUN_FORMAT = "featurecache-run/2"  # heads in skops and safetensors files, their sha256 in run.json
PICKLE_FORMAT = "featurecache-run/1"  # heads pickled in model.joblib; a run.json without "format"
PICKLE_FILE = "model.joblib"
# The advice of a damaged run: the same sweep fits it again (and keeps its finetune/ and report/ folders).
REFIT = "run the fc fit-head that made it again (same cache and options, see its run.json): it fits a damaged run again"


@dataclass
class Run:
    """A finished run: its directory, ``run.json`` and its leaderboard (best first)."""

    path: Path
    meta: dict
    leaderboard: list

    @property
    def best(self) -> str:
        return self.meta["best"]

    @property
    def format(self) -> str:
        return self.meta.get("format", PICKLE_FORMAT)


def slug(spec: str) -> str:
    """A file-system-safe name for a head spec: ``logreg:C=0.1;pre=standardize`` -> ``logreg-C=0.1-pre=standardize``."""
    text = "".join(c if c.isalnum() or c in "=.+_" else "-" for c in spec).strip("-")
    if len(text) > 120:
        text = text[:100] + "-" + hashlib.sha256(spec.encode()).hexdigest()[:12]
    return text


def _csv_text(rows: list[dict]) -> str:
    out = io.StringIO(newline="")
    writer = csv.DictWriter(out, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _write_head(run_dir: Path, entry: dict, cfg: HeadConfig, blobs: dict, record: dict | None) -> dict:
    """Write one head's folder (``blobs``: file name -> bytes, or the path of a finished fit's
    file); return the sha256 of each of its files, by path relative to ``run_dir``."""
    htype = head_type(cfg.name)
    folder = run_dir / "heads" / slug(entry["head"])
    folder.mkdir(parents=True)
    for name, data in blobs.items():
        if isinstance(data, Path):
            shutil.copyfile(data, folder / name)
        else:
            (folder / name).write_bytes(data)
    head_meta = {"head": entry["head"], **cfg.to_dict(), "kind": htype.kind, "transferable": htype.transferable,
                 "metrics": entry["metrics"], "selection_split": entry["selection_split"],
                 "fit_seconds": entry["fit_seconds"],
                 **{k: entry[k] for k in ("status", "reason", "rows", "calibration") if k in entry}}
    if record is not None:
        head_meta["estimator"] = record
    files.write_json(folder / HEAD_FILE, head_meta)
    return {p.relative_to(run_dir).as_posix(): files.sha256_file(p) for p in sorted(folder.iterdir())}


def _write_ensemble(run_dir: Path, entry: dict) -> dict:
    """The ensemble's folder: its ``head.json`` alone (members and weights; the members are the run's heads)."""
    folder = run_dir / "heads" / ENSEMBLE
    folder.mkdir(parents=True)
    head_meta = {"head": ENSEMBLE, "name": ENSEMBLE, "kind": ENSEMBLE, "pre": None, "class_weight": None,
                 **{k: entry[k] for k in ("params", "members", "transferable", "ensemble", "metrics", "selection_split",
                                          "fit_seconds", "status", "reason", "rows", "calibration") if k in entry}}
    files.write_json(folder / HEAD_FILE, head_meta)
    return {(folder / HEAD_FILE).relative_to(run_dir).as_posix(): files.sha256_file(folder / HEAD_FILE)}


RUN_FILES = (RUN_FILE, "leaderboard.json", "leaderboard.csv", "best", "heads")  # what write_run writes


def write_run(run_dir: Path, meta: dict, entries: list[dict], dumped: dict) -> None:
    """Build the run directory under a temporary name, ``run.json`` last, and rename it into place.

    A damaged run at ``run_dir`` (:func:`run_problem`) is replaced; the folders later stages
    added to it move into the new one."""
    if run_dir.exists() and not (run_dir / RUN_FILE).exists():
        shutil.rmtree(run_dir)  # not a complete run: left by an older, interrupted featurecache
    try:
        with files.atomic_dir(run_dir) as tmp:
            sha256 = {}
            for entry in entries:
                sha256.update(_write_ensemble(tmp, entry) if is_ensemble(entry)
                              else _write_head(tmp, entry, *dumped[entry["head"]]))
            files.write_json(tmp / "leaderboard.json", entries)
            (tmp / "leaderboard.csv").write_text(_csv_text(csv_rows(entries)))
            (tmp / "best").write_text(slug(meta["best"]) + "\n")
            files.write_json(tmp / RUN_FILE, {**meta, "sha256": sha256})
            _replace_damaged(run_dir, tmp)
    except FileExistsError:
        pass  # a concurrent identical run finished first: keep its result
    shutil.rmtree(partial_dir(run_dir), ignore_errors=True)


def _replace_damaged(run_dir: Path, new: Path) -> None:
    """Move what later stages added to a damaged ``run_dir`` into ``new``, and remove the rest of it."""
    if not run_dir.is_dir() or run_problem(run_dir) is None:
        return  # none, or a sound run that a concurrent identical sweep wrote first: kept
    for path in run_dir.iterdir():
        if path.name not in RUN_FILES and not files.is_temp_name(path):
            os.rename(path, new / path.name)
    shutil.rmtree(run_dir)


def _readable_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_problem(run_dir: str | os.PathLike) -> str | None:
    """What is wrong with a complete run's files, or None: ``run.json``, the leaderboard and ``best``
    must read, and every file ``run.json`` records must have the sha256 it records."""
    run_dir = Path(run_dir)
    meta = _readable_json(run_dir / RUN_FILE)
    if not isinstance(meta, dict):
        return f"{RUN_FILE} cannot be read"
    if not isinstance(_readable_json(run_dir / "leaderboard.json"), list):
        return "leaderboard.json cannot be read"
    if not (run_dir / "best").is_file():
        return "the file best is missing"
    recorded = meta.get("sha256", {})
    for name, digest in sorted(recorded.items()):
        path = run_dir / name
        if not path.is_file() or files.sha256_file(path) != digest:
            return f"{name} is missing or differs from the file the run wrote (sha256 mismatch)"
    heads = run_dir / "heads"
    strays = sorted(p.relative_to(run_dir).as_posix() for p in heads.glob("*/*") if not p.name.startswith("."))
    strays = [name for name in strays if name not in recorded] if recorded else []
    return f"{strays[0]} is not one of the files {RUN_FILE} records" if strays else None


# --------------------------------------------------------------------------- finished fits of a running sweep


def partial_dir(run_dir: Path) -> Path:
    """Where the finished fits of the sweep that will write ``run_dir`` are kept until it is complete."""
    return run_dir.with_name(run_dir.name + ".partial")


def save_fit(run_dir: Path, key: str, specs: list[str], result: list[dict]) -> list[dict]:
    """Keep one finished fit (a task's per-head results) under the partial run, atomically.

    Per head: ``fit.json`` records the spec, seconds, error or estimator record; the
    probabilities go to an ``.npz`` file and the head's files beside it. Returns the
    results with each head's files replaced by their paths (the bytes need not stay in memory).
    """
    target = partial_dir(run_dir) / key
    with contextlib.suppress(FileExistsError), files.atomic_dir(target) as tmp:
        heads = []
        for i, (spec, head) in enumerate(zip(specs, result)):
            heads.append({"spec": spec, **{k: head.get(k) for k in ("seconds", "error", "record")},
                          "files": sorted(head.get("files") or {})})
            if "probas" in head:
                np.savez(tmp / f"probas-{i}.npz", **head["probas"])
            for name, data in (head.get("files") or {}).items():
                (tmp / f"{i}-{name}").write_bytes(data)
        files.write_json(tmp / "fit.json", heads)
    return _read_fit(target)


def _read_fit(folder: Path) -> list[dict]:
    heads = json.loads((folder / "fit.json").read_text())
    for i, head in enumerate(heads):
        if head.get("error") is None:
            head.pop("error", None)
            with np.load(folder / f"probas-{i}.npz", allow_pickle=False) as z:
                head["probas"] = {name: z[name] for name in z.files}
        head["files"] = {name: folder / f"{i}-{name}" for name in head["files"]} or None
    return heads


def load_fits(run_dir: Path) -> dict[str, list[dict]]:
    """The finished fits kept under the partial run of ``run_dir``, by key (see :func:`save_fit`)."""
    root = partial_dir(run_dir)
    found = {}
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not files.is_temp_name(folder) and (folder / "fit.json").is_file():
            with contextlib.suppress(OSError, ValueError, KeyError):
                found[folder.name] = _read_fit(folder)
    return found


def resolve_run(ref: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A run directory by path, by run id, or by a unique prefix of its id or of its hash."""
    path = Path(ref)
    if (path / RUN_FILE).is_file():
        return path
    if path.is_dir():
        raise RunError(f"{path} is not a complete run directory (no {RUN_FILE}); run fc fit-head on its cache "
                       "to make one")
    root = store.default_cache_dir(cache_dir) / RUNS
    runs = sorted(p for p in root.glob("*") if (p / RUN_FILE).is_file() and not files.is_temp_name(p)) \
        if root.is_dir() else []
    text = str(ref)
    matches = [p for p in runs if p.name.startswith(text) or p.name.rpartition("-")[2].startswith(text)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        hint = suggest(text, [p.name for p in runs])
        raise RunError(f"no run matches {text!r} in {root}{hint}")
    raise RunError(f"{text!r} matches {len(matches)} runs in {root}: " + ", ".join(p.name for p in matches))


def _check_cache(run_dir: Path, meta: dict) -> None:
    cache = Path(meta["cache"])
    if not cache.exists():
        raise RunError(f"run {run_dir.name} was trained on {cache}, which no longer exists; "
                       "re-run fc extract and fc fit-head")
    key = store.info(cache)["key"]
    if key != meta["cache_key"]:
        raise RunError(f"run {run_dir.name} was trained on features {meta['cache_key'][:16]} but {cache} now "
                       f"holds {key[:16]}; re-run fc fit-head")


def load_run(run: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Run:
    """A finished run (path, id or prefix), checked against the cache it was trained on."""
    run_dir = resolve_run(run, cache_dir)
    meta = _readable_json(run_dir / RUN_FILE)
    if not isinstance(meta, dict):
        raise RunError(f"{run_dir / RUN_FILE} cannot be read; {REFIT}")
    loaded = Run(run_dir, meta, [])
    if loaded.format not in (RUN_FORMAT, PICKLE_FORMAT):
        raise RunError(f"run {run_dir.name} has the format {loaded.format}, which this featurecache cannot read; "
                       "upgrade featurecache or re-run fc fit-head")
    _check_cache(run_dir, loaded.meta)
    leaderboard = _readable_json(run_dir / "leaderboard.json")
    if not isinstance(leaderboard, list):
        raise RunError(f"{run_dir / 'leaderboard.json'} cannot be read; {REFIT}")
    loaded.leaderboard = leaderboard
    return loaded


def _can_become_layer(entry: dict) -> bool:
    if is_ensemble(entry):
        return bool(entry.get("transferable"))
    htype = HEADS.get(entry["head"].partition(":")[0])
    return htype is not None and htype.transferable


def best_transferable(leaderboard: list[dict]) -> str | None:
    """The entry stage three starts from: the selected (first) entry when it can become a layer (an ensemble
    of such heads too); else its transferable form when the sweep fitted one and it is tied with the selected
    entry on the selection split; else the best-ranked entry that can become a layer (None: none can)."""
    if leaderboard and _can_become_layer(leaderboard[0]):
        return leaderboard[0]["head"]
    for entry in leaderboard:
        form = entry.get("transfer_of")
        if form and form["head"] == leaderboard[0]["head"] and form["tied"]:
            return entry["head"]
    return next((entry["head"] for entry in leaderboard if _can_become_layer(entry)), None)


def start_note(leaderboard: list[dict], head: str) -> str | None:
    """Why stage three starts from ``head`` rather than the selected entry, and how far it is from it on the
    selection split (None when it starts from the selected entry)."""
    selected = leaderboard[0]
    if head == selected["head"]:
        return None
    entry = next(e for e in leaderboard if e["head"] == head)
    split = selected["selection_split"]
    form = entry.get("transfer_of") or {}
    if form.get("head") == selected["head"]:
        how = f"its transferable form {head}, tied with it on {split}"
    else:
        how = f"the best entry that can, {head}"
    difference = selected["selection_accuracy"] - entry["selection_accuracy"]
    return (f"the selected entry {selected['head']} cannot become a layer of the network: fine-tuning starts from "
            f"{how} ({difference * 100:+.2f} points below it on {split})")


def _head_folder(loaded: Run, head: str) -> Path:
    """The folder of a run's head: ``best``, ``best-transferable``, a spec or a slug."""
    name = head
    if head == "best":
        name = (loaded.path / "best").read_text().strip()
    elif head == "best-transferable":
        name = best_transferable(loaded.leaderboard)
        if name is None:
            raise RunError(f"run {loaded.path.name} has no head that can become a layer of a network "
                           f"({', '.join(transferable_heads())})")
    folders = loaded.path / "heads"
    for folder in (folders / name, folders / slug(name)):
        if folder.parent == folders and (folder / HEAD_FILE).is_file():
            return folder
    raise RunError(f"run {loaded.path.name} has no head {head!r}{suggest(head, loaded.meta['heads'])}")


def head_meta(loaded: Run, head: str = "best") -> dict:
    """The ``head.json`` of one head of a loaded run (``best``, ``best-transferable``, a spec or a slug),
    checked against ``run.json`` as :func:`load_head` checks it, without loading its fitted files: what
    a refit of its spec needs."""
    folder = _head_folder(loaded, head)
    if loaded.format == RUN_FORMAT:
        _check_files(loaded, folder)
    meta = _readable_json(folder / HEAD_FILE)
    if not isinstance(meta, dict):
        raise RunError(f"{folder / HEAD_FILE} cannot be read; {REFIT}")
    return meta


def _check_files(loaded: Run, folder: Path) -> None:
    """Every file of a head folder is recorded in ``run.json`` with the sha256 it has now."""
    recorded = loaded.meta.get("sha256", {})
    prefix = folder.relative_to(loaded.path).as_posix() + "/"
    names = {key[len(prefix):] for key in recorded if key.startswith(prefix)}
    if not names:
        raise RunError(f"{RUN_FILE} of run {loaded.path.name} records no files for {prefix}; {REFIT}")
    for path in sorted(folder.iterdir()):
        if not path.name.startswith(".") and path.name not in names:
            raise RunError(f"{path} is not one of the files {RUN_FILE} records; refused")
    for name in sorted(names):
        path = folder / name
        if not path.is_file() or files.sha256_file(path) != recorded[prefix + name]:
            raise RunError(f"{path} is missing or differs from the file the run wrote (sha256 mismatch); "
                           f"refused: {REFIT}")


def _load_pickle(loaded: Run, folder: Path, trust: bool):
    path = folder / PICKLE_FILE
    if not trust:
        raise RunError(f"{path} is a pickle, from a run of an older featurecache; it is refused because loading "
                       "a pickle can run any code it holds: pass --trust (trust=True) if you made this run or "
                       "trust its author, or re-run fc fit-head to save the heads without pickles")
    if not path.is_file():
        raise RunError(f"run {loaded.path.name} has no {PICKLE_FILE} for {folder.name}; re-run fc fit-head")
    return joblib.load(path)


def load_head(run: str | os.PathLike, head: str = "best", cache_dir: str | os.PathLike | None = None,
              trust: bool = False):
    """``(fitted pipeline, head.json dict)`` of one head of a run.

    ``head`` is ``best`` (the top of the leaderboard), ``best-transferable`` (the best
    head that can become a layer of a network), a spec or a slug. A head's files are
    checked against the sha256 ``run.json`` records. A run of the first format holds
    pickles, which can run code when loaded: it loads only with ``trust=True``.
    """
    loaded = load_run(run, cache_dir)
    folder = _head_folder(loaded, head)
    if loaded.format == PICKLE_FORMAT:
        return _load_pickle(loaded, folder, trust), json.loads((folder / HEAD_FILE).read_text())
    _check_files(loaded, folder)
    head_meta = json.loads((folder / HEAD_FILE).read_text())
    if head_meta.get("kind") == ENSEMBLE:
        return _load_mixture(loaded, head_meta), head_meta
    return load_head_files(folder, head_meta), head_meta


def _load_mixture(loaded: Run, head_meta: dict) -> WeightedMixture:
    """The ensemble of ``head.json`` from the run's own head folders, each checked as :func:`load_head` checks it."""
    members, names = [], []
    for member in head_meta["members"]:
        folder = _head_folder(loaded, member["head"])
        _check_files(loaded, folder)
        meta = json.loads((folder / HEAD_FILE).read_text())
        members.append(load_head_files(folder, meta))
        names.append(meta["name"])
    return WeightedMixture(members, [m["weight"] for m in head_meta["members"]],
                           [m["temperature"] for m in head_meta["members"]], names)


