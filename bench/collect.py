"""Add the CSV rows of a GPU check to bench/results/, the record kept in git.

    python -m bench.collect /path/to/out                      # a folder written by gpu_check.sh
    python -m bench.collect /path/to/out/gpu_check.tar.gz     # or its packed form (PACK=1)

Each `<name>.csv` found is appended to `bench/results/<name>.csv`, row by row, skipping rows
already there (collecting twice changes nothing). A file whose columns differ from the record's
is refused with its name, since mixing them would misalign every later row.
"""

from __future__ import annotations

import csv
import sys
import tarfile
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def read_rows(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(newline="") as f:
        rows = list(csv.reader(f))
    return (rows[0], rows[1:]) if rows else ([], [])


def collect(folder: Path, results: Path = RESULTS) -> dict[str, int]:
    """Append new rows of every CSV under `folder` to `results`; returns rows added per file."""
    added = {}
    for source in sorted(folder.rglob("*.csv")):
        header, rows = read_rows(source)
        target = results / source.name
        if target.exists():
            known_header, known = read_rows(target)
            if known_header != header:
                raise SystemExit(f"{source}: columns {header} differ from {target}'s {known_header}")
        else:
            known = []
        seen = {tuple(row) for row in known}
        new = [row for row in rows if tuple(row) not in seen]
        results.mkdir(parents=True, exist_ok=True)
        with target.open("a", newline="") as f:
            writer = csv.writer(f)
            if not target.stat().st_size:
                writer.writerow(header)
            writer.writerows(new)
        added[source.name] = len(new)
    return added


def main(argv: list[str], results: Path = RESULTS) -> None:
    if len(argv) != 1:
        raise SystemExit(__doc__)
    source = Path(argv[0])
    if not source.exists():
        raise SystemExit(f"{source} does not exist")
    with tempfile.TemporaryDirectory() as tmp:
        if source.is_file():
            with tarfile.open(source) as archive:
                archive.extractall(tmp, filter="data")  # plain files only, nothing outside tmp
            source = Path(tmp)
        for name, count in collect(source, results).items():
            print(f"{name}: {count} new row(s) -> {results / name}")


if __name__ == "__main__":
    main(sys.argv[1:])
