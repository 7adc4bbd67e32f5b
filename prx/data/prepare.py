"""Image-caption collections -> webdataset tar shards with indexes (what `--data` reads).

    python -m prx.data.prepare SOURCE OUT_DIR [--shard-size 1GB] [--max-side 1024] [--text-encoder NAME]

SOURCE is one of:
  * a folder of images (jpg/jpeg/png/webp/bmp/tiff, searched recursively), each with a caption in
    a sidecar file of the same stem: `cat.jpg` + `cat.txt`, or `cat.json` with a "caption" field;
  * a .jsonl or .csv file of rows with an image path (relative to the file) and a caption;
  * a .parquet file, or a folder of them, with image bytes and captions (needs pyarrow);
  column names: --image-column (default "image") and --caption-column (default "caption").

Each image is decoded once to check it and to read its size. Skipped and counted, each under its
reason: "corrupt image" (truncated, or not an image), "unreadable image" (the file cannot be
read), "image too large" (over Pillow's pixel limit: a decompression bomb, `prx.data.images`),
"image without caption" (none, or an empty one), "caption without image" (a sidecar or row
whose image is missing), "no image or caption". Plain 8-bit gray or RGB JPEG/PNG/WebP bytes are
stored as they are; any other image (16-bit, palette, alpha, CMYK, other formats) is stored as
the 8-bit RGB the trainer would make of it (`to_rgb8`), as PNG (JPEG quality 95 for JPEG
sources), so every decoder reads the shards alike; --max-side shrinks larger images (JPEG
quality 95). A shard closes when it reaches --shard-size bytes; it is written to a temporary
name, indexed (`prx.data.shards`) and renamed, then `prepare_state.json` records how far the
input was consumed. Run the same command again after a crash and it continues after the last
complete shard; the summary lands in `prepare_summary.json`. With --text-encoder the captions'
embeddings are stored beside the shards too (`python -m prx.data.embed`, which does the same for
existing shards; training then does not load the encoder). A bad flag or path is one line
(`error: ...`) on stderr and exit status 2, before anything is written.
"""

from __future__ import annotations

import argparse
import collections
import csv
import errno
import functools
import io
import itertools
import json
import os
import re
import sys
import tarfile
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

from PIL import Image
from tqdm import tqdm

from prx.config_rules import ConfigError, OneLineParser
from prx.data.images import DECODE_ERRORS, ImageTooLarge, is_plain_rgb8, open_image, to_rgb8
from prx.data.shards import ShardError, scan_shard, write_index
from prx.hub import PretrainedMissing

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
TABLE_SUFFIXES = {".jsonl", ".csv", ".parquet"}
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
JPEG_QUALITY = 95  # re-encoded JPEGs: visually lossless, ~3x the bytes of quality 75
STATE_FILE, SUMMARY_FILE = "prepare_state.json", "prepare_summary.json"
CHUNK = 64  # items per worker task: amortises process hand-off, keeps the order
Item = tuple[str, "bytes | Path | None", "str | None"]  # (name for messages, image bytes or file, caption)


class PrepareError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- sources


def _read_caption_file(path: Path, caption_field: str) -> str | None:
    """A .txt's text, or a .json's `caption_field`; None when the file holds no caption."""
    if path.suffix == ".txt":
        return path.read_text(encoding="utf-8", errors="replace").strip()
    try:
        return str(json.loads(path.read_text(encoding="utf-8"))[caption_field]).strip()
    except (ValueError, KeyError, TypeError):
        return None


def _read_caption_sidecar(image: Path, caption_field: str) -> str | None:
    for sidecar in (image.with_suffix(".txt"), image.with_suffix(".json")):
        if sidecar.exists():
            return _read_caption_file(sidecar, caption_field)
    return None


def iter_folder(root: Path, caption_field: str) -> Iterator[Item]:
    """Images with their sidecar captions, and sidecars without an image (counted, not kept), in
    path order."""
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES | {".txt", ".json"})
    stems = {p.with_suffix("") for p in files if p.suffix.lower() in IMAGE_SUFFIXES}
    for path in files:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            yield str(path.relative_to(root)), path, _read_caption_sidecar(path, caption_field)
        elif path.suffix in (".txt", ".json") and path.with_suffix("") not in stems:
            caption = _read_caption_file(path, caption_field)  # a .json without the field: not a caption
            if caption is not None:
                yield str(path.relative_to(root)), None, caption


def iter_table(path: Path, image_column: str, caption_column: str) -> Iterator[Item]:
    if path.suffix.lower() == ".jsonl":
        rows = (_json_row(path, n + 1, line) for n, line in enumerate(path.open(encoding="utf-8")) if line.strip())
    else:
        rows = csv.DictReader(path.open(encoding="utf-8", newline=""))
    for n, row in enumerate(rows):
        if image_column not in row:
            raise PrepareError(f"{path} row {n + 1} has no column {image_column!r} (columns: "
                               f"{', '.join(row)}); pass --image-column")
        image = Path(str(row[image_column])) if row[image_column] else None
        if image is not None and not image.is_absolute():
            image = path.parent / image
        yield f"{path.name}:{n + 1}", image, _text(row.get(caption_column))


def _json_row(path: Path, line_number: int, line: str) -> dict:
    try:
        row = json.loads(line)
    except ValueError as err:
        raise PrepareError(f"{path} line {line_number} is not JSON ({err}); fix or delete that line, then "
                           "run the same command again") from None
    if not isinstance(row, dict):
        raise PrepareError(f"{path} line {line_number} is a JSON {type(row).__name__}, not an object with "
                           "image and caption fields; fix or delete that line")
    return row


def _text(caption) -> str | None:
    return None if caption is None else str(caption).strip()


def iter_parquet(path: Path, image_column: str, caption_column: str) -> Iterator[Item]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepareError("reading parquet needs pyarrow: `pip install pyarrow`") from None
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    for file in files:
        try:
            table = pq.ParquetFile(file)
        except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
            raise PrepareError(f"{file} is not a readable parquet file ({err})") from None
        missing = [c for c in (image_column, caption_column) if c not in table.schema_arrow.names]
        if missing:
            raise PrepareError(f"{file} has no column {missing[0]!r} (columns: "
                               f"{', '.join(table.schema_arrow.names)}); pass --image-column / --caption-column")
        n = 0
        for batch in table.iter_batches(batch_size=256, columns=[image_column, caption_column]):
            for row in batch.to_pylist():
                image = row[image_column]
                if isinstance(image, dict):  # Hugging Face datasets store {"bytes": ..., "path": ...}
                    image = image.get("bytes")
                yield f"{file.name}:{n}", image if isinstance(image, bytes) else None, _text(row[caption_column])
                n += 1


def iter_source(source: Path, args) -> Iterator[Item]:
    """The source's items in a fixed order; PrepareError when it does not exist, is of a kind we do
    not read, or holds nothing."""
    if not source.exists():
        raise PrepareError(f"SOURCE {source} does not exist; give an image folder, a .jsonl/.csv file of "
                           "image paths and captions, or a .parquet file or folder")
    suffix = source.suffix.lower()
    if source.is_dir() and any(source.glob("*.parquet")):
        items = iter_parquet(source, args.image_column, args.caption_column)
    elif source.is_dir():
        items = iter_folder(source, args.caption_field)
    elif suffix in (".jsonl", ".csv"):
        items = iter_table(source, args.image_column, args.caption_column)
    elif suffix == ".parquet":
        items = iter_parquet(source, args.image_column, args.caption_column)
    else:
        raise PrepareError(f"SOURCE {source} is a {suffix or 'extensionless'} file; give an image folder (images "
                           "with .txt/.json caption sidecars), a .jsonl/.csv file or a .parquet file or folder")
    first = next(items, None)
    if first is None:
        what = (f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it or its subfolders"
                if source.is_dir() and suffix != ".parquet" and not any(source.glob("*.parquet"))
                else "no rows")
        raise PrepareError(f"SOURCE {source} is empty: {what}; point it at the data")
    return itertools.chain([first], items)


# ----------------------------------------------------------------------------- one sample


def check_image(item: Item, max_side: int) -> tuple[str, bytes, str, str] | tuple[str, str]:
    """(name, image bytes, extension, caption) for a good sample, else (name, reason to skip); the
    reason is the part before " (" (the module docstring lists them)."""
    name, image, caption = item
    try:
        data = image.read_bytes() if isinstance(image, Path) else image
    except FileNotFoundError:
        data = None
    except OSError as err:
        return name, f"unreadable image ({type(err).__name__})"
    if data is None:
        return name, "caption without image" if caption else "no image or caption"
    if not caption:
        return name, "image without caption"
    try:
        with open_image(data) as im:
            fmt, plain = im.format, is_plain_rgb8(im)
            im.load()  # the full decode: truncated or corrupt data fails here
            if max_side and max(im.size) > max_side:
                scale = max_side / max(im.size)
                size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
                return name, _encode(to_rgb8(im).resize(size, Image.Resampling.LANCZOS), "JPEG"), "jpg", caption
            if fmt in KEPT_FORMATS and plain:
                return name, data, KEPT_FORMATS[fmt], caption
            if fmt == "JPEG":  # CMYK: stays lossy, re-encoded once
                return name, _encode(to_rgb8(im), "JPEG"), "jpg", caption
            return name, _encode(to_rgb8(im), "PNG"), "png", caption
    except ImageTooLarge as err:
        return name, f"image too large ({err})"
    except DECODE_ERRORS as err:
        return name, f"corrupt image ({type(err).__name__})"


def _encode(rgb: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    rgb.save(out, fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
    return out.getvalue()


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
        try:
            write_index(final, *scan_shard(final))
        except BaseException:
            final.unlink()  # not yet in prepare_state.json: the next run writes it again
            raise
        self.tar, self.number = None, self.number + 1

    def abort(self) -> None:
        """Drop the shard being written (a run that stops leaves only complete shards)."""
        if self.tar is not None:
            try:
                self.tar.close()  # writes the end-of-archive blocks, which a full disk refuses
            except OSError:
                pass
            finally:
                self.tmp.unlink(missing_ok=True)
                self.tar = None


SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str, flag: str = "--shard-size") -> int:
    """'1GB', '512MB', '64KB', '1.5G', '1GiB' or plain bytes -> bytes (1KB = 1024 bytes)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    size = int(float(match.group(1)) * SIZE_UNITS[match.group(2)]) if match else 0
    if size < 1:
        raise PrepareError(f"{flag} {text!r} is not a size; give a positive number of bytes, optionally with "
                           "KB, MB or GB (e.g. 512MB or 1GB)")
    return size


def check_flags(args) -> None:
    """Refuse a bad flag before anything is read or written: the message names it, its value and a fix."""
    parse_size(args.shard_size)
    if args.max_side < 0:
        raise PrepareError(f"--max-side {args.max_side} is negative; give 0 to keep every image's size, or the "
                           "longest side in pixels to shrink larger ones to (e.g. 1024)")
    if args.workers < 1:
        raise PrepareError(f"--workers {args.workers}: give at least 1 decode-check process (this machine has "
                           f"{os.cpu_count()} CPUs)")
    if not args.prefix or any(c in args.prefix for c in "/\\") or args.prefix.startswith("."):
        raise PrepareError(f"--prefix {args.prefix!r} is not a plain file-name start; give one like 'shard'")


def open_out_dir(out: Path) -> None:
    """Create OUT_DIR when missing and check that it takes files."""
    if out.exists() and not out.is_dir():
        raise PrepareError(f"OUT_DIR {out} is a file; give a folder for the shards (it is created when missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise PrepareError(f"OUT_DIR {out} is not writable ({err.strerror or err}); give a folder you can "
                           "write to") from None


def load_state(out: Path, state_path: Path, options: dict, prefix: str) -> dict:
    """The previous run's progress in OUT_DIR, or a fresh state; refuses another run's shards."""
    if not state_path.exists():
        others = sorted(out.glob(f"{prefix}-*.tar"))
        if others:
            raise PrepareError(f"OUT_DIR {out} already holds {len(others)} shard(s) ({others[0].name}, ...) but no "
                               f"{STATE_FILE}; give an empty OUT_DIR (or another --prefix)")
        return {"options": options, "consumed": 0, "shards": 0, "samples": 0, "skipped": {}}
    try:
        saved = json.loads(state_path.read_text())
        saved_options = saved["options"]
    except (ValueError, KeyError, TypeError):
        raise PrepareError(f"{state_path} is unreadable; delete OUT_DIR {out} (or its shards and that file) and "
                           "run again") from None
    if saved_options != options:
        raise PrepareError(f"{out} holds shards from another run ({saved_options}); use an empty OUT_DIR or the "
                           "same options")
    return saved


def prepare(args) -> dict:
    source, out = Path(args.source).expanduser(), Path(args.out).expanduser()
    check_flags(args)
    items = iter_source(source, args)  # a missing, unknown or empty SOURCE stops here, before OUT_DIR is made
    open_out_dir(out)
    options = {"source": str(source.resolve()), "max_side": args.max_side, "shard_size": args.shard_size,
               "prefix": args.prefix}
    state_path = out / STATE_FILE
    state = load_state(out, state_path, options, args.prefix)
    for stale in out.glob("*.tar.tmp"):  # a shard that was being written when a run stopped
        stale.unlink()
    skipped = Counter(state["skipped"])
    examples: list[str] = []
    writer = ShardWriter(out, args.prefix, parse_size(args.shard_size), state["shards"])
    for n in range(state["consumed"]):  # continue after the last complete shard
        if next(items, None) is None:
            raise PrepareError(f"SOURCE {source} now holds {n} item(s), fewer than the {state['consumed']} a "
                               f"previous run consumed; it changed: use a new OUT_DIR")
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
    try:
        with ProcessPoolExecutor(args.workers) as pool:
            for results in ordered_map(pool, functools.partial(_check_chunk, max_side=args.max_side),
                                       chunks(), window=2 * args.workers):
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
    except BaseException as err:  # Ctrl-C, a full disk: keep the complete shards, drop the one in progress
        writer.abort()
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise PrepareError(f"no space left on {out}; the {writer.number} complete shard(s) are kept: free space "
                               "and run the same command again to continue after them") from None
        raise
    finally:
        bar.close()
    consumed += pending
    save_state()
    summary = {"shards": writer.number, "samples": state["samples"], "skipped": dict(skipped),
               "examples": examples, "out": str(out),
               "bytes": sum(p.stat().st_size for p in out.glob(f"{args.prefix}-*.tar"))}
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    if summary["samples"] == 0:
        raise PrepareError(f"none of the {consumed} item(s) of SOURCE {source} is usable (skipped: "
                           f"{describe_skipped(skipped)}); {out / SUMMARY_FILE} names the first ones")
    return summary


def describe_skipped(skipped: dict) -> str:
    return ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())) or "none"


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
    p = OneLineParser(prog="python -m prx.data.prepare", description=__doc__.split("\n\n")[0],
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
    p.add_argument("--text-encoder", default="", help="also store caption embeddings of this encoder")
    p.add_argument("--max-tokens", type=int, default=256, help="with --text-encoder: the run's text.max_tokens")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def embed_captions(args, out: Path) -> str:
    """--text-encoder: the caption embeddings of the shards just written (a summary line)."""
    from prx.data import embed

    done = embed.run(argparse.Namespace(data=str(out), text_encoder=args.text_encoder, max_tokens=args.max_tokens,
                                        fields="caption", dtype="bf16", device="auto", quiet=args.quiet))
    return embed.describe(done)


def main(argv: list[str] | None = None) -> int:
    """`python -m prx.data.prepare`: 0 when done; a bad flag, path or source, or a failed write, is
    one line `error: ...` on stderr and status 2 (130 for Ctrl-C), never a traceback."""
    try:
        args = build_parser().parse_args(argv)
        if args.text_encoder and args.max_tokens < 1:
            raise PrepareError(f"--max-tokens {args.max_tokens}: give at least 1 (the run's text.max_tokens)")
        summary = prepare(args)
        embedded = embed_captions(args, Path(summary["out"])) if args.text_encoder else ""
    except (PrepareError, ConfigError, ShardError, PretrainedMissing) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # reading SOURCE or writing OUT_DIR failed (a lost mount, a full disk at the end)
        print(f"error: {err}; fix that and run the same command again: it continues after the last complete "
              "shard", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: stopped by Ctrl-C; run the same command again: it continues after the last complete shard",
              file=sys.stderr)
        return 130
    print(f"prepare: {summary['samples']:,} samples in {summary['shards']} shard(s), "
          f"{summary['bytes'] / 2**20:.1f} MiB, in {summary['out']}; skipped: {describe_skipped(summary['skipped'])}")
    for line in summary["examples"]:
        print(f"  skipped {line}")
    if embedded:
        print(embedded)
    return 0


if __name__ == "__main__":
    sys.exit(main())
