"""Frozen feature networks for the quality metrics, loaded offline: uint8 images -> (B, dim) fp32 features.

  fid       the FID Inception-v3 (TF 2015-12-05 weights), pool3, 2048-d (prx/eval/inception.py);
            `eval.inception` names the .pth (or .safetensors) state dict file.
  cmmd      CLIP ViT-L/14-336 `image_embeds` (768-d), L2-normalised, as CMMD (Jayasumana et al.,
            CVPR 2024) defines it; preprocessing is CLIPImageProcessor's (shortest side to 336 with
            PIL bicubic, centre crop 336, CLIP mean/std), done in torch on the device. `eval.clip`.
  dino_mmd  DINOv2 ViT-L/14 with registers, the CLS token after the final LayerNorm (1024-d),
            L2-normalised, from a 518 x 518 bicubic resize with ImageNet mean/std. `eval.dino`.

DINO-MMD follows the Photoroom PRX reference (prx/callbacks/feature_extractors.py,
DINOFeatureExtractor): torch.hub `dinov2_vitl14_reg`, whose forward returns `x_norm_clstoken`, on
images resized to 518 (its default `dino_resize_size`, the resolution DINOv2 was finished at),
embeddings L2-normalised. We keep all three so our numbers compare with PRX's; the L2 norm also
puts DINO's tokens on the scale that CMMD's sigma = 10 was chosen for (unit-norm CLIP embeddings).
518 px costs 1374 tokens per image against 261 at 224 (about 1 TFLOP per image for ViT-L against
0.16): for 10k images about 10 PFLOP, some 3 minutes in fp32 on one H100 (67 TFLOP/s peak), well
under one with TF32. DINO_SIZE is the one constant to change for a cheaper, non-comparable variant.

Every net runs in fp32, as the references do, so the numbers compare with theirs. Nothing is
downloaded: a missing source raises `FeatureNetMissing` with how to get it. `FeatureNet.identity`
names the weights and the preprocessing version, so the cached reference features
(prx/eval/metrics.py) are recomputed when either changes.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from prx.config import METRIC_NAMES
from prx.eval.inception import POOL3_DIM, FidInceptionV3, load_fid_inception_state
from prx.hub import PretrainedMissing, resolve_pretrained
from prx.recipe.teachers import IMAGENET_MEAN, IMAGENET_STD, TeacherMissing, load_dino

# pytorch-fid's file, and torch-fidelity's (torchmetrics') copy under another name; the sha256 prefix
# in both names (torch.hub's convention) is the same: 6726825d
INCEPTION_URLS = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                  "pt_inception-2015-12-05-6726825d.pth",
                  "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                  "weights-inception-2015-12-05-6726825d.pth")
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OPENAI_CLIP_MEAN, CLIPImageProcessor's
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DINO_SIZE = 518
# bump when a net's preprocessing changes: the reference-feature cache key includes it
PREPROCESSING = {
    "fid": "tf1-bilinear-299/v1",
    "cmmd": "pil-bicubic-shortest-crop-clipnorm-l2/v1",
    "dino_mmd": f"bicubic-{DINO_SIZE}-imagenet-cls-l2/v1",
}


class FeatureNetMissing(PretrainedMissing):
    """A metric's feature network named by the config is not on this machine (or is not loadable)."""


@dataclass(frozen=True)
class FeatureNet:
    """A frozen feature network: __call__ maps uint8 images (B, 3, H, W), any H and W, on the net's
    device to fp32 features (B, dim)."""

    metric: str
    dim: int
    identity: str  # weights + preprocessing, part of the reference-feature cache key
    embed: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.metric}: expected uint8 images (B, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        with torch.no_grad():
            return self.embed(images).float()


def load_feature_net(metric: str, source: str, device: torch.device | str) -> FeatureNet:
    """The feature net of `metric` (one of METRIC_NAMES) from `source` (a file for fid, a hub id or
    directory for cmmd and dino_mmd), frozen, fp32, on `device`."""
    device = torch.device(device)
    if metric == "fid":
        return load_inception(source, device)
    if metric == "cmmd":
        return load_clip(source, device)
    if metric == "dino_mmd":
        return load_dino_cls(source, device)
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRIC_NAMES}")


def file_digest(path: Path) -> str:
    """The first 16 hex digits of the file's sha256 (the 91 MiB Inception file: a fraction of a second)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def directory_identity(path: Path) -> str:
    """A transformers model directory's identity: its config.json's sha256 and its weight files' names
    and sizes (hashing 1.2 GB of ViT-L weights each run would cost seconds for little gain)."""
    weights = sorted((p.name, p.stat().st_size) for p in path.iterdir()
                     if p.suffix in (".safetensors", ".bin"))
    payload = json.dumps({"config": hashlib.sha256((path / "config.json").read_bytes()).hexdigest(),
                          "weights": weights}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_inception(source: str, device: torch.device) -> FeatureNet:
    path = Path(source).expanduser()
    how = (f"on a machine with network, download {INCEPTION_URLS[0]} (or {INCEPTION_URLS[1]}; a plain "
           "state dict, 91 MiB), copy it here and set --set eval.inception=/path/to/that/file")
    if not path.is_file():
        raise FeatureNetMissing(f"FID Inception weights {str(path)!r} not found: {how}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, no arbitrary objects
        model = FidInceptionV3()
        load_fid_inception_state(model, state)
    except (pickle.UnpicklingError, RuntimeError, KeyError, OSError, AttributeError) as err:
        raise FeatureNetMissing(f"FID Inception weights {str(path)!r} are not the FID Inception-v3 "
                                f"state dict ({err}); {how}") from None
    model = model.eval().requires_grad_(False).to(device)
    identity = f"fid-inception-v3:sha256={file_digest(path)}:{PREPROCESSING['fid']}"
    return FeatureNet("fid", POOL3_DIM, identity, model)


def clip_preprocess(images: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> CLIP pixel values (B, 3, size, size) fp32, as CLIPImageProcessor (PIL backend).

    PIL resizes in two passes, width then height, each rounded to uint8; torch's antialiased bicubic
    uses PIL's kernel (a = -0.5, support scaled on downsampling), so the same two rounded passes give
    PIL's pixels up to ties of PIL's fixed-point rounding: for square inputs about 0.05% of pixels
    off by one level, for 55 of 60 random sizes from 200 to 1100 px under 1.5% off by at most two.
    For the other 5, all portrait, Pillow 13 takes the height pass first (its choice is
    undocumented) and a fifth to a third of the pixels differ, by up to about 20 levels. New size as
    transformers': short side = size, long side = int(size * long / short); centre crop at offset
    (dim - size) // 2.
    """
    height, width = images.shape[-2:]
    short, long = min(height, width), max(height, width)
    new_long = int(size * long / short)
    new_height, new_width = (size, new_long) if height <= width else (new_long, size)
    x = images.float()
    for target in ((height, new_width), (new_height, new_width)):
        if tuple(x.shape[-2:]) != target:
            x = F.interpolate(x, size=target, mode="bicubic", antialias=True, align_corners=False)
            x = (x + 0.5).floor().clamp(0.0, 255.0)  # PIL rounds halves up, then clips to uint8
    top, left = (new_height - size) // 2, (new_width - size) // 2
    x = x[..., top:top + size, left:left + size]
    return (x / 255.0 - mean) / std


def load_clip(source: str, device: torch.device) -> FeatureNet:
    from transformers import CLIPVisionModelWithProjection

    path = resolve_pretrained(source, "CMMD feature net (CLIP)", "eval.clip", FeatureNetMissing)
    try:  # a full CLIPModel checkpoint (openai/clip-vit-large-patch14-336) loads its vision half
        model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise FeatureNetMissing(f"CMMD feature net (CLIP) {source!r}: no loadable CLIP vision weights in "
                                f"{path} ({err}); set --set eval.clip=/path/to/dir") from None
    model = model.eval().requires_grad_(False).to(device)
    size = int(model.config.image_size)  # 336 for ViT-L/14-336: both the shortest edge and the crop
    mean = torch.tensor(CLIP_MEAN, device=device).reshape(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).reshape(1, 3, 1, 1)

    def embed(images: torch.Tensor) -> torch.Tensor:
        pixels = clip_preprocess(images, size, mean, std)
        return F.normalize(model(pixel_values=pixels).image_embeds.float(), dim=-1)

    identity = f"clip:{directory_identity(path)}:{size}:{PREPROCESSING['cmmd']}"
    return FeatureNet("cmmd", int(model.visual_projection.out_features), identity, embed)


def load_dino_cls(source: str, device: torch.device) -> FeatureNet:
    path = resolve_pretrained(source, "DINO-MMD feature net", "eval.dino", FeatureNetMissing)
    try:
        dino = load_dino(str(path), device, torch.float32, what="DINO-MMD feature net", option="eval.dino")
    except TeacherMissing as err:
        raise FeatureNetMissing(str(err)) from None
    mean = torch.tensor(IMAGENET_MEAN, device=device).reshape(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).reshape(1, 3, 1, 1)

    def embed(images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.float() / 255.0, size=(DINO_SIZE, DINO_SIZE), mode="bicubic", align_corners=False)
        cls = dino.model(pixel_values=(x - mean) / std).last_hidden_state[:, 0]  # after the final LayerNorm
        return F.normalize(cls.float(), dim=-1)

    identity = f"dino:{directory_identity(path)}:{PREPROCESSING['dino_mmd']}"
    return FeatureNet("dino_mmd", dino.hidden_size, identity, embed)
