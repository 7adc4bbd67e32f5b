"""Webdataset tar shards: find them, index them, read one sample's bytes by offset.

A shard is a plain (uncompressed) tar in the webdataset layout: the members of one sample share
a key (the path up to the first dot of the file name) and sit next to each other, e.g.
`000000017.jpg` + `000000017.txt`. Images are jpg/jpeg/png/webp; the caption is a `.txt`, or a
field (default "caption") of a `.json`.

Why not the `webdataset` package: its readers are sequential streams through a shuffle buffer.
Such a stream cannot be checkpointed exactly (the buffer's contents are lost on a crash) and it
splits samples over ranks by shard, so a 2-process run reads other samples than a 1-process run.
Instead each shard gets an index -- byte offsets and image sizes of its samples, one small
`.index.npz` beside it, written by `prx.data.prepare` or built here on first use -- and the
trainer draws a global permutation of all samples, reading each with one `pread`. Local disks
serve this easily: 160 img/s of ~300 KB is ~50 MB/s of random reads per GPU.

Bad input is counted under its reason, never fatal by itself: "truncated tar" (a member whose
data runs past the end of the file: a tar cut mid-write), "caption without image" and "image
without caption" (a key with only one of the two; "no image or caption" for a key with neither,
e.g. only a `.cls`), "corrupt image" (a header that does not parse), "image too large" (over the
pixel limit of `prx.data.images`: a decompression bomb), "not a tar file". Too many of them in
one shard stops the run with the shard's name (`ShardError`).
"""

from __future__ import annotations

import glob
import json
import os
import re
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from prx.data.images import ImageTooLarge, open_image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_TXT, CAPTION_JSON = 1, 2
INDEX_VERSION = 1
INDEX_DTYPE = np.dtype([
    ("image_offset", "<i8"), ("image_size", "<i8"),
    ("caption_offset", "<i8"), ("caption_size", "<i8"), ("caption_kind", "u1"),
    ("width", "<i4"), ("height", "<i4"),
])
HEADER_PROBE_BYTES = 1 << 16  # image headers (size) sit in the first 64 KB unless EXIF is huge


class ShardError(RuntimeError):
    """Unusable shards: none found, or too many bad samples in one (the message names it)."""


# ----------------------------------------------------------------------------- finding shards


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..012}.tar` and `{x,y}` expansion (webdataset's notation), left to right."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end():], match.group(1)
    numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numeric:
        lo, hi = numeric.groups()
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [p for option in options for p in expand_braces(head + option + tail)]


def find_shards(spec: str) -> list[Path]:
    """Shards named by `spec`: a .tar file, a directory (its *.tar), a glob or a brace pattern;
    several such specs joined by '::' are read together (e.g. two datasets)."""
    found: list[Path] = []
    for part in spec.split("::"):
        for item in expand_braces(part.strip()):
            path = Path(item).expanduser()
            if path.is_dir():
                found.extend(sorted(path.glob("*.tar")))
            elif any(c in item for c in "*?["):
                found.extend(Path(p) for p in sorted(glob.glob(os.path.expanduser(item))))
            elif path.exists():
                found.append(path)
            else:
                raise ShardError(f"shard {path} does not exist (from --data {spec!r})")
    if not found:
        raise ShardError(f"no .tar shards found for --data {spec!r}; make them with "
                         "`python -m prx.data.prepare SOURCE OUT_DIR`")
    return found


def split_shards(path: str, val_path: str = "", val_shards: int = 0) -> tuple[list[Path], list[Path]]:
    """(training shards, held-out shards): the held-out ones are `val_path`'s, or the last
    `val_shards` of `path`'s (then left out of training); none without either."""
    shards = find_shards(path)
    if val_path:
        return shards, find_shards(val_path)
    if val_shards >= len(shards):
        raise ShardError(f"data.val_shards={val_shards} holds out every one of the {len(shards)} shard(s) of "
                         f"--data {path!r}; hold out fewer, or name held-out shards with data.val_path")
    return (shards[:-val_shards], shards[-val_shards:]) if val_shards else (shards, [])


# ----------------------------------------------------------------------------- indexing


@dataclass
class ScanReport:
    """What indexing one shard found besides good samples."""

    samples: int = 0
    bad: Counter = field(default_factory=Counter)  # reason -> count

    @property
    def bad_total(self) -> int:
        return sum(self.bad.values())


def index_path(shard: Path) -> Path:
    return shard.with_name(shard.name[: -len(".tar")] + ".index.npz" if shard.name.endswith(".tar")
                           else shard.name + ".index.npz")


def _image_size(f, offset: int, size: int) -> tuple[int, int] | str:
    """(width, height) from the image header, or the reason it is bad: "corrupt image" (the header
    does not parse) or "image too large" (over the pixel limit)."""
    for probe in (min(size, HEADER_PROBE_BYTES), size):
        f.seek(offset)
        try:
            with open_image(f.read(probe)) as im:
                return im.size
        except ImageTooLarge:
            return "image too large"
        except Exception:  # Pillow raises many types for bad headers; maybe only the probe was short
            pass
    return "corrupt image"


def scan_shard(shard: Path) -> tuple[np.ndarray, ScanReport]:
    """Read a shard's tar headers (and image headers) into index rows; count what is bad."""
    report, rows = ScanReport(), []
    file_size = shard.stat().st_size
    groups: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    with open(shard, "rb") as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as tar:
                while True:
                    try:
                        member = tar.next()
                    except (tarfile.ReadError, EOFError, OSError):
                        report.bad["truncated tar"] += 1
                        break
                    if member is None:
                        break
                    if not member.isfile():
                        continue
                    if member.offset_data + member.size > file_size:
                        report.bad["truncated tar"] += 1  # cut mid-file: the rest is gone
                        break
                    base = member.name.rsplit("/", 1)
                    stem, _, ext = base[-1].partition(".")
                    key = (base[0] + "/" if len(base) > 1 else "") + stem
                    if not groups or groups[-1][0] != key:
                        groups.append((key, {}))
                    groups[-1][1][ext.lower()] = member
        except tarfile.ReadError:
            report.bad["not a tar file"] += 1
        for key, members in groups:
            image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
            caption, kind = members.get("txt"), CAPTION_TXT
            if caption is None:
                caption, kind = members.get("json"), CAPTION_JSON
            if image is None:
                report.bad["caption without image" if caption is not None else "no image or caption"] += 1
                continue
            if caption is None:
                report.bad["image without caption"] += 1
                continue
            size = _image_size(f, image.offset_data, image.size)
            if isinstance(size, str):
                report.bad[size] += 1
                continue
            rows.append((image.offset_data, image.size, caption.offset_data, caption.size, kind, *size))
    report.samples = len(rows)
    return np.array(rows, dtype=INDEX_DTYPE), report


def write_index(shard: Path, rows: np.ndarray, report: ScanReport) -> Path:
    """Save the index beside the shard, atomically (temp file, then rename)."""
    path = index_path(shard)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, rows=rows, tar_size=np.int64(shard.stat().st_size), version=np.int64(INDEX_VERSION),
                     bad=np.bytes_(json.dumps(dict(report.bad))))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_index(shard: Path) -> tuple[np.ndarray, ScanReport]:
    """The shard's index: from its .index.npz when that is intact and matches the tar, else by
    scanning (and saving the result when the directory is writable)."""
    path = index_path(shard)
    if path.exists():
        saved = _read_index(path, shard.stat().st_size)
        if saved is not None:
            return saved
    rows, report = scan_shard(shard)
    try:
        write_index(shard, rows, report)
    except OSError:
        pass  # read-only data directory: scan again next time
    return rows, report


def _read_index(path: Path, tar_size: int) -> tuple[np.ndarray, ScanReport] | None:
    """A saved index, or None when it is stale or damaged in any way: cut short (zipfile's
    BadZipFile, EOFError), bytes flipped (a CRC error, garbage arrays), another layout, or rows
    that point outside the tar. None means "rebuild": a bad index must never be read as data."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            if int(saved["version"]) != INDEX_VERSION or int(saved["tar_size"]) != tar_size:
                return None
            rows = saved["rows"]
            bad = Counter({str(k): int(v) for k, v in json.loads(bytes(saved["bad"])).items()})
    except Exception:  # numpy and zipfile raise a dozen types for damaged files; all mean "rebuild"
        return None
    if rows.dtype != INDEX_DTYPE or rows.ndim != 1:
        return None
    for start, size in (("image_offset", "image_size"), ("caption_offset", "caption_size")):
        if len(rows) and (rows[start].min() < 0 or rows[size].min() < 0
                          or int((rows[start] + rows[size]).max()) > tar_size):
            return None
    if len(rows) and (rows["width"].min() < 1 or rows["height"].min() < 1
                      or not np.isin(rows["caption_kind"], (CAPTION_TXT, CAPTION_JSON)).all()):
        return None
    return rows, ScanReport(len(rows), bad)


# ----------------------------------------------------------------------------- all shards


class ShardSet:
    """Every good sample of a list of shards, addressable by one global index."""

    def __init__(self, shards: list[Path], max_bad_fraction: float = 0.05, progress=None):
        self.shards = shards
        self.max_bad_fraction = max_bad_fraction
        parts, shard_ids, self.reports = [], [], []
        for i in (range(len(shards)) if progress is None else progress(range(len(shards)))):
            rows, report = load_index(shards[i])
            self.check_bad(i, report.bad_total, report.samples + report.bad_total, "indexing")
            parts.append(rows)
            shard_ids.append(np.full(len(rows), i, dtype=np.int32))
            self.reports.append(report)
        self.rows = np.concatenate(parts) if parts else np.zeros(0, INDEX_DTYPE)
        self.shard_of = np.concatenate(shard_ids) if shard_ids else np.zeros(0, np.int32)
        if len(self.rows) == 0:
            raise ShardError(f"the {len(shards)} shard(s) starting with {shards[0]} hold no readable "
                             f"samples ({self.bad_summary()})")
        self._files: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def aspects(self) -> np.ndarray:
        return self.rows["width"] / self.rows["height"]

    def bad_summary(self) -> str:
        total = sum((r.bad for r in self.reports), Counter())
        empty = sum(1 for r in self.reports if r.samples == 0)
        parts = [f"{n} {reason}" for reason, n in sorted(total.items())]
        if empty:
            parts.append(f"{empty} empty shard(s)")
        return ", ".join(parts) if parts else "none"

    def check_bad(self, shard_id: int, bad: int, seen: int, when: str) -> None:
        """Stop when a shard's bad share is above the limit (and not just one or two files)."""
        # At least 3 bad: one corrupt file among the first few samples read is noise, not a bad shard.
        if bad >= 3 and bad > self.max_bad_fraction * seen:
            raise ShardError(
                f"shard {self.shards[shard_id]}: {bad} of {seen} samples are bad while {when} "
                f"(limit data.max_bad_fraction={self.max_bad_fraction}); re-create it with "
                "prx.data.prepare, remove it from --data, or raise the limit")

    def _fd(self, shard_id: int) -> int:
        if self._pid != os.getpid():  # a DataLoader worker after fork: open its own files
            self._files, self._pid = {}, os.getpid()
        if shard_id not in self._files:
            self._files[shard_id] = os.open(self.shards[shard_id], os.O_RDONLY)
        return self._files[shard_id]

    def read(self, i: int, caption_key: str = "caption") -> tuple[bytes, str]:
        """Sample i's encoded image and caption text (json captions: the `caption_key` field)."""
        row, fd = self.rows[i], self._fd(int(self.shard_of[i]))
        image = os.pread(fd, int(row["image_size"]), int(row["image_offset"]))
        text = os.pread(fd, int(row["caption_size"]), int(row["caption_offset"])).decode("utf-8", "replace")
        if row["caption_kind"] == CAPTION_JSON:
            try:
                text = str(json.loads(text).get(caption_key, ""))
            except (ValueError, AttributeError):
                text = ""
        return image, text.strip()

    def shard_name(self, i: int) -> str:
        return str(self.shards[int(self.shard_of[i])])
