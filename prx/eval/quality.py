"""Quality metrics of generated images against held-out real ones: FID, CMMD, DINO-MMD.

The protocol (the PRX reference's, offline): the captions of the first `eval.metrics_samples`
held-out samples (`prx.data.heldout`) are the prompts, sampled with noise keyed by eval.seed and
the sample's index, so every evaluation of a run draws the same noise for the same prompts.
Each rank generates its share and embeds it with the frozen feature networks
(`prx.eval.features`); rank 0 gathers the features and compares them with the real images'
(`prx.eval.metrics`). The real images' features are computed once, on rank 0, and cached under a
key of what they came from (data, count, resolution, feature network). The feature networks
load when this object is built, before step 1: a missing one stops the run then, naming it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from prx.config import Config, metric_names
from prx.data.heldout import HeldOut
from prx.eval.features import load_feature_net
from prx.eval.grids import to_uint8
from prx.eval.metrics import cached_reference_features, metric_value
from prx.eval.sampling import generate
from prx.run.distributed import DistInfo, gather_to_main

DEFAULT_REFERENCE_CACHE = "~/.cache/prx/reference_features"
BATCH = 64  # images generated and embedded at a time: bounds host memory at any sample count


# where pytorch-fid and torch-fidelity (torchmetrics' FID) download the FID Inception weights
INCEPTION_FILES = ("pt_inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth")


def default_inception_path() -> str:
    """The FID weights in the torch hub cache ($TORCH_HOME/hub/checkpoints), under either library's
    name; the first name when neither is there (the error then names it)."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    found = [folder / name for name in INCEPTION_FILES if (folder / name).is_file()]
    return str(found[0] if found else folder / INCEPTION_FILES[0])


def feature_source(cfg: Config, metric: str) -> str:
    """Where the config says metric's feature network is."""
    return {"fid": cfg.eval.inception or default_inception_path(), "cmmd": cfg.eval.clip,
            "dino_mmd": cfg.eval.dino}[metric]


def images_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float (B, 3, H, W) -> uint8 (B, 3, H, W), quantised as a saved PNG is: the metrics
    score what a user would save."""
    return torch.from_numpy(to_uint8(images)).permute(0, 3, 1, 2)


class QualityMetrics:
    def __init__(self, cfg: Config, heldout: HeldOut, dist: DistInfo, device: torch.device, log_print,
                 progress=lambda items: items):
        self.cfg, self.heldout, self.dist, self.device = cfg, heldout, dist, device
        self.print, self.progress = log_print, progress
        self.names = metric_names(cfg.eval.metrics)
        self.nets = {name: load_feature_net(name, feature_source(cfg, name), device) for name in self.names}
        count = heldout.usable(cfg.eval.metrics_samples)
        self.count = count - count % dist.world_size  # the same number of sampler forwards on every rank
        self.mine = list(range(dist.rank, self.count, dist.world_size))
        self.cache = Path(cfg.eval.reference_cache or DEFAULT_REFERENCE_CACHE).expanduser()
        self._reference: dict[str, torch.Tensor] | None = None

    def describe(self) -> str:
        return (f"quality metrics {', '.join(self.names)} on {self.count:,} images "
                f"({self.heldout.describe()}), reference features cached in {self.cache}")

    def _embed(self, images: torch.Tensor, features: dict[str, list[torch.Tensor]]) -> None:
        images = images.to(self.device)
        for name, net in self.nets.items():
            features[name].append(net(images).float().cpu())

    def reference(self) -> dict[str, torch.Tensor]:
        """The real images' features per metric (rank 0), from the cache or computed once."""
        if self._reference is None:
            self._reference = {}
            for name, net in self.nets.items():
                key = {"metric": name, "net": net.identity, "count": self.count, "heldout": self.heldout.key()}

                def compute(net=net, name=name) -> torch.Tensor:
                    self.print(f"{name}: features of {self.count:,} held-out real images (once; cached)")
                    features: list[torch.Tensor] = []
                    for start in self.progress(range(0, self.count, BATCH)):
                        indices = list(range(start, min(start + BATCH, self.count)))
                        features.append(net(self.heldout.images(indices).to(self.device)).float().cpu())
                    return torch.cat(features)

                self._reference[name] = cached_reference_features(self.cache, key, compute)
        return self._reference

    @torch.no_grad()
    def generated_features(self, model, tower) -> dict[str, torch.Tensor] | None:
        """Every rank samples and embeds its share; rank 0 receives all features (None elsewhere)."""
        features: dict[str, list[torch.Tensor]] = {name: [] for name in self.names}
        for start in self.progress(range(0, len(self.mine), BATCH)):
            slots = self.mine[start:start + BATCH]
            images = generate(model, tower, self.heldout.captions(slots), self.cfg, seed=self.cfg.eval.seed,
                              noise_slots=slots, batch_size=BATCH)
            self._embed(images_uint8(images), features)
        gathered = {}
        for name in self.names:
            local = torch.cat(features[name]) if features[name] else torch.zeros(0, self.nets[name].dim)
            gathered[name] = gather_to_main(local, self.mine, self.count)
        return gathered if self.dist.is_main else None

    def __call__(self, model, tower, step: int) -> dict | None:
        """The metrics record on rank 0 (None elsewhere)."""
        start = time.perf_counter()
        generated = self.generated_features(model, tower)
        if generated is None:
            return None
        reference = self.reference()
        values = {name: metric_value(name, generated[name], reference[name]) for name in self.names}
        shown = " | ".join(f"{name} {value:.4g}" for name, value in values.items())
        self.print(f"metrics step {step}: {shown} ({self.count:,} images, {time.perf_counter() - start:.0f} s)")
        return {"kind": "metrics", "step": step, "samples": self.count, **values}
