"""Held-out samples: what the validation loss and the quality metrics measure, never trained on.

The shapes set holds out the scenes past `data.shapes_length` (training draws indices below it;
every index is a deterministic scene). Webdataset data holds out `data.val_path`'s shards, or the
last `data.val_shards` of `data.path` (which training then leaves out, `split_shards`). Either
way a held-out sample is (a square uint8 image at `data.resolution`, centre-cropped, and its
caption), addressed by its index 0, 1, 2, ...: fixed, so every evaluation of a run and every run
of the same data measure the same images.
"""

from __future__ import annotations

import torch

from prx.config import Config
from prx.data.images import DECODE_ERRORS
from prx.data.shapes import make_scene, render_scene
from prx.data.shards import ShardError, ShardSet, split_shards
from prx.data.webdata import decode_image


class HeldOut:
    """Held-out images and captions by index; `describe()` says where they come from."""

    def __init__(self, cfg: Config, progress=None):
        d = cfg.data
        self.resolution, self.caption_key, self.seed = d.resolution, d.caption_field, cfg.train.seed
        self.first_scene = d.shapes_length  # shapes: held-out index i is scene shapes_length + i
        self.shards: ShardSet | None = None
        if d.source == "webdataset" and (d.val_path or d.val_shards):
            self.shards = ShardSet(split_shards(d.path, d.val_path, d.val_shards)[1], d.max_bad_fraction, progress)
        self.available = d.source == "shapes" or self.shards is not None

    def usable(self, wanted: int) -> int:
        """How many of `wanted` samples there are (the shapes set has as many as asked for)."""
        if self.shards is None:
            return wanted if self.available else 0
        return min(wanted, len(self.shards))

    def describe(self) -> str:
        if self.shards is None:
            return (f"held-out shapes scenes {self.first_scene:,}+" if self.available
                    else "no held-out data (set data.val_path or data.val_shards)")
        return f"{len(self.shards):,} held-out samples in {len(self.shards.shards)} shard(s)"

    def key(self) -> dict:
        """What identifies these samples, for caches of what is computed from them."""
        if self.shards is None:
            return {"source": "shapes", "seed": self.seed, "first_scene": self.first_scene,
                    "resolution": self.resolution}
        return {"source": "webdataset", "shards": [str(p.resolve()) for p in self.shards.shards],
                "sizes": [p.stat().st_size for p in self.shards.shards], "resolution": self.resolution,
                "caption_key": self.caption_key}

    def captions(self, indices: list[int]) -> list[str]:
        if self.shards is None:
            return [make_scene(self.seed, self.first_scene + i).caption for i in indices]
        return [self.shards.read(i, self.caption_key)[1] for i in indices]

    def images(self, indices: list[int]) -> torch.Tensor:
        """uint8 (len(indices), 3, R, R) on the CPU."""
        if self.shards is None:
            return torch.stack([torch.from_numpy(render_scene(make_scene(self.seed, self.first_scene + i),
                                                              self.resolution)) for i in indices])
        return torch.stack([self._decode(i) for i in indices])

    def _decode(self, i: int) -> torch.Tensor:
        # Held-out data must decode: the index said it would, so a failure here is a shard that
        # changed since it was indexed, and a quietly substituted image would skew every metric.
        data = self.shards.read(i, self.caption_key)[0]
        try:
            return decode_image(data, self.resolution, self.resolution)
        except DECODE_ERRORS as err:
            raise ShardError(f"held-out sample {i} of {self.shards.shard_name(i)} does not decode ({err}); "
                             "re-run `python -m prx.data.prepare` on it or hold out other shards") from None
