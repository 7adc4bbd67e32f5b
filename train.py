"""The PRX speedrun: setup -> model -> optimizer -> data -> loop. Reads top to bottom.

    python train.py                                  # tiny preset: 32 px shapes, minutes on a CPU
    python train.py --preset prx_small_512 --set train.steps=1000
    torchrun --nproc-per-node 8 train.py --preset prx_small_512
    python train.py --resume auto                    # continue the run in --run-dir exactly

Each step: a batch of images and captions -> text embeddings (the empty caption for 10 %) ->
timesteps and noise -> x_t -> the model predicts x -> velocity-space loss -> Muon for the block
matrices and Adam for the rest (AdamW alone in the tiny preset), gradient clipped at 0.2,
linear warmup. RECIPE.md says what each number is and where it comes from.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from kernels import patchify_and_noise, unpatchify
from prx.run import checkpoint as ckpt
from prx.model import liger
from prx.config import Config, ConfigError, describe, from_dict, parse_args, save_json
from prx.data.shapes import ShapesBatches, eval_scenes, make_scene
from prx.data.shards import ShardError
from prx.data.stream import ImageBatch
from prx.data.webdata import ShardBatches
from prx.recipe.dino_loss import dino_perceptual_loss
from prx.run.distributed import DistInfo, all_reduce_mean, gather_to_main, init_distributed, shutdown
from prx.recipe.ema import EMA
from prx.eval.grids import save_grid
from prx.eval.sampling import generate
from prx.recipe.flow import T_BIN_NAMES, flow_loss, loss_sums_by_t_bin, sample_timesteps
from prx.run.guard import BadStepGuard, OutOfMemory, TooManyBadSteps, out_of_memory_advice
from prx.hub import PretrainedMissing
from prx.recipe.lpips import LPIPSLoss
from prx.model.denoiser import PRX, count_parameters
from prx.optim import build_optimizer
from prx.run.parallel import BatchPlan, parallelize, set_gradient_sync
from prx.run.stop_signals import StopSignals, signal_name
from prx.recipe.repa import RepaProjector, repa_loss, teacher_targets
from prx.rng import mix_seed, step_generator
from prx.run.runlog import LOSS_TERMS, RunLog
from prx.eval.shapes_score import chance_score, score_images
from prx.recipe.teachers import load_dino
from prx.text import CaptionTable, TextTower, pad_text
from prx.model.tread import plan_route, route_seeds


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup over `warmup_steps`, then constant (RECIPE section 6)."""
    return cfg.optim.lr * min(1.0, (step + 1) / max(cfg.optim.warmup_steps, 1))


def recipe_summary(cfg: Config) -> str:
    """Which recipe pieces run (RECIPE sections 3 to 6), for the start-of-run log."""
    on, off = [], []
    first, last = cfg.tread.blocks(cfg.model.depth)
    pieces = [
        (cfg.tread.enabled, f"TREAD {cfg.tread.probability:.0%} of tokens around blocks {first}-{last}", "TREAD"),
        (cfg.repa.enabled, f"REPA on block {cfg.repa.block} ({cfg.repa.teacher})", "REPA"),
        (cfg.perceptual.lpips_weight > 0, f"LPIPS x{cfg.perceptual.lpips_weight}", "LPIPS"),
        (cfg.perceptual.dino_weight > 0, f"DINO x{cfg.perceptual.dino_weight} ({cfg.perceptual.dino_teacher})",
         "DINO"),
        (cfg.ema.enabled, f"EMA {cfg.ema.decay} every {cfg.ema.every} steps", "EMA"),
    ]
    for enabled, description, name in pieces:
        (on if enabled else off).append(description if enabled else name)
    line = "recipe: " + ("; ".join(on) if on else "diffusion loss only")
    if off:
        line += f" (off: {', '.join(off)})"
    if not (cfg.repa.enabled or cfg.perceptual.lpips_weight or cfg.perceptual.dino_weight):
        line += "; no pretrained teachers: none ship offline, set their paths to turn them on"
    return line


def caption_embeddings(batch: ImageBatch, dropped: list[bool], tower: TextTower,
                       table: CaptionTable | None, empty: torch.Tensor) -> list[torch.Tensor]:
    """Per-caption embeddings of a batch; dropped captions take the empty caption's and are not
    encoded. The shapes set's captions come from `table` (embedded once, by sample id); real
    data's are encoded per batch (they are not known in advance)."""
    if table is not None:
        return [empty if drop else table[i] for i, drop in zip(batch.ids, dropped)]
    kept = [c for c, drop in zip(batch.captions, dropped) if not drop]
    encoded = iter(tower.encode(kept) if kept else [])
    return [empty if drop else next(encoded) for drop in dropped]


def sample_prompts(model, tower, cfg: Config, dist: DistInfo, prompts: list[str]) -> torch.Tensor | None:
    """Images for `prompts` on rank 0 (None elsewhere). Every rank samples its share (a sharded
    model needs all ranks in each forward); prompt i's noise is keyed by i, so any split agrees."""
    mine = list(range(dist.rank, len(prompts), dist.world_size))
    images = generate(model, tower, [prompts[i] for i in mine], cfg, steps=cfg.eval.sample_steps,
                      guidance=cfg.eval.guidance, seed=cfg.eval.seed, noise_slots=mine)
    return gather_to_main(images, mine, len(prompts))


def sample_grid(model, tower, cfg: Config, dist: DistInfo, step: int, run_dir: Path, log: RunLog,
                prompts: list[str]) -> None:
    """Real data: a captioned grid of the fixed prompts (there is no score without labels)."""
    start = time.perf_counter()
    images = sample_prompts(model, tower, cfg, dist, prompts)
    if dist.is_main:
        grid = save_grid(images, prompts, run_dir / "samples" / f"step_{step:08d}.png")
        log.print(f"samples step {step}: {grid} ({time.perf_counter() - start:.0f} s)")


def shapes_evaluation(model, tower, cfg: Config, dist: DistInfo, step: int, run_dir: Path,
                      log: RunLog) -> dict | None:
    """Sample the fixed evaluation prompts, save a captioned grid, score prompt following.
    Returns the record on rank 0, else None."""
    scenes = eval_scenes(cfg.train.seed, cfg.eval.num_prompts)
    captions = [s.caption for s in scenes]
    start = time.perf_counter()
    images = sample_prompts(model, tower, cfg, dist, captions)
    if not dist.is_main:
        return None
    score = score_images(images, scenes)
    grid = save_grid(images[: cfg.eval.grid_prompts], captions[: cfg.eval.grid_prompts],
                     run_dir / "samples" / f"step_{step:08d}.png")
    log.print(f"eval step {step}: shapes score {score.format()} ({time.perf_counter() - start:.0f} s), "
              f"grid {grid}")
    record = {"kind": "eval", "step": step, **{f"shapes_{k}": v for k, v in score.as_dict().items()}}
    log.write(record)
    return record


def main(argv: list[str] | None = None) -> int:
    """Train; returns the exit status (0, or 128 + the signal that stopped the run early)."""
    cfg, args = parse_args(argv)
    stop = StopSignals()  # SIGTERM / SIGUSR1: checkpoint at the end of the step, then exit
    try:
        return run(cfg, args, stop)
    except torch.OutOfMemoryError as err:  # name the settings that lower a step's memory
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        plan = BatchPlan.derive(cfg.train.batch_size, world_size, cfg.parallel.micro_batch)
        raise OutOfMemory(out_of_memory_advice(err, cfg, plan)) from err
    finally:
        stop.restore()


def run(cfg: Config, args: argparse.Namespace, stop: StopSignals) -> int:
    # ------------------------------------------------------------------ setup
    dist = init_distributed(cfg.train.device)
    device = dist.device
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resume_path = None
    if args.resume == "auto":
        resume_path = ckpt.latest_checkpoint(run_dir)
    elif args.resume:
        resume_path = Path(args.resume)
    resumed = ckpt.read_meta(resume_path) if resume_path else None
    if resumed and from_dict(resumed["config"]).model != cfg.model:
        raise ConfigError(f"checkpoint {resume_path} was trained with a different model config; "
                          "resume with the same --preset and model.* settings")
    log = RunLog(run_dir, cfg.train.steps, resumed["step"] if resumed else 0, dist.is_main)
    if dist.is_main:
        save_json(cfg, run_dir / "config.json")
    log.print(describe(cfg))
    if args.resume == "auto" and resume_path is None:
        log.print(f"--resume auto: no checkpoint in {run_dir} yet; starting from step 0")
    plan = BatchPlan.derive(cfg.train.batch_size, dist.world_size, cfg.parallel.micro_batch)
    log.print(f"device {device}; {plan.describe()}; run dir {run_dir}")
    compute_dtype = torch.bfloat16 if device.type == "cuda" and cfg.train.precision == "bf16" else torch.float32
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=compute_dtype == torch.bfloat16)

    # ------------------------------------------------------------------ model and text tower
    if cfg.model.fused_ops == "liger":
        liger.check_available(device)
    torch.manual_seed(cfg.train.seed)  # the initial weights, identical on every rank
    projector = (RepaProjector(cfg.model.hidden_dim, cfg.repa.projector_dim, cfg.repa.teacher_dim)
                 if cfg.repa.enabled else None)  # REPA's, trained with (and inside) the denoiser
    model = PRX(cfg.model, projector).to(device)  # fp32 weights; bf16 compute
    log.print(f"PRX denoiser: {count_parameters(model):,} parameters")
    tower = TextTower(cfg.text, device)
    if tower.hidden_size != cfg.model.text_dim:
        raise ConfigError(f"text encoder {cfg.text.encoder} is {tower.hidden_size} wide but "
                          f"model.text_dim={cfg.model.text_dim}; set --set model.text_dim={tower.hidden_size}")

    # ------------------------------------------------------------------ frozen teachers (RECIPE 4, 5)
    # Loaded before the first step, so a missing weight file stops the run here.
    repa_teacher = load_dino(cfg.repa.teacher, device) if cfg.repa.enabled else None
    if repa_teacher is not None and repa_teacher.hidden_size != cfg.repa.teacher_dim:
        raise ConfigError(f"REPA teacher {cfg.repa.teacher} is {repa_teacher.hidden_size} wide; "
                          f"set --set repa.teacher_dim={repa_teacher.hidden_size}")
    dino_teacher = (load_dino(cfg.perceptual.dino_teacher, device, what="DINO perceptual teacher",
                              option="perceptual.dino_teacher") if cfg.perceptual.dino_weight else None)
    lpips = (LPIPSLoss.from_config(cfg.perceptual, device, compute_dtype)
             if cfg.perceptual.lpips_weight else None)  # VGG16 + the lpips package's heads
    log.print(recipe_summary(cfg))
    active_terms = {"diffusion"} | {name for name, on in (("repa", repa_teacher), ("lpips", lpips),
                                                         ("dino", dino_teacher)) if on}

    # ------------------------------------------------------------------ parallelize, optimizer
    train_model = parallelize(model, cfg.parallel, device, dist.world_size, compute_dtype)
    optimizer = build_optimizer(model, cfg)
    ema = EMA(model, cfg.ema.decay, cfg.ema.every) if cfg.ema.enabled else None  # shards like the model
    guard = BadStepGuard(cfg.train.max_bad_steps)
    checkpoints = ckpt.CheckpointWriter(run_dir, cfg.train.keep_checkpoints, cfg.train.async_checkpoint)

    # ------------------------------------------------------------------ data
    shapes = cfg.data.source == "shapes"
    if shapes:  # the procedural set: captions known in advance, embedded once
        stream = ShapesBatches(cfg.train.seed, cfg.data.resolution, cfg.data.shapes_length, cfg.train.batch_size,
                               device, dist.rank, dist.world_size)
        captions = [make_scene(cfg.train.seed, i).caption for i in range(cfg.data.shapes_length)]
        log.print(f"encoding {len(captions):,} captions of the shapes set once")
        caption_table = CaptionTable(tower, captions, progress=log.wrap_progress("captions"))
        empty_caption = tower.empty().cpu()  # the caption table lives on the CPU too
    else:  # webdataset shards: aspect-bucketed batches, captions embedded per batch
        stream = ShardBatches(cfg.data, cfg.model.patch_size, device, cfg.train.seed, cfg.train.batch_size,
                              dist.rank, dist.world_size, log.print, log.wrap_progress("indexing shards"))
        caption_table, empty_caption = None, tower.empty()
        prompts = (Path(cfg.eval.prompts).read_text().split("\n") if cfg.eval.prompts
                   else stream.prompts(cfg.eval.grid_prompts, cfg.data.caption_key))
        prompts = [p.strip() for p in prompts if p.strip()][: cfg.eval.grid_prompts]

    start_step = 0
    if resumed:
        rng = ckpt.load_train_state(resume_path, model, optimizer,  # resharded to this world size
                                    {"ema": ema.state_dict()} if ema else None)
        stream.load_state_dict(resumed["data"])
        if rng is not None:
            ckpt.set_rng_state(rng, device)
        start_step = resumed["step"]
        log.print(f"resumed from {resume_path} at step {start_step}")
        del resumed
    if dist.is_main and start_step == 0 and shapes:
        chance = chance_score(eval_scenes(cfg.train.seed, cfg.eval.num_prompts), cfg.data.resolution,
                              cfg.train.seed)
        log.print(f"shapes score at chance (images that ignore their prompt): {chance.format()}")
        log.write({"kind": "chance", **chance.as_dict()})

    # ------------------------------------------------------------------ loop
    sums = torch.zeros(3, device=device)  # loss, grad norm, steps since the last log line
    term_sums = torch.zeros(len(LOSS_TERMS), device=device)
    bin_sums, bin_counts = torch.zeros(3, device=device), torch.zeros(3, device=device)
    log.restart_clock(start_step)
    stop_signal = 0
    for step in range(start_step, cfg.train.steps):
        batch = stream.next_batch()  # uint8 images on the device, this rank's share
        images = batch.images  # real data: one aspect bucket per batch, so the grid varies
        grid = (images.shape[2] // cfg.model.patch_size, images.shape[3] // cfg.model.patch_size)
        # Per-step randomness, keyed by (seed, step) and global sample slot: replayable on
        # resume, and the same for any number of processes.
        gen = step_generator(cfg.train.seed, step)
        dropped = (torch.rand(cfg.train.batch_size, generator=gen) < cfg.flow.caption_dropout)[stream.slots]
        t = sample_timesteps(cfg.train.batch_size, cfg.flow, gen)[stream.slots].to(device)

        # Caption dropout: the empty caption's embedding for 10 %, for classifier-free guidance.
        seqs = caption_embeddings(batch, dropped.tolist(), tower, caption_table, empty_caption)
        text, text_mask = (tensor.to(device) for tensor in pad_text(seqs, cfg.text.pad_to_multiple))

        # Noising in patch layout, x_t = (1 - t) x + t eps, in one pass from the uint8 images
        # (a Triton kernel on GPU); eps is drawn from seeds keyed by (seed, step, global slot).
        seeds = torch.tensor([mix_seed(cfg.train.seed, step, slot) for slot in stream.slots], device=device)
        x_t, x = patchify_and_noise(images, t, cfg.model.patch_size, seeds=seeds, noise_scale=cfg.flow.noise_scale)

        # TREAD: per sample, the tokens that run the routed blocks (keyed like the noise).
        route = plan_route(cfg.tread, cfg.model.depth, x.shape[1],
                           route_seeds(cfg.train.seed, step, stream.slots, device))
        # REPA: the frozen teacher's patch tokens of the clean images, on the denoiser's grid.
        repa_targets = teacher_targets(repa_teacher, images, grid) if repa_teacher else None

        # Forward and backward in micro-batches; gradients reduce across ranks on the last one.
        per_sample = torch.empty(plan.local_batch, device=device)
        terms = torch.zeros(len(LOSS_TERMS), device=device)  # weighted, summed over micro-batches
        for micro in range(plan.accumulation):
            part = slice(micro * plan.micro_batch, (micro + 1) * plan.micro_batch)
            micro_route = route.part(part) if route else None
            set_gradient_sync(train_model, micro == plan.accumulation - 1)
            with autocast:
                out = train_model(x_t[part], t[part], text[part], text_mask[part], grid, route=micro_route,
                                  capture=cfg.repa.block if repa_teacher else None)
            x_hat, aligned = out if repa_teacher else (out, None)
            diffusion, micro_per_sample = flow_loss(x_hat, x[part], t[part], cfg.flow.t_floor)
            loss_terms = {"diffusion": diffusion}
            if repa_teacher is not None:  # -0.5 mean cos; with TREAD on the kept tokens only
                loss_terms["repa"] = repa_loss(aligned, repa_targets[part],
                                               micro_route.keep_idx if micro_route else None, cfg.repa.weight)
            if lpips is not None or dino_teacher is not None:  # perceptual losses see x-hat as an image
                x_hat_image, x_image = (unpatchify(patches, cfg.model.patch_size, *images.shape[2:])
                                        for patches in (x_hat, x[part]))
                if lpips is not None:  # 0.1 x LPIPS-VGG at half resolution
                    loss_terms["lpips"], _ = lpips(x_hat_image, x_image, t[part])
                if dino_teacher is not None:  # 0.01 x (1 - cos) of DINOv2-B tokens at 224 px
                    loss_terms["dino"] = cfg.perceptual.dino_weight * dino_perceptual_loss(
                        dino_teacher, x_hat_image, x_image, cfg.perceptual.dino_resolution).mean()
            total = sum(loss_terms.values())
            (total / plan.accumulation).backward()
            per_sample[part] = micro_per_sample.detach()
            terms += torch.stack([loss_terms[n].detach().float() if n in loss_terms else torch.zeros((), device=device)
                                  for n in LOSS_TERMS]) / plan.accumulation
        loss = terms.sum()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        # A stop signal on any rank (SIGTERM: time limit, preemption) ends the run after this step.
        # Agreed on here, where the guard waits for the device anyway, so it stalls nothing.
        stop_signal = stop.agreed(device, dist.world_size)
        if guard.step(optimizer, grad_norm, step + 1):  # skips non-finite gradients
            sums += torch.stack([loss, grad_norm.detach(), torch.ones((), device=device)])
            term_sums += terms
            s, c = loss_sums_by_t_bin(per_sample, t)
            bin_sums += s
            bin_counts += c
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if ema is not None:
            ema.update(done)  # every cfg.ema.every steps
        log.advance(done)

        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            totals = all_reduce_mean(torch.cat([sums, bin_sums, bin_counts, term_sums])).tolist()
            sec_per_step, img_per_s = log.throughput(done, cfg.train.batch_size)
            steps_logged = max(totals[2], 1e-12)
            record = {"kind": "train", "step": done, "loss": totals[0] / steps_logged,
                      "grad_norm": totals[1] / steps_logged, "lr": lr_at(step, cfg),
                      "skipped": guard.take_skipped(), "epoch": round(stream.epoch, 3),
                      "sec_per_step": sec_per_step, "img_per_s": img_per_s}
            for k, name in enumerate(T_BIN_NAMES):
                record[f"loss_{name}"] = totals[3 + k] / totals[6 + k] if totals[6 + k] else None
            for k, name in enumerate(LOSS_TERMS):
                if name in active_terms:
                    record[f"loss_{name}"] = totals[9 + k] / steps_logged
            log.write(record)
            sums.zero_(), bin_sums.zero_(), bin_counts.zero_(), term_sums.zero_()

        last = done == cfg.train.steps
        stop_signal = 0 if last else stop_signal  # at the last step the run ends as planned
        if stop_signal:  # checkpoint this step, then exit
            log.print(f"{signal_name(stop_signal)} received: checkpointing step {done}, then stopping")
        elif (cfg.train.sample_every and done % cfg.train.sample_every == 0) or (last and cfg.eval.final):
            with ema.swapped_into(model) if ema else contextlib.nullcontext():  # samples use the EMA
                if shapes:
                    record = shapes_evaluation(model, tower, cfg, dist, done, run_dir, log)
                    if last and record is not None:
                        (run_dir / "shapes_score.json").write_text(json.dumps(record, indent=2) + "\n")
                elif prompts:
                    sample_grid(model, tower, cfg, dist, done, run_dir, log, prompts)
            log.restart_clock(done)

        if (cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0) or last or stop_signal:
            meta = {"config": cfg.to_dict(), "step": done, "schedule": {"step": done},
                    "data": stream.state_dict()}
            path = checkpoints.save(done, model, optimizer, meta, ckpt.rng_state(device),  # every rank
                                    {"ema": ema.state_dict()} if ema else None)
            log.print(f"checkpoint {path}" + (" (writing in the background)" if cfg.train.async_checkpoint else ""))
            log.restart_clock(done)
        if stop_signal:
            log.print(f"stopped by {signal_name(stop_signal)} after step {done}; continue with --resume auto")
            break

    checkpoints.close()  # waits for a background save
    log.close()
    shutdown()
    return 128 + stop_signal if stop_signal else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ConfigError, PretrainedMissing, ckpt.CheckpointError, TooManyBadSteps, ShardError,
            OutOfMemory) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
