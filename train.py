"""The PRX speedrun: setup -> model -> parallelize -> optimizer -> data -> loop. Reads top to bottom.

    python train.py                                  # tiny preset: 32 px shapes, minutes on a CPU
    python train.py --preset prx_small_512 --set train.steps=1000
    torchrun --nproc-per-node 8 train.py --preset prx_small_512
    python train.py --resume auto                    # continue the run in --run-dir exactly
    python train.py --preset tiny --print-config     # every --set field, its value and meaning

Each step, in the order the loop below spells out: a batch of images and captions (the empty
caption for 10 %) -> timesteps and noise -> x_t -> the TREAD route -> the model predicts x ->
the recipe's loss terms (velocity loss, REPA, LPIPS, DINO) -> backward -> gradient clipped at
0.2 -> Muon for the block matrices and Adam for the rest (AdamW alone in the tiny preset), with
linear warmup -> EMA -> log -> evaluate -> checkpoint. docs/recipe.md says what each number is
and where it comes from; docs/architecture.md which module owns what.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

import kernels
from kernels import patchify_and_noise
from prx import precision
from prx.config import Config, ConfigError, describe, parse_args, print_config, save_json
from prx.data.heldout import HeldOut
from prx.data.shapes import ShapesBatches, make_scene
from prx.data.shards import ShardError
from prx.data.stream import BatchSource
from prx.data.text_store import StoredText, identity_of, training_text
from prx.data.webdata import ShardBatches
from prx.eval.periodic import PromptGrid, ShapesEvaluation, grid_prompts
from prx.eval.quality import QualityMetrics
from prx.eval.validation import ValidationLoss
from prx.hub import PretrainedMissing
from prx.model import liger
from prx.model.denoiser import PRX, count_parameters
from prx.model.tread import plan_route, route_seeds
from prx.optim import MuonAdam, build_optimizer
from prx.recipe.ema import EMA
from prx.recipe.flow import sample_timesteps
from prx.recipe.loss_terms import LOSS_TERMS, load_teachers, micro_batch_loss
from prx.recipe.repa import RepaProjector
from prx.rng import mix_seed, step_generator
from prx.run import checkpoint as ckpt
from prx.run.batch_plan import BatchPlan, OutOfMemory
from prx.run.distributed import DistInfo, init_distributed, shutdown
from prx.run.guard import BadStepGuard, TooManyBadSteps
from prx.run.init_weights import load_initial_weights
from prx.run.log_backends import open_backends
from prx.run.parallel import parallelize, set_gradient_sync
from prx.run.run_dir import check_same_run, check_writable, resume_point, settle_metrics
from prx.run.runlog import RunLog
from prx.run.stop_signals import StopSignals, signal_name
from prx.run.train_metrics import TrainMetrics
from prx.run.utilization import Utilization
from prx.text import BatchCaptions, CaptionTable, StoredPrompts, TextTower


def lr_at(step: int, cfg: Config) -> float:
    """Linear warmup over `warmup_steps`, then constant (docs/recipe.md section 6); with
    `cooldown_fraction`, linear decay to zero over that share of the run's last steps (a share,
    not a count, so a shorter run keeps the shape: `--steps 1000` of the tiny preset cools over 300)."""
    o = cfg.optim
    warmup = min(1.0, (step + 1) / max(o.warmup_steps, 1))
    cooldown_steps = round(o.cooldown_fraction * cfg.train.steps)
    cooldown = min(1.0, (cfg.train.steps - step) / cooldown_steps) if cooldown_steps else 1.0
    return o.lr * min(warmup, cooldown)


def recipe_summary(cfg: Config) -> str:
    """Which recipe pieces run (docs/recipe.md sections 3 to 6), for the start-of-run log."""
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


def build_data(cfg: Config, tower: TextTower | StoredPrompts, stored: StoredText | None, dist: DistInfo,
               log: RunLog, run_dir: Path):
    """The one place that tells the shapes set from real data: (batch source, caption embeddings,
    evaluation), each with one interface the loop calls whatever the data."""
    if cfg.data.source == "shapes":  # the procedural set: captions known in advance, embedded once
        source: BatchSource = ShapesBatches(cfg.train.seed, cfg.data.resolution, cfg.data.shapes_length,
                                            cfg.train.batch_size, dist.device, dist.rank, dist.world_size)
        captions = [make_scene(cfg.train.seed, i).caption for i in range(cfg.data.shapes_length)]
        log.print(f"encoding {len(captions):,} captions of the shapes set once")
        table = CaptionTable(tower, captions, progress=log.wrap_progress("captions"))
        return source, BatchCaptions(tower, table), ShapesEvaluation(cfg, tower, dist, run_dir, log)
    # webdataset shards: aspect-bucketed batches, captions embedded per batch or stored with them
    source = ShardBatches(cfg.data, cfg.model.patch_size, dist.device, cfg.train.seed, cfg.train.batch_size,
                          dist.rank, dist.world_size, log.print, log.wrap_progress("indexing shards"),
                          shards=stored.shards if stored else None, stored=stored)
    if stored:  # the grid's prompts are the first captions, served from their stored embeddings
        if cfg.eval.prompts:
            raise ConfigError(f"eval.prompts={cfg.eval.prompts!r} needs the text encoder, which a run on stored "
                              "caption embeddings does not load; leave it empty (the grid then shows the first "
                              "captions) or set text.precomputed=off")
        first = source.prompt_samples(cfg.eval.grid_prompts, cfg.data.caption_field)
        tower.add_samples(stored, [i for i, _ in first], [c for _, c in first], cfg.data.caption_field)
    prompts = grid_prompts(cfg, lambda count: source.prompts(count, cfg.data.caption_field))
    return source, BatchCaptions(tower), PromptGrid(cfg, tower, dist, run_dir, log, prompts)


def main(argv: list[str] | None = None) -> int:
    """Train; returns the exit status (0, or 128 + the signal that stopped the run early)."""
    cfg, args = parse_args(argv)
    if args.print_config:
        print(print_config(cfg))
        return 0
    dist = init_distributed(cfg.train.device)
    plan = BatchPlan.derive(cfg.train.batch_size, dist.world_size, cfg.parallel.micro_batch)
    stop = StopSignals()  # SIGTERM / SIGUSR1 / Ctrl-C: checkpoint at the end of the step, then exit
    checkpoints = ckpt.CheckpointWriter(cfg.train.run_dir, cfg.train.keep_checkpoints, cfg.train.async_checkpoint)
    try:
        return train(cfg, args, dist, plan, stop, checkpoints)
    except torch.OutOfMemoryError as err:  # name the settings that lower a step's memory
        raise plan.out_of_memory(err, cfg) from err
    except TooManyBadSteps as err:  # name the checkpoint to go back to
        checkpoints.close()
        raise TooManyBadSteps(f"{err}; the newest good checkpoint is {checkpoints.newest_good()}") from None
    finally:
        checkpoints.close()  # publishes a background save in flight, whatever stopped the run
        stop.restore()


def train(cfg: Config, args: argparse.Namespace, dist: DistInfo, plan: BatchPlan, stop: StopSignals,
          checkpoints: ckpt.CheckpointWriter) -> int:
    # ------------------------------------------------------------------ setup
    device = dist.device
    kernels.pin(cfg.train.kernels)  # auto: Triton on GPU tensors; reference: PyTorch everywhere
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.train.run_dir)
    check_writable(run_dir)  # made here; validate() already checked that it can be
    # Where the run starts: a new run, or the checkpoint --resume names (verified intact, and of
    # the same run). A new run beside another run's checkpoints is refused (prx/run/run_dir.py).
    resume_path = resume_point(run_dir, args.resume)
    resumed = ckpt.read_meta(resume_path) if resume_path else None
    if resumed:
        check_same_run(resumed["config"], cfg, resume_path)
    # metrics.jsonl, and TensorBoard / W&B when asked for (a package that is missing stops here)
    backends = (open_backends(cfg.train.tensorboard, cfg.train.wandb, cfg.train.wandb_project, run_dir,
                              cfg.to_dict()) if dist.is_main else [])
    log = RunLog(run_dir, cfg.train.steps, resumed["step"] if resumed else 0, dist.is_main, backends=backends)
    log.print(describe(cfg))
    if args.resume == "auto" and resume_path is None:
        log.print(f"--resume auto: no checkpoint in {run_dir} yet; starting from step 0")
    log.print(f"device {device}; {plan.describe()}; run dir {run_dir}")
    compute_dtype = precision.compute_dtype(cfg.train.precision, device)
    autocast = precision.autocast(cfg.train.precision, device)

    # ------------------------------------------------------------------ model and text tower
    if cfg.model.fused_ops == "liger":
        liger.check_available(device)
    torch.manual_seed(cfg.train.seed)  # the initial weights, identical on every rank
    projector = (RepaProjector(cfg.model.hidden_dim, cfg.repa.projector_dim, cfg.repa.teacher_dim)
                 if cfg.repa.enabled else None)  # REPA's, trained with (and inside) the denoiser
    model = PRX(cfg.model, projector).to(device)  # fp32 weights; bf16 compute
    log.print(f"PRX denoiser: {count_parameters(model):,} parameters")
    if cfg.train.init_from:  # pretrained weights for step 0; a mismatch stops here, before any step
        log.print(load_initial_weights(cfg.train.init_from, model, log.print))
    # The text: the shards' stored caption embeddings when they have them (no encoder loaded), else the encoder.
    stored = training_text(cfg, log.wrap_progress("indexing shards"))
    tower = TextTower(cfg.text, device) if stored is None else StoredPrompts(cfg.text, stored.empty, stored.hidden_size)
    if stored:
        log.print(f"text: stored caption embeddings of {cfg.text.encoder} in the shards; the encoder is not loaded")
    if tower.hidden_size != cfg.model.text_dim:
        raise ConfigError(f"text encoder {cfg.text.encoder} is {tower.hidden_size} wide but "
                          f"model.text_dim={cfg.model.text_dim}; set --set model.text_dim={tower.hidden_size}")

    # ------------------------------------------------------------------ frozen teachers (docs/recipe.md 4, 5)
    teachers = load_teachers(cfg, device, compute_dtype)  # before the first step: a missing file stops here
    log.print(recipe_summary(cfg))
    # The held-out samples, and the feature networks of FID / CMMD / DINO-MMD: a missing one stops here too.
    heldout = HeldOut(cfg, log.wrap_progress("indexing held-out shards"))
    if stored and heldout.shards is not None:  # their stored embeddings serve validation and metrics
        held = StoredText(heldout.shards, identity_of(cfg), [cfg.data.caption_field])
        first = list(range(heldout.usable(max(cfg.eval.val_samples, cfg.eval.metrics_samples))))
        tower.add_samples(held, first, heldout.captions(first), cfg.data.caption_field)
    quality = QualityMetrics(cfg, heldout, dist, device, log.print, log.wrap_progress("metrics")) \
        if cfg.eval.metrics else None
    if quality:
        log.print(quality.describe())

    # ------------------------------------------------------------------ parallelize, optimizer
    train_model = parallelize(model, cfg.parallel, device, dist.world_size, compute_dtype)
    optimizer = build_optimizer(model, cfg)
    if isinstance(optimizer, MuonAdam) and dist.world_size > 1 and cfg.parallel.data_parallel == "fsdp":
        log.print(optimizer.describe_owners(dist.world_size))  # whole matrices on owner ranks
    ema = EMA(model, cfg.ema.decay, cfg.ema.every) if cfg.ema.enabled else None  # shards like the model
    guard = BadStepGuard(cfg.train.max_bad_steps)

    # ------------------------------------------------------------------ data
    source, captions, evaluation = build_data(cfg, tower, stored, dist, log, run_dir)
    validation = None
    if cfg.eval.val_every and heldout.available:  # fixed images, timesteps and noise (prx/eval/validation.py)
        validation = ValidationLoss(cfg, heldout, tower, dist, log, plan.micro_batch)
        log.print(f"{validation.describe()}, every {cfg.eval.val_every} steps")
    elif cfg.eval.val_every:
        log.print(f"validation loss off: {heldout.describe()}")
    start_step = 0
    if resumed:
        rng = ckpt.load_train_state(resume_path, model, optimizer,  # resharded to this world size
                                    {"ema": ema.state_dict()} if ema else None)
        source.load_state_dict(resumed["data"])
        if rng is not None:
            ckpt.set_rng_state(rng, device)
        start_step = resumed["step"]
        log.print(f"resumed from {resume_path} at step {start_step}")
        del resumed
    if dist.is_main:  # only once the setup succeeded: a failed resume leaves the run's files alone
        if note := settle_metrics(run_dir, start_step):
            log.print(note)
        save_json(cfg, run_dir / "config.json")
    if start_step == 0:
        evaluation.log_baseline()  # shapes: the score of images that ignore their prompt

    # ------------------------------------------------------------------ loop
    metrics = TrainMetrics(device, teachers.active_terms)
    utilization = Utilization(cfg, device, dist.world_size)  # peak memory and MFU for the log line
    log.print(utilization.describe())
    log.restart_clock(start_step)
    stop_signal = 0
    for step in range(start_step, cfg.train.steps):
        # Batch: this rank's share, uint8 images on the device (real data: one aspect bucket per
        # batch, so the grid varies). Per-step randomness is keyed by (seed, step) and global
        # sample slot: replayable on resume, and the same for any number of processes.
        batch = source.next_batch()
        images = batch.images
        grid = (images.shape[2] // cfg.model.patch_size, images.shape[3] // cfg.model.patch_size)
        gen = step_generator(cfg.train.seed, step)
        dropped = (torch.rand(cfg.train.batch_size, generator=gen) < cfg.flow.caption_dropout)[source.slots]
        text, text_mask = captions.embed(batch, dropped.tolist(), device)

        # Timesteps and noise: x_t = (1 - t) x + t eps in patch layout, in one pass from the uint8
        # images (a Triton kernel on GPU); eps is drawn from seeds keyed by (seed, step, global slot).
        t = sample_timesteps(cfg.train.batch_size, cfg.flow, gen)[source.slots].to(device)
        seeds = torch.tensor([mix_seed(cfg.train.seed, step, slot) for slot in source.slots], device=device)
        x_t, x = patchify_and_noise(images, t, cfg.model.patch_size, seeds=seeds, noise_scale=cfg.flow.noise_scale)
        utilization.add_step(x.shape[1], text.shape[1])

        # Route: per sample, the tokens that run TREAD's routed blocks (keyed like the noise), and
        # REPA's targets: the frozen teacher's patch tokens of the clean images, on the same grid.
        route = plan_route(cfg.tread, cfg.model.depth, x.shape[1],
                           route_seeds(cfg.train.seed, step, source.slots, device))
        repa_targets = teachers.repa_targets(images, grid)

        # Forward, loss terms and backward per micro-batch; gradients reduce across ranks on the last.
        per_sample = torch.empty(plan.local_batch, device=device)
        terms = torch.zeros(len(LOSS_TERMS), device=device)  # weighted, averaged over micro-batches
        for micro, part in enumerate(plan.micro_batches()):
            micro_route = route.part(part) if route else None
            set_gradient_sync(train_model, micro == plan.accumulation - 1)
            with autocast:
                out = train_model(x_t[part], t[part], text[part], text_mask[part], grid, route=micro_route,
                                  capture=cfg.repa.block if teachers.repa else None)
            loss = micro_batch_loss(cfg, out, x[part], t[part], images.shape[2:], teachers,
                                    None if repa_targets is None else repa_targets[part], micro_route)
            (loss.total / plan.accumulation).backward()
            per_sample[part] = loss.per_sample.detach()
            terms += loss.detached() / plan.accumulation

        # Clip, then the optimizer step, unless the gradient is not finite (the guard counts the
        # skips and stops a run that keeps producing them).
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        # A stop signal on any rank (SIGTERM: time limit, preemption) ends the run after this step.
        # Agreed on here, where the guard waits for the device anyway, so it stalls nothing.
        stop_signal = stop.agreed(device, dist.world_size)
        if guard.finite(grad_norm, step + 1):
            optimizer.step()
            metrics.add(terms, grad_norm, per_sample, t)
        optimizer.zero_grad(set_to_none=True)
        done = step + 1

        # EMA of the weights, every cfg.ema.every steps.
        if ema is not None:
            ema.update(done)
        log.advance(done)

        # Log: the means since the last log line, over all ranks.
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            sec_per_step, img_per_s = log.throughput(done, cfg.train.batch_size)
            log.write({"kind": "train", "step": done, **metrics.reduce(), "lr": lr_at(step, cfg),
                       "skipped": guard.take_skipped(), "epoch": round(source.epoch, 3),
                       "sec_per_step": sec_per_step, "img_per_s": img_per_s, **utilization.take(sec_per_step)})

        # Checkpoint, before the evaluation (an evaluation that fails cannot cost it): sharded,
        # every rank writes its part, published atomically; never from non-finite weights.
        last = done == cfg.train.steps
        stop_signal = 0 if last else stop_signal  # at the last step the run ends as planned
        # A time slice (train.stop_after) ends like a stop signal, with exit status 0; the
        # schedule is the whole run's, so the resumed run continues exactly.
        pause = not last and cfg.train.stop_after > 0 and done - start_step == cfg.train.stop_after
        if stop_signal:
            log.print(f"{signal_name(stop_signal)} received: checkpointing step {done}, then stopping")
        checkpoints.check_background_save()  # a failed background write stops the run now
        if (cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0) or last or stop_signal or pause:
            meta = {"config": cfg.to_dict(), "step": done, "schedule": {"step": done},
                    "data": source.state_dict()}
            path = checkpoints.save(done, model, optimizer, meta, ckpt.rng_state(device),
                                    {"ema": ema.state_dict()} if ema else None)
            log.print(f"checkpoint {path}" + (" (writing in the background)" if cfg.train.async_checkpoint else ""))
            log.restart_clock(done)
        if stop_signal:
            log.print(f"stopped by {signal_name(stop_signal)} after step {done}; continue with --resume auto")
            break
        if pause:
            log.print(f"stopping after step {done}, {cfg.train.stop_after} steps of this invocation "
                      "(train.stop_after); continue with --resume auto")
            break

        # Evaluate, with the EMA weights: the validation loss, the quality metrics, and the shapes
        # score or a grid of fixed prompts, each at its own interval (and after the last step).
        validate_now = validation is not None and (done % cfg.eval.val_every == 0 or last)
        metrics_now = quality is not None and ((cfg.eval.metrics_every and done % cfg.eval.metrics_every == 0)
                                               or (last and cfg.eval.final))
        sample_now = (cfg.train.sample_every and done % cfg.train.sample_every == 0) or (last and cfg.eval.final)
        if validate_now or metrics_now or sample_now:
            with ema.swapped_into(model) if ema else contextlib.nullcontext():
                if validate_now:
                    validation(model, done)
                if metrics_now and (record := quality(model, tower, done)):
                    log.write(record)
                if sample_now:
                    evaluation(model, done, last)
            log.restart_clock(done)

    checkpoints.close()  # waits for a background save
    log.close()
    shutdown()
    return 128 + stop_signal if stop_signal else 0


USER_ERRORS = (ConfigError, PretrainedMissing, ckpt.CheckpointError, TooManyBadSteps, ShardError, OutOfMemory)


def cli(argv: list[str] | None = None) -> int:
    """`python train.py`: a user's mistake or a stop the trainer decided on is one line on stderr
    (`error: ...`) and exit status 2, never a traceback."""
    try:
        return main(argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C (prx/run/stop_signals.py), or one before the handlers
        print("error: stopped at once by Ctrl-C, without a checkpoint of the steps since the last one; "
              "continue with --resume auto", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(cli())
