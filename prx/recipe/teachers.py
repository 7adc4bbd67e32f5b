"""Frozen DINO encoders: the REPA teacher (docs/recipe.md section 4) and the DINO perceptual loss (section 5).

`load_dino` loads DINOv2 (with or without registers) or DINOv3 ViT weights in the transformers
format, from a directory or the Hugging Face cache, never from the network; a missing model
raises `TeacherMissing` with a message that says how to get it. `FrozenDino.patch_tokens` maps
images in [0, 1] to the patch tokens after the final LayerNorm, CLS and register tokens dropped.

`FrozenDino` is deliberately not an `nn.Module`: stored as an attribute of a module, its weights
are not registered, so they stay out of state_dict (checkpoints), `.parameters()` (the
optimizer), `.train()` (DINOv3 jitters its RoPE coordinates in training mode), FSDP and `.to()`.
Its weights never require grad; gradients can still flow through it to its input (the DINO
perceptual loss on x-hat).
"""

from __future__ import annotations

import torch

from prx.hub import PretrainedMissing, resolve_pretrained

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# transformers model types whose last_hidden_state is [CLS, registers..., patches...] after the final norm
DINO_MODEL_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit")


class TeacherMissing(PretrainedMissing):
    """A DINO teacher named by the config is not on this machine (or is not a DINO model)."""


def images_to_01(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> x / 255; float images are taken as [-1, 1] (the trainer's range) -> (x + 1) / 2,
    clamped to [0, 1] (an x-prediction can overshoot). fp32; differentiable for float input."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return ((images.float() + 1.0) * 0.5).clamp(0.0, 1.0)


def teacher_input_size(grid: tuple[int, int], teacher_patch: int) -> tuple[int, int]:
    """(H, W) in pixels that gives the teacher the token grid (rows, cols) of the denoiser.

    512 px at patch 32 is a 16 x 16 grid -> 256 x 256 for a patch-16 teacher, 224 x 224 for
    patch 14; an aspect bucket's (rows, cols) maps the same way per axis.
    """
    rows, cols = grid
    return rows * teacher_patch, cols * teacher_patch


class FrozenDino:
    """A frozen DINO ViT in eval mode: images in [0, 1] -> patch tokens (B, h * w, hidden_size)."""

    def __init__(self, model: torch.nn.Module, name: str):
        config = model.config
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.patch_size = int(config.patch_size)
        self.hidden_size = int(config.hidden_size)
        self.num_registers = int(getattr(config, "num_register_tokens", 0))
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).reshape(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).reshape(1, 3, 1, 1)

    def patch_tokens(self, images01: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1], H and W multiples of the patch -> (B, (H/p) * (W/p), D) row-major,
        in the teacher's dtype. Not under no_grad: callers choose (the DINO loss needs the graph)."""
        height, width = images01.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"{self.name}: input {height}x{width} is not a multiple of the patch {self.patch_size}")
        # normalise in fp32, then round once to the teacher's dtype
        pixels = ((images01.float() - self._mean) / self._std).to(self.dtype)
        hidden = self.model(pixel_values=pixels).last_hidden_state  # final LayerNorm applied
        return hidden[:, 1 + self.num_registers:]

    def __repr__(self) -> str:
        return (f"FrozenDino({self.name}, patch {self.patch_size}, hidden {self.hidden_size}, "
                f"{self.num_registers} registers, {self.dtype}, {self.device})")


def load_dino(name_or_path: str, device: torch.device | str, dtype: torch.dtype | None = None, *,
              what: str = "REPA teacher", option: str = "repa.teacher") -> FrozenDino:
    """Load a DINO ViT from a directory or the HF cache, frozen, on `device`.

    dtype: default bf16 on CUDA, fp32 elsewhere. what / option: how an error names the model and
    the config field that picks it (the DINO loss passes "DINO perceptual teacher",
    "perceptual.dino_teacher").
    """
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the run has its own progress display
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = resolve_pretrained(name_or_path, what, option, TeacherMissing)
    how = f"set --set {option}=/path/to/dir (a transformers DINOv2/DINOv3 save_pretrained directory)"
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise TeacherMissing(f"{what} {name_or_path!r}: cannot read {path}/config.json ({err}); {how}") from None
    if config.model_type not in DINO_MODEL_TYPES:
        raise TeacherMissing(f"{what} {name_or_path!r} is a {config.model_type!r} model, not one of "
                             f"{DINO_MODEL_TYPES}; {how}")
    try:
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
    except OSError as err:  # config present, weights missing or unreadable
        raise TeacherMissing(f"{what} {name_or_path!r}: no loadable weights in {path} ({err}); {how}") from None
    return FrozenDino(model.to(device), str(name_or_path))
