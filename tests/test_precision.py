"""train.precision decides the compute dtype of training and of sampling alike (prx.precision)."""

import torch

from prx import precision
from prx.config import apply_override, tiny
from prx.eval import sampling
from prx.model.denoiser import PRX


def test_bf16_only_on_a_gpu_and_only_when_asked():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert precision.compute_dtype("bf16", cuda) == torch.bfloat16
    assert precision.compute_dtype("fp32", cuda) == torch.float32
    assert precision.compute_dtype("bf16", cpu) == torch.float32


class FixedTower:
    """Stands in for the text tower: captions -> a fixed 3-token embedding."""

    def __init__(self, width: int):
        self.width = width
        self.cfg = tiny().text

    def encode(self, captions):
        return [torch.ones(3, self.width) for _ in captions]

    def empty(self):
        return torch.zeros(1, self.width)


def test_sampling_runs_in_the_precision_the_run_trained_in(monkeypatch):
    asked = []
    original = precision.autocast
    monkeypatch.setattr(sampling.precision, "autocast",
                        lambda name, device: asked.append((name, device.type)) or original(name, device))
    for value in ("fp32", "bf16"):
        cfg = apply_override(tiny(), f"train.precision={value}")
        images = sampling.generate(PRX(cfg.model), FixedTower(cfg.model.text_dim), ["a"], cfg, steps=1)
        assert images.shape == (1, 3, 32, 32)
    assert asked == [("fp32", "cpu"), ("bf16", "cpu")]
