"""Caption embeddings per training step: encoding on the fly against reading stored ones.

On the fly, each step runs the frozen encoder over its batch's captions (`TextTower.encode`,
no_grad, bf16 on a GPU, padded to the batch's longest caption). Stored, each step reads its
captions' embeddings from `<shard>.text.safetensors` (`prx.data.text_store`) and pads them
(`pad_text`), the work a DataLoader worker and the loop do. The encoder is a random T5Gemma of
the real code (transformers' T5Gemma encoder, loaded through `TextTower`): `--size 2b` has the
T5Gemma-2B encoder's shape (26 layers, 2304 wide, 8 query and 4 key-value heads of 256, MLP
9216; the vocabulary is MiniLM's 30522 tokens, which changes the embedding table, not the
FLOPs); `--size tiny` a 2-layer, 256-wide one that runs on a CPU. Captions are random words, of
lengths spread up to --max-tokens, as web captions are.

    python -m bench.bench_text                        # tiny on the CPU; rows -> bench/results/text.csv
    python -m bench.bench_text --size 2b --out OUT/text.csv   # on a GPU

Rows: op "text", shape "b<batch> t<max tokens> <size>", provider "encode" (the batch in one call,
padded to its longest caption), "encode-sorted<chunk>" (sorted by length, --chunk captions a
call: `text.encode_chunk`) or "stored"; ms per
step (median of --steps); the note has the mean caption length and the stored bytes per caption.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import FIELDS, RESULTS, append_csv, environment
from prx.config import TextConfig
from prx.data.text_store import ShardTextStore, TextIdentity, write_store
from prx.text import MINILM_PACKAGE, TextTower, pad_text, resolve_encoder_path

SIZES = {  # T5Gemma encoder shapes (the 2B's from its published config)
    "tiny": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64),
    "2b": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
               num_key_value_heads=4, head_dim=256),
}
WORDS = ("a photo of red blue green small large cat dog house tree river city street light dark old new "
         "woman man child car boat sky cloud mountain field flower table chair window door wall").split()


def random_encoder(folder: Path, size: str) -> Path:
    """A random T5Gemma encoder-decoder saved as the real checkpoint is, with MiniLM's tokenizer."""
    from transformers import T5GemmaConfig, T5GemmaForConditionalGeneration

    module = dict(vocab_size=30522, **SIZES[size])
    torch.manual_seed(0)
    config = T5GemmaConfig(encoder=module, decoder=module, vocab_size=30522)
    T5GemmaForConditionalGeneration(config).save_pretrained(folder)
    for f in resolve_encoder_path(MINILM_PACKAGE).iterdir():
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, folder / f.name)
    return folder


def random_captions(count: int, max_tokens: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(8, max(9, int(0.9 * max_tokens)), (count,), generator=g).tolist()
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (n,), generator=g)) for n in lengths]


def median_ms(fn, steps: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench(size: str, batch: int, max_tokens: int, steps: int, device: torch.device, chunk: int = 8) -> list[dict]:
    env = environment(device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        encoder = random_encoder(tmp / "encoder", size)
        tower = TextTower(TextConfig(encoder=str(encoder), max_tokens=max_tokens), device)
        captions = random_captions(batch * (steps + 1), max_tokens)
        batches = [captions[i * batch:(i + 1) * batch] for i in range(steps + 1)]
        seqs = [s.cpu() for b in batches for s in tower.encode(b)]
        mean_tokens = sum(s.shape[0] for s in seqs) / len(seqs)
        shard = tmp / "bench-000000.tar"
        shard.write_bytes(b"")  # the store only records the tar's size
        store_file = write_store(shard, TextIdentity(str(encoder), max_tokens), {"caption": seqs},
                                 tower.empty().cpu())
        store = ShardTextStore(shard)
        per_caption = store_file.stat().st_size / len(seqs)
        step = iter(range(10**9))

        def encode(per_call: int):
            return lambda: tower(batches[next(step) % len(batches)], per_call)

        def stored():
            k = next(step) % len(batches)
            text, mask = pad_text([store.read("caption", k * batch + i) for i in range(batch)], 16)
            text.to(device, non_blocking=True), mask.to(device, non_blocking=True)

        note = f"mean caption {mean_tokens:.0f} tokens; stored {per_caption / 1e3:.1f} kB per caption (bf16)"
        shape = f"b{batch} t{max_tokens} {size}"
        dtype = "bf16" if device.type == "cuda" else "fp32"
        return [{**env, "op": "text", "shape": shape, "dtype": dtype, "mode": "fwd", "provider": provider,
                 "ms": round(median_ms(fn, steps, device), 3), "note": note}
                for provider, fn in (("encode", encode(0)), (f"encode-sorted{chunk}", encode(chunk)),
                                     ("stored", stored))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_text", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default=None, help="default: 2b on a GPU, tiny on the CPU")
    p.add_argument("--batch", type=int, default=32, help="captions per step per GPU (default 32)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--chunk", type=int, default=TextConfig.encode_chunk, help="captions per call, sorted by length")
    p.add_argument("--out", default=None, help="CSV file (default bench/results/text.csv)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = bench(args.size or ("2b" if device.type == "cuda" else "tiny"), args.batch, args.max_tokens, args.steps,
                 device, args.chunk)
    append_csv(Path(args.out) if args.out else RESULTS / "text.csv", FIELDS, rows)
    for row in rows:
        print(f"{row['op']:<6}{row['shape']:<22}{row['provider']:<8}{row['ms']:>10.2f} ms/step  {row['note']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
