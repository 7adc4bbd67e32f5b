"""Time one dense training step of the denoiser: forward + backward, then clip + AdamW.

    python -m bench.bench_step --preset tiny --batch-size 64                          # CPU
    python -m bench.bench_step --preset prx_small_1024 --batch-size 16 \\
        --variants eager compile compile-no-mask                                       # GPU

A variant is a provider (`eager`, or `compile`: per-block torch.compile(fullgraph=True)),
optionally with `-no-mask` (every text token real). The variants run in one process on one
model, in the order given, so the 1.2 B-parameter model is built once; the compiled ones come
after the eager ones because compiling is done in place and cannot be undone.

Inputs are random (noisy patches, timesteps, text embeddings; the mask pads each caption to a
random length in [T/4, T]), so no data or text encoder is needed. Per variant: median ms of
forward + backward (what docs/recipe.md section 9's 202 ms / 79 img/s measure) and of the whole step,
images/s of forward + backward, achieved TFLOP/s, and on a GPU MFU against the measured bf16
matmul ceiling and peak memory. Appends a row per variant to bench/results/step.csv.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from bench.common import append_csv, environment, matmul_tflops
from prx.config import apply_override, preset
from prx.model.denoiser import PRX, training_flops_per_image
from prx.recipe.flow import flow_loss
from prx.run.parallel import apply_compile

ROOT = Path(__file__).resolve().parents[1]

FIELDS = ["date", "device", "torch", "git", "preset", "resolution", "batch", "text_tokens", "mask",
          "provider", "fwd_bwd_ms", "ms_per_step", "img_per_s", "tflops", "mfu", "peak_gib"]
VARIANTS = ("eager", "compile", "eager-no-mask", "compile-no-mask")


def parse_variant(name: str) -> tuple[str, bool]:
    """'compile-no-mask' -> ('compile', False): provider and whether the text is padded."""
    if name not in VARIANTS:
        raise SystemExit(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    return name.removesuffix("-no-mask"), not name.endswith("-no-mask")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--text-tokens", type=int, default=None, help="default: text.max_tokens")
    p.add_argument("--variants", nargs="+", default=["eager"], help=f"any of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant (compiling happens here)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "step.csv"))
    args = p.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    providers = [provider for provider, _ in variants]
    if "compile" in providers and "eager" in providers[providers.index("compile"):]:
        raise SystemExit("list the eager variants before the compiled ones (compiling is in place)")

    cfg = preset(args.preset)
    for o in args.overrides:
        cfg = apply_override(cfg, o)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    m = cfg.model
    b, side = args.batch_size, cfg.data.resolution // m.patch_size
    n, t_len = side * side, args.text_tokens or cfg.text.max_tokens

    torch.manual_seed(0)
    with device:  # initialised where it runs: seconds less of GPU time than on the host
        model = PRX(m)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    x = torch.randn(b, n, m.patch_dim, device=device)
    target = torch.randn(b, n, m.patch_dim, device=device)
    t = torch.rand(b, device=device)
    text = torch.randn(b, t_len, m.text_dim, device=device)
    padded = torch.arange(t_len, device=device)[None] < torch.randint(t_len // 4, t_len + 1, (b, 1), device=device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cuda)
    env = environment(device)
    ceiling = matmul_tflops(device) if cuda else None
    flops = training_flops_per_image(m, n, t_len) * b

    def sync():
        if cuda:
            torch.cuda.synchronize()

    compiled = False
    for provider, mask in variants:
        if provider == "compile" and not compiled:
            apply_compile(model)
            compiled = True
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        fwd_bwd, whole = [], []
        for i in range(args.warmup + args.steps):
            sync()
            start = time.perf_counter()
            with autocast:
                out = model(x, t, text, padded if mask else None, (side, side)).x_hat
            loss, _ = flow_loss(out, target, t)
            loss.backward()
            sync()
            middle = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.2)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            if i >= args.warmup:
                fwd_bwd.append(middle - start)
                whole.append(time.perf_counter() - start)
        sec = statistics.median(fwd_bwd)
        row = {**env, "preset": cfg.preset, "resolution": cfg.data.resolution, "batch": b, "text_tokens": t_len,
               "mask": mask, "provider": provider, "fwd_bwd_ms": round(sec * 1e3, 2),
               "ms_per_step": round(statistics.median(whole) * 1e3, 2), "img_per_s": round(b / sec, 1),
               "tflops": round(flops / sec / 1e12, 3)}
        if cuda:
            row.update(mfu=round(flops / sec / 1e12 / ceiling, 3),
                       peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
        print(", ".join(f"{k} {v}" for k, v in row.items() if k not in ("date", "git")), flush=True)
        append_csv(Path(args.out), FIELDS, [row])  # row by row: a later variant that fails loses nothing


if __name__ == "__main__":
    main()
