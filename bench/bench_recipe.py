"""Time the full-recipe training step and what each piece of the recipe costs.

    python -m bench.bench_recipe              # GPU: prx_small at 512 px, batch 32, compiled blocks
    python -m bench.bench_recipe --smoke      # CPU: a small model and small teachers

The step is train.py's: TREAD (2 -> 12, 50 %), REPA on block 7 with a DINOv3 ViT-L/16-sized
teacher, LPIPS-VGG16 at 0.5x, DINOv2-B/14 perceptual loss at 224 px, gradient clip 0.2, Muon +
Adam, EMA. Teachers have random weights: only their cost matters here (as in the reference's
measurement, docs/recipe.md section 9: 262.5 ms, 122 img/s, 29.8 GiB on an H200).

The breakdown is by ablation, measured in the same run: the cost of a piece is the full step
minus the step without it (TREAD's is negative: it saves work); the optimizer is timed alone.
Appends rows to bench/results/recipe.csv.
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

import kernels
from bench.common import append_rows, environment, time_ms
from prx.config import Config, ModelConfig, preset
from prx.model.denoiser import PRX
from prx.model.tread import plan_route, route_seeds
from prx.optim import build_optimizer
from prx.recipe.ema import EMA
from prx.recipe.loss_terms import Teachers, micro_batch_loss
from prx.recipe.lpips import LPIPS_VGG_CHANNELS, LPIPSLoss, VGG16Features
from prx.recipe.repa import RepaProjector
from prx.recipe.teachers import FrozenDino
from prx.run.parallel import apply_compile


def random_dino(kind: str, size: str, device, dtype) -> FrozenDino:
    """A random DINO in the real layout: v3 ViT-L/16 or v2-with-registers ViT-B/14 (or tiny)."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, DINOv3ViTConfig, DINOv3ViTModel

    dims = dict(large=(1024, 24, 16), base=(768, 12, 12), tiny=(32, 2, 2))[size]
    shape = dict(hidden_size=dims[0], num_hidden_layers=dims[1], num_attention_heads=dims[2],
                 num_register_tokens=4, intermediate_size=4 * dims[0])
    if kind == "v3":
        model = DINOv3ViTModel(DINOv3ViTConfig(patch_size=16, **shape))
    else:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(patch_size=14, **shape))
    return FrozenDino(model.to(device, dtype), f"random DINO{kind} {size}")


def random_lpips(device, dtype) -> LPIPSLoss:
    heads = [torch.rand(c) for c in LPIPS_VGG_CHANNELS]
    return LPIPSLoss(VGG16Features().to(device, dtype), heads).to(device, dtype)


def make_step(cfg: Config, model, optimizer, ema, teachers: Teachers, batch: int, device, autocast):
    """One training step of train.py's loop on random data (uint8 images, padded text), with the
    loop's own loss-terms call."""
    res, p = cfg.data.resolution, cfg.model.patch_size
    grid = (res // p, res // p)
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, res, res), device=device, dtype=torch.uint8, generator=g)
    t = torch.rand(batch, device=device, generator=g)
    x_t, x = kernels.patchify_and_noise(images, t, p, seeds=torch.arange(batch, device=device))
    text = torch.randn(batch, cfg.text.max_tokens, cfg.model.text_dim, device=device, generator=g)
    mask = torch.arange(cfg.text.max_tokens, device=device)[None] < torch.randint(
        cfg.text.max_tokens // 4, cfg.text.max_tokens + 1, (batch, 1), device=device, generator=g)
    counter = iter(range(10**9))

    def step():
        k = next(counter)
        route = plan_route(cfg.tread, cfg.model.depth, x.shape[1], route_seeds(0, k, list(range(batch)), device))
        targets = teachers.repa_targets(images, grid)
        with autocast:
            out = model(x_t, t, text, mask, grid, route=route, capture=cfg.repa.block if teachers.repa else None)
        micro_batch_loss(cfg, out, x, t, (res, res), teachers, targets, route).total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema:
            ema.update(k + 1)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small model and teachers (CPU)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--out-dir", default=None, help="CSV folder (default bench/results)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")
    cfg = preset("prx_small_512")
    sizes = ("large", "base")
    if args.smoke:
        cfg = dataclasses.replace(
            cfg, model=ModelConfig(patch_size=4, bottleneck_dim=16, hidden_dim=64, depth=4, num_heads=4,
                                   text_dim=32, time_embed_dim=32),
            data=dataclasses.replace(cfg.data, resolution=32), text=dataclasses.replace(cfg.text, max_tokens=8),
            tread=dataclasses.replace(cfg.tread, route_start=1, route_end=2),
            repa=dataclasses.replace(cfg.repa, block=1, projector_dim=32, teacher_dim=32),
            perceptual=dataclasses.replace(cfg.perceptual, dino_resolution=28))
        sizes = ("tiny", "tiny")
        args.batch_size = min(args.batch_size, 4)
    with device:  # random teachers, initialised on the device too
        every = Teachers(random_dino("v3", sizes[0], device, dtype), random_lpips(device, dtype),
                         random_dino("v2", sizes[1], device, dtype))
    cfg = dataclasses.replace(cfg, repa=dataclasses.replace(cfg.repa, teacher_dim=every.repa.hidden_size))

    torch.manual_seed(0)
    with device:  # initialised where it runs: seconds less of GPU time than on the host
        model = PRX(cfg.model, RepaProjector(cfg.model.hidden_dim, cfg.repa.projector_dim, cfg.repa.teacher_dim))
    if not args.no_compile and device.type == "cuda":
        apply_compile(model)
    optimizer = build_optimizer(model, cfg)
    ema = EMA(model, cfg.ema.decay, cfg.ema.every)
    env = environment(device)
    label = f"{'smoke' if args.smoke else 'prx_small'} {cfg.data.resolution}px b{args.batch_size}"

    no_tread = dataclasses.replace(cfg, tread=dataclasses.replace(cfg.tread, enabled=False))
    variants = {
        "full": (cfg, every),
        "no TREAD": (no_tread, every),
        "no REPA": (cfg, dataclasses.replace(every, repa=None)),
        "no LPIPS": (cfg, dataclasses.replace(every, lpips=None)),
        "no DINO": (cfg, dataclasses.replace(every, dino=None)),
        "dense denoiser only": (no_tread, Teachers()),
    }
    times = {}
    for name, (variant_cfg, teachers) in variants.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        step = make_step(variant_cfg, model, optimizer, ema, teachers, args.batch_size, device, autocast)
        for _ in range(3):  # compile, allocator, autotune
            step()
        times[name] = time_ms(step, device, reps=10)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
        row = {**env, "op": "recipe_step", "shape": label, "dtype": "bf16" if device.type == "cuda" else "fp32",
               "mode": "step", "provider": name, "ms": round(times[name], 2),
               "note": f"{args.batch_size / times[name] * 1e3:.1f} img/s; peak {peak:.1f} GiB"}
        path = append_rows("recipe", [row], args.out_dir)  # row by row: a cut-off run keeps its rows
        print(f"{name:<22}{times[name]:>10.2f} ms  {args.batch_size / times[name] * 1e3:>8.1f} img/s  peak {peak:.1f} GiB")

    for p in model.parameters():  # the optimizer alone, on the gradients of one step
        p.grad = torch.randn_like(p) * 1e-3
    optimizer_ms = time_ms(optimizer.step, device, reps=10)
    costs = {f"cost of {piece}": times["full"] - times[f"no {piece}"] for piece in ("TREAD", "REPA", "LPIPS", "DINO")}
    costs["optimizer (Muon + Adam)"] = optimizer_ms
    for name, ms in costs.items():
        print(f"{name:<28}{ms:>10.2f} ms")
        append_rows("recipe", [{**env, "op": "recipe_component", "shape": label, "mode": "step", "provider": name,
                                "ms": round(ms, 2),
                                "note": "full step minus the step without it" if "cost" in name else "alone"}],
                    args.out_dir)
    print("reference (docs/recipe.md section 9, H200): 262.5 ms, 122 img/s, 29.8 GiB at batch 32")
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
