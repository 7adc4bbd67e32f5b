"""Fused losses of the recipe: flow matching, the LPIPS distance head, cosine alignment.

Three memory-bound ops. Each reads its inputs once in the forward and once in the backward and
keeps everything else in registers; the reductions across programs go through per-program
partial sums that a small torch `sum` finishes, so every result is deterministic (no atomics).

1. Flow-matching loss (RECIPE section 2). v_hat - v = (x - x_hat) / max(t, floor), so the
   per-sample loss is sum_j (x_hat - x)^2 / (M max(t, floor)^2) over the M values of a sample.
   The kernel computes the per-sample sums of squared differences in one pass over x_hat and x;
   the 1/(M max(t, floor)^2) scale, the optional per-sample weights and the mean are torch ops
   on (B,) vectors, so autograd chains them for free. Backward: one elementwise pass,
   grad = 2 g_b (x_hat - x). Bytes: forward reads x_hat and x; backward reads both and writes
   the gradient (x_hat's dtype).
2. LPIPS distance head (Zhang et al. 2018, the `lpips` package v0.1): for one feature layer
   (B, C, h, w) of pred p and target q, per position u = p / (|p| + eps), v = q / (|q| + eps)
   (norm over channels, eps 1e-10 as in lpips.normalize_tensor), d = sum_c w_c (u_c - v_c)^2,
   then the spatial mean. One pass over the channels accumulates nine sums per position
   (|p|^2, |q|^2 and, with delta = p - q, |delta|^2, delta.q, sum w delta^2, sum w delta q,
   sum w delta p, sum w q^2, sum w p^2), from which d follows without cancellation both when
   p is close to q (a plain expansion sum w u^2 - 2 sum w u v + sum w v^2 loses 2 % at
   d ~ 1e-6) and when one side's norm is ~0; d = 0 exactly for p == q. With gradients it also
   writes four fp32 numbers per position (1/(|p|+eps), the delta scale of the form used,
   kappa = 1/(|p|+eps) - 1/(|q|+eps), the coefficient of the normalisation's Jacobian), which
   the backward uses to write dL/dp in one more pass over p and q. Bytes: forward reads p and q
   (+16 B per position with grad); backward reads p, q (+16 B) and writes dL/dp (p's dtype).
   NCHW and channels-last both run in place.
3. Cosine alignment (REPA, DINO perceptual loss): cos(a, b) = a.b / (max(|a|, eps) max(|b|, eps))
   per token of (B, N, D), masked, summed per sample; forward one pass over a and b (+8 B per
   token with grad), backward one pass reading a, b and writing dL/da.

Limits: no gradient to the LPIPS target features, the LPIPS weights or the cosine teacher `b`
(they are constants in the recipe; asking for one raises); no double backward. Inputs must be
dense in the reduced dimensions (a non-dense input is copied with `.contiguous()`). At a
position where all pred features are exactly 0 the LPIPS gradient is 2 w (0 - v) / eps, the
derivative of lpips' p / (|p| + eps) there (~1e10 in size; the torch reference gives NaN).
LPIPS launches one kernel (plus two tiny torch reductions) per layer: at 512 px the five
layers move ~0.5 GB, so launch overhead is a visible share. Tuned on: nothing yet; the blocks
were chosen by reasoning (no GPU was lent when this was written) and bench/bench_losses.py
says how close they get to copy bandwidth. Under TRITON_INTERPRET=1 (CPU tests) the same
kernels run with tiny grids.

The ops are registered with `torch.library.custom_op` (fake implementations and autograd
included), so `torch.compile(fullgraph=True)` traces through them without graph breaks.
`triton_op` would let inductor see the kernels, but its fake mode runs the kernel itself
under the interpreter, which breaks the CPU tests; a loss op at the end of the graph gains
nothing from being visible to inductor.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _target_programs(device: torch.device) -> int:
    """Programs to keep busy: a few waves on a GPU, a handful under the interpreter."""
    if device.type == "cuda" and not _interpreting():
        return 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


# ============================================================================ layer 1: kernels


@triton.jit
def _sq_dist_partials_kernel(
    a_ptr, b_ptr, partials_ptr,
    M, n_programs,
    stride_a, stride_b,
    BLOCK: tl.constexpr,
):
    """partials[s, p] = sum over this program's blocks of sample s of (a - b)^2 (fp32)."""
    pid_p = tl.program_id(0)
    pid_s = tl.program_id(1)
    a_row = a_ptr + pid_s.to(tl.int64) * stride_a
    b_row = b_ptr + pid_s.to(tl.int64) * stride_b
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(pid_p * BLOCK, M, n_programs * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < M
        a = tl.load(a_row + offs, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_row + offs, mask=mask, other=0.0).to(tl.float32)
        diff = a - b
        acc += diff * diff
    tl.store(partials_ptr + pid_s * n_programs + pid_p, tl.sum(acc, axis=0))


@triton.jit
def _sq_dist_grad_kernel(
    a_ptr, b_ptr, g_ptr, grad_ptr,
    M,
    stride_a, stride_b, stride_grad,
    BLOCK: tl.constexpr,
):
    """grad[s, j] = 2 g[s] (a[s, j] - b[s, j]), in grad's dtype."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    a = tl.load(a_ptr + pid_s.to(tl.int64) * stride_a + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + pid_s.to(tl.int64) * stride_b + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + pid_s).to(tl.float32)
    grad = (2.0 * g) * (a - b)
    tl.store(grad_ptr + pid_s.to(tl.int64) * stride_grad + offs,
             grad.to(grad_ptr.dtype.element_ty), mask=mask)


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

_FLOW_BLOCK = 2048
_FLOW_WARPS = 8


def _check_float(name: str, tensor: Tensor) -> None:
    if not tensor.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {tensor.dtype}")


def _rows(x: Tensor) -> Tensor:
    """(B, ...) -> (B, M) view with unit stride inside a sample (copies a non-dense input)."""
    flat = x.reshape(x.shape[0], -1)
    return flat if flat.stride(1) == 1 or flat.shape[1] == 1 else flat.contiguous()


def _check_pair(op: str, a: Tensor, b: Tensor) -> None:
    _check_float(f"{op} {a.dtype}", a)
    _check_float(f"{op} {b.dtype}", b)
    if a.shape != b.shape:
        raise ValueError(f"{op}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{op}: devices differ, {a.device} vs {b.device}")
    if a.dim() < 1 or a.shape[0] == 0 or a.numel() == 0:
        raise ValueError(f"{op}: empty input of shape {tuple(a.shape)}")


def sq_dist_per_sample_launch(a: Tensor, b: Tensor) -> Tensor:
    """(B,) fp32: sum over each sample of (a - b)^2."""
    _check_pair("sq_dist_per_sample", a, b)
    a2, b2 = _rows(a), _rows(b)
    n_samples, m = a2.shape
    if m >= 2**31 - _FLOW_BLOCK:
        raise ValueError(f"sq_dist_per_sample: {m} values per sample; at most 2^31 - {_FLOW_BLOCK}")
    n_blocks = triton.cdiv(m, _FLOW_BLOCK)
    programs = max(1, min(n_blocks, triton.cdiv(_target_programs(a.device), n_samples)))
    partials = torch.empty(n_samples, programs, device=a.device, dtype=torch.float32)
    _sq_dist_partials_kernel[(programs, n_samples)](
        a2, b2, partials, m, programs, a2.stride(0), b2.stride(0),
        BLOCK=_FLOW_BLOCK, num_warps=_FLOW_WARPS,
    )
    return partials.sum(1)


def sq_dist_grad_launch(a: Tensor, b: Tensor, g: Tensor) -> Tensor:
    """2 g[s] (a - b), shaped and typed like a."""
    _check_pair("sq_dist_grad", a, b)
    a2, b2 = _rows(a), _rows(b)
    n_samples, m = a2.shape
    grad = torch.empty(a.shape, device=a.device, dtype=a.dtype)
    grad2 = grad.view(n_samples, m)
    g = g.to(torch.float32).contiguous()
    _sq_dist_grad_kernel[(triton.cdiv(m, _FLOW_BLOCK), n_samples)](
        a2, b2, g, grad2, m, a2.stride(0), b2.stride(0), grad2.stride(0),
        BLOCK=_FLOW_BLOCK, num_warps=_FLOW_WARPS,
    )
    return grad


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
    contiguous channels (channels-last) get 16 positions x 64 channels."""
    if stride_c == 1:
        return 64, 16, 4
    block_p = triton.next_power_of_2(max(1, positions // _target_programs(device)))
    block_p = max(16, min(64, block_p))
    return 1024 // block_p, block_p, 4


def _lpips_weight(weight: Tensor, channels: int) -> Tensor:
    w = weight.reshape(-1).to(torch.float32).contiguous()
    if w.numel() != channels:
        raise ValueError(f"lpips head: {w.numel()} weights for {channels} channels")
    return w


def lpips_head_fwd_launch(pred: Tensor, target: Tensor, weight: Tensor, eps: float,
                          save_stats: bool) -> tuple[Tensor, Tensor]:
    """((B,) spatial mean of the weighted distance, (B, 4, h*w) fp32 stats or an empty tensor)."""
    _check_pair("lpips_head", pred, target)
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


def lpips_head_bwd_launch(pred: Tensor, target: Tensor, weight: Tensor, stats: Tensor,
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


def cosine_fwd_launch(a: Tensor, b: Tensor, mask: Tensor | None, eps: float,
                      save_stats: bool) -> tuple[Tensor, Tensor]:
    """((B,) sum over tokens of mask * cos(a, b), (B, 2, N) fp32 stats or an empty tensor)."""
    _check_pair("cosine_alignment", a, b)
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


def cosine_bwd_launch(a: Tensor, b: Tensor, mask: Tensor | None, stats: Tensor, g: Tensor) -> Tensor:
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
# Saved for backward: the inputs (which the caller keeps alive anyway) and, for LPIPS and
# cosine, the small per-position / per-token stats the forward wrote; nothing is recomputed
# except the elementwise terms of the gradient.


@torch.library.custom_op("prx::loss_sq_dist_per_sample", mutates_args=())
def _sq_dist_op(a: Tensor, b: Tensor) -> Tensor:
    return sq_dist_per_sample_launch(a, b)


@_sq_dist_op.register_fake
def _(a, b):
    return a.new_empty((a.shape[0],), dtype=torch.float32)


@torch.library.custom_op("prx::loss_sq_dist_grad", mutates_args=())
def _sq_dist_grad_op(a: Tensor, b: Tensor, g: Tensor) -> Tensor:
    return sq_dist_grad_launch(a, b, g)


@_sq_dist_grad_op.register_fake
def _(a, b, g):
    return torch.empty_like(a, memory_format=torch.contiguous_format)


def _sq_dist_setup(ctx, inputs, output):
    a, b = inputs
    ctx.save_for_backward(a, b)


def _sq_dist_backward(ctx, g):
    a, b = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad
    grad_a = _sq_dist_grad_op(a, b, g) if need_a else None
    grad_b = _sq_dist_grad_op(b, a, g) if need_b else None  # 2 g (b - a), in b's dtype
    return grad_a, grad_b


_sq_dist_op.register_autograd(_sq_dist_backward, setup_context=_sq_dist_setup)


@torch.library.custom_op("prx::loss_lpips_head", mutates_args=())
def _lpips_head_op(pred: Tensor, target: Tensor, weight: Tensor, eps: float,
                   save_stats: bool) -> tuple[Tensor, Tensor]:
    return lpips_head_fwd_launch(pred, target, weight, eps, save_stats)


@_lpips_head_op.register_fake
def _(pred, target, weight, eps, save_stats):
    n, _, h, w = pred.shape
    stats_shape = (n, 4, h * w) if save_stats else (0,)
    return pred.new_empty((n,), dtype=torch.float32), pred.new_empty(stats_shape, dtype=torch.float32)


@torch.library.custom_op("prx::loss_lpips_head_grad", mutates_args=())
def _lpips_head_grad_op(pred: Tensor, target: Tensor, weight: Tensor, stats: Tensor, g: Tensor) -> Tensor:
    return lpips_head_bwd_launch(pred, target, weight, stats, g)


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


@torch.library.custom_op("prx::loss_cosine", mutates_args=())
def _cosine_op(a: Tensor, b: Tensor, mask: Tensor | None, eps: float,
               save_stats: bool) -> tuple[Tensor, Tensor]:
    return cosine_fwd_launch(a, b, mask, eps, save_stats)


@_cosine_op.register_fake
def _(a, b, mask, eps, save_stats):
    n, tokens, _ = a.shape
    stats_shape = (n, 2, tokens) if save_stats else (0,)
    return a.new_empty((n,), dtype=torch.float32), a.new_empty(stats_shape, dtype=torch.float32)


@torch.library.custom_op("prx::loss_cosine_grad", mutates_args=())
def _cosine_grad_op(a: Tensor, b: Tensor, mask: Tensor | None, stats: Tensor, g: Tensor) -> Tensor:
    return cosine_bwd_launch(a, b, mask, stats, g)


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


def flow_loss(x_hat: Tensor, x: Tensor, t: Tensor, t_floor: float = 0.05,
              weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Velocity-space loss of an x-prediction: (mean loss, per-sample losses (B,)), fp32.

    per_sample[b] = mean_j ((x - x_hat) / max(t_b, t_floor))^2 (unweighted: it feeds the
    per-t-bin log); mean = mean_b(weight_b * per_sample[b]) (weight 1 when None). No gradient
    to t or weight. Same signature as `kernels.ref.flow_loss`.
    """
    if t.shape != (x_hat.shape[0],):
        raise ValueError(f"flow_loss: t of shape {tuple(t.shape)}, expected ({x_hat.shape[0]},)")
    values = x_hat[0].numel()
    scale = t.detach().float().clamp_min(t_floor).reciprocal().square() / values
    per_sample = _sq_dist_op(x_hat, x) * scale
    if weight is None:
        return per_sample.mean(), per_sample
    return (weight.detach().float() * per_sample).mean(), per_sample


def _needs_grad(x: Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def lpips_head_distance(pred: Tensor, target: Tensor, weight: Tensor, eps: float = 1e-10) -> Tensor:
    """One LPIPS layer: (B,) spatial mean of sum_c w_c (p/(|p|+eps) - q/(|q|+eps))_c^2.

    pred, target: (B, C, h, w) features of x-hat and x; weight: the layer's C non-negative head
    weights ((C,) or lpips' (1, C, 1, 1)). Gradient to pred only.
    """
    if _needs_grad(target) or _needs_grad(weight):
        raise ValueError("lpips_head_distance: target and weight must not require grad (detach them)")
    dist, _ = _lpips_head_op(pred, target, weight, float(eps), _needs_grad(pred))
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


def cosine_alignment(a: Tensor, b: Tensor, mask: Tensor | None = None,
                     eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """(mean over valid tokens of cos(a, b), per-sample mean (B,)), fp32; a, b: (B, N, D).

    cos = a.b / (max(|a|, eps) max(|b|, eps)) (torch.cosine_similarity). mask (B, N), bool or
    float: the token weights (None: all ones). The overall mean divides by the total mask sum
    (REPA's mean over tokens); a sample whose mask sums to 0 gets 0. Gradient to a only.
    REPA loss: -0.5 * mean; DINO perceptual loss per sample: 1 - per_sample.
    """
    if _needs_grad(b):
        raise ValueError("cosine_alignment: b must not require grad (detach the teacher / target features)")
    maskf = None if mask is None else mask.detach().to(device=a.device, dtype=torch.float32)
    sums, _ = _cosine_op(a, b, maskf, float(eps), _needs_grad(a))
    if maskf is None:
        counts = torch.full_like(sums, float(a.shape[1]))
    else:
        counts = maskf.sum(1)
    per_sample = sums / counts.clamp_min(1e-12) * (counts > 0)
    return sums.sum() / counts.sum().clamp_min(1e-12), per_sample
