"""Fused masked cosine alignment (REPA and the DINO perceptual loss; docs/recipe.md sections 4, 5).

cos(a, b) = a.b / (max(|a|, eps) max(|b|, eps)) per token of (B, N, D), weighted by a mask and
summed per sample. Forward: one pass over a and b (+8 B per token with grad: the two factors of
the gradient); backward: one pass reading a, b and writing dL/da. Reductions across programs go
through per-program partial sums (deterministic, no atomics). At REPA's shape (32 x 128 kept
tokens x 1024 channels, bf16) the forward reads 17 MB.

Limits: no gradient to b (the teacher or target features; asking for one raises); no double
backward; a non-dense last dim is copied.

Registered as a `torch.library.custom_op` (why not `triton_op`: kernels/launch.py). Tuned on:
nothing yet (no GPU was lent when this was written); bench/bench_losses.py measures it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import check_pair, needs_grad

Tensor = torch.Tensor


# ============================================================================ layer 1: kernels


@triton.jit
def _cosine_fwd_kernel(
    a_ptr, b_ptr, mask_ptr, partials_ptr, stats_ptr,
    N, D, n_blocks,
    stride_ab, stride_an, stride_bb, stride_bn,
    eps,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, SAVE_STATS: tl.constexpr,
):
    """partials[s, blk] = sum over the block's tokens of mask * cos(a, b)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    a_base = a_ptr + pid_s.to(tl.int64) * stride_ab + rows[:, None].to(tl.int64) * stride_an
    b_base = b_ptr + pid_s.to(tl.int64) * stride_bb + rows[:, None].to(tl.int64) * stride_bn
    aa = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    bb = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    ab = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        a = tl.load(a_base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        aa += a * a
        bb += b * b
        ab += a * b
    norm_a = tl.sqrt(tl.sum(aa, axis=1))
    inv_a = 1.0 / tl.maximum(norm_a, eps)
    inv_b = 1.0 / tl.maximum(tl.sqrt(tl.sum(bb, axis=1)), eps)
    cos = tl.sum(ab, axis=1) * inv_a * inv_b
    offs = pid_s.to(tl.int64) * N + rows
    if HAS_MASK:
        weight = tl.load(mask_ptr + offs, mask=row_mask, other=0.0).to(tl.float32)
    else:
        weight = tl.where(row_mask, 1.0, 0.0)
    tl.store(partials_ptr + pid_s * n_blocks + pid_n, tl.sum(weight * cos, axis=0))
    if SAVE_STATS:
        # dcos/da_k = b_k / (|a|' |b|') - a_k cos / |a|'^2 (the second term only where |a| > eps).
        stat_offs = pid_s.to(tl.int64) * 2 * N + rows  # stats: (B, 2, N)
        tl.store(stats_ptr + stat_offs, inv_a * inv_b, mask=row_mask)
        tl.store(stats_ptr + N + stat_offs, tl.where(norm_a > eps, cos * inv_a * inv_a, 0.0), mask=row_mask)


@triton.jit
def _cosine_bwd_kernel(
    a_ptr, b_ptr, mask_ptr, stats_ptr, g_ptr, grad_ptr,
    N, D,
    stride_ab, stride_an, stride_bb, stride_bn, stride_gb, stride_gn,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """grad[s, n, k] = g[s] mask[s, n] (b_k r1 - a_k r2) with r1, r2 from the forward."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    g = tl.load(g_ptr + pid_s).to(tl.float32)
    if HAS_MASK:
        g = g * tl.load(mask_ptr + pid_s.to(tl.int64) * N + rows, mask=row_mask, other=0.0).to(tl.float32)
    stat_offs = pid_s.to(tl.int64) * 2 * N + rows  # stats: (B, 2, N)
    r1 = (g * tl.load(stats_ptr + stat_offs, mask=row_mask, other=0.0))[:, None]
    r2 = (g * tl.load(stats_ptr + N + stat_offs, mask=row_mask, other=0.0))[:, None]
    a_base = a_ptr + pid_s.to(tl.int64) * stride_ab + rows[:, None].to(tl.int64) * stride_an
    b_base = b_ptr + pid_s.to(tl.int64) * stride_bb + rows[:, None].to(tl.int64) * stride_bn
    g_base = grad_ptr + pid_s.to(tl.int64) * stride_gb + rows[:, None].to(tl.int64) * stride_gn
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        a = tl.load(a_base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        grad = b * r1 - a * r2
        tl.store(g_base + cols[None, :], grad.to(grad_ptr.dtype.element_ty), mask=mask)


# ============================================================================ layer 2: launchers

def _tokens(name: str, x: Tensor) -> Tensor:
    if x.dim() != 3:
        raise ValueError(f"{name}: expected (B, N, D), got {tuple(x.shape)}")
    return x if x.stride(2) == 1 else x.contiguous()


def _cosine_blocks(d: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_D, warps)."""
    block_d = min(256, triton.next_power_of_2(d))
    return max(1, 1024 // block_d), block_d, 4


def _cosine_mask(mask: Tensor | None, a: Tensor) -> Tensor | None:
    if mask is None:
        return None
    if mask.shape != a.shape[:2]:
        raise ValueError(f"cosine_alignment: mask of shape {tuple(mask.shape)}, expected {tuple(a.shape[:2])}")
    return mask.to(device=a.device, dtype=torch.float32).contiguous()


def launch_cosine_forward(a: Tensor, b: Tensor, mask: Tensor | None, eps: float,
                      save_stats: bool) -> tuple[Tensor, Tensor]:
    """((B,) sum over tokens of mask * cos(a, b), (B, 2, N) fp32 stats or an empty tensor)."""
    check_pair("cosine_alignment", a, b)
    a, b = _tokens("cosine_alignment a", a), _tokens("cosine_alignment b", b)
    n_samples, n, d = a.shape
    m = _cosine_mask(mask, a)
    block_n, block_d, warps = _cosine_blocks(d)
    n_blocks = triton.cdiv(n, block_n)
    partials = torch.empty(n_samples, n_blocks, device=a.device, dtype=torch.float32)
    stats = torch.empty((n_samples, 2, n) if save_stats else (0,), device=a.device, dtype=torch.float32)
    _cosine_fwd_kernel[(n_blocks, n_samples)](
        a, b, m if m is not None else partials, partials, stats, n, d, n_blocks,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), eps,
        BLOCK_N=block_n, BLOCK_D=block_d, HAS_MASK=m is not None, SAVE_STATS=save_stats,
        num_warps=warps,
    )
    return partials.sum(1), stats


def launch_cosine_backward(a: Tensor, b: Tensor, mask: Tensor | None, stats: Tensor, g: Tensor) -> Tensor:
    """dL/da for L = sum_s g[s] * sums[s]; shaped and typed like a (contiguous)."""
    a, b = _tokens("cosine_alignment a", a), _tokens("cosine_alignment b", b)
    n_samples, n, d = a.shape
    if stats.shape != (n_samples, 2, n):
        raise ValueError(f"cosine_alignment backward: stats of shape {tuple(stats.shape)}")
    m = _cosine_mask(mask, a)
    grad = torch.empty(a.shape, device=a.device, dtype=a.dtype)
    block_n, block_d, warps = _cosine_blocks(d)
    g = g.to(torch.float32).contiguous()
    _cosine_bwd_kernel[(triton.cdiv(n, block_n), n_samples)](
        a, b, m if m is not None else g, stats, g, grad, n, d,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), grad.stride(0), grad.stride(1),
        BLOCK_N=block_n, BLOCK_D=block_d, HAS_MASK=m is not None, num_warps=warps,
    )
    return grad


# ============================================================================ layer 3: ops + autograd


@torch.library.custom_op("prx::loss_cosine", mutates_args=())
def _cosine_op(a: Tensor, b: Tensor, mask: Tensor | None, eps: float,
               save_stats: bool) -> tuple[Tensor, Tensor]:
    return launch_cosine_forward(a, b, mask, eps, save_stats)


@_cosine_op.register_fake
def _(a, b, mask, eps, save_stats):
    n, tokens, _ = a.shape
    stats_shape = (n, 2, tokens) if save_stats else (0,)
    return a.new_empty((n,), dtype=torch.float32), a.new_empty(stats_shape, dtype=torch.float32)


@torch.library.custom_op("prx::loss_cosine_grad", mutates_args=())
def _cosine_grad_op(a: Tensor, b: Tensor, mask: Tensor | None, stats: Tensor, g: Tensor) -> Tensor:
    return launch_cosine_backward(a, b, mask, stats, g)


@_cosine_grad_op.register_fake
def _(a, b, mask, stats, g):
    return torch.empty_like(a, memory_format=torch.contiguous_format)


def _cosine_setup(ctx, inputs, output):
    a, b, mask, _, save_stats = inputs
    ctx.save_stats = save_stats
    ctx.save_for_backward(a, b, mask, output[1])


def _cosine_backward(ctx, g, _g_stats):
    a, b, mask, stats = ctx.saved_tensors
    if ctx.needs_input_grad[1]:
        raise RuntimeError("cosine_alignment: no gradient to b (the teacher / target features); detach it")
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    if not ctx.save_stats:
        raise RuntimeError("cosine_alignment: the forward ran with save_stats=False; call it with gradients enabled")
    return _cosine_grad_op(a, b, mask, stats, g), None, None, None, None


_cosine_op.register_autograd(_cosine_backward, setup_context=_cosine_setup)


# ============================================================================ layer 4: functional API


def cosine_alignment(a: Tensor, b: Tensor, mask: Tensor | None = None,
                     eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """(mean over valid tokens of cos(a, b), per-sample mean (B,)), fp32; a, b: (B, N, D).

    cos = a.b / (max(|a|, eps) max(|b|, eps)) (torch.cosine_similarity). mask (B, N), bool or
    float: the token weights (None: all ones). The overall mean divides by the total mask sum
    (REPA's mean over tokens); a sample whose mask sums to 0 gets 0. Gradient to a only.
    REPA loss: -0.5 * mean; DINO perceptual loss per sample: 1 - per_sample.
    """
    if needs_grad(b):
        raise ValueError("cosine_alignment: b must not require grad (detach the teacher / target features)")
    maskf = None if mask is None else mask.detach().to(device=a.device, dtype=torch.float32)
    sums, _ = _cosine_op(a, b, maskf, float(eps), needs_grad(a))
    if maskf is None:
        counts = torch.full_like(sums, float(a.shape[1]))
    else:
        counts = maskf.sum(1)
    per_sample = sums / counts.clamp_min(1e-12) * (counts > 0)
    return sums.sum() / counts.sum().clamp_min(1e-12), per_sample
