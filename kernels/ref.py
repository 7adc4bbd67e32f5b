"""PyTorch references for every kernel op (same signatures as the kernels).

They define the layouts the whole trainer agrees on, and they run on CPU and in tests.

Patch layout: an image (B, C, H, W) with patch size p becomes (B, L, C*p*p) with
L = (H/p) * (W/p) tokens in row-major order (token index = row * (W/p) + column), each
patch flattened in (channel, row in patch, column in patch) order. This is the order of the
PRX reference implementation, so its released weights load unchanged.
"""

from __future__ import annotations

import functools

import torch


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p) * (W/p), C * p * p)."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"patchify: image size {h}x{w} is not a multiple of the patch {p}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(patches: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """(B, L, C * p * p) -> (B, C, H, W); the inverse of `patchify`."""
    b, length, dim = patches.shape
    p = patch_size
    gh, gw = height // p, width // p
    if gh * gw != length or dim % (p * p):
        raise ValueError(
            f"unpatchify: {length} tokens of width {dim} do not tile {height}x{width} with patch {p}"
        )
    c = dim // (p * p)
    x = patches.reshape(b, gh, gw, c, p, p)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


# ---------------------------------------------------------------- Newton-Schulz (muon.py)


NEWTON_SCHULZ_METHODS = ("standard", "gram")
# Gram iteration: a restart every 3 steps (5 steps: once, after the third). Measured
# (bench/muon_numerics.py, CPU, torch 2.13; fp16 storage, bf16 banks with singular values
# log-uniform over 1e-6..1, PRX small shapes / 4, worst of 18 matrices), distance to the exact
# iteration, Jordan / Polar Express: restart after step 3 0.008 / 0.015, after 2 (the Dao lab's
# choice for its coefficients) 0.020 / 0.046, after 4 0.012 / 0.068, after 1 0.055 / 0.23,
# after 2 and 4 0.009 / 0.014 (3 r^2 c more work), never 0.090 / 0.37.
GRAM_RESTART_EVERY = 3


def gram_restarts(steps: int) -> tuple[int, ...]:
    """Steps before which the Gram iteration restarts (5 steps: (3,))."""
    return tuple(range(GRAM_RESTART_EVERY, steps, GRAM_RESTART_EVERY))


def gram_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage of the Gram-space matrices: fp16 for half banks, else the bank's own dtype. bf16's
    8-bit significand is 6-9x further from the exact iteration (PRX small shapes, CPU:
    0.041 / 0.070 against 0.0052 / 0.0079, Jordan / Polar Express, bench/muon_numerics.py)."""
    return torch.float16 if dtype in (torch.bfloat16, torch.float16) else dtype


def newton_schulz(x: torch.Tensor, coefficients: list[tuple[float, float, float]],
                  norm_safety: float = 1.0, eps: float = 1e-7, out_scale: float = 1.0,
                  method: str = "standard") -> torch.Tensor:
    """Approximate the orthogonal polar factor U V^T of x (..., R, C), times out_scale, in x's dtype.

    The plain iteration of Muon (Jordan et al. 2024) and Polar Express (arXiv 2505.16932):
    X0 = x / (||x||_F * norm_safety + eps), on the wide orientation (transposed when R > C, so
    the Gram matrix is the small side); then per step (a, b, c):
    A = X X^T, B = b A + c A A, X <- a X + B X, which maps each singular value s to
    a s + b s^3 + c s^5. Works on one matrix or a batch of same-shape matrices.
    method="gram" evaluates the same polynomial in Gram space (`gram_newton_schulz`); "standard"
    iterates on X.
    """
    if method not in NEWTON_SCHULZ_METHODS:
        raise ValueError(f"newton_schulz: method {method!r}: use one of {', '.join(NEWTON_SCHULZ_METHODS)}")
    if method == "gram":
        return gram_newton_schulz(x, coefficients, norm_safety, eps, out_scale)
    tall = x.shape[-2] > x.shape[-1]
    X = x.mT if tall else x
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True,
                                    dtype=torch.promote_types(X.dtype, torch.float32))
    X = X / (norm * norm_safety + eps).to(X.dtype)
    for a, b, c in coefficients:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if out_scale != 1.0:
        X = X * out_scale
    return X.mT if tall else X


def _product(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype, alpha: float = 1.0,
             c: torch.Tensor | None = None, beta: float = 0.0, symmetric: bool = True) -> torch.Tensor:
    """alpha x y + beta c accumulated in fp32 (fp64 for fp64), rounded once to dtype: the kernels'
    tl.dot with its epilogue, here one baddbmm. `symmetric`: the upper triangle mirrored, as the
    kernel stores it, where `dtype` is half; in fp32 and fp64 the two triangles of these products
    (of commuting symmetric matrices) differ by rounding only, and the mirror cost Muon's CPU step
    on the tiny model's banks ~8 of ~34 ms (2026-12-07, 2 cores)."""
    acc = torch.promote_types(dtype, torch.float32)
    x, y = x.to(acc), y.to(acc)
    if c is None:
        out = torch.matmul(x, y)
        if alpha != 1.0:
            out.mul_(alpha)
    else:
        batched = x.ndim == 3
        out = (torch.baddbmm if batched else torch.addmm)(c.to(acc), x, y, beta=beta, alpha=alpha)
    if symmetric and dtype.itemsize < 4:
        out = torch.where(_upper_triangle(out.shape[-1], out.device), out, out.mT)
    return out.to(dtype)


@functools.cache
def _upper_triangle(n: int, device: torch.device) -> torch.Tensor:
    """(n, n) bool, True on and above the diagonal: one `where` mirrors a product's upper triangle
    (three ops with triu)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu()


def gram_newton_schulz(x: torch.Tensor, coefficients: list[tuple[float, float, float]],
                       norm_safety: float = 1.0, eps: float = 1e-7, out_scale: float = 1.0,
                       dtype: torch.dtype | None = None,
                       restarts: tuple[int, ...] | None = None) -> torch.Tensor:
    """`newton_schulz`'s polynomial evaluated on the r x r Gram matrix (arXiv 2505.16932, appendix F).

    With X_k = Q_k X0 and R_k = X_k X_k^T (r x r, r <= c), every Q_k and R_k is a polynomial in
    R_0, so all of them commute and are symmetric. Per step, with Z = b R + c R^2:
    Q <- Q Z + a Q (the first step of a segment: Q = Z + a I), and, unless the segment ends,
    RZ = R Z + a R, R <- Z RZ + a RZ (= (aI + Z)^2 R). The result is Q X0. Before each step in
    `restarts` (default `gram_restarts`) X is rebuilt as Q X, R as X X^T, and Q restarts at I: Q
    grows like the product of the a's (up to 3.4445^5 = 480 for Jordan), and its rounding error
    reaches the output multiplied by that, so half-precision Q must not run 5 steps.
    Products accumulate in fp32 and every matrix is stored in `dtype` (default `gram_dtype`:
    fp16 for half banks); the result is in x's dtype.
    """
    tall = x.shape[-2] > x.shape[-1]
    X = x.mT if tall else x
    dtype = dtype or gram_dtype(x.dtype)
    acc = torch.promote_types(dtype, torch.float32)
    norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=acc)
    X = (X.to(acc) / (norm * norm_safety + eps)).to(dtype)
    eye = torch.eye(X.shape[-2], dtype=acc, device=X.device)
    R = _product(X, X.mT, dtype)
    Q = None
    restarts = gram_restarts(len(coefficients)) if restarts is None else restarts
    for i, (a, b, c) in enumerate(coefficients):
        if i and i in restarts:
            X = _product(Q, X, dtype, symmetric=False)
            R, Q = _product(X, X.mT, dtype), None
        Z = _product(R, R, dtype, alpha=c, c=R, beta=b)
        Q = (Z.to(acc) + a * eye).to(dtype) if Q is None else _product(Q, Z, dtype, c=Q, beta=a)
        if i + 1 < len(coefficients) and i + 1 not in restarts:
            RZ = _product(R, Z, dtype, c=R, beta=a)
            R = _product(Z, RZ, dtype, c=RZ, beta=a)
    out = _product(Q, X, x.dtype, alpha=out_scale, symmetric=False)
    return out.mT if tall else out


def newton_schulz_flops(rows: int, cols: int, steps: int, symmetric: bool = False,
                        method: str = "standard") -> int:
    """FLOP of `steps` iterations on one matrix: nominal (full products) or with symmetry
    (X X^T and r x r products on the upper triangle: half; Q X and B X: full)."""
    r, c = min(rows, cols), max(rows, cols)
    half = 1 if symmetric else 2  # a symmetric product costs half of 2 m n k
    if method == "gram":
        restarts = len(gram_restarts(steps))
        small = 4 * steps - 3 * (restarts + 1)  # r x r products: 4 a step, 3 fewer per segment
        return (1 + restarts) * (half * r * r * c + 2 * r * r * c) + small * half * r**3
    per_step = half * r * r * c + 2 * r * r * c + half * r**3
    return steps * per_step


# ---------------------------------------------------------------- patchify + noise, TREAD routing
# References of kernels/patchify.py and kernels/routing.py. The random numbers are Philox4x32-10
# keyed by a per-sample 64-bit seed, written out in integer torch ops so that the CPU reference
# draws bit for bit the integers the Triton kernels draw (tl.randint4x), on any device.

_M32 = 0xFFFFFFFF
_PHILOX_ROUND_A, _PHILOX_ROUND_B = 0xD2511F53, 0xCD9E8D57
_PHILOX_KEY_A, _PHILOX_KEY_B = 0x9E3779B9, 0xBB67AE85


def philox4x32(seeds: torch.Tensor, counters: torch.Tensor, rounds: int = 10):
    """Four uint32 streams (as int64 in [0, 2^32)) of Philox4x32 for key = seed (64 bits) and
    counter = (counter lo, counter hi, 0, 0); seeds and counters broadcast. Same as tl.randint4x.

    Products of two 32-bit values are formed in int64, whose wrap-around keeps all 64 bits of the
    unsigned product, so the high word is (p >> 32) & 0xFFFFFFFF.
    """
    k0, k1 = seeds & _M32, (seeds >> 32) & _M32
    c0, c1 = counters & _M32, (counters >> 32) & _M32
    c2 = c3 = torch.zeros_like(c0)
    for _ in range(rounds):
        prod_b, prod_a = c2 * _PHILOX_ROUND_B, c0 * _PHILOX_ROUND_A
        c0, c1, c2, c3 = (((prod_b >> 32) & _M32) ^ c1 ^ k0, prod_b & _M32,
                          ((prod_a >> 32) & _M32) ^ c3 ^ k1, prod_a & _M32)
        k0, k1 = (k0 + _PHILOX_KEY_A) & _M32, (k1 + _PHILOX_KEY_B) & _M32
    return c0, c1, c2, c3


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """uint32 (as int64) -> float32 uniform in the open interval (0, 1), from the top 24 bits."""
    return ((bits >> 8).to(torch.float32) + 0.5) * 2.0**-24


def normal_from_seeds(seeds: torch.Tensor, offset: int, num_tokens: int, channels: int,
                      patch_size: int) -> torch.Tensor:
    """(B, L, C * p * p) float32 N(0, 1) noise in patch layout, sample b keyed by seeds[b] alone
    (so it does not depend on the batch it sits in): the noise the fused kernel draws.

    With q = ceil(p * p / 4), element (l, c, j) of a sample (j = row * p + column in the patch)
    is component j % 4 of Box-Muller applied to the pairs (r0, r1), (r2, r3) of
    Philox(seed, counter = offset + (l * C + c) * q + j // 4); the components of a pair are
    (rho cos theta, rho sin theta), rho = sqrt(-2 ln u_first), theta = 2 pi u_second.
    A sample uses the counters [offset, offset + L * C * q).
    """
    pp = patch_size * patch_size
    groups = -(-pp // 4)
    counters = offset + torch.arange(num_tokens * channels * groups, device=seeds.device)
    u0, u1, u2, u3 = (uniform_from_bits(r) for r in philox4x32(seeds.to(torch.int64)[:, None], counters[None]))
    rho01, theta01 = torch.sqrt(-2.0 * torch.log(u0)), 6.283185307179586 * u1
    rho23, theta23 = torch.sqrt(-2.0 * torch.log(u2)), 6.283185307179586 * u3
    normals = torch.stack([rho01 * torch.cos(theta01), rho01 * torch.sin(theta01),
                           rho23 * torch.cos(theta23), rho23 * torch.sin(theta23)], dim=-1)
    normals = normals.reshape(seeds.shape[0], num_tokens * channels, groups * 4)[..., :pp]
    return normals.reshape(seeds.shape[0], num_tokens, channels * pp)


def images_to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (x / 127.5 - 1); float images are taken as already in [-1, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    return images.float()


def patchify_and_noise(images: torch.Tensor, t: torch.Tensor, patch_size: int,
                       noise: torch.Tensor | None = None, seeds: torch.Tensor | None = None,
                       noise_offset: int = 0, noise_scale: float = 1.0,
                       out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) uint8 or float in [-1, 1], t (B,) -> (x_t, x) in patch layout
    (B, L, 3 * p * p) and out_dtype: x = patchify(images), x_t = (1 - t) x + t * noise_scale * eps.

    eps is `noise` (B, L, 3 * p * p) when given, else drawn from per-sample int64 `seeds` (B,)
    and `noise_offset` as `normal_from_seeds` says. Computed in fp32, rounded once at the end.
    """
    if (noise is None) == (seeds is None):
        raise ValueError("patchify_and_noise: pass exactly one of noise and seeds")
    x = patchify(images_to_unit_range(images), patch_size)
    if noise is not None:
        eps = noise.float()
    else:
        eps = normal_from_seeds(seeds, noise_offset, x.shape[1], images.shape[1], patch_size)
    tb = t.float().reshape(-1, 1, 1)
    x_t = (1 - tb) * x + tb * (noise_scale * eps)
    return x_t.to(out_dtype), x.to(out_dtype)


def route_keys(seeds: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, N) int64 sort keys of the TREAD selection: (Philox(seed_b, n) word 0) * 2^31 + n, so
    all keys of a sample differ and the selection is exact on any device."""
    tokens = torch.arange(num_tokens, device=seeds.device)
    bits = philox4x32(seeds.to(torch.int64)[:, None], tokens[None])[0]
    return (bits << 31) + tokens


def select_kept_tokens(seeds: torch.Tensor, num_tokens: int, num_kept: int) -> torch.Tensor:
    """(B, num_kept) int64 indices of the tokens that stay in the routed span, ascending: the
    num_kept smallest keys of `route_keys`. Sample b depends on seeds[b] only."""
    if not 0 < num_kept <= num_tokens:
        raise ValueError(f"select_kept_tokens: cannot keep {num_kept} of {num_tokens} tokens")
    keys = route_keys(seeds, num_tokens)
    return keys.topk(num_kept, dim=1, largest=False).indices.sort(dim=1).values


def route_gather(x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), keep_idx (B, K) -> (B, K, C): the kept tokens, in the order of keep_idx."""
    return x.gather(1, keep_idx[..., None].expand(-1, -1, x.shape[2]))


def route_scatter(x_kept: torch.Tensor, x_full: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """(B, N, C): x_full with row keep_idx[b, k] replaced by x_kept[b, k]; the routed-away
    tokens come back unchanged."""
    return x_full.scatter(1, keep_idx[..., None].expand(-1, -1, x_full.shape[2]), x_kept)


def route_gather_table(table: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """A per-token table shared by the batch (N, ...), e.g. RoPE cos/sin (N, 1, D/2) or grid
    positions (N, 2) -> (B, K, ...) for the kept tokens. Tiny; plain indexing on every device."""
    return table[keep_idx]


# ---------------------------------------------------------------- losses (flow_matching.py, lpips_head.py, cosine.py)


def flow_loss(x_hat: torch.Tensor, x: torch.Tensor, t: torch.Tensor, t_floor: float = 0.05,
              weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Velocity-space loss of an x-prediction (docs/recipe.md section 2): (mean, per-sample (B,)), fp32.

    v_hat - v = ((x_t - x_hat) - (x_t - x)) / max(t, t_floor) = (x - x_hat) / max(t, t_floor).
    per_sample is unweighted (the per-t-bin log); mean = mean_b(weight_b * per_sample_b).
    """
    scale = 1.0 / t.detach().float().clamp_min(t_floor)
    err = (x.float() - x_hat.float()) * scale.reshape(-1, *([1] * (x.dim() - 1)))
    per_sample = err.square().flatten(1).mean(1)
    if weight is None:
        return per_sample.mean(), per_sample
    return (weight.detach().float() * per_sample).mean(), per_sample


def lpips_head_distance(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                        eps: float = 1e-10) -> torch.Tensor:
    """One LPIPS layer (lpips v0.1): unit-normalise over channels, squared difference, the
    layer's linear weights, spatial mean. pred, target: (B, C, h, w); weight: C values -> (B,)."""
    def unit(f):
        return f / (f.square().sum(1, keepdim=True).sqrt() + eps)

    diff = (unit(pred.float()) - unit(target.float())).square()
    return (diff * weight.float().reshape(1, -1, 1, 1)).sum(1).mean((1, 2))


def lpips_distance(preds, targets, weights, eps: float = 1e-10) -> torch.Tensor:
    """LPIPS: the sum over layers of `lpips_head_distance`, (B,)."""
    return sum(lpips_head_distance(p, q, w, eps) for p, q, w in zip(preds, targets, weights, strict=True))


def cosine_alignment(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None,
                     eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over valid tokens of cos(a, b), per-sample mean (B,)), fp32; a, b: (B, N, D).

    cos = a.b / (max(|a|, eps) max(|b|, eps)); mask (B, N) weights the tokens (None: all);
    a sample with no valid token gets 0.
    """
    a32, b32 = a.float(), b.float()
    cos = (a32 * b32).sum(-1) / (a32.norm(dim=-1).clamp_min(eps) * b32.norm(dim=-1).clamp_min(eps))
    m = torch.ones_like(cos) if mask is None else mask.detach().to(cos.dtype)
    sums, counts = (m * cos).sum(1), m.sum(1)
    per_sample = torch.where(counts > 0, sums / counts.clamp_min(1e-12), torch.zeros_like(sums))
    return sums.sum() / counts.sum().clamp_min(1e-12), per_sample


# ---------------------------------------------------------------- Muon momentum and update (muon_update.py)


def momentum_to_bank(grads: list[torch.Tensor], buffers: list[torch.Tensor], momentum: float,
                     nesterov: bool, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """K same-shape matrices: buf <- lerp(buf, g, 1 - momentum) in place; u = lerp(g, buf,
    momentum) (Nesterov) or buf; returns the bank (K, R, C) of u in `dtype`. Gradients are only read."""
    torch._foreach_lerp_(list(buffers), list(grads), 1 - momentum)
    bank = torch.empty((len(grads), *grads[0].shape), dtype=dtype, device=grads[0].device)
    for k, (g, buf) in enumerate(zip(grads, buffers, strict=True)):
        bank[k].copy_(torch.lerp(g, buf, momentum) if nesterov else buf)  # one matrix's fp32 at a time
    return bank


def apply_update(params: list[torch.Tensor], updates: list[torch.Tensor], step_size: float,
                 decay: float = 1.0) -> None:
    """p <- p * decay - step_size * o for each pair, in place (decay = 1 - lr * weight_decay)."""
    if decay != 1.0:
        torch._foreach_mul_(list(params), decay)
    for p, o in zip(params, updates, strict=True):
        p.add_(o, alpha=-step_size)
