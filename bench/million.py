"""A million-row dataset: listing, planning, fc's own cost per row and assembling the file.

Writes ``--rows`` (1,000,000) tiny images as WebDataset shards (``train-NNNNNN.tar``, 10,000
samples each: ``KEY.png`` and ``KEY.cls``) and, with ``--parquet``, as Parquet files, then:

1. listing plus planning, in a fresh process each (so that its peak RSS is its own): the
   listing, the fingerprint, the cache key and the rows left to compute, all of
   ``featurecache.extract`` up to the first image (the shards' indexes built on the first run,
   read on the second). Goal: <= 60 s and <= 2 GB peak RSS at 1,000,000 rows;
2. fc's own cost per row outside the forward pass: ``featurecache.extract`` over the first
   ``--extract-rows`` rows in one process (``--workers 0``) with a backbone that costs almost
   nothing (``free/pool``: a global average pool of 8 x 8 crops), its loop's seconds per row
   minus the forward pass's, timed alone on the same batches; and of that, reading and
   decoding an image (timed alone: the part that decoding workers share out). Goal: <= 200 us per row;
3. assembling the cache file from the checkpoint shards (reading them, ordering the rows,
   writing the HDF5 file) for a quarter, a half and all of the rows, and the ratios: linear
   growth gives 1 : 2 : 4.

    python bench/million.py [--rows N] [--extract-rows N] [--parquet] [--keep DIR]

Timings on a shared machine swing: the load averages are printed beside them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the working tree, also without PYTHONPATH

PER_SHARD = 10_000

# The near-free backbone, registered in every process that extracts.
FREE = '''
import torch
from torch import nn
from featurecache.backbones import models
from featurecache.data.preprocess import Preprocess

class FreeSource(models.BackboneSource):
    prefix = "free/"
    def names(self): return ["free/pool"]
    def weight_names(self, name): return ["DEFAULT"]
    def weights_identity(self, name, weights): return {"weights": "free:DEFAULT"}
    def default_preprocess(self, name, weights): return Preprocess(resize=8, crop=8)
    def create(self, name, weights):
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))

models.SOURCES["free/"] = FreeSource()
'''

# Listing and planning in a fresh process: extract() up to the rows left to compute, then the
# assembly of the file from made-up checkpoint shards of those rows.
PLAN = FREE + '''
import json, resource, sys, time
import numpy as np
from featurecache import store
from featurecache.data import records
from featurecache.extraction import stage

data, assemble = sys.argv[1], sys.argv[2] == "1"
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = {}

def plan(job):
    out["rows"] = job.n
    out["pending"] = int(np.flatnonzero(~store.ShardWriter(job.entry, job.n, job.manifest).done()).size)
    out["plan_s"] = time.perf_counter() - started
    out["plan_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if assemble:
        writer = store.ShardWriter(job.entry, job.n, job.manifest)
        rng = np.random.default_rng(0)
        for first in range(0, job.n, 4096):
            idx = np.arange(first, min(job.n, first + 4096))
            writer.write(idx, rng.random((len(idx), job.width), dtype=np.float32), np.ones(len(idx), bool),
                         [""] * len(idx))
        start = time.perf_counter()
        stage._write(job, writer, [(job.n, 1.0)])
        out["assemble_s"] = time.perf_counter() - start
        out["assemble_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    raise SystemExit(0)

def timed(name, function):
    def call(*args, **kwargs):
        start = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            out[name] = out.get(name, 0.0) + time.perf_counter() - start
    return call

stage._launch = plan
stage._open_data = timed("list_s", stage._open_data)
records.Dataset.fingerprint = timed("fingerprint_s", records.Dataset.fingerprint)
started = time.perf_counter()
try:
    stage.extract(data, backbone="free/pool", weights="DEFAULT", workers=0, progress=False)
finally:
    out["base_rss"] = base_rss
    print(json.dumps(out))
'''

EXTRACT = FREE + """
import json, sys, time
import numpy as np
import torch
import featurecache
from featurecache.data.images import ImageTensors, normalize_batch
from featurecache.data.sources import open_dataset
from featurecache.extraction import stage

data = sys.argv[1]
res = featurecache.extract(data, backbone="free/pool", weights="DEFAULT", workers=0, progress=False)
rows = sum(s["n"] + s["skipped"] for s in res.splits.values())
net = stage.backbones.build("free/pool", "DEFAULT", preprocess=stage.backbones.resolve_preprocess("free/pool"))
# Reading and decoding alone: a record's bytes, PIL, resize and crop, as the loop's workers do.
images = ImageTensors(open_dataset(data), np.arange(2000), net.preprocess, None)
start = time.perf_counter()
for i in range(len(images)):
    images[i]
decode = (time.perf_counter() - start) / len(images)
# The forward pass alone, on normalized batches of the size the loop used, on as many threads.
model = net.model.eval()
batch = stage.runtime.default_batch_size(torch.device("cpu"))
x = normalize_batch(torch.randint(0, 255, (batch, 3, 8, 8), dtype=torch.uint8), net.preprocess)
with torch.inference_mode():
    for _ in range(20):
        model(x)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 2.0:
        model(x)
        n += batch
forward = (time.perf_counter() - start) / n
print(json.dumps({"rows": rows, "images_per_s": res.images_per_s, "seconds": res.seconds, "forward_s": forward,
                  "decode_s": decode, "batch": batch}))
"""


def _png(seed: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shards(root: Path, rows: int) -> float:
    start = time.perf_counter()
    images = [_png(i) for i in range(16)]
    root.mkdir(parents=True, exist_ok=True)
    for shard, first in enumerate(range(0, rows, PER_SHARD)):
        with tarfile.open(root / f"train-{shard:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(first, min(rows, first + PER_SHARD)):
                for name, data in ((f"{i:09d}.png", images[i % 16]), (f"{i:09d}.cls", str(i % 10).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (root / "classes.txt").write_text("".join(f"class{i}\n" for i in range(10)))
    return time.perf_counter() - start


def write_parquet(root: Path, rows: int) -> float:
    import pyarrow as pa
    import pyarrow.parquet as pq

    start = time.perf_counter()
    images = [_png(i) for i in range(16)]
    root.mkdir(parents=True, exist_ok=True)
    per_file = 100_000
    for n, first in enumerate(range(0, rows, per_file)):
        ids = range(first, min(rows, first + per_file))
        table = pa.table({"image": [images[i % 16] for i in ids], "label": [f"class{i % 10}" for i in ids]})
        pq.write_table(table, root / f"train-{n:05d}.parquet", row_group_size=10_000)
    return time.perf_counter() - start


def _child(code: str, *args: str, cache: Path, fresh: str = "caches") -> dict:
    """Run ``code`` in a fresh process; ``fresh``: ``all`` removes the cache directory first (the
    shards' indexes too, in its ``datasets/``), ``caches`` everything but the indexes, ``none`` nothing."""
    if cache.is_dir() and fresh != "none":
        for entry in cache.iterdir():
            if entry.is_dir() and (fresh == "all" or entry.name != "datasets"):
                shutil.rmtree(entry)
            elif not entry.is_dir():
                entry.unlink()
    env = {**os.environ, "FC_CACHE_DIR": str(cache), "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _load() -> str:
    return "load averages " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _shards_pattern(root: Path, rows: int) -> str:
    last = (rows - 1) // PER_SHARD
    return f"webdataset:{root}/train-{{000000..{last:06d}}}.tar"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--extract-rows", type=int, default=None, help="Rows to extract (default: --rows).")
    parser.add_argument("--parquet", action="store_true", help="Also list the rows as Parquet files.")
    parser.add_argument("--keep", default=None, help="A folder for the data, kept (and reused) after the run.")
    parser.add_argument("--parts", default="1,2,3", help="Which measurements to run (1, 2, 3 above).")
    args = parser.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # each figure as soon as it is measured
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fc-million-"))
    shards = work / "wds"
    if not (shards / "classes.txt").is_file():
        print(f"writing {args.rows:,} samples as shards: {write_shards(shards, args.rows):.1f} s ({_load()})")
    parts = {int(p) for p in args.parts.split(",")}
    cache = work / "cache"
    if 1 in parts:
        _listing(args, shards, cache, work)
    if 2 in parts:
        _own_cost(args, shards, work)
    if 3 in parts:
        _assembly(args, shards, work)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def _listing(args, shards: Path, cache: Path, work: Path) -> None:
    print(f"\n1. listing and planning of {args.rows:,} rows (a fresh process each; {_load()})")
    for label in ("first (indexes built)", "again (indexes read)"):
        r = _child(PLAN, f"webdataset:{shards}", "0", cache=cache,
                   fresh="all" if label.startswith("first") else "none")
        print(f"   webdataset, {label}: {r['plan_s']:.1f} s (listing {r['list_s']:.1f}, fingerprint "
              f"{r['fingerprint_s']:.1f}), peak RSS {r['plan_rss'] / 2**30:.2f} GB "
              f"(after imports {r['base_rss'] / 2**30:.2f} GB); {r['rows']:,} rows, {r['pending']:,} to compute "
              f"[goals: <= 60 s, <= 2 GB]")
    if args.parquet:
        if not (work / "pq").is_dir():
            print(f"   writing {args.rows:,} rows as Parquet: {write_parquet(work / 'pq', args.rows):.1f} s")
        r = _child(PLAN, f"parquet:{work / 'pq'}", "0", cache=work / "cache-parquet")
        print(f"   parquet: {r['plan_s']:.1f} s (listing {r['list_s']:.1f}, fingerprint {r['fingerprint_s']:.1f}), "
              f"peak RSS {r['plan_rss'] / 2**30:.2f} GB; {r['rows']:,} rows")


def _own_cost(args, shards: Path, work: Path) -> None:
    rows = min(args.extract_rows or args.rows, args.rows)
    print(f"\n2. fc's own cost per row: extract {rows:,} rows with free/pool ({_load()})")
    r = _child(EXTRACT, _shards_pattern(shards, rows), cache=work / "cache-extract")
    loop = 1 / r["images_per_s"]
    own, decode = loop - r["forward_s"], r["decode_s"]
    print(f"   {r['rows']:,} rows in {r['seconds']:.1f} s, in one process (--workers 0): the loop "
          f"{loop * 1e6:.0f} us/row, "
          f"the forward pass {r['forward_s'] * 1e6:.1f} us/row: fc's own {own * 1e6:.0f} us/row [goal: <= 200], of "
          f"which reading and decoding the image (PIL, resize, crop: what workers do in parallel) "
          f"{decode * 1e6:.0f} and the rest (batches, checkpoints) {(own - decode) * 1e6:.0f} ({_load()})")


def _assembly(args, shards: Path, work: Path) -> None:
    print(f"\n3. assembling the file from the checkpoint shards ({_load()})")
    times = {}
    for part in (4, 2, 1):
        n = args.rows // part
        r = _child(PLAN, _shards_pattern(shards, n), "1", cache=work / "cache")  # the indexes of part 1
        times[n] = r["assemble_s"]
        print(f"   {r['rows']:,} rows: {r['assemble_s']:.1f} s, peak RSS {r['assemble_rss'] / 2**30:.2f} GB")
    smallest = min(times)
    print("   ratios " + " : ".join(f"{times[n] / times[smallest]:.2f}" for n in sorted(times))
          + " for rows " + " : ".join(f"{n / smallest:g}" for n in sorted(times)) + f" [linear: 1 : 2 : 4] ({_load()})")


if __name__ == "__main__":
    main()
