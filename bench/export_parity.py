"""Does a model keep its quality when it leaves the trainer? The shapes score of a checkpoint by our
sampler, against the same checkpoint exported (`python -m prx.export`) and sampled by diffusers'
PRXPixelPipeline: the held-out prompts of the run's final evaluation, the same noise, steps,
guidance and schedule; the pipeline encodes the prompts itself (its tokenizer, its ftfy cleaning,
the text encoder copied into the export).

    python -m bench.export_parity --checkpoint runs/tiny/checkpoints/step_00002000

Prints both scores and the largest pixel difference, saves both grids under --out, and appends a
row to bench/results/export_parity.csv. Needs diffusers and ftfy (the dev extras).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.common import RESULTS, append_csv, environment
from kernels import unpatchify
from prx.config import from_dict
from prx.data.shapes import eval_scenes
from prx.eval.grids import save_grid
from prx.eval.sampling import generate
from prx.eval.shapes_score import score_images
from prx.export import export
from prx.model.denoiser import PRX
from prx.rng import per_sample_normal
from prx.run.checkpoint import load_model_weights, read_meta
from prx.text import TextTower

FIELDS = ["date", "device", "torch", "git", "checkpoint", "step", "prompts", "steps", "guidance", "sampler",
          "color", "shape", "position", "scenes_all_right", "max_pixel_difference", "seconds"]


def pipeline_images(folder: Path, captions: list[str], noise: torch.Tensor, cfg, steps: int) -> torch.Tensor:
    """PRXPixelPipeline's images for `captions`, from our noise (patch layout) as its latents."""
    from diffusers import PRXPixelPipeline

    pipe = PRXPixelPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    side, p = cfg.data.resolution, cfg.model.patch_size
    images = []
    for i, caption in enumerate(captions):  # one a call: diffusers 0.42.1 fails for more with guidance
        latents = unpatchify(noise[i : i + 1], p, side, side)
        images.append(pipe(prompt=caption, latents=latents, num_inference_steps=steps,
                           guidance_scale=cfg.eval.guidance, height=side, width=side,
                           use_resolution_binning=False, output_type="pt").images.clamp(-1, 1))
    return torch.cat(images)


@torch.no_grad()  # not torch.set_grad_enabled(False): a caller (the tests) keeps its autograd
def main(argv: list[str] | None = None) -> list[dict]:
    """Run the comparison; returns the CSV rows (ours first)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint of a shapes run (RUN/checkpoints/step_N)")
    parser.add_argument("--out", default="bench/out/export_parity", help="export folder and grids")
    parser.add_argument("--csv-dir", default=None, help="CSV folder (default bench/results/)")
    args = parser.parse_args(argv)
    checkpoint, out = Path(args.checkpoint), Path(args.out)
    meta = read_meta(checkpoint)
    cfg = from_dict(meta["config"])
    steps = cfg.eval.sample_steps
    export(checkpoint, out / "export", ema=cfg.ema.enabled, copy_text=True)

    model = PRX(cfg.model)
    load_model_weights(checkpoint, model, ema=cfg.ema.enabled)
    model.eval()
    scenes = eval_scenes(cfg.train.seed, cfg.eval.num_prompts)  # the run's final evaluation
    captions = [s.caption for s in scenes]
    side = cfg.data.resolution
    shape = ((side // cfg.model.patch_size) ** 2, cfg.model.patch_dim)
    noise = cfg.flow.noise_scale * per_sample_normal(shape, cfg.eval.seed, 0, list(range(len(captions))),
                                                     torch.device("cpu"))  # generate's noise for prompt i
    results = {}
    start = time.perf_counter()
    results["prx (ours)"] = (generate(model, TextTower(cfg.text, torch.device("cpu")), captions, cfg,
                                      seed=cfg.eval.seed), time.perf_counter() - start)
    start = time.perf_counter()
    results["diffusers PRXPixelPipeline"] = (pipeline_images(out / "export", captions, noise, cfg, steps),
                                             time.perf_counter() - start)
    ours = results["prx (ours)"][0]
    env = environment(torch.device("cpu"))
    rows = []
    for sampler, (images, seconds) in results.items():
        score = score_images(images, scenes)
        name = "ours" if images is ours else "diffusers"
        save_grid(images[: cfg.eval.grid_prompts], captions[: cfg.eval.grid_prompts], out / f"grid_{name}.png")
        difference = (images - ours).abs().max().item()
        rows.append({**{k: env[k] for k in ("date", "device", "torch", "git")}, "checkpoint": str(checkpoint),
                     "step": meta["step"], "prompts": len(captions), "steps": steps, "guidance": cfg.eval.guidance,
                     "sampler": sampler, "color": score.color, "shape": score.shape, "position": score.position,
                     "scenes_all_right": score.all_correct, "max_pixel_difference": difference, "seconds": seconds})
        print(f"{sampler:<28} {score.format()}  max |image - ours| {difference:.2e}  ({seconds:.0f} s)")
    print(f"rows appended to {append_csv(Path(args.csv_dir or RESULTS) / 'export_parity.csv', FIELDS, rows)}; "
          f"grids in {out}")
    return rows


if __name__ == "__main__":
    main()
