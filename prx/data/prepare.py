"""Image-caption collections -> webdataset tar shards with indexes (what `--data` reads).

    python -m prx.data.prepare SOURCE OUT_DIR [--shard-size 1GB] [--max-side 1024]

SOURCE is one of:
  * a folder of images (jpg/jpeg/png/webp/bmp/tiff, searched recursively), each with a caption in
    a sidecar file of the same stem: `cat.jpg` + `cat.txt`, or `cat.json` with a "caption" field;
  * a .jsonl or .csv file of rows with an image path (relative to the file) and a caption;
  * a .parquet file, or a folder of them, with image bytes and captions (needs pyarrow);
  column names: --image-column (default "image") and --caption-column (default "caption").

Each image is decoded once to check it (corrupt or truncated ones are skipped and counted) and to
read its size; JPEG/PNG/WebP bytes are stored as they are unless --max-side asks for a smaller
copy (re-encoded as JPEG quality 95), other formats become PNG. A shard closes when it reaches
--shard-size bytes; it is written to a temporary name, indexed (`prx.data.shards`) and renamed,
then `prepare_state.json` records how far the input was consumed. Run the same command again
after a crash and it continues after the last complete shard; the summary lands in
`prepare_summary.json`.
"""

from __future__ import annotations

import argparse
import collections
import csv
import functools
import io
import json
import os
import sys
import tarfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

from PIL import Image
from tqdm import tqdm

from prx.data.shards import scan_shard, write_index

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
STATE_FILE, SUMMARY_FILE = "prepare_state.json", "prepare_summary.json"
CHUNK = 64  # items per worker task: amortises process hand-off, keeps the order
Item = tuple[str, "bytes | Path", "str | None"]  # (name for messages, image bytes or file, caption)


class PrepareError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- sources


def _read_caption_sidecar(image: Path, caption_field: str) -> str | None:
    txt, js = image.with_suffix(".txt"), image.with_suffix(".json")
    if txt.exists():
        return txt.read_text(encoding="utf-8", errors="replace").strip()
    if js.exists():
        try:
            return str(json.loads(js.read_text(encoding="utf-8"))[caption_field]).strip()
        except (ValueError, KeyError, TypeError):
            return None
    return None


def iter_folder(root: Path, caption_field: str) -> Iterator[Item]:
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        yield str(path.relative_to(root)), path, _read_caption_sidecar(path, caption_field)


def iter_table(path: Path, image_column: str, caption_column: str) -> Iterator[Item]:
    if path.suffix == ".jsonl":
        rows = (json.loads(line) for line in path.open(encoding="utf-8") if line.strip())
    else:
        rows = csv.DictReader(path.open(encoding="utf-8", newline=""))
    for n, row in enumerate(rows):
        if image_column not in row:
            raise PrepareError(f"{path} row {n + 1} has no column {image_column!r} (columns: "
                               f"{', '.join(row)}); pass --image-column")
        image = Path(str(row[image_column]))
        caption = row.get(caption_column)
        yield f"{path.name}:{n + 1}", image if image.is_absolute() else path.parent / image, (
            None if caption is None else str(caption).strip())


def iter_parquet(path: Path, image_column: str, caption_column: str) -> Iterator[Item]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepareError("reading parquet needs pyarrow: `pip install pyarrow`") from None
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    for file in files:
        table = pq.ParquetFile(file)
        for batch in table.iter_batches(batch_size=256, columns=[image_column, caption_column]):
            rows = batch.to_pylist()
            for n, row in enumerate(rows):
                image = row[image_column]
                if isinstance(image, dict):  # Hugging Face datasets store {"bytes": ..., "path": ...}
                    image = image.get("bytes")
                yield f"{file.name}:{n}", image if isinstance(image, bytes) else b"", row[caption_column]


def iter_source(source: Path, args) -> Iterator[Item]:
    if source.is_dir() and any(source.glob("*.parquet")):
        return iter_parquet(source, args.image_column, args.caption_column)
    if source.is_dir():
        return iter_folder(source, args.caption_field)
    if source.suffix in (".jsonl", ".csv"):
        return iter_table(source, args.image_column, args.caption_column)
    if source.suffix == ".parquet":
        return iter_parquet(source, args.image_column, args.caption_column)
    raise PrepareError(f"{source}: expected a folder, a .jsonl/.csv or a .parquet file")


# ----------------------------------------------------------------------------- one sample


def check_image(item: Item, max_side: int) -> tuple[str, bytes, str, str] | tuple[str, str]:
    """(name, image bytes, extension, caption) for a good sample, else (name, reason to skip)."""
    name, image, caption = item
    if not caption:
        return name, "missing caption"
    try:
        data = image.read_bytes() if isinstance(image, Path) else image
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()  # the full decode: truncated or corrupt data fails here
            if max_side and max(im.size) > max_side:
                scale = max_side / max(im.size)
                size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
                small = im.convert("RGB").resize(size, Image.Resampling.LANCZOS)
                out = io.BytesIO()
                small.save(out, "JPEG", quality=95)
                return name, out.getvalue(), "jpg", caption
            if fmt not in KEPT_FORMATS:
                out = io.BytesIO()
                im.convert("RGB").save(out, "PNG")
                return name, out.getvalue(), "png", caption
            return name, data, KEPT_FORMATS[fmt], caption
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return name, f"corrupt image ({type(err).__name__})"


def _check_chunk(chunk: list, max_side: int) -> list:
    return [check_image(item, max_side) for item in chunk]


# ----------------------------------------------------------------------------- shards


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # mtime 0: identical input, identical bytes
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Writes `<prefix>-NNNNNN.tar` shards atomically, each with its index beside it."""

    def __init__(self, out: Path, prefix: str, shard_size: int, first_shard: int):
        self.out, self.prefix, self.shard_size = out, prefix, shard_size
        self.number, self.tar, self.samples = first_shard, None, 0

    def path(self, number: int) -> Path:
        return self.out / f"{self.prefix}-{number:06d}.tar"

    def add(self, key: str, image: bytes, ext: str, caption: str) -> bool:
        """Add one sample; True when this closed a shard."""
        if self.tar is None:
            self.tmp = self.path(self.number).with_suffix(".tar.tmp")
            self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        _add(self.tar, f"{key}.{ext}", image)
        _add(self.tar, f"{key}.txt", caption.encode("utf-8"))
        self.samples += 1
        if self.tar.offset >= self.shard_size:
            self.close()
            return True
        return False

    def close(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        final = self.path(self.number)
        os.replace(self.tmp, final)
        rows, report = scan_shard(final)
        write_index(final, rows, report)
        self.tar, self.number = None, self.number + 1


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("b")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1:] in units else int(text)


def prepare(args) -> dict:
    source, out = Path(args.source).expanduser(), Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    options = {"source": str(source.resolve()), "max_side": args.max_side, "shard_size": args.shard_size,
               "prefix": args.prefix}
    state = {"options": options, "consumed": 0, "shards": 0, "samples": 0, "skipped": {}}
    state_path = out / STATE_FILE
    if state_path.exists():
        saved = json.loads(state_path.read_text())
        if saved["options"] != options:
            raise PrepareError(f"{out} holds shards from another run ({saved['options']}); use an "
                               "empty OUT_DIR or the same options")
        state = saved
    for stale in out.glob("*.tar.tmp"):  # a shard that was being written when a run stopped
        stale.unlink()
    skipped = Counter(state["skipped"])
    examples: list[str] = []
    writer = ShardWriter(out, args.prefix, parse_size(args.shard_size), state["shards"])
    items = iter_source(source, args)
    for _ in range(state["consumed"]):  # continue after the last complete shard
        next(items)
    consumed, pending = state["consumed"], 0  # pending: consumed items not yet in a closed shard

    def save_state():
        state.update(consumed=consumed, shards=writer.number, skipped=dict(skipped))
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, state_path)

    def chunks():
        chunk = []
        for item in items:
            chunk.append(item)
            if len(chunk) == CHUNK:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    bar = tqdm(desc="prepare", unit="img", initial=consumed, disable=args.quiet)
    with ProcessPoolExecutor(max(1, args.workers)) as pool:
        for results in ordered_map(pool, functools.partial(_check_chunk, max_side=args.max_side),
                                   chunks(), window=2 * max(1, args.workers)):
            for result in results:
                pending += 1
                bar.update()
                if len(result) == 2:
                    skipped[result[1].split(" (")[0]] += 1
                    if len(examples) < 10:
                        examples.append(f"{result[0]}: {result[1]}")
                    continue
                name, data, ext, caption = result
                closed = writer.add(f"{state['samples']:09d}", data, ext, caption)
                state["samples"] += 1
                if closed:
                    consumed, pending = consumed + pending, 0
                    save_state()
    writer.close()
    consumed += pending
    save_state()
    bar.close()
    summary = {"shards": writer.number, "samples": state["samples"], "skipped": dict(skipped),
               "examples": examples, "out": str(out),
               "bytes": sum(p.stat().st_size for p in out.glob(f"{args.prefix}-*.tar"))}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def ordered_map(pool, fn, inputs, window: int):
    """pool.map with at most `window` tasks in flight (Executor.map submits all inputs at once,
    which for parquet bytes would hold the whole dataset in memory)."""
    pending = collections.deque()
    for item in inputs:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m prx.data.prepare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="image folder, .jsonl/.csv, or .parquet file/folder")
    p.add_argument("out", help="output folder for the shards")
    p.add_argument("--shard-size", default="1GB", help="target bytes per shard (default 1GB)")
    p.add_argument("--max-side", type=int, default=0, help="shrink larger images to this side (0: keep)")
    p.add_argument("--prefix", default="shard", help="shard file prefix (default shard)")
    p.add_argument("--image-column", default="image")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--caption-field", default="caption", help="field of .json caption sidecars")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode-check processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = prepare(args)
    except PrepareError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(summary["skipped"].items())) or "none"
    print(f"prepare: {summary['samples']:,} samples in {summary['shards']} shard(s), "
          f"{summary['bytes'] / 2**20:.1f} MiB, in {summary['out']}; skipped: {skipped}")
    for line in summary["examples"]:
        print(f"  skipped {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
