"""Caption embeddings stored beside a shard, so that training need not run the text encoder.

`<shard>.text.safetensors` holds, for each caption field, every sample's encoder output at its
real length (no padding stored), packed: `<field>.values` (sum of lengths, C) and
`<field>.offsets` (samples + 1), sample i being values[offsets[i]:offsets[i + 1]]; and `empty`,
the empty caption's embedding (caption dropout), once per shard. Rows follow the shard's index
(`prx.data.shards`), so global sample i of a ShardSet finds its embedding by (shard, row).

The metadata records what the embeddings were made with (`TextIdentity`: encoder, max tokens,
prompt cleaning) and of what (the tar's size and sample count); a store made by another encoder,
another max length or for another version of the shard is refused with a message that names
both sides and the command that re-embeds. Writes are atomic (a temporary name, then a rename),
so a crash leaves a shard with its old store or none, and `embed_shards` skips shards whose
store is current: running the same command again continues where it stopped.

Why bf16: on a GPU the encoder runs in bf16 and its last hidden state is bf16 already, so the
stored values are the ones on-the-fly encoding would use. Size: 256 tokens x 2304 channels x 2
bytes = 1.18 MB per caption at the PRX presets' longest, 1.18 TB per million captions; real
captions are shorter, and `embed_shards` reports what was written.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from prx.config import caption_fields
from prx.data.shards import ShardError, ShardSet, split_shards

STORE_VERSION = 1
CLEANING = "ftfy+html2"  # prx.text.clean_prompt: a store made under another cleaning is refused
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass(frozen=True)
class TextIdentity:
    """What the stored embeddings were made with; training refuses a store of another identity."""

    encoder: str
    max_tokens: int
    cleaning: str = CLEANING

    def differences(self, other: TextIdentity) -> list[str]:
        return [f"{name} {getattr(other, name)!r} (this run: {getattr(self, name)!r})"
                for name in ("encoder", "max_tokens", "cleaning") if getattr(self, name) != getattr(other, name)]


def store_path(shard: Path) -> Path:
    stem = shard.name[: -len(".tar")] if shard.name.endswith(".tar") else shard.name
    return shard.with_name(stem + ".text.safetensors")


def write_store(shard: Path, identity: TextIdentity, fields: dict[str, list[torch.Tensor]], empty: torch.Tensor,
                dtype: str = "bf16") -> Path:
    """Save one shard's embeddings (per field, one (T_i, C) tensor per index row), atomically."""
    from safetensors.torch import save_file

    tensors = {"empty": empty.to(DTYPES[dtype]).contiguous()}
    counts = {len(seqs) for seqs in fields.values()}
    for name, seqs in fields.items():
        lengths = torch.tensor([s.shape[0] for s in seqs], dtype=torch.long)
        tensors[f"{name}.offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        tensors[f"{name}.values"] = torch.cat(seqs).to(DTYPES[dtype]).contiguous()
    meta = {"version": str(STORE_VERSION), "identity": json.dumps(asdict(identity)),
            "fields": json.dumps(sorted(fields)), "samples": str(counts.pop()),
            "tar_size": str(shard.stat().st_size), "dtype": dtype, "hidden_size": str(empty.shape[1])}
    path = store_path(shard)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


class ShardTextStore:
    """One shard's stored embeddings, read lazily (safetensors maps the file: one slice a sample)."""

    def __init__(self, shard: Path):
        from safetensors import SafetensorError, safe_open

        self.shard, self.path = shard, store_path(shard)
        try:
            with safe_open(str(self.path), "pt") as f:
                meta = f.metadata() or {}
                if int(meta.get("version", -1)) != STORE_VERSION:
                    raise ShardError(f"{self.path} is a text store of format {meta.get('version')!r}, not "
                                     f"{STORE_VERSION}; re-embed with `python -m prx.data.embed`")
                self.identity = TextIdentity(**json.loads(meta["identity"]))
                self.fields = json.loads(meta["fields"])
                self.samples, self.tar_size = int(meta["samples"]), int(meta["tar_size"])
                self.hidden_size = int(meta["hidden_size"])
                self.offsets = {name: f.get_tensor(f"{name}.offsets") for name in self.fields}
                self.empty = f.get_tensor("empty").float()
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as err:  # cut short, or not ours
            raise ShardError(f"{self.path} is unreadable ({type(err).__name__}: {err}); delete it and re-embed "
                             "with `python -m prx.data.embed`") from None
        self._file, self._pid = None, None

    def problem(self, identity: TextIdentity, fields: list[str], samples: int) -> str:
        """Why this store cannot serve a run of `identity` reading `fields` ("" when it can)."""
        if differs := identity.differences(self.identity):
            return f"it was made with {', '.join(differs)}"
        if missing := [f for f in fields if f not in self.fields]:
            return f"it has no caption field {', '.join(missing)} (it holds {', '.join(self.fields)})"
        if self.tar_size != self.shard.stat().st_size or self.samples != samples:
            return (f"it describes {self.samples} samples of a {self.tar_size}-byte tar, the shard now has "
                    f"{samples} in {self.shard.stat().st_size} bytes")
        return ""

    def read(self, field: str, row: int) -> torch.Tensor:
        """Row `row`'s embedding of `field`, (T, C) fp32."""
        from safetensors import safe_open

        if self._pid != os.getpid():  # a DataLoader worker after fork opens its own mapping
            self._file, self._pid = safe_open(str(self.path), "pt"), os.getpid()
        start, end = self.offsets[field][row : row + 2].tolist()
        return self._file.get_slice(f"{field}.values")[start:end].float()


class StoredText:
    """The stored embeddings of every shard of a ShardSet, by global sample index."""

    def __init__(self, shards: ShardSet, identity: TextIdentity, fields: list[str]):
        self.shards = shards
        self.stores: list[ShardTextStore] = []
        rows_per_shard = torch.bincount(torch.from_numpy(shards.shard_of).long(), minlength=len(shards.shards))
        for shard, samples in zip(shards.shards, rows_per_shard.tolist()):
            if not store_path(shard).exists():
                raise ShardError(f"shard {shard} has no stored caption embeddings while others do; run "
                                 f"`python -m prx.data.embed {shard.parent} --text-encoder {identity.encoder}`")
            store = ShardTextStore(shard)
            if why := store.problem(identity, fields, samples):
                raise ShardError(f"the caption embeddings of {shard} do not fit this run: {why}; re-embed with "
                                 f"`python -m prx.data.embed {shard.parent} --text-encoder {identity.encoder} "
                                 f"--max-tokens {identity.max_tokens}`, or train on other shards")
            self.stores.append(store)
        self.hidden_size = self.stores[0].hidden_size
        self.empty = self.stores[0].empty
        starts = torch.cat([torch.zeros(1, dtype=torch.long), rows_per_shard.cumsum(0)])
        self.first_row = starts.tolist()  # global index of each shard's row 0 (ShardSet concatenates)

    @staticmethod
    def present(shards: list[Path]) -> bool:
        return any(store_path(s).exists() for s in shards)

    def read(self, i: int, field: str) -> torch.Tensor:
        shard_id = int(self.shards.shard_of[i])
        return self.stores[shard_id].read(field, i - self.first_row[shard_id])


def training_text(cfg, progress=None) -> StoredText | None:
    """The training shards' stored caption embeddings, or None where the run encodes on the fly
    (shapes data, text.precomputed=off, or shards without stores)."""
    d = cfg.data
    if d.source != "webdataset" or cfg.text.precomputed == "off":
        return None
    shards = split_shards(d.path, d.val_path, d.val_shards)[0]
    if not StoredText.present(shards):
        return None
    return StoredText(ShardSet(shards, d.max_bad_fraction, progress), identity_of(cfg),
                      [name for name, _ in caption_fields(d.caption_key)])


def identity_of(cfg) -> TextIdentity:
    return TextIdentity(cfg.text.encoder, cfg.text.max_tokens)
