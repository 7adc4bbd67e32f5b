"""Fused LPIPS distance head (Zhang et al. 2018, the `lpips` package v0.1; docs/recipe.md section 5).

For one feature layer (B, C, h, w) of pred p and target q, per position u = p / (|p| + eps),
v = q / (|q| + eps) (norm over channels, eps 1e-10 as in lpips.normalize_tensor),
d = sum_c w_c (u_c - v_c)^2, then the spatial mean. One pass over the channels accumulates nine
sums per position (|p|^2, |q|^2 and, with delta = p - q, |delta|^2, delta.q, sum w delta^2,
sum w delta q, sum w delta p, sum w q^2, sum w p^2), from which d follows without cancellation
both when p is close to q (a plain expansion sum w u^2 - 2 sum w u v + sum w v^2 loses 2 % at
d ~ 1e-6) and when one side's norm is ~0; d = 0 exactly for p == q. With gradients it also
writes four fp32 numbers per position (1/(|p|+eps), the delta scale of the form used,
kappa = 1/(|p|+eps) - 1/(|q|+eps), the coefficient of the normalisation's Jacobian), which the
backward uses to write dL/dp in one more pass over p and q. Bytes: forward reads p and q (+16 B
per position with grad); backward reads p, q (+16 B) and writes dL/dp (p's dtype). NCHW and
channels-last both run in place. Reductions across programs go through per-program partial sums
(deterministic, no atomics).

Limits: no gradient to the target features or the head weights (constants in the recipe; asking
for one raises); no double backward. At a position where all pred features are exactly 0 the
gradient is 2 w (0 - v) / eps, the derivative of lpips' p / (|p| + eps) there (~1e10 in size;
the torch reference gives NaN). One kernel (plus two tiny torch reductions) per layer: at 512 px
the five VGG layers move ~0.5 GB, so launch overhead is a visible share.

Registered as a `torch.library.custom_op` (why not `triton_op`: kernels/launch.py). Tuned on:
nothing yet (no GPU was lent when this was written); bench/bench_losses.py measures it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from kernels.launch import check_pair, needs_grad, target_programs

Tensor = torch.Tensor


# ============================================================================ layer 1: kernels


@triton.jit
def _lpips_head_fwd_kernel(
    p_ptr, q_ptr, w_ptr, partials_ptr, stats_ptr,
    C, HW, n_blocks,
    stride_pb, stride_pc, stride_pp,
    stride_qb, stride_qc, stride_qp,
    eps,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, SAVE_STATS: tl.constexpr,
):
    """partials[b, blk] = sum over the block's positions of sum_c w_c (u_c - v_c)^2."""
    pid_p = tl.program_id(0)
    pid_b = tl.program_id(1)
    pos = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pos_mask = pos < HW
    p_base = p_ptr + pid_b.to(tl.int64) * stride_pb + pos[None, :].to(tl.int64) * stride_pp
    q_base = q_ptr + pid_b.to(tl.int64) * stride_qb + pos[None, :].to(tl.int64) * stride_qp
    # Accumulated in terms of delta = p - q, so that nothing cancels when p is close to q:
    # with a = |p| + eps, b = |q| + eps, kappa = 1/a - 1/b = (|q| - |p|) / (a b) and
    # |q| - |p| = -(|delta|^2 + 2 delta.q) / (|p| + |q|),
    #   u - v = delta / a + kappa q  (used where |p| >= |q|)
    #         = delta / b + kappa p  (used where |p| < |q|: the first form cancels at p ~ 0).
    pp = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    qq = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    dd = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    dq = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    wdd = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    wdq = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    wdp = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    wqq = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    wpp = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        ch_mask = ch < C
        mask = ch_mask[:, None] & pos_mask[None, :]
        p = tl.load(p_base + ch[:, None].to(tl.int64) * stride_pc, mask=mask, other=0.0).to(tl.float32)
        q = tl.load(q_base + ch[:, None].to(tl.int64) * stride_qc, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + ch, mask=ch_mask, other=0.0).to(tl.float32)[:, None]
        delta = p - q
        pp += p * p
        qq += q * q
        dd += delta * delta
        dq += delta * q
        wd = w * delta
        wdd += wd * delta
        wdq += wd * q
        wdp += wd * p
        wqq += (w * q) * q
        wpp += (w * p) * p
    norm_p = tl.sqrt(tl.sum(pp, axis=0))
    norm_q = tl.sqrt(tl.sum(qq, axis=0))
    inv_p = 1.0 / (norm_p + eps)
    inv_q = 1.0 / (norm_q + eps)
    norm_sum = norm_p + norm_q
    norm_gap = -(tl.sum(dd, axis=0) + 2.0 * tl.sum(dq, axis=0)) / tl.where(norm_sum > 0.0, norm_sum, 1.0)
    kappa = norm_gap * inv_p * inv_q
    s_wdd = tl.sum(wdd, axis=0)
    s_wdq = tl.sum(wdq, axis=0)
    s_wdp = tl.sum(wdp, axis=0)
    s_wqq = tl.sum(wqq, axis=0)
    s_wpp = tl.sum(wpp, axis=0)
    p_first = norm_p >= norm_q
    inv_d = tl.where(p_first, inv_p, inv_q)  # the scale of delta in the form used
    s_wdo = tl.where(p_first, s_wdq, s_wdp)  # sum w delta o, o = q or p
    s_woo = tl.where(p_first, s_wqq, s_wpp)
    dist = s_wdd * inv_d * inv_d + 2.0 * kappa * s_wdo * inv_d + kappa * kappa * s_woo
    dist = tl.where(pos_mask, dist, 0.0)
    tl.store(partials_ptr + pid_b * n_blocks + pid_p, tl.sum(dist, axis=0))
    if SAVE_STATS:
        # dd/dp_k = 2 w_k (u_k - v_k) / a - p_k * 2 proj / (a^2 |p|), proj = sum_c w_c (u_c - v_c) p_c:
        # (delta / a + kappa q).p = s_wdp / a + kappa (s_wqq + s_wdq); (delta / b + kappa p).p.
        proj = tl.where(p_first, s_wdp * inv_p + kappa * (s_wqq + s_wdq), s_wdp * inv_q + kappa * s_wpp)
        coef = tl.where(norm_p > 0.0, 2.0 * proj * inv_p * inv_p / tl.maximum(norm_p, 1e-30), 0.0)
        offs = pid_b.to(tl.int64) * 4 * HW + pos  # stats: (B, 4, HW)
        tl.store(stats_ptr + offs, inv_p, mask=pos_mask)
        tl.store(stats_ptr + HW + offs, inv_d, mask=pos_mask)
        tl.store(stats_ptr + 2 * HW + offs, kappa, mask=pos_mask)
        tl.store(stats_ptr + 3 * HW + offs, coef, mask=pos_mask)


@triton.jit
def _lpips_head_bwd_kernel(
    p_ptr, q_ptr, w_ptr, stats_ptr, g_ptr, grad_ptr,
    C, HW,
    stride_pb, stride_pc, stride_pp,
    stride_qb, stride_qc, stride_qp,
    stride_gb, stride_gc, stride_gp,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """grad[b, c, pos] = g[b] (2 w_c (u_c - v_c) inv_p - p_c coef), u - v in the forward's form;
    g already holds the 1/HW of the spatial mean."""
    pid_p = tl.program_id(0)
    pid_b = tl.program_id(1)
    pos = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pos_mask = pos < HW
    offs = pid_b.to(tl.int64) * 4 * HW + pos  # stats: (B, 4, HW)
    inv_p = tl.load(stats_ptr + offs, mask=pos_mask, other=0.0)[None, :]
    inv_d = tl.load(stats_ptr + HW + offs, mask=pos_mask, other=0.0)[None, :]
    kappa = tl.load(stats_ptr + 2 * HW + offs, mask=pos_mask, other=0.0)[None, :]
    coef = tl.load(stats_ptr + 3 * HW + offs, mask=pos_mask, other=0.0)[None, :]
    p_first = inv_d == inv_p
    g = tl.load(g_ptr + pid_b).to(tl.float32)
    p_base = p_ptr + pid_b.to(tl.int64) * stride_pb + pos[None, :].to(tl.int64) * stride_pp
    q_base = q_ptr + pid_b.to(tl.int64) * stride_qb + pos[None, :].to(tl.int64) * stride_qp
    g_base = grad_ptr + pid_b.to(tl.int64) * stride_gb + pos[None, :].to(tl.int64) * stride_gp
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        ch_mask = ch < C
        mask = ch_mask[:, None] & pos_mask[None, :]
        p = tl.load(p_base + ch[:, None].to(tl.int64) * stride_pc, mask=mask, other=0.0).to(tl.float32)
        q = tl.load(q_base + ch[:, None].to(tl.int64) * stride_qc, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + ch, mask=ch_mask, other=0.0).to(tl.float32)[:, None]
        diff = (p - q) * inv_d + kappa * tl.where(p_first, q, p)  # u - v
        grad = g * (2.0 * w * diff * inv_p - p * coef)
        tl.store(g_base + ch[:, None].to(tl.int64) * stride_gc, grad.to(grad_ptr.dtype.element_ty), mask=mask)


# ============================================================================ layer 2: launchers

def _positions(name: str, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """(B, C, h, w) with h and w mergeable into one position axis: (tensor, (sb, sc, sp))."""
    if x.dim() != 4:
        raise ValueError(f"{name}: expected (B, C, h, w), got {tuple(x.shape)}")
    _, _, h, w = x.shape
    if h > 1 and x.stride(2) != w * x.stride(3):
        x = x.contiguous()
    return x, (x.stride(0), x.stride(1), x.stride(3) if w > 1 else x.stride(2) // max(w, 1))


def _lpips_blocks(stride_c: int, positions: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_C, BLOCK_P, warps), a 1024-value tile: contiguous positions (NCHW) get up to 64
    positions per program, fewer on the small deep layers so that the grid still fills the GPU;
    contiguous channels (channels-last) get 16 positions x 64 channels. 8 warps: at 4 the forward
    needs 96 registers a thread, 5 blocks (640 threads) per SM; at 8, 62 and 4 blocks (1,024
    threads), what a memory-bound kernel needs to hide DRAM latency (bench/kernel_resources.py)."""
    if stride_c == 1:
        return 64, 16, 8
    block_p = triton.next_power_of_2(max(1, positions // target_programs(device)))
    block_p = max(16, min(64, block_p))
    return 1024 // block_p, block_p, 8


def _lpips_weight(weight: Tensor, channels: int) -> Tensor:
    w = weight.reshape(-1).to(torch.float32).contiguous()
    if w.numel() != channels:
        raise ValueError(f"lpips head: {w.numel()} weights for {channels} channels")
    return w


def launch_lpips_head_forward(pred: Tensor, target: Tensor, weight: Tensor, eps: float,
                          save_stats: bool) -> tuple[Tensor, Tensor]:
    """((B,) spatial mean of the weighted distance, (B, 4, h*w) fp32 stats or an empty tensor)."""
    check_pair("lpips_head", pred, target)
    p, (spb, spc, spp) = _positions("lpips_head pred", pred)
    q, (sqb, sqc, sqp) = _positions("lpips_head target", target)
    n, c, h, w_ = p.shape
    hw = h * w_
    w = _lpips_weight(weight, c).to(p.device)
    block_c, block_p, warps = _lpips_blocks(spc, n * hw, p.device)
    n_blocks = triton.cdiv(hw, block_p)
    partials = torch.empty(n, n_blocks, device=p.device, dtype=torch.float32)
    stats = torch.empty((n, 4, hw) if save_stats else (0,), device=p.device, dtype=torch.float32)
    _lpips_head_fwd_kernel[(n_blocks, n)](
        p, q, w, partials, stats, c, hw, n_blocks, spb, spc, spp, sqb, sqc, sqp, eps,
        BLOCK_C=block_c, BLOCK_P=block_p, SAVE_STATS=save_stats, num_warps=warps,
    )
    return partials.sum(1) / hw, stats


def launch_lpips_head_backward(pred: Tensor, target: Tensor, weight: Tensor, stats: Tensor,
                          g: Tensor) -> Tensor:
    """dL/dpred for L = sum_b g[b] * distance[b]; shaped, strided and typed like pred."""
    p, (spb, spc, spp) = _positions("lpips_head pred", pred)
    q, (sqb, sqc, sqp) = _positions("lpips_head target", target)
    n, c, h, w_ = p.shape
    hw = h * w_
    if stats.shape != (n, 4, hw):
        raise ValueError(f"lpips_head backward: stats of shape {tuple(stats.shape)}, expected {(n, 4, hw)}")
    w = _lpips_weight(weight, c).to(p.device)
    grad = torch.empty_like(p)
    _, (sgb, sgc, sgp) = _positions("lpips_head grad", grad)
    block_c, block_p, warps = _lpips_blocks(spc, n * hw, p.device)
    g = (g.to(torch.float32) / hw).contiguous()
    _lpips_head_bwd_kernel[(triton.cdiv(hw, block_p), n)](
        p, q, w, stats, g, grad, c, hw, spb, spc, spp, sqb, sqc, sqp, sgb, sgc, sgp,
        BLOCK_C=block_c, BLOCK_P=block_p, num_warps=warps,
    )
    return grad


# ============================================================================ layer 3: ops + autograd


@torch.library.custom_op("prx::loss_lpips_head", mutates_args=())
def _lpips_head_op(pred: Tensor, target: Tensor, weight: Tensor, eps: float,
                   save_stats: bool) -> tuple[Tensor, Tensor]:
    return launch_lpips_head_forward(pred, target, weight, eps, save_stats)


@_lpips_head_op.register_fake
def _(pred, target, weight, eps, save_stats):
    n, _, h, w = pred.shape
    stats_shape = (n, 4, h * w) if save_stats else (0,)
    return pred.new_empty((n,), dtype=torch.float32), pred.new_empty(stats_shape, dtype=torch.float32)


@torch.library.custom_op("prx::loss_lpips_head_grad", mutates_args=())
def _lpips_head_grad_op(pred: Tensor, target: Tensor, weight: Tensor, stats: Tensor, g: Tensor) -> Tensor:
    return launch_lpips_head_backward(pred, target, weight, stats, g)


@_lpips_head_grad_op.register_fake
def _(pred, target, weight, stats, g):
    return torch.empty_like(pred)


def _lpips_head_setup(ctx, inputs, output):
    pred, target, weight, _, save_stats = inputs
    ctx.save_stats = save_stats
    ctx.save_for_backward(pred, target, weight, output[1])


def _lpips_head_backward(ctx, g, _g_stats):
    pred, target, weight, stats = ctx.saved_tensors
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        raise RuntimeError("lpips_head: no gradient to the target features or the head weights; detach them")
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    if not ctx.save_stats:
        raise RuntimeError("lpips_head: the forward ran with save_stats=False; call it with gradients enabled")
    return _lpips_head_grad_op(pred, target, weight, stats, g), None, None, None, None


_lpips_head_op.register_autograd(_lpips_head_backward, setup_context=_lpips_head_setup)


# ============================================================================ layer 4: functional API


def lpips_head_distance(pred: Tensor, target: Tensor, weight: Tensor, eps: float = 1e-10) -> Tensor:
    """One LPIPS layer: (B,) spatial mean of sum_c w_c (p/(|p|+eps) - q/(|q|+eps))_c^2.

    pred, target: (B, C, h, w) features of x-hat and x; weight: the layer's C non-negative head
    weights ((C,) or lpips' (1, C, 1, 1)). Gradient to pred only.
    """
    if needs_grad(target) or needs_grad(weight):
        raise ValueError("lpips_head_distance: target and weight must not require grad (detach them)")
    dist, _ = _lpips_head_op(pred, target, weight, float(eps), needs_grad(pred))
    return dist


def lpips_distance(preds: Sequence[Tensor], targets: Sequence[Tensor], weights: Sequence[Tensor],
                   eps: float = 1e-10) -> Tensor:
    """LPIPS: the sum over layers (VGG16: 64, 128, 256, 512, 512 channels) of the head distance, (B,)."""
    if not len(preds) == len(targets) == len(weights) > 0:
        raise ValueError(f"lpips_distance: {len(preds)} pred, {len(targets)} target, {len(weights)} weight layers")
    total = lpips_head_distance(preds[0], targets[0], weights[0], eps)
    for pred, target, weight in zip(preds[1:], targets[1:], weights[1:]):
        total = total + lpips_head_distance(pred, target, weight, eps)
    return total
