"""Batched Newton-Schulz orthogonalisation for Muon, using the symmetry of X X^T.

One Newton-Schulz step on a wide matrix X (r x c, r <= c) with coefficients (a, b, c3) is
    A = X X^T            (r x r, symmetric)      2 r^2 c FLOP
    B = b A + c3 A A     (r x r, symmetric)      2 r^3   FLOP
    X <- a X + B X       (r x c)                 2 r^2 c FLOP
Both products that build a symmetric matrix (X X^T, and A A = A A^T since A is symmetric) are
computed by one kernel that runs only the tiles on and above the diagonal and writes each
off-diagonal tile twice (as itself and mirrored): 3 r^2 c + r^3 FLOP per step instead of
4 r^2 c + 2 r^3. For the PRX small block matrices (r = 1792, c = 1792 ... 10752) that is 29 %
fewer FLOP than the full grid; the 48 TFLOP of nominal work per optimizer step (docs/recipe.md
section 9) becomes 34 TFLOP.

The Gram iteration (method="gram", the trainer's default; Polar Express, arXiv 2505.16932,
appendix F; the Dao AI Lab's Gram Newton-Schulz write-up) runs the same polynomial on r x r
matrices. Each X_k is Q_k X0, and Q_k and R_k = X_k X_k^T are
polynomials in R0 = X0 X0^T: they commute, so the product of any two is symmetric and the same
upper-triangle kernel computes it (`launch_symmetric_product` with a second operand Y). A step:
    Z = b R + c3 R R        r^3
    Q <- Q Z + a Q          r^3   (a segment's first step: Q = Z + a I, no product)
    RZ = R Z + a R          r^3   } not in a segment's last step,
    R <- Z RZ + a RZ        r^3   } whose R nothing reads
that is 4 L - 3 products for a segment of L steps, with R0 (r^2 c) before and O = Q X0
(2 r^2 c) after. A restart after the third step (X <- Q X, R <- X X^T, Q <- I: another
3 r^2 c) keeps the rounding of Q, which grows like the product of the a's (3.4445^5 = 480),
from reaching the output multiplied by all of it. Five steps: 6 r^2 c + 14 r^3 FLOP against
15 r^2 c + 5 r^3 for the standard iteration with the same symmetric products: equal for a square
matrix, 26 % less at c = 2 r, 47 % less at c = 6 r. PRX small: 21.5 TFLOP a step instead of
34.3 (as full products 34.6 instead of 47.9; without the restart 17.2, but 3-15x further from the exact iteration in
fp16, bench/muon_numerics.py). Precision: the Gram-space matrices and the restarted X are
stored in fp16 for half banks (bf16 there is 6-9x further from the exact iteration; fp16's range
holds them: entries of R at most 1, of Q at most the product of 3 a's, 130), in the bank's
dtype otherwise; products accumulate in fp32. The input enters fp16 scaled, X0 = s x (one
extra pass over the bank, 4 bytes an element: fp16 cannot hold raw gradient magnitudes); the
output is written in the bank's dtype. Stored products are exactly symmetric (upper triangle
mirrored, diagonal tiles included), which the Gram iteration needs.

Fused: the Frobenius normalisation of the input is a per-matrix scale s folded into the first
step (A0 = s^2 U U^T, X1 = s (a U + B0 U)), so the normalised copy of the input is never written;
`b A` rides in the epilogue of the A A product and `a X` in the epilogue of B X.
Momentum, Nesterov and the cast into the bank, and the parameter update after, are
kernels/muon_update.py's: one pass each per bank, 24 bytes an element (27.7 GB a step at PRX
small, 6.6 ms at the H200's 4.21 TB/s; the unfused foreach ops and stack moved 60.1 GB).

Banks: matrices of one shape are stacked (K, R, C) and orthogonalised by one launch per
product over the whole bank (grid axis 1 = matrix). Operands are read in the bank's dtype
(bf16 in training), products accumulate in fp32, results are stored in the bank's dtype.

Limits: the kernels take any strides (a transposed view is the wide orientation of a tall
bank at no copy). Block sizes are fixed per device kind below; tuned for none yet, since
no GPU was at hand when this was written (the GPU check measures them). No autograd: this
runs in the optimizer step, outside autograd and outside compiled graphs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import launch
from kernels.ref import NEWTON_SCHULZ_METHODS, gram_dtype, gram_restarts, newton_schulz_flops  # noqa: F401

# (BLOCK, BLOCK_K, num_warps, num_stages). Under the CPU interpreter every program instance
# costs about a millisecond whatever its size, so small tiles keep tests quick.
GPU_TILES = (128, 64, 8, 3)
INTERPRETER_TILES = (32, 32, 4, 1)


@triton.jit
def _symmetric_product_kernel(
    x_ptr, y_ptr, c_ptr, out_ptr, scale_ptr,
    M, K,
    stride_xb, stride_xm, stride_xk,
    stride_yb, stride_ym, stride_yk,
    stride_cb, stride_cm, stride_cn,
    stride_ob, stride_om, stride_on,
    alpha, beta,
    HAS_C: tl.constexpr, HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out = alpha * s^2 * X Y^T + beta * C for one upper tile (ti <= tj), mirrored below.

    Y = X (a Gram matrix), or any Y for which X Y^T is symmetric: in the Gram iteration both are
    symmetric polynomials in one matrix, so they commute and X Y^T = X Y is symmetric.
    Program (p, k): tile pair p of matrix k of the bank, pairs numbered row by row over the
    upper triangle of the T x T tile grid.
    """
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    tiles = tl.cdiv(M, BLOCK)
    ti = 0
    rest = pid
    while rest >= tiles - ti:  # row ti of the upper triangle holds tiles - ti pairs
        rest -= tiles - ti
        ti += 1
    tj = ti + rest

    rows = ti * BLOCK + tl.arange(0, BLOCK)
    cols = tj * BLOCK + tl.arange(0, BLOCK)
    ks = tl.arange(0, BLOCK_K)
    x = x_ptr + batch * stride_xb
    row_ptrs = x + rows[:, None].to(tl.int64) * stride_xm + ks[None, :] * stride_xk
    col_ptrs = y_ptr + batch * stride_yb + cols[None, :].to(tl.int64) * stride_ym + ks[:, None] * stride_yk
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        left = tl.load(row_ptrs, mask=(rows[:, None] < M) & k_ok[None, :], other=0.0)
        right = tl.load(col_ptrs, mask=(cols[None, :] < M) & k_ok[:, None], other=0.0)
        acc = tl.dot(left, right, acc)
        row_ptrs += BLOCK_K * stride_xk
        col_ptrs += BLOCK_K * stride_yk

    factor = alpha
    if HAS_SCALE:
        s = tl.load(scale_ptr + batch)
        factor = factor * s * s
    acc = acc * factor
    inside = (rows[:, None] < M) & (cols[None, :] < M)
    if HAS_C:
        c = c_ptr + batch * stride_cb + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn
        acc += beta * tl.load(c, mask=inside, other=0.0).to(tl.float32)
    out = out_ptr + batch * stride_ob
    value = acc.to(out_ptr.dtype.element_ty)
    # The tile as computed, then (after a barrier, so these writes land last) the strict lower
    # triangle mirrored from the upper one, diagonal tiles included: the result is exactly
    # symmetric. Keeping a diagonal tile's own lower half (X Y^T there is symmetric only up to
    # rounding when Y != X) made the fp16 Gram iteration 4.6x less accurate (Polar Express,
    # 3 x 45 x 70 under the interpreter: 0.017 against 0.0037, relative Frobenius). Masking the
    # first store to the upper triangle instead costs 136 registers with C (1 block per SM,
    # bench/kernel_resources.py); this costs 128 (2 blocks).
    tl.store(out + rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on, value, mask=inside)
    tl.debug_barrier()
    lower = (cols[:, None] < M) & (rows[None, :] < M) & (cols[:, None] > rows[None, :])
    tl.store(out + cols[:, None].to(tl.int64) * stride_om + rows[None, :] * stride_on, tl.trans(value),
             mask=lower)


@triton.jit
def _polynomial_step_kernel(
    b_ptr, x_ptr, out_ptr, scale_ptr,
    M, N,
    stride_bb, stride_bm, stride_bk,
    stride_xb, stride_xm, stride_xn,
    stride_ob, stride_om, stride_on,
    a, multiplier,
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out = multiplier * s * (a X + B X) for one (BLOCK x BLOCK) tile; B is M x M, X is M x N."""
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    col_tiles = tl.cdiv(N, BLOCK)
    rows = (pid // col_tiles) * BLOCK + tl.arange(0, BLOCK)
    cols = (pid % col_tiles) * BLOCK + tl.arange(0, BLOCK)
    ks = tl.arange(0, BLOCK_K)
    x = x_ptr + batch * stride_xb
    b_ptrs = b_ptr + batch * stride_bb + rows[:, None].to(tl.int64) * stride_bm + ks[None, :] * stride_bk
    x_ptrs = x + ks[:, None].to(tl.int64) * stride_xm + cols[None, :] * stride_xn
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, M, BLOCK_K):
        k_ok = (k0 + ks) < M
        left = tl.load(b_ptrs, mask=(rows[:, None] < M) & k_ok[None, :], other=0.0)
        right = tl.load(x_ptrs, mask=k_ok[:, None] & (cols[None, :] < N), other=0.0)
        acc = tl.dot(left, right, acc)
        b_ptrs += BLOCK_K * stride_bk
        x_ptrs += BLOCK_K * stride_xm

    inside = (rows[:, None] < M) & (cols[None, :] < N)
    here = tl.load(x + rows[:, None].to(tl.int64) * stride_xm + cols[None, :] * stride_xn, mask=inside, other=0.0)
    acc += a * here.to(tl.float32)
    factor = multiplier
    if HAS_SCALE:
        factor = factor * tl.load(scale_ptr + batch)
    acc = acc * factor
    out = out_ptr + batch * stride_ob + rows[:, None].to(tl.int64) * stride_om + cols[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=inside)


# ----------------------------------------------------------------------------- launchers


def _tiles() -> tuple[int, int, int, int]:
    return INTERPRETER_TILES if launch.interpreting() else GPU_TILES


def _check_bank(x: torch.Tensor, name: str) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name}: expected a bank of matrices (K, R, C), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name}: dtype {x.dtype} is not supported (use bf16, fp16 or fp32)")


def launch_symmetric_product(x: torch.Tensor, alpha: float = 1.0, c: torch.Tensor | None = None, beta: float = 0.0,
                      scale: torch.Tensor | None = None, out: torch.Tensor | None = None,
                      y: torch.Tensor | None = None) -> torch.Tensor:
    """alpha * s_k^2 * X_k Y_k^T + beta * C_k for every matrix k of a bank X (K, M, N) -> (K, M, M).

    Y defaults to X; otherwise X_k Y_k^T must be symmetric (only the upper tiles are computed).
    C must be symmetric (only its upper tiles are read); `scale` is an optional (K,) fp32 s_k.
    """
    _check_bank(x, "symmetric_product")
    k, m, n = x.shape
    y = x if y is None else y
    if y.shape != x.shape or y.dtype != x.dtype:
        raise ValueError(f"symmetric_product: Y is {tuple(y.shape)} {y.dtype}, expected {tuple(x.shape)} {x.dtype}")
    if c is not None and c.shape != (k, m, m):
        raise ValueError(f"symmetric_product: C has shape {tuple(c.shape)}, expected {(k, m, m)}")
    out = torch.empty((k, m, m), device=x.device, dtype=x.dtype) if out is None else out
    block, block_k, warps, stages = _tiles()
    tiles = triton.cdiv(m, block)
    c_arg = c if c is not None else out
    _symmetric_product_kernel[(tiles * (tiles + 1) // 2, k)](
        x, y, c_arg, out, scale if scale is not None else out,
        m, n,
        *x.stride(), *y.stride(), *c_arg.stride(), *out.stride(),
        float(alpha), float(beta),
        HAS_C=c is not None, HAS_SCALE=scale is not None,
        BLOCK=block, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    return out


def launch_polynomial_step(b: torch.Tensor, x: torch.Tensor, a: float, multiplier: float = 1.0,
                    scale: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """multiplier * s_k * (a X_k + B_k X_k) for a bank: B (K, M, M), X (K, M, N) -> (K, M, N)."""
    _check_bank(x, "polynomial_step")
    k, m, n = x.shape
    if b.shape != (k, m, m):
        raise ValueError(f"polynomial_step: B has shape {tuple(b.shape)}, expected {(k, m, m)}")
    out = torch.empty((k, m, n), device=x.device, dtype=x.dtype) if out is None else out
    block, block_k, warps, stages = _tiles()
    _polynomial_step_kernel[(triton.cdiv(m, block) * triton.cdiv(n, block), k)](
        b, x, out, scale if scale is not None else out,
        m, n,
        *b.stride(), *x.stride(), *out.stride(),
        float(a), float(multiplier),
        HAS_SCALE=scale is not None,
        BLOCK=block, BLOCK_K=block_k, num_warps=warps, num_stages=stages,
    )
    return out


def newton_schulz(bank: torch.Tensor, coefficients: list[tuple[float, float, float]],
                  norm_safety: float = 1.0, eps: float = 1e-7, out_scale: float = 1.0,
                  method: str = "standard") -> torch.Tensor:
    """Orthogonalise every matrix of a bank (K, R, C) like `kernels.ref.newton_schulz`, times out_scale.

    "standard" computes in the bank's dtype, "gram" in `gram_dtype` (fp16 for half banks);
    both accumulate in fp32. Returns a new (K, R, C) tensor in the bank's dtype, which is a
    transposed view when R > C (the iteration runs on the wide orientation).
    """
    _check_bank(bank, "newton_schulz")
    if not coefficients:
        raise ValueError("newton_schulz: need at least one (a, b, c) step")
    if method not in NEWTON_SCHULZ_METHODS:
        raise ValueError(f"newton_schulz: method {method!r}: use one of {', '.join(NEWTON_SCHULZ_METHODS)}")
    tall = bank.shape[1] > bank.shape[2]
    x = bank.mT if tall else bank  # a strided view: the kernels read any layout
    k, r, c = x.shape
    norm = torch.linalg.vector_norm(x, dim=(-2, -1), dtype=torch.float32)
    scale = 1.0 / (norm * norm_safety + eps)  # folded into the first step
    if method == "gram":
        x = _gram_newton_schulz(x, coefficients, scale, out_scale)
        return x.mT if tall else x
    gram = torch.empty((k, r, r), device=x.device, dtype=x.dtype)
    poly = torch.empty_like(gram)
    buffers = [torch.empty((k, r, c), device=x.device, dtype=x.dtype) for _ in range(min(2, len(coefficients)))]
    for step, (a, b, c3) in enumerate(coefficients):
        first, last = step == 0, step == len(coefficients) - 1
        s = scale if first else None
        launch_symmetric_product(x, alpha=1.0, scale=s, out=gram)                 # A = s^2 X X^T
        launch_symmetric_product(gram, alpha=c3, c=gram, beta=b, out=poly)       # B = b A + c A A
        x = launch_polynomial_step(poly, x, a, out_scale if last else 1.0, scale=s,
                            out=buffers[step % len(buffers)])             # X = s (a X + B X)
    return x.mT if tall else x


def _gram_newton_schulz(x: torch.Tensor, coefficients: list[tuple[float, float, float]], scale: torch.Tensor,
                        out_scale: float) -> torch.Tensor:
    """The Gram iteration of `kernels.ref.gram_newton_schulz` on a wide bank view x (K, r, c)."""
    k, r, c = x.shape
    dtype = gram_dtype(x.dtype)
    x0 = torch.empty((k, r, c), device=x.device, dtype=dtype)
    torch.mul(x, scale.view(k, 1, 1), out=x0)  # X0 = s x computed in fp32, stored once: raw gradients overflow fp16
    restarts = gram_restarts(len(coefficients))
    gram = launch_symmetric_product(x0)                                            # R = X0 X0^T
    q = None
    for step, (a, b, c3) in enumerate(coefficients):
        if step in restarts:
            x0 = launch_polynomial_step(q, x0, 0.0)                                # X = Q X
            gram, q = launch_symmetric_product(x0), None                           # R = X X^T, Q = I
        z = launch_symmetric_product(gram, alpha=c3, c=gram, beta=b)               # Z = b R + c R R
        if q is None:
            q = z.clone()
            q.diagonal(dim1=-2, dim2=-1).add_(a)                                   # Q = Z + a I
        else:
            q = launch_symmetric_product(q, y=z, c=q, beta=a)                      # Q = Q Z + a Q
        if step + 1 < len(coefficients) and step + 1 not in restarts:
            rz = launch_symmetric_product(gram, y=z, c=gram, beta=a)               # RZ = R Z + a R
            gram = launch_symmetric_product(z, y=rz, c=rz, beta=a)                 # R = Z RZ + a RZ
    out = torch.empty((k, r, c), device=x.device, dtype=x.dtype)
    return launch_polynomial_step(q, x0, 0.0, out_scale, out=out)                  # O = Q X
