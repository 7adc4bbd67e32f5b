"""The evaluation the training loop runs every `train.sample_every` steps and at the end.

The data source decides which, once, at setup (train.py's `build_data`): the procedural shapes
set has labels, so its evaluation samples the held-out prompts, saves a grid and scores prompt
following (`ShapesEvaluation`); real data has none, so its evaluation samples a captioned grid
of fixed prompts (`PromptGrid`). Steps and guidance are the config's (`eval.*`, `generate`'s
defaults). Both sample with whatever weights the model holds when called
(the loop swaps the EMA in), on every rank: a sharded model needs all ranks in each forward.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from prx.config import Config
from prx.data.shapes import eval_scenes
from prx.eval.grids import save_grid
from prx.eval.sampling import generate
from prx.eval.shapes_score import chance_score, score_images
from prx.run.distributed import DistInfo, gather_to_main
from prx.run.runlog import RunLog
from prx.text import TextTower


def sample_prompts(model, tower: TextTower, cfg: Config, dist: DistInfo, prompts: list[str]) -> torch.Tensor | None:
    """Images for `prompts` on rank 0 (None elsewhere). Every rank samples its share; prompt i's
    noise is keyed by i, so any split over ranks gives the same images."""
    mine = list(range(dist.rank, len(prompts), dist.world_size))
    images = generate(model, tower, [prompts[i] for i in mine], cfg, seed=cfg.eval.seed, noise_slots=mine)
    return gather_to_main(images, mine, len(prompts))


class ShapesEvaluation:
    """Shapes data: sample the fixed held-out prompts, save a captioned grid, score prompt
    following; the last evaluation of a run also writes <run_dir>/shapes_score.json."""

    def __init__(self, cfg: Config, tower: TextTower, dist: DistInfo, run_dir: Path, log: RunLog):
        self.cfg, self.tower, self.dist, self.run_dir, self.log = cfg, tower, dist, run_dir, log
        self.scenes = eval_scenes(cfg.train.seed, cfg.eval.num_prompts)

    def log_baseline(self) -> None:
        """The score of images that ignore their prompt, for comparison (rank 0, at step 0)."""
        if self.dist.is_main:
            chance = chance_score(self.scenes, self.cfg.data.resolution, self.cfg.train.seed)
            self.log.print(f"shapes score at chance (images that ignore their prompt): {chance.format()}")
            self.log.write({"kind": "chance", **chance.as_dict()})

    def __call__(self, model, step: int, last: bool) -> None:
        captions = [s.caption for s in self.scenes]
        start = time.perf_counter()
        images = sample_prompts(model, self.tower, self.cfg, self.dist, captions)
        if not self.dist.is_main:
            return
        score = score_images(images, self.scenes)
        shown = self.cfg.eval.grid_prompts
        grid = save_grid(images[:shown], captions[:shown], self.run_dir / "samples" / f"step_{step:08d}.png")
        self.log.image("samples", step, grid)
        self.log.print(f"eval step {step}: shapes score {score.format()} ({time.perf_counter() - start:.0f} s), "
                       f"grid {grid}")
        record = {"kind": "eval", "step": step, **{f"shapes_{k}": v for k, v in score.as_dict().items()}}
        self.log.write(record)
        if last:
            (self.run_dir / "shapes_score.json").write_text(json.dumps(record, indent=2) + "\n")


class PromptGrid:
    """Real data: a captioned grid of fixed prompts (there is no score without labels)."""

    def __init__(self, cfg: Config, tower: TextTower, dist: DistInfo, run_dir: Path, log: RunLog,
                 prompts: list[str]):
        self.cfg, self.tower, self.dist, self.run_dir, self.log = cfg, tower, dist, run_dir, log
        self.prompts = prompts

    def log_baseline(self) -> None:
        """Nothing to compare a grid with."""

    def __call__(self, model, step: int, last: bool) -> None:
        if not self.prompts:
            return
        start = time.perf_counter()
        images = sample_prompts(model, self.tower, self.cfg, self.dist, self.prompts)
        if self.dist.is_main:
            grid = save_grid(images, self.prompts, self.run_dir / "samples" / f"step_{step:08d}.png")
            self.log.image("samples", step, grid)
            self.log.print(f"samples step {step}: {grid} ({time.perf_counter() - start:.0f} s)")


def grid_prompts(cfg: Config, captions_of_first_samples) -> list[str]:
    """The fixed prompts of a real-data grid: eval.prompts (a file, one a line), else the first
    captions of the data (`captions_of_first_samples(count)`); blank lines dropped."""
    count = cfg.eval.grid_prompts
    lines = (Path(cfg.eval.prompts).read_text().split("\n") if cfg.eval.prompts
             else captions_of_first_samples(count))
    return [p.strip() for p in lines if p.strip()][:count]
