"""Tiny random DINO teachers in the transformers formats of the real ones, for CPU tests.

Same layout as facebook/dinov2-with-registers-* and facebook/dinov3-vit*-pretrain-lvd1689m
(CLS, 4 registers, patch tokens, final LayerNorm), at hidden 32, 2 layers, 2 heads.
"""

import torch

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_register_tokens=4)


def tiny_dino(kind: str, seed: int = 0):
    """A random model: kind "v2" (Dinov2WithRegistersModel, patch 14) or "v3" (DINOv3ViTModel, patch 16)."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel, DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(seed)
    if kind == "v2":
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(patch_size=14, image_size=56, mlp_ratio=2, **TINY))
    else:
        model = DINOv3ViTModel(DINOv3ViTConfig(patch_size=16, image_size=64, intermediate_size=64, **TINY))
    with torch.no_grad():  # make the final LayerNorm's affine visible in the tokens (init is 1, 0)
        norm = model.layernorm if kind == "v2" else model.norm
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0.0, 0.1)
    return model.eval()


def save_tiny_dino(kind: str, path, seed: int = 0):
    """Write a tiny teacher with save_pretrained to `path`; returns the in-memory model."""
    model = tiny_dino(kind, seed)
    model.save_pretrained(path)
    return model


def fake_hub_cache(cache_dir, repo_id: str, kind: str, seed: int = 0):
    """Lay out `repo_id` in the Hugging Face cache format under cache_dir (the $HF_HUB_CACHE folder)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    model = save_tiny_dino(kind, repo / "snapshots" / commit, seed)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return model
