"""Fused flow-matching loss (docs/recipe.md section 2): per-sample squared error in one pass.

v_hat - v = (x - x_hat) / max(t, floor), so the per-sample loss is
sum_j (x_hat - x)^2 / (M max(t, floor)^2) over the M values of a sample. The kernel computes the
per-sample sums of squared differences in one pass over x_hat and x, through per-program
partial sums that a small torch `sum` finishes (deterministic, no atomics); the
1/(M max(t, floor)^2) scale, the optional per-sample weights and the mean are torch ops on (B,)
vectors, so autograd chains them for free. Backward: one elementwise pass, grad = 2 g_b (x_hat - x).
Bytes: forward reads x_hat and x; backward reads both and writes the gradient (x_hat's dtype).
At PRX small, 512 px, batch 32 (25 M values a tensor, fp32): 201 MB forward, 302 MB backward.

Limits: inputs must be dense inside a sample (a non-dense one is copied); no double backward.
Saved for backward: the inputs (the caller keeps them alive anyway).

Registered as a `torch.library.custom_op` (why not `triton_op`: kernels/launch.py). Tuned on:
nothing yet (no GPU was lent when this was written); bench/bench_losses.py measures it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch import check_pair, target_programs

Tensor = torch.Tensor


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


# ============================================================================ layer 2: launchers

_FLOW_BLOCK = 2048
_FLOW_WARPS = 8


def _rows(x: Tensor) -> Tensor:
    """(B, ...) -> (B, M) view with unit stride inside a sample (copies a non-dense input)."""
    flat = x.reshape(x.shape[0], -1)
    return flat if flat.stride(1) == 1 or flat.shape[1] == 1 else flat.contiguous()


def launch_sq_dist_per_sample(a: Tensor, b: Tensor) -> Tensor:
    """(B,) fp32: sum over each sample of (a - b)^2."""
    check_pair("sq_dist_per_sample", a, b)
    a2, b2 = _rows(a), _rows(b)
    n_samples, m = a2.shape
    if m >= 2**31 - _FLOW_BLOCK:
        raise ValueError(f"sq_dist_per_sample: {m} values per sample; at most 2^31 - {_FLOW_BLOCK}")
    n_blocks = triton.cdiv(m, _FLOW_BLOCK)
    programs = max(1, min(n_blocks, triton.cdiv(target_programs(a.device), n_samples)))
    partials = torch.empty(n_samples, programs, device=a.device, dtype=torch.float32)
    _sq_dist_partials_kernel[(programs, n_samples)](
        a2, b2, partials, m, programs, a2.stride(0), b2.stride(0),
        BLOCK=_FLOW_BLOCK, num_warps=_FLOW_WARPS,
    )
    return partials.sum(1)


def launch_sq_dist_grad(a: Tensor, b: Tensor, g: Tensor) -> Tensor:
    """2 g[s] (a - b), shaped and typed like a."""
    check_pair("sq_dist_grad", a, b)
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


# ============================================================================ layer 3: ops + autograd


@torch.library.custom_op("prx::loss_sq_dist_per_sample", mutates_args=())
def _sq_dist_op(a: Tensor, b: Tensor) -> Tensor:
    return launch_sq_dist_per_sample(a, b)


@_sq_dist_op.register_fake
def _(a, b):
    return a.new_empty((a.shape[0],), dtype=torch.float32)


@torch.library.custom_op("prx::loss_sq_dist_grad", mutates_args=())
def _sq_dist_grad_op(a: Tensor, b: Tensor, g: Tensor) -> Tensor:
    return launch_sq_dist_grad(a, b, g)


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
