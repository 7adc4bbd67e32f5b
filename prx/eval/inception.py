"""The FID Inception-v3: the TF 2015-12-05 graph's pool3 features (2048-d), as a PyTorch port.

This is the network every FID number since Heusel et al. (2017) is computed with; its weights are
the TF graph's, converted to a plain state dict (pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`,
91 MiB; torch-fidelity and torchmetrics load it as `weights-inception-2015-12-05-6726825d.pth`).
Parameter names are torchvision's Inception3 names (`Mixed_5b.branch1x1.conv.weight`,
`...bn.running_var`), so that file loads as is; its 1008-way `fc` logits are not needed for FID
and are ignored.

Where the TF graph differs from torchvision's Inception3, this port follows the TF graph:
  - input: float pixels 0..255 resized to 299 x 299 with TF1's `ResizeBilinear`
    (align_corners=False, no half-pixel centres: source = dst * in / out), then (x - 128) / 128;
    torch's own bilinear uses half-pixel centres, samples other points and so shifts FID;
  - the 3 x 3 average pools of the A and C blocks and of Mixed_7b exclude the zero padding from the mean;
  - the last block (Mixed_7c) pools its pool branch with a 3 x 3 max, not an average;
  - BatchNorm eps 0.001.
What still differs from the TF graph is float rounding only (convolution summation order). On the
same random weights this port gives bit-identical features to torch-fidelity 0.4's
FeatureExtractorInceptionV3 (the extractor torchmetrics uses), checked once by hand; torch-fidelity
itself is not a dependency because its package imports torchvision, which cannot be installed
beside this project's torch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INPUT_SIZE = 299
POOL3_DIM = 2048


def tf1_source_index(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TF1 ResizeBilinear's source taps: (lower index, upper index, fp32 lerp weight) per output index.

    TF computes scale = in / out and source = dst * scale in float32, lower = floor(source),
    upper = min(lower + 1, in - 1) (tensorflow/core/kernels/image_resizer_state.h, resize_bilinear_op.cc).
    """
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    source = torch.arange(out_size, dtype=torch.float32) * scale
    lower = source.floor()
    upper = (lower + 1).clamp(max=in_size - 1)
    return lower.long(), upper.long(), source - lower


def resize_bilinear_tf1(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) float -> (B, C, *size), as TF1's ResizeBilinear(align_corners=False): rows first
    lerped along the width (top, bottom), then the two lerped along the height, in TF's a + (b - a) * t form."""
    y_lo, y_hi, y_lerp = (t.to(images.device) for t in tf1_source_index(images.shape[-2], size[0]))
    x_lo, x_hi, x_lerp = (t.to(images.device) for t in tf1_source_index(images.shape[-1], size[1]))
    y_lerp, x_lerp = y_lerp.to(images.dtype)[:, None], x_lerp.to(images.dtype)
    top, bottom = images[..., y_lo, :], images[..., y_hi, :]
    top = top[..., x_lo] + (top[..., x_hi] - top[..., x_lo]) * x_lerp
    bottom = bottom[..., x_lo] + (bottom[..., x_hi] - bottom[..., x_lo]) * x_lerp
    return top + (bottom - top) * y_lerp


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 0.001, the TF graph's) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int = 1, padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def avg_pool_3x3_tf(x: torch.Tensor) -> torch.Tensor:
    """TF's 3 x 3 stride-1 SAME average pool: padded zeros do not count in the mean."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35 x 35 block: 1x1, 5x5, double 3x3 and pool branches -> 224 + pool_features channels."""

    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(avg_pool_3x3_tf(x)),
        ], 1)


class InceptionB(nn.Module):
    """35 -> 17 reduction (Mixed_6a): strided 3x3, strided double 3x3, max pool -> 768 channels."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionC(nn.Module):
    """17 x 17 block with factorised 7x7 convolutions -> 768 channels."""

    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        double = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            self.branch7x7dbl_5(self.branch7x7dbl_4(double)),
            self.branch_pool(avg_pool_3x3_tf(x)),
        ], 1)


class InceptionD(nn.Module):
    """17 -> 8 reduction (Mixed_7a) -> 1280 channels."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seven = self.branch7x7x3_2(self.branch7x7x3_1(x))
        return torch.cat([
            self.branch3x3_2(self.branch3x3_1(x)),
            self.branch7x7x3_4(self.branch7x7x3_3(seven)),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class InceptionE(nn.Module):
    """8 x 8 block with split 1x3 / 3x1 outputs -> 2048 channels. The TF graph's Mixed_7b pools its
    pool branch with an average (padding excluded), Mixed_7c with a max: `max_pool` picks which."""

    def __init__(self, in_channels: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        single = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else avg_pool_3x3_tf(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(single), self.branch3x3_2b(single),
            self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double),
            self.branch_pool(pooled),
        ], 1)


class FidInceptionV3(nn.Module):
    """uint8 or 0..255 float images (B, 3, H, W), any H and W -> pool3 features (B, 2048) fp32."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = resize_bilinear_tf1(images.float(), (INPUT_SIZE, INPUT_SIZE))
        x = (x - 128.0) / 128.0  # the graph's Sub 128, Mul 1/128 (exact: a power of two)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # 147 x 147
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # 73 x 73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # 71 x 71
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # 35 x 35
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))))  # 17 x 17
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # 8 x 8 x 2048
        return x.mean(dim=(2, 3))  # pool3


def load_fid_inception_state(model: FidInceptionV3, state: dict[str, torch.Tensor]) -> None:
    """Load the converted TF weights strictly, except the unused 1008-way `fc` logits and BatchNorm's
    `num_batches_tracked` counters (present in some conversions, absent in others; eval ignores them)."""
    def needed(name: str) -> bool:
        return not name.startswith("fc.") and not name.endswith("num_batches_tracked")

    wanted = {k for k in model.state_dict() if needed(k)}
    given = {k: v for k, v in state.items() if needed(k)}
    missing, unexpected = sorted(wanted - given.keys()), sorted(given.keys() - wanted)
    if missing or unexpected:
        raise KeyError(f"not the FID Inception-v3 state dict: missing {missing[:5]} ({len(missing)}), "
                       f"unexpected {unexpected[:5]} ({len(unexpected)})")
    model.load_state_dict(given, strict=False)
