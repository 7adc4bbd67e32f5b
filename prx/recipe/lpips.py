"""LPIPS perceptual loss on the x-prediction (docs/recipe.md section 5), in plain torch.

loss = weight * mean_b [t_b <= t_max] * LPIPS(down(x_hat_b), down(x_b)), where down is a 0.5x
bilinear resize of the full image and LPIPS is the `lpips` package's v0.1 VGG metric: its input
scaling, the five VGG16 ReLU taps (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3), unit-normalised
over channels, squared difference weighted by the learned linear heads, spatial mean, summed over
the taps. The distance itself is `kernels.lpips_distance` (fused Triton kernel on CUDA, reference
on CPU).

The VGG16 weights are torchvision's ImageNet file (`vgg16-397923af.pth`, a plain state dict), read
without torchvision: `VGG16Features` names its layers exactly like torchvision's `vgg16().features`
so that file loads as is. The heads come from `prx.recipe.lpips_heads.load_lpips_heads`.

The VGG is frozen (no parameter requires grad) and `LPIPSLoss` is not an nn.Module, so it stays
out of the model's state dict, optimizer and FSDP wherever it is kept. Gradient reaches x_hat only.
A missing weight file raises `LPIPSWeightsMissing` (a `prx.hub.PretrainedMissing`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kernels
from prx.hub import PretrainedMissing
from prx.recipe.lpips_heads import LPIPS_VGG_CHANNELS, load_lpips_heads

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"

# VGG16 ("configuration D" of Simonyan & Zisserman; torchvision's cfgs["D"]) up to relu5_3: conv
# widths, "M" a 2x2 max-pool. Each conv is followed by a ReLU, so in torchvision's `features`
# numbering the convs sit at 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28 and the pools at 4,
# 9, 16, 23. The 5th pool (30) and the classifier are not needed by LPIPS and are left out.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# The LPIPS taps: the ReLU just before each pool, and the last one (lpips' vgg16 slices end at
# features indices 3, 8, 15, 22, 29).
VGG16_TAPS = (3, 8, 15, 22, 29)

# lpips v0.1 ScalingLayer (lpips/lpips.py): maps inputs in [-1, 1] to ImageNet-normalised ones,
# (x - shift) / scale; shift = 2 * mean - 1 and scale = 2 * std of ImageNet, rounded by lpips.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


class LPIPSWeightsMissing(PretrainedMissing):
    """The VGG16 or LPIPS head weights are not on this machine (nothing here downloads)."""


class VGG16Features(nn.Module):
    """VGG16 convolutions up to relu5_3; returns the five LPIPS taps (64, 128, 256, 512, 512 ch).

    State-dict keys are torchvision's: `features.{i}.weight` / `.bias` for i in the conv indices.
    """

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in _VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(in_channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                in_channels = item
        self.features = nn.Sequential(*layers)
        assert len(self.features) == VGG16_TAPS[-1] + 1

    def forward(self, x: Tensor) -> list[Tensor]:
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in VGG16_TAPS:
                taps.append(x)  # the next layer (pool or conv) is out-of-place, so x stays intact
        return taps


def vgg16_weights_path(path: str | Path | None = None) -> Path:
    """The VGG16 weight file: `path`, or torchvision's name in the torch hub cache
    (`torch.hub.get_dir()/checkpoints`, i.e. $TORCH_HOME/hub or ~/.cache/torch/hub)."""
    file = Path(path).expanduser() if path else Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILE
    if not file.is_file():
        raise LPIPSWeightsMissing(
            f"VGG16 weights for LPIPS not found at {file}: download {VGG16_URL} there "
            f"(e.g. `curl -L --create-dirs -o {file} {VGG16_URL}`), "
            f"or set --set perceptual.lpips_vgg=/path/to/vgg16.pth")
    return file


def load_vgg16_features(path: str | Path | None = None) -> VGG16Features:
    """A frozen, eval-mode `VGG16Features` with torchvision-format ImageNet weights (fp32, CPU).

    path: a .pth state dict (read with weights_only=True) or a .safetensors file with
    torchvision's keys; `classifier.*` and anything past features.28 are ignored.
    Default: vgg16-397923af.pth in the torch hub cache. Raises LPIPSWeightsMissing if absent.
    """
    file = vgg16_weights_path(path)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
    net = VGG16Features()
    wanted = net.state_dict().keys()
    try:
        net.load_state_dict({k: v for k, v in state.items() if k in wanted}, strict=True)
    except RuntimeError as e:  # missing keys or wrong shapes: say which file
        raise ValueError(f"{file} is not a torchvision VGG16 state dict: {e}") from None
    net.float().eval().requires_grad_(False)
    return net


def downsample(x: Tensor, scale: float) -> Tensor:
    """Bilinear resize of the full image by `scale` (output floor(H * scale) x floor(W * scale)).

    antialias=False, align_corners=False: at scale 0.5 on even sizes this is exactly the mean of
    each 2x2 block (sample points fall midway between pixel centres), a proper box downsample, so
    an antialias filter adds cost and blur for nothing; it is also F.interpolate's default. The
    given scale is used as is (not recomputed from the sizes), as a plain
    `F.interpolate(x, scale_factor=0.5, mode="bilinear")` call does.
    """
    if scale == 1.0:
        return x
    return F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False, antialias=False)


class LPIPSLoss:
    """The weighted LPIPS term of the training loss: `lpips(x_hat, x, t)` is the scalar to add.

    x_hat, x: (B, 3, H, W) in [-1, 1]; t: (B,) noise levels or None (all samples count).
    loss = weight * sum_b(mask_b * d_b) / B (this class applies `weight`). The mean is over all B
    samples, masked ones adding 0, so a sample's weight does not depend on how many others pass
    the threshold (as in the flow loss' per-sample mean). `distance(x_hat, x)` gives d_b (B,),
    fp32, unweighted and unmasked. Masked samples still run through the VGG: static shapes beat
    the saving when t_max < 1 (PRX default: 1).

    Deliberately not an nn.Module (like `prx.recipe.teachers.FrozenDino`): kept as an attribute of the
    model or the trainer, its VGG registers nowhere, so it stays out of state_dict (checkpoints),
    .parameters() (the optimizer), .train(), FSDP and the model's .to(). Use `.to()` here.
    """

    def __init__(self, vgg: VGG16Features, heads: list[Tensor], weight: float = 0.1,
                 scale: float = 0.5, t_max: float = 1.0) -> None:
        if len(heads) != len(LPIPS_VGG_CHANNELS):
            raise ValueError(f"expected {len(LPIPS_VGG_CHANNELS)} LPIPS heads, got {len(heads)}")
        if not 0.0 < scale <= 1.0:
            raise ValueError(f"LPIPS downsample scale must be in (0, 1], got {scale}")
        self.vgg = vgg.eval().requires_grad_(False)
        self.weight, self.scale, self.t_max = float(weight), float(scale), float(t_max)
        self.heads = [head.detach().float().reshape(-1).clone() for head in heads]
        self.shift = torch.tensor(LPIPS_SHIFT).reshape(1, 3, 1, 1)
        self.inv_scale = 1.0 / torch.tensor(LPIPS_SCALE).reshape(1, 3, 1, 1)

    @classmethod
    def from_config(cls, cfg, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32) -> LPIPSLoss:
        """From a `PerceptualConfig`: lpips_vgg, lpips_heads ("" = defaults), lpips_weight,
        lpips_scale, lpips_t_max; VGG weights in `dtype` on `device`. Raises
        LPIPSWeightsMissing when a weight file is absent."""
        vgg = load_vgg16_features(cfg.lpips_vgg or None)
        try:
            heads = load_lpips_heads(cfg.lpips_heads or None)
        except FileNotFoundError as e:
            raise LPIPSWeightsMissing(f"{e} (or set --set perceptual.lpips_heads=/path/to/vgg.pth)") from None
        return cls(vgg, heads, cfg.lpips_weight, cfg.lpips_scale, cfg.lpips_t_max).to(device, dtype)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> LPIPSLoss:
        """Move to `device`; `dtype` is the VGG weights' (heads and constants stay fp32)."""
        self.vgg.to(device=device, dtype=dtype)
        self.heads = [h.to(device) for h in self.heads]
        self.shift, self.inv_scale = self.shift.to(device), self.inv_scale.to(device)
        return self

    def features(self, images: Tensor) -> list[Tensor]:
        """The five VGG taps of images in [-1, 1], after the resize and lpips' input scaling
        (in fp32, then rounded once to the VGG's dtype)."""
        scaled = (downsample(images.float(), self.scale) - self.shift) * self.inv_scale
        return self.vgg(scaled.to(self.vgg.features[0].weight.dtype))

    def distance(self, x_hat: Tensor, x: Tensor) -> Tensor:
        """LPIPS(down(x_hat_b), down(x_b)) per sample, (B,) fp32; gradient to x_hat only."""
        if x_hat.shape != x.shape or x_hat.dim() != 4 or x_hat.shape[1] != 3:
            raise ValueError(f"LPIPS wants x_hat and x of one shape (B, 3, H, W), got "
                             f"{tuple(x_hat.shape)} and {tuple(x.shape)}")
        with torch.no_grad():  # the target: forward only, its activations freed at once
            targets = self.features(x)
        return kernels.lpips_distance(self.features(x_hat), targets, self.heads)

    def __call__(self, x_hat: Tensor, x: Tensor, t: Tensor | None = None) -> Tensor:
        per_sample = self.distance(x_hat, x)
        if t is None or self.t_max >= 1.0:  # t < 1 always (docs/recipe.md section 2): nothing to mask
            return self.weight * per_sample.mean()
        mask = (t.detach().reshape(-1) <= self.t_max).to(per_sample.device, per_sample.dtype)
        return self.weight * (mask * per_sample).mean()
