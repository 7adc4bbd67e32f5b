"""The PRX denoiser (docs/recipe.md section 1): a single-stream DiT in pixel space that predicts x.

Only image tokens flow through the blocks; text is projected once (`txt_in`) and each block
turns it into keys and values that image queries attend to, text first. The model works in
patch layout (B, L, 3*p*p) (see `kernels.ref.patchify`), so that data loading, noising and the
loss can stay in that layout and never round-trip through images.

Shapes of PRX small: hidden 1792, 16 blocks, 28 heads of 64, MLP 6272, patch 32;
1,177,215,744 parameters with the 2304-wide T5Gemma-2B text context.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from prx.config import ModelConfig
from prx.model import liger
from prx.model.attention import (
    KeyPadding,
    apply_rope,
    at_least_fp32,
    attention,
    grid_positions,
    resolve_backend,
    rope_angles,
)
from prx.model.tread import TokenRoute

NORM_EPS = 1e-6
RESOLUTION_SINUSOID_DIM = 256  # 128 for the height, 128 for the width (diffusers' PRXResolutionEmbedder)


def sinusoid(x: torch.Tensor, dim: int, scale: float = 1.0, max_period: float = 10000.0) -> torch.Tensor:
    """[cos, sin] of scale * x at dim / 2 geometric frequencies, (B,) -> (B, dim), at least fp32."""
    half = dim // 2
    dtype = at_least_fp32(x.dtype)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=dtype) / half)
    args = scale * x.to(dtype)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The timestep's sinusoid: of 1000 t, so that t in [0, 1] spans the frequencies as steps 0..1000 do."""
    return sinusoid(t, dim, scale=1000.0)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def layer_norm(x: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """LayerNorm without affine parameters (the modulation supplies shift and scale)."""
    if fused:
        return liger.layer_norm(x, NORM_EPS)
    return F.layer_norm(x, (x.shape[-1],), eps=NORM_EPS)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in fp32, with a learnable scale (init 1)."""

    def __init__(self, dim: int, fused: bool = False):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.fused = fused  # Liger-Kernel's RMSNorm (model.fused_ops=liger)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return liger.rms_norm(x, self.scale, NORM_EPS)
        wide = at_least_fp32(x.dtype)
        normed = F.rms_norm(x.to(wide), (x.shape[-1],), eps=NORM_EPS)
        return (normed * self.scale.to(wide)).to(x.dtype)


class PatchEmbedding(nn.Module):
    """JiT bottleneck: Linear(3*p*p -> bottleneck) then Linear(bottleneck -> hidden), no activation."""

    def __init__(self, patch_dim: int, bottleneck_dim: int, hidden_dim: int):
        super().__init__()
        self.down = nn.Linear(patch_dim, bottleneck_dim)
        self.up = nn.Linear(bottleneck_dim, hidden_dim)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(patches))


class TimestepEmbedding(nn.Module):
    def __init__(self, sinusoid_dim: int, hidden_dim: int):
        super().__init__()
        self.sinusoid_dim = sinusoid_dim
        self.fc1 = nn.Linear(sinusoid_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        sinusoid = timestep_sinusoid(t, self.sinusoid_dim).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(sinusoid)))


class ResolutionEmbedding(nn.Module):
    """Resolution-aware conditioning (model.resolution_embeds; the "vec" mode of PRX-7B, as diffusers'
    PRXResolutionEmbedder): sinusoids of the image height and width in pixels, 128 wide each, through
    a 2-layer MLP, added to the timestep embedding, so every modulation knows the size it draws at."""

    def __init__(self, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(RESOLUTION_SINUSOID_DIM, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, height: int, width: int) -> torch.Tensor:
        """(1, hidden): one size for the whole batch (a batch is one bucket), broadcast over it."""
        weight = self.fc1.weight
        sizes = torch.tensor([height, width], device=weight.device, dtype=at_least_fp32(weight.dtype))
        wave = sinusoid(sizes, RESOLUTION_SINUSOID_DIM // 2).reshape(1, -1)  # [cos h, sin h, cos w, sin w]
        return self.fc2(F.silu(self.fc1(wave.to(self.fc1.weight.dtype))))


class Attention(nn.Module):
    """Image queries over [text keys; image keys]; RoPE on image q and k; QK RMS norm."""

    def __init__(self, hidden_dim: int, num_heads: int, fused: bool = False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_dim // num_heads
        self.qkv = nn.Linear(hidden_dim, 3 * hidden_dim, bias=False)  # rows: q, k, v; heads major
        self.q_norm = RMSNorm(head_dim, fused)
        self.k_norm = RMSNorm(head_dim, fused)
        self.text_kv = nn.Linear(hidden_dim, 2 * hidden_dim, bias=False)  # rows: k, v
        self.text_k_norm = RMSNorm(head_dim, fused)
        self.out = nn.Linear(hidden_dim, hidden_dim, bias=False)

    def forward(self, x, text, rope_cos, rope_sin, pad: KeyPadding) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).unflatten(-1, (3, self.num_heads, -1)).unbind(2)  # (B, N, H, D)
        q = apply_rope(self.q_norm(q), rope_cos, rope_sin)
        k = apply_rope(self.k_norm(k), rope_cos, rope_sin)
        text_k, text_v = self.text_kv(text).unflatten(-1, (2, self.num_heads, -1)).unbind(2)
        text_k = self.text_k_norm(text_k)
        out = attention(q, torch.cat([text_k, k], dim=1), torch.cat([text_v, v], dim=1), pad)
        return self.out(out.reshape(b, n, -1))


class GatedMLP(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden_dim: int, mlp_hidden_dim: int, fused: bool = False):
        super().__init__()
        self.gate = nn.Linear(hidden_dim, mlp_hidden_dim, bias=False)
        self.up = nn.Linear(hidden_dim, mlp_hidden_dim, bias=False)
        self.down = nn.Linear(mlp_hidden_dim, hidden_dim, bias=False)
        self.fused = fused  # Liger-Kernel's GeGLU (model.fused_ops=liger)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.down(liger.geglu(self.gate(x), self.up(x)))
        return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))


class PRXBlock(nn.Module):
    """adaLN-Zero block: modulated attention then modulated gated MLP, each with a gated residual."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_dim
        self.fused = cfg.fused_ops == "liger"
        self.modulation = nn.Linear(h, 6 * h)  # shift, scale, gate (attention), then (MLP)
        self.attn = Attention(h, cfg.num_heads, self.fused)
        self.mlp = GatedMLP(h, cfg.mlp_hidden_dim, self.fused)

    def forward(self, img, text, cond, rope_cos, rope_sin, pad: KeyPadding) -> torch.Tensor:
        """img (B, N, h); text (B, T, h); cond = SiLU(timestep embedding) (B, h)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond)[:, None].chunk(6, dim=-1)
        attn = self.attn(modulate(layer_norm(img, self.fused), shift1, scale1), text, rope_cos, rope_sin, pad)
        img = img + gate1 * attn
        img = img + gate2 * self.mlp(modulate(layer_norm(img, self.fused), shift2, scale2))
        return img


class FinalLayer(nn.Module):
    def __init__(self, hidden_dim: int, patch_dim: int, fused: bool = False):
        super().__init__()
        self.modulation = nn.Linear(hidden_dim, 2 * hidden_dim)  # shift, scale
        self.linear = nn.Linear(hidden_dim, patch_dim)
        self.fused = fused  # the blocks' LayerNorm choice (model.fused_ops=liger)

    def forward(self, img: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.modulation(cond)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(layer_norm(img, self.fused), shift, scale))


class PRXOutput(NamedTuple):
    """What the denoiser returns, with or without a captured hidden state."""

    x_hat: torch.Tensor  # predicted clean patches (B, N, 3*p*p)
    # the hidden state after block `capture`, through the REPA projector when the model has one:
    # (B, K, ...) if the block is inside the TREAD route's span, else (B, N, ...); None without capture
    captured: torch.Tensor | None = None


class PRX(nn.Module):
    """x-prediction denoiser: (noisy patches, t, text) -> predicted clean patches."""

    def __init__(self, cfg: ModelConfig, repa_projector: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_dim
        self.img_in = PatchEmbedding(cfg.patch_dim, cfg.bottleneck_dim, h)
        self.time_in = TimestepEmbedding(cfg.time_embed_dim, h)
        self.txt_in = nn.Linear(cfg.text_dim, h)
        self.resolution_in = ResolutionEmbedding(h) if cfg.resolution_embeds else None
        self.blocks = nn.ModuleList(PRXBlock(cfg) for _ in range(cfg.depth))
        self.final = FinalLayer(h, cfg.patch_dim, cfg.fused_ops == "liger")
        # REPA (docs/recipe.md section 4): trained with the denoiser, so it lives here and shares its data
        # parallelism, optimizer and checkpoints; it maps the `capture`d hidden state. Sampling
        # never uses it.
        self.repa_projector = repa_projector
        self.reset_zero_init()

    def reset_zero_init(self) -> None:
        """adaLN-Zero: every modulation and the output projection start at zero, so the
        untrained network predicts x-hat = 0 and each block starts as the identity."""
        zero = [blk.modulation for blk in self.blocks] + [self.final.modulation, self.final.linear]
        for linear in zero:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def rope_tables(self, grid_h: int, grid_w: int, device, dtype=torch.float32):
        """cos, sin of shape (1, N, 1, head_dim / 2) for a grid of patches (angles in fp64)."""
        angles = rope_angles(grid_positions(grid_h, grid_w, device), self.cfg.head_dim, self.cfg.rope_theta)
        return angles.cos().to(dtype)[None, :, None], angles.sin().to(dtype)[None, :, None]

    def conditioning(self, t: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """vec (B, hidden): the timestep embedding, plus the image size's with model.resolution_embeds."""
        vec = self.time_in(t)
        if self.resolution_in is not None:
            p = self.cfg.patch_size
            vec = vec + self.resolution_in(grid[0] * p, grid[1] * p)
        return vec

    def forward(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None,
        grid: tuple[int, int],
        route: TokenRoute | None = None,
        capture: int | None = None,
    ) -> PRXOutput:
        """x_t (B, N, 3*p*p) noisy patches, t (B,), text (B, T, text_dim), text_mask (B, T) bool
        (True = real token; None = all real), grid = (rows, columns) of patches with N = rows*cols.
        Returns x-hat in the same patch layout, and the captured hidden state (`PRXOutput`).

        `route` (TREAD): only the route's kept tokens run blocks route.start..route.end, with
        their own positions; the others skip them unchanged. `capture`: also return the hidden
        state after that block (REPA), through the REPA projector when the model has one.
        """
        if x_t.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"{x_t.shape[1]} tokens do not fill a {grid[0]}x{grid[1]} patch grid")
        img = self.img_in(x_t)
        cond = F.silu(self.conditioning(t, grid))  # every modulation reads SiLU(vec); compute it once
        txt = self.txt_in(text)
        backend = resolve_backend(self.cfg.attention, x_t.device)
        rope = self.rope_tables(*grid, x_t.device, at_least_fp32(x_t.dtype))
        pad = KeyPadding.build(text_mask, img.shape[1], backend)
        dense = (img, rope, pad)
        hidden = None
        for i, block in enumerate(self.blocks):
            if route is not None and i == route.start:  # the routed tokens wait here
                full = img
                img = route.gather(img)
                rope = tuple(route.gather_table(table) for table in rope)
                pad = KeyPadding.build(text_mask, img.shape[1], backend)
            img = block(img, txt, cond, *rope, pad)
            if i == capture:
                hidden = img
            if route is not None and i == route.end:  # and rejoin, unchanged
                img = route.scatter(img, full)
                _, rope, pad = dense
        x_hat = self.final(img, cond)
        if hidden is not None and self.repa_projector is not None:
            hidden = self.repa_projector(hidden)
        return PRXOutput(x_hat, hidden)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def training_flops_per_image(cfg: ModelConfig, image_tokens: int, text_tokens: int, routed_blocks: int = 0,
                             kept_tokens: int | None = None) -> float:
    """Matmul FLOPs of one image through forward and backward (3x forward).

    PRX small at 1024 px (1024 tokens) with 256 text tokens: 5.23 TFLOP, as docs/recipe.md section 9.
    With TREAD, `routed_blocks` of the blocks see only `kept_tokens` image tokens: the work the
    step really does (MFU then credits no FLOP that routing skipped).
    """
    h, t, m = cfg.hidden_dim, text_tokens, cfg.mlp_hidden_dim

    def per_block(n: int) -> int:
        return (
            2 * n * h * 3 * h  # qkv
            + 2 * n * h * h  # attention output
            + 2 * n * 3 * h * m  # gate, up, down
            + 2 * t * h * 2 * h  # text keys and values
            + 2 * 2 * n * (t + n) * h  # scores and weighted values over [text; image] keys
        )

    n = image_tokens
    kept = n if kept_tokens is None else kept_tokens
    blocks = (cfg.depth - routed_blocks) * per_block(n) + routed_blocks * per_block(kept)
    outside = 2 * n * (cfg.patch_dim * cfg.bottleneck_dim + cfg.bottleneck_dim * h + h * cfg.patch_dim)
    outside += 2 * t * cfg.text_dim * h
    return 3.0 * (blocks + outside)
