"""Fused patchify + noising, and the patch <-> image layout copies (patchify, unpatchify).

`patchify_and_noise`: images as the loader delivers them (uint8 (B, 3, H, W), or float in
[-1, 1], any strides) -> in one pass the model input x_t = (1 - t) x + t * s * eps and the clean
target x, both in patch layout (B, L, 3 * p * p) (order of `kernels.ref.patchify`) and in the
compute dtype. eps is read from a noise tensor in patch layout, or drawn in the kernel
(Philox4x32-10 keyed by a per-sample int64 seed, counters from an offset; the exact stream is
`kernels.ref.normal_from_seeds`), so no noise tensor ever exists in memory.

Bytes it must move per pixel: uint8 in, two bf16 out = 1 + 2 + 2 = 5 (+ 4 with an fp32 noise
tensor); the unfused reference (float conversion, patchify copy, randn, the noising) moves about
40. `patchify` / `unpatchify`: read and write each element once (2 * element size per pixel);
each is the other's backward.

One program per (sample, token): it walks the C channels, each a p x p tile (rows of p
contiguous pixels), and writes C * p * p contiguous outputs. The in-kernel noise draws one Philox
call per 4 outputs (randint4x, two Box-Muller pairs) and interleaves them with join/reshape.

Limits: patch layout tensors contiguous; p * p <= 16384; no gradient through
`patchify_and_noise` (it is the data path; use `patchify` for a differentiable layout change).
Tuned on: not yet tuned on a GPU (one config: one token per program, 4 warps).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------- kernels


@triton.jit
def _patchify_and_noise_kernel(
    images_ptr, t_ptr, noise_ptr, seeds_ptr, x_t_ptr, x_ptr,
    num_tokens, grid_w, noise_offset, noise_scale,
    stride_b, stride_c, stride_h, stride_w,
    CHANNELS: tl.constexpr, PATCH: tl.constexpr, BLOCK: tl.constexpr,
    FROM_UINT8: tl.constexpr, NOISE_FROM_SEEDS: tl.constexpr,
):
    token = tl.program_id(0)  # over B * L
    b = token // num_tokens
    l = token % num_tokens
    gy = l // grid_w
    gx = l % grid_w
    j = tl.arange(0, BLOCK)  # position in the p x p tile: row * p + column
    mask = j < PATCH * PATCH
    image_offsets = (b.to(tl.int64) * stride_b + (gy * PATCH + j // PATCH).to(tl.int64) * stride_h
                     + (gx * PATCH + j % PATCH).to(tl.int64) * stride_w)
    out_row = token.to(tl.int64) * (CHANNELS * PATCH * PATCH)
    t = tl.load(t_ptr + b).to(tl.float32)
    if NOISE_FROM_SEEDS:
        seed = tl.load(seeds_ptr + b)
        group = tl.arange(0, BLOCK // 4)
    for c in tl.static_range(CHANNELS):
        x = tl.load(images_ptr + image_offsets + c * stride_c, mask=mask, other=0).to(tl.float32)
        if FROM_UINT8:
            x = x / 127.5 - 1.0
        out_offsets = out_row + c * (PATCH * PATCH) + j
        if NOISE_FROM_SEEDS:
            counters = (l * CHANNELS + c).to(tl.int64) * ((PATCH * PATCH + 3) // 4) + noise_offset + group
            r0, r1, r2, r3 = tl.randint4x(seed, counters)
            rho01 = tl.sqrt(-2.0 * tl.log(_uniform_from_bits(r0)))
            theta01 = 6.283185307179586 * _uniform_from_bits(r1)
            rho23 = tl.sqrt(-2.0 * tl.log(_uniform_from_bits(r2)))
            theta23 = 6.283185307179586 * _uniform_from_bits(r3)
            # join appends a last axis: join(join(n0, n2), join(n1, n3))[g, i, k] = n(2i + k),
            # so the flat block holds component m of group g at 4g + m.
            n02 = tl.join(rho01 * tl.cos(theta01), rho23 * tl.cos(theta23))
            n13 = tl.join(rho01 * tl.sin(theta01), rho23 * tl.sin(theta23))
            eps = tl.reshape(tl.join(n02, n13), [BLOCK])
        else:
            eps = tl.load(noise_ptr + out_offsets, mask=mask, other=0).to(tl.float32)
        x_t = (1.0 - t) * x + t * (noise_scale * eps)
        tl.store(x_t_ptr + out_offsets, x_t.to(x_t_ptr.dtype.element_ty), mask=mask)
        tl.store(x_ptr + out_offsets, x.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _uniform_from_bits(bits):
    """uint32 -> float32 in (0, 1) from the top 24 bits (as `kernels.ref.uniform_from_bits`)."""
    return ((bits >> 8).to(tl.float32) + 0.5) * 5.960464477539063e-08  # 2^-24


@triton.jit
def _patch_layout_kernel(
    images_ptr, patches_ptr,
    num_tokens, grid_w,
    stride_b, stride_c, stride_h, stride_w,
    CHANNELS: tl.constexpr, PATCH: tl.constexpr, BLOCK: tl.constexpr, TO_IMAGES: tl.constexpr,
):
    token = tl.program_id(0)  # over B * L
    b = token // num_tokens
    l = token % num_tokens
    j = tl.arange(0, BLOCK)
    mask = j < PATCH * PATCH
    image_offsets = (b.to(tl.int64) * stride_b
                     + ((l // grid_w) * PATCH + j // PATCH).to(tl.int64) * stride_h
                     + ((l % grid_w) * PATCH + j % PATCH).to(tl.int64) * stride_w)
    patch_offsets = token.to(tl.int64) * (CHANNELS * PATCH * PATCH) + j
    for c in tl.static_range(CHANNELS):
        if TO_IMAGES:
            v = tl.load(patches_ptr + patch_offsets + c * (PATCH * PATCH), mask=mask)
            tl.store(images_ptr + image_offsets + c * stride_c, v, mask=mask)
        else:
            v = tl.load(images_ptr + image_offsets + c * stride_c, mask=mask)
            tl.store(patches_ptr + patch_offsets + c * (PATCH * PATCH), v, mask=mask)


# ---------------------------------------------------------------- launchers


def _tile_block(patch_size: int) -> int:
    """Power-of-two block covering a p x p tile, at least 4 (the noise draws 4 values a call)."""
    if patch_size * patch_size > 16384:
        raise ValueError(f"patch size {patch_size} too large for one block (p * p <= 16384)")
    return max(4, triton.next_power_of_2(patch_size * patch_size))


def _grid_of(height: int, width: int, patch_size: int, op: str) -> tuple[int, int]:
    if height % patch_size or width % patch_size:
        raise ValueError(f"{op}: image size {height}x{width} is not a multiple of the patch {patch_size}")
    return height // patch_size, width // patch_size


def launch_patchify_and_noise(images, t, patch_size, noise, seeds, noise_offset, noise_scale, out_dtype):
    if images.dim() != 4:
        raise ValueError(f"patchify_and_noise: images must be (B, C, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.dtype.is_floating_point:
        raise ValueError(f"patchify_and_noise: images must be uint8 or float, got {images.dtype}")
    if (noise is None) == (seeds is None):
        raise ValueError("patchify_and_noise: pass exactly one of noise and seeds")
    b, c, h, w = images.shape
    gh, gw = _grid_of(h, w, patch_size, "patchify_and_noise")
    shape = (b, gh * gw, c * patch_size * patch_size)
    if t.shape != (b,):
        raise ValueError(f"patchify_and_noise: t must be ({b},), got {tuple(t.shape)}")
    if noise is not None and (noise.shape != shape or not noise.is_contiguous()):
        raise ValueError(f"patchify_and_noise: noise must be contiguous {shape}, got {tuple(noise.shape)}")
    if seeds is not None and (seeds.shape != (b,) or seeds.dtype != torch.int64):
        raise ValueError(f"patchify_and_noise: seeds must be int64 ({b},), got {seeds.dtype} {tuple(seeds.shape)}")
    x_t = torch.empty(shape, dtype=out_dtype, device=images.device)
    x = torch.empty(shape, dtype=out_dtype, device=images.device)
    if x.numel() == 0:
        return x_t, x
    t = t.contiguous()
    _patchify_and_noise_kernel[(b * gh * gw,)](
        images, t, noise if noise is not None else x, seeds.contiguous() if seeds is not None else t, x_t, x,
        gh * gw, gw, int(noise_offset), float(noise_scale),
        *images.stride(),
        CHANNELS=c, PATCH=patch_size, BLOCK=_tile_block(patch_size),
        FROM_UINT8=images.dtype == torch.uint8, NOISE_FROM_SEEDS=seeds is not None,
        num_warps=4,
    )
    return x_t, x


def _launch_patch_layout(images: torch.Tensor, patches: torch.Tensor, patch_size: int, to_images: bool):
    b, c, h, w = images.shape
    gh, gw = _grid_of(h, w, patch_size, "unpatchify" if to_images else "patchify")
    if patches.shape != (b, gh * gw, c * patch_size * patch_size) or not patches.is_contiguous():
        raise ValueError(f"patches must be contiguous (B, L, C*p*p) = {(b, gh * gw, c * patch_size ** 2)}, "
                         f"got {tuple(patches.shape)}")
    if patches.numel():
        _patch_layout_kernel[(b * gh * gw,)](
            images, patches, gh * gw, gw, *images.stride(),
            CHANNELS=c, PATCH=patch_size, BLOCK=_tile_block(patch_size), TO_IMAGES=to_images,
            num_warps=4,
        )


def launch_patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    if images.dim() != 4:
        raise ValueError(f"patchify: images must be (B, C, H, W), got {tuple(images.shape)}")
    b, c, h, w = images.shape
    patches = images.new_empty(b, (h // patch_size) * (w // patch_size), c * patch_size * patch_size)
    _launch_patch_layout(images, patches, patch_size, to_images=False)
    return patches


def launch_unpatchify(patches: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    if patches.dim() != 3 or patches.shape[2] % (patch_size * patch_size):
        raise ValueError(f"unpatchify: patches must be (B, L, C*p*p) with p = {patch_size}, got {tuple(patches.shape)}")
    b, _, dim = patches.shape
    images = patches.new_empty(b, dim // (patch_size * patch_size), height, width)
    _launch_patch_layout(images, patches, patch_size, to_images=True)
    return images


# ---------------------------------------------------------------- torch.library ops and autograd
# custom_op (opaque to torch.compile, with a fake for tracing) rather than triton_op: under the
# Triton interpreter wrap_triton cannot trace a kernel, so only custom_op lets the CPU tests prove
# that torch.compile(fullgraph=True) goes through these ops with their gradients.


@torch.library.custom_op("prx::patchify_and_noise", mutates_args=())
def _patchify_and_noise_op(images: torch.Tensor, t: torch.Tensor, patch_size: int,
                           noise: torch.Tensor | None, seeds: torch.Tensor | None, noise_offset: int,
                           noise_scale: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_patchify_and_noise(images, t, patch_size, noise, seeds, noise_offset, noise_scale, out_dtype)


@_patchify_and_noise_op.register_fake
def _(images, t, patch_size, noise, seeds, noise_offset, noise_scale, out_dtype):
    b, c, h, w = images.shape
    shape = (b, (h // patch_size) * (w // patch_size), c * patch_size * patch_size)
    return images.new_empty(shape, dtype=out_dtype), images.new_empty(shape, dtype=out_dtype)


@torch.library.custom_op("prx::patchify", mutates_args=())
def _patchify_op(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    return launch_patchify(images, patch_size)


@_patchify_op.register_fake
def _(images, patch_size):
    b, c, h, w = images.shape
    return images.new_empty(b, (h // patch_size) * (w // patch_size), c * patch_size * patch_size)


@torch.library.custom_op("prx::unpatchify", mutates_args=())
def _unpatchify_op(patches: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    return launch_unpatchify(patches, patch_size, height, width)


@_unpatchify_op.register_fake
def _(patches, patch_size, height, width):
    return patches.new_empty(patches.shape[0], patches.shape[2] // (patch_size * patch_size), height, width)


# Each layout op's backward is the other op; nothing is saved but the sizes.
def _save_layout(ctx, inputs, output):
    ctx.patch_size = inputs[1]
    ctx.image_size = inputs[0].shape[-2:] if inputs[0].dim() == 4 else None


def _patchify_backward(ctx, grad_patches):
    h, w = ctx.image_size
    return _unpatchify_op(grad_patches.contiguous(), ctx.patch_size, h, w), None


def _unpatchify_backward(ctx, grad_images):
    return _patchify_op(grad_images, ctx.patch_size), None, None, None


_patchify_op.register_autograd(_patchify_backward, setup_context=_save_layout)
_unpatchify_op.register_autograd(_unpatchify_backward, setup_context=_save_layout)


# ---------------------------------------------------------------- functional API


def patchify_and_noise(images: torch.Tensor, t: torch.Tensor, patch_size: int, noise: torch.Tensor | None = None,
                       seeds: torch.Tensor | None = None, noise_offset: int = 0, noise_scale: float = 1.0,
                       out_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, x) in patch layout; see `kernels.ref.patchify_and_noise`. No gradient."""
    return _patchify_and_noise_op(images, t, patch_size, noise, seeds, noise_offset, noise_scale, out_dtype)


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, C * p * p), differentiable; see `kernels.ref.patchify`."""
    return _patchify_op(images, patch_size)


def unpatchify(patches: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """(B, L, C * p * p) -> (B, C, H, W), differentiable; see `kernels.ref.unpatchify`."""
    return _unpatchify_op(patches, patch_size, height, width)
