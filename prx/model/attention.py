"""Attention of image queries over [text keys; image keys], and 2-D rotary position embedding.

Padded text keys are excluded once per forward, never with a (B, heads, L, L) mask per block:
`KeyPadding.build` turns the text mask into whatever the chosen backend needs (nothing without a
text mask; a (B, 1, 1, L) boolean mask that broadcasts over heads and queries for
SDPA; packed keys with cumulative lengths for FlashAttention's variable-length kernel) and every
block reuses it. Masked SDPA calls on a GPU never have a key count of 64 mod 128: see
`cudnn_safe_key_count` (pytorch issue 196678).

Backends: FlashAttention 3 (`flash_attn_interface`) or 2 (`flash_attn`) when importable on a
GPU, else PyTorch SDPA with cuDNN preferred (docs/recipe.md section 9: cuDNN 1.6 ms vs 2.4 ms for the
FlashAttention-2 backend at the 1024 px shape), and a plain `math` version used as a reference.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def _import_flash_varlen():
    """FlashAttention's variable-length function, FA3 first; None when neither is installed."""
    for module_name in ("flash_attn_interface", "flash_attn"):
        try:
            return importlib.import_module(module_name).flash_attn_varlen_func
        except (ImportError, AttributeError):
            continue
    return None


_FLASH_VARLEN = _import_flash_varlen()
_CUDA_SDPA_ORDER = [
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
]
CUDNN_KEY_TILE = 128  # cuDNN's SDPA backward walks the keys in 128-wide tiles (pytorch issue 196678)
CUDNN_BAD_REMAINDER = 64  # the one key count mod 128 that gives NaN there


def cudnn_safe_key_count(num_keys: int) -> int:
    """The key count a masked cuDNN SDPA call runs with: `num_keys`, or the next multiple of 128
    when `num_keys` is 64 mod 128 (the extra keys are zeros and masked out).

    pytorch issue 196678 (torch 2.11 and later, H100 and H200, cuDNN SDPA, which we prefer on a
    GPU): with an `attn_mask` passed (an all-True one too) and a key count of 64 mod 128 (64, 192,
    320, ..., 1088), the backward's query gradient is NaN for a query row whose log-sum-exp is
    below -88.7. That threshold is -ln(FLT_MAX): our reading is that the empty half of the last
    128-wide key tile is scored 0 instead of -inf, exp(0 - lse) overflows, and inf * 0 gives NaN
    (not verified on a GPU here; the GPU test reproduces the case). Multiples of 128 and every other
    remainder tested there are clean, so only that remainder moves, by 64 keys. Our key count is
    the padded caption (a multiple of 16) + the image tokens of the block (256 or 1024 at the
    square sizes, 128 or 512 inside the TREAD span), so a padded caption of 64 or 192 tokens hits
    it in every block; aspect buckets and other routing shares give other counts, and applying
    the rule per call covers them all. Cost: README, "Attention" (under Kernels).
    """
    if num_keys % CUDNN_KEY_TILE == CUDNN_BAD_REMAINDER:
        return num_keys + CUDNN_KEY_TILE - CUDNN_BAD_REMAINDER
    return num_keys


def resolve_backend(name: str, device: torch.device) -> str:
    """'auto' -> 'flash' when FlashAttention is importable on a GPU, else 'sdpa'."""
    if name == "flash" and (_FLASH_VARLEN is None or device.type != "cuda"):
        raise RuntimeError(
            "model.attention=flash needs a CUDA device and the flash_attn (FA2) or "
            "flash_attn_interface (FA3) package; use model.attention=sdpa instead"
        )
    if name == "auto":
        return "flash" if (_FLASH_VARLEN is not None and device.type == "cuda") else "sdpa"
    return name


@dataclass
class KeyPadding:
    """Which of the T + N keys ([text; image]) are real, in the form the backend needs."""

    backend: str
    key_valid: torch.Tensor | None = None  # (B, T + N) bool; None: every key is real
    sdpa_mask: torch.Tensor | None = None  # (B, 1, 1, T + N + extra_keys) bool, True = attend
    packed_index: torch.Tensor | None = None  # flash: positions of real keys in (B * (T + N))
    cu_seqlens_k: torch.Tensor | None = None  # flash: int32 (B + 1,)
    max_seqlen_k: int = 0
    extra_keys: int = 0  # sdpa: masked zero keys `attention` appends (`cudnn_safe_key_count`)

    @staticmethod
    def build(text_mask: torch.Tensor | None, num_image_tokens: int, backend: str,
              cudnn_rule: bool | None = None) -> "KeyPadding":
        """`cudnn_rule`: apply `cudnn_safe_key_count`; None = where cuDNN can run, an SDPA mask on a
        GPU (flash varlen, math and CPU SDPA are unaffected); True forces it (tests on CPU)."""
        if text_mask is None:  # no mask, no bug: cuDNN without attn_mask is clean
            return KeyPadding(backend)
        b = text_mask.shape[0]
        image_valid = text_mask.new_ones(b, num_image_tokens, dtype=torch.bool)
        key_valid = torch.cat([text_mask.bool(), image_valid], dim=1)
        if backend == "flash":
            lengths = key_valid.sum(1, dtype=torch.int32)
            cu = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
            return KeyPadding(backend, key_valid,
                              packed_index=key_valid.flatten().nonzero().squeeze(1),
                              cu_seqlens_k=cu, max_seqlen_k=int(lengths.max()))
        if cudnn_rule is None:
            cudnn_rule = backend == "sdpa" and text_mask.is_cuda
        num_keys = key_valid.shape[1]
        extra = cudnn_safe_key_count(num_keys) - num_keys if cudnn_rule else 0
        mask = F.pad(key_valid, (0, extra), value=False) if extra else key_valid
        return KeyPadding(backend, key_valid, sdpa_mask=mask[:, None, None, :], extra_keys=extra)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad: KeyPadding) -> torch.Tensor:
    """q (B, N, H, D) over k, v (B, L, H, D) -> (B, N, H, D); scale 1/sqrt(D), no causal mask."""
    if pad.backend == "flash":
        return _flash_attention(q, k, v, pad)
    if pad.extra_keys:  # zero keys at the end, masked out by pad.sdpa_mask: k, v (B, L + extra, H, D)
        k, v = (F.pad(x, (0, 0, 0, 0, 0, pad.extra_keys)) for x in (k, v))
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # (B, H, L, D)
    if pad.backend == "math":
        return math_attention(qh, kh, vh, pad.sdpa_mask).transpose(1, 2)
    if q.is_cuda:
        with sdpa_kernel(_CUDA_SDPA_ORDER, set_priority=True):
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=pad.sdpa_mask)
    else:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=pad.sdpa_mask)
    return out.transpose(1, 2)


def math_attention(q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
    """Reference attention on (B, H, L, D) in fp32; mask True = attend."""
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def _flash_attention(q, k, v, pad: KeyPadding) -> torch.Tensor:
    b, n, h, d = q.shape
    cu_q = torch.arange(0, (b + 1) * n, n, device=q.device, dtype=torch.int32)
    if pad.packed_index is None:  # nothing padded: every sample has L keys
        length = k.shape[1]
        cu_k = torch.arange(0, (b + 1) * length, length, device=q.device, dtype=torch.int32)
        k_packed, v_packed, max_k = k.reshape(-1, h, d), v.reshape(-1, h, d), length
    else:
        k_packed = k.reshape(-1, h, d).index_select(0, pad.packed_index)
        v_packed = v.reshape(-1, h, d).index_select(0, pad.packed_index)
        cu_k, max_k = pad.cu_seqlens_k, pad.max_seqlen_k
    out = _FLASH_VARLEN(q.reshape(-1, h, d), k_packed, v_packed, cu_q, cu_k, n, max_k)
    if isinstance(out, tuple):  # some FA3 builds also return the log-sum-exp
        out = out[0]
    return out.reshape(b, n, h, d)


# ----------------------------------------------------------------------------- rotary embedding


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """The dtype for numerically sensitive parts: fp32 for bf16/fp16/fp32, fp64 stays fp64."""
    return torch.promote_types(dtype, torch.float32)


def grid_positions(grid_h: int, grid_w: int, device=None) -> torch.Tensor:
    """(N, 2) float64 (row, column) of each patch, tokens in row-major order."""
    rows = torch.arange(grid_h, device=device, dtype=torch.float64)
    cols = torch.arange(grid_w, device=device, dtype=torch.float64)
    return torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """(..., 2) positions -> (..., head_dim / 2) rotation angles, one per pair of dims.

    The first half of the head dim rotates by the row, the second half by the column; each
    half of d = head_dim / 2 dims has d / 2 pairs with frequencies 1 / theta^(2k / d).
    """
    half = head_dim // 2
    freqs = theta ** (-torch.arange(0, half, 2, device=positions.device, dtype=positions.dtype) / half)
    return torch.cat([positions[..., :1] * freqs, positions[..., 1:2] * freqs], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2i, 2i+1) of x (B, N, H, D) by angles with cos/sin (B|1, N, 1, D/2).

    Computed in fp32 (or x's dtype if wider), returned in x's dtype.
    """
    pairs = x.to(at_least_fp32(x.dtype)).unflatten(-1, (-1, 2))
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)
