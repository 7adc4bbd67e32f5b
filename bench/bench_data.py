"""Data loading throughput: images/s of Pillow decoding per CPU core, and of DALI (CPU, and GPU
when one is at hand), at 512 and 1024 px training resolution.

The sources are what the recipe's data look like: JPEG (quality 90) of about 1024^2 pixels at
aspects 0.5 to 2 (the FLUX-generated sets are ~1 MP), photo-like in file size (smooth color
fields plus grain, ~1.5-2 bits per pixel). Both resolutions read the same files, as the 512 px
and 1024 px stages of the 24 h run do. Each provider goes through the trainer's own loader
(`ShardBatches`, batch 16, aspect buckets), so reading, cropping and collation are included.

    python -m bench.bench_data                 # rows -> bench/results/data.csv
    python -m bench.bench_data --out OUT/data.csv --images 64

Rows: op "data", shape "<res>px", provider pillow-1proc (decode in the main process: one core),
pillow-<n>workers (DataLoader workers over all cores; on a shared 2-core machine they also compete with the main process), dali-cpu, dali-gpu; ms per image, and img/s in the note.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.common import append_rows, environment
from prx.config import DataConfig
from prx.data.webdata import ShardBatches

BATCH = 16


def photo_like(h: int, w: int, rng: np.random.Generator) -> bytes:
    small = rng.integers(0, 256, (h // 64 + 2, w // 64 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.normal(0, 6, (h, w, 1))  # sensor-like grain: what makes real JPEGs ~2 bits/pixel
    out = io.BytesIO()
    Image.fromarray(np.clip(base + grain, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_shard(folder: Path, count: int, seed: int = 0) -> float:
    """A shard of `count` ~1 MP JPEGs; returns their mean size in KB."""
    rng = np.random.default_rng(seed)
    sizes = []
    with tarfile.open(folder / "bench-000000.tar", "w") as tar:
        for n in range(count):
            aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))  # width / height
            h = int(round(1024 / np.sqrt(aspect) / 16) * 16)
            w = int(round(1024 * np.sqrt(aspect) / 16) * 16)
            for name, data in ((f"{n:06d}.jpg", photo_like(h, w, rng)), (f"{n:06d}.txt", b"a photo")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                sizes.append(len(data)) if name.endswith("jpg") else None
    return sum(sizes) / len(sizes) / 1024


def measure(folder: Path, resolution: int, decoder: str, workers: int, images: int, device) -> float:
    """Images per second through the trainer's loader (after one warm-up batch)."""
    cfg = DataConfig(source="webdataset", path=str(folder), resolution=resolution, buckets="square",
                     decoder=decoder, workers=workers)
    batches = ShardBatches(cfg, 32, device, seed=0, batch_size=BATCH, log=lambda m: None)
    batches.next_batch()  # warm-up: worker start, DALI pipeline build
    steps = max(1, images // BATCH)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        batches.next_batch().images.sum()  # touch the result
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    batches.close()
    return steps * BATCH / seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=64, help="images timed per provider and resolution")
    p.add_argument("--resolutions", default="512,1024")
    p.add_argument("--out", default=None, help="CSV file (default bench/results/data.csv)")
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(1)  # the loader's decode is single-threaded per process; keep torch out of the way
    providers = [("pillow-1proc", "cpu", 0, 1), (f"pillow-{cores}workers", "cpu", cores, cores)]
    try:
        import nvidia.dali  # noqa: F401

        providers.append(("dali-cpu", "dali-cpu", 1, cores))  # DALI's thread pool (4) on all cores
        if torch.cuda.is_available():
            providers.append(("dali-gpu", "dali", 2, None))
    except ImportError:
        print("bench_data: DALI not installed; Pillow only")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        kb = write_shard(folder, args.images + 2 * BATCH)
        for res in (int(r) for r in args.resolutions.split(",")):
            for name, decoder, workers, used_cores in providers:
                device = torch.device("cuda" if decoder == "dali" else "cpu")
                rate = measure(folder, res, decoder, workers, args.images, device)
                per_core = f", {rate / used_cores:.1f} img/s per core" if used_cores else ""
                note = (f"{rate:.1f} img/s{per_core} ({used_cores or 0} of {cores} cores); ~1 MP JPEG q90, "
                        f"{kb:.0f} KB mean; batch {BATCH}; "
                        f"{160 / (rate / used_cores):.1f} cores per GPU at 160 img/s" if used_cores else
                        f"{rate:.1f} img/s on the GPU; ~1 MP JPEG q90, {kb:.0f} KB mean; batch {BATCH}")
                env = environment(device)
                if device.type == "cpu":
                    env["device"] = f"CPU ({os.uname().machine}, {cores} cores)"
                rows.append({**env, "op": "data", "shape": f"{res}px", "dtype": "uint8", "mode": "load",
                             "provider": name, "ms": 1e3 / rate, "note": note})
                print(f"{res:>5} px  {name:<16}{rate:>8.1f} img/s{per_core}")
    out = Path(args.out) if args.out else None
    path = append_rows(out.stem, rows, out.parent) if out else append_rows("data", rows)
    print(f"rows -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
