"""TREAD token routing: the per-sample random selection, and the gather/scatter of token rows.

- `select_kept_tokens(seeds, N, K)`: per sample, K of N tokens, indices ascending (so positions
  stay sorted). Sort keys (Philox(seed_b, n) word 0) * 2^31 + n come from a tiny kernel; the K
  smallest are kept (torch.topk, then sort). The keys are integers and unique, so the selection is
  identical on every device and to `kernels.ref.select_kept_tokens`. Sample b depends on seeds[b]
  only: with seeds from (seed, step, global sample slot) it is the same on any number of ranks.
- `route_gather(x, keep_idx)`: (B, N, C) -> (B, K, C).
- `route_scatter(x_kept, x_full, keep_idx)`: (B, N, C): the kept rows from x_kept, every other
  row from x_full unchanged (the tokens that skipped the span).
Backwards: gather's is a scatter into zeros, scatter's splits the gradient into the kept rows
and the rest (zeros at the kept rows); each in one pass, through an inverse index
(B, N) int32 (kept position or -1) built by two small torch ops.

Bytes they must move: gather reads and writes K rows; scatter reads N rows (K kept + N - K full)
and writes N; masked loads skip what is not needed, so nothing more moves. In bf16 at
B = 16, N = 1024, C = 1792 a gather moves 2 * 16 * 512 * 1792 * 2 B = 59 MB.
Limits: x, x_kept, x_full contiguous; keep_idx (B, K) int64 of distinct indices in [0, N)
(not checked on the GPU; `select_kept_tokens` makes them so).
Tuned on: not yet tuned on a GPU (one config: 4096-element tiles of up to 256 columns).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------- kernels


@triton.jit
def _route_keys_kernel(seeds_ptr, keys_ptr, num_tokens, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    tokens = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    seed = tl.load(seeds_ptr + b)
    bits, _, _, _ = tl.randint4x(seed, tokens.to(tl.int64))
    keys = (bits.to(tl.int64) << 31) + tokens
    tl.store(keys_ptr + b.to(tl.int64) * num_tokens + tokens, keys, mask=tokens < num_tokens)


@triton.jit
def _gather_rows_kernel(
    x_ptr, keep_idx_ptr, out_ptr,
    num_rows, num_kept, num_tokens, width,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # over B * K
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    row_mask = rows < num_rows
    mask = row_mask[:, None] & (cols < width)[None, :]
    token = tl.load(keep_idx_ptr + rows, mask=row_mask, other=0)
    src_rows = (rows // num_kept).to(tl.int64) * num_tokens + token
    values = tl.load(x_ptr + src_rows[:, None] * width + cols[None, :], mask=mask)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * width + cols[None, :], values, mask=mask)


@triton.jit
def _merge_rows_kernel(
    kept_ptr, full_ptr, inverse_ptr, out_ptr,
    num_rows, num_kept, num_tokens, width,
    HAS_FULL: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """out row n = kept row inverse[n] if inverse[n] >= 0, else full row n (or 0 without full)."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # over B * N
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    row_mask = rows < num_rows
    mask = row_mask[:, None] & (cols < width)[None, :]
    position = tl.load(inverse_ptr + rows, mask=row_mask, other=-1)
    is_kept = (position >= 0)[:, None]
    kept_rows = (rows // num_tokens).to(tl.int64) * num_kept + position
    values = tl.load(kept_ptr + kept_rows[:, None] * width + cols[None, :], mask=mask & is_kept, other=0)
    out_offsets = rows.to(tl.int64)[:, None] * width + cols[None, :]
    if HAS_FULL:
        rest = tl.load(full_ptr + out_offsets, mask=mask & ~is_kept, other=0)
        values = tl.where(is_kept, values, rest)
    tl.store(out_ptr + out_offsets, values, mask=mask)


@triton.jit
def _split_rows_kernel(
    grad_ptr, inverse_ptr, grad_kept_ptr, grad_full_ptr,
    num_rows, num_kept, num_tokens, width,
    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    """grad row n goes to grad_kept row inverse[n] if kept, else to grad_full row n; grad_full
    gets zeros at the kept rows."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # over B * N
    cols = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    row_mask = rows < num_rows
    mask = row_mask[:, None] & (cols < width)[None, :]
    position = tl.load(inverse_ptr + rows, mask=row_mask, other=-1)
    is_kept = (position >= 0)[:, None]
    offsets = rows.to(tl.int64)[:, None] * width + cols[None, :]
    grad = tl.load(grad_ptr + offsets, mask=mask)
    tl.store(grad_full_ptr + offsets, tl.where(is_kept, tl.zeros_like(grad), grad), mask=mask)
    kept_rows = (rows // num_tokens).to(tl.int64) * num_kept + position
    tl.store(grad_kept_ptr + kept_rows[:, None] * width + cols[None, :], grad, mask=mask & is_kept)


# ---------------------------------------------------------------- launchers


def _tiles(num_rows: int, width: int) -> tuple[tuple[int, int], dict]:
    """Tiles of about 4096 elements, at most 256 columns wide (512 bytes of a bf16 row)."""
    block_cols = min(256, triton.next_power_of_2(width))
    block_rows = max(1, 4096 // block_cols)
    grid = (triton.cdiv(num_rows, block_rows), triton.cdiv(width, block_cols))
    return grid, {"BLOCK_ROWS": block_rows, "BLOCK_COLS": block_cols, "num_warps": 4}


def _check_rows(name: str, x: torch.Tensor, keep_idx: torch.Tensor) -> None:
    if x.dim() != 3 or not x.is_contiguous():
        raise ValueError(f"{name}: tokens must be a contiguous (B, N, C) tensor, got {tuple(x.shape)}")
    if keep_idx.dim() != 2 or keep_idx.shape[0] != x.shape[0] or keep_idx.dtype != torch.int64:
        raise ValueError(f"{name}: keep_idx must be int64 (B, K) with B = {x.shape[0]}, "
                         f"got {keep_idx.dtype} {tuple(keep_idx.shape)}")


def inverse_index(keep_idx: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(B, N) int32: the position of token n in keep_idx[b], or -1 if it was routed away."""
    b, k = keep_idx.shape
    inverse = torch.full((b, num_tokens), -1, dtype=torch.int32, device=keep_idx.device)
    positions = torch.arange(k, dtype=torch.int32, device=keep_idx.device).expand(b, k)
    return inverse.scatter_(1, keep_idx, positions)


def launch_route_keys(seeds: torch.Tensor, num_tokens: int) -> torch.Tensor:
    if seeds.dim() != 1 or seeds.dtype != torch.int64:
        raise ValueError(f"route keys: seeds must be int64 (B,), got {seeds.dtype} {tuple(seeds.shape)}")
    keys = torch.empty(seeds.shape[0], num_tokens, dtype=torch.int64, device=seeds.device)
    if keys.numel():
        block = min(1024, triton.next_power_of_2(num_tokens))
        _route_keys_kernel[(seeds.shape[0], triton.cdiv(num_tokens, block))](
            seeds.contiguous(), keys, num_tokens, BLOCK=block)
    return keys


def launch_route_gather(x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    _check_rows("route_gather", x, keep_idx)
    b, n, c = x.shape
    k = keep_idx.shape[1]
    out = x.new_empty(b, k, c)
    if out.numel():
        grid, meta = _tiles(b * k, c)
        _gather_rows_kernel[grid](x, keep_idx.contiguous(), out, b * k, k, n, c, **meta)
    return out


def launch_route_merge(x_kept: torch.Tensor, x_full: torch.Tensor | None, keep_idx: torch.Tensor,
                       num_tokens: int) -> torch.Tensor:
    """route_scatter with x_full, or the scatter of x_kept into zeros (gather's backward)."""
    _check_rows("route_scatter", x_kept, keep_idx)
    b, k, c = x_kept.shape
    if keep_idx.shape[1] != k:
        raise ValueError(f"route_scatter: {k} kept rows but keep_idx has {keep_idx.shape[1]}")
    if x_full is not None:
        if x_full.shape != (b, num_tokens, c) or x_full.dtype != x_kept.dtype or not x_full.is_contiguous():
            raise ValueError(f"route_scatter: x_full must be contiguous {(b, num_tokens, c)} {x_kept.dtype}, "
                             f"got {tuple(x_full.shape)} {x_full.dtype}")
    out = x_kept.new_empty(b, num_tokens, c)
    if out.numel():
        grid, meta = _tiles(b * num_tokens, c)
        _merge_rows_kernel[grid](x_kept, x_full if x_full is not None else x_kept,
                                 inverse_index(keep_idx, num_tokens), out,
                                 b * num_tokens, k, num_tokens, c, HAS_FULL=x_full is not None, **meta)
    return out


def launch_route_split(grad: torch.Tensor, keep_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_rows("route_scatter backward", grad, keep_idx)
    b, n, c = grad.shape
    k = keep_idx.shape[1]
    grad_kept, grad_full = grad.new_empty(b, k, c), torch.empty_like(grad)
    if grad.numel():
        grid, meta = _tiles(b * n, c)
        _split_rows_kernel[grid](grad, inverse_index(keep_idx, n), grad_kept, grad_full, b * n, k, n, c, **meta)
    return grad_kept, grad_full


# ---------------------------------------------------------------- torch.library ops and autograd
# custom_op with fakes, not triton_op: see kernels/patchify.py (compile is testable on the CPU).


@torch.library.custom_op("prx::route_keys", mutates_args=())
def _route_keys_op(seeds: torch.Tensor, num_tokens: int) -> torch.Tensor:
    return launch_route_keys(seeds, num_tokens)


@_route_keys_op.register_fake
def _(seeds, num_tokens):
    return seeds.new_empty(seeds.shape[0], num_tokens)


@torch.library.custom_op("prx::route_gather", mutates_args=())
def _route_gather_op(x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    return launch_route_gather(x, keep_idx)


@_route_gather_op.register_fake
def _(x, keep_idx):
    return x.new_empty(x.shape[0], keep_idx.shape[1], x.shape[2])


@torch.library.custom_op("prx::route_merge", mutates_args=())
def _route_merge_op(x_kept: torch.Tensor, x_full: torch.Tensor | None, keep_idx: torch.Tensor,
                    num_tokens: int) -> torch.Tensor:
    return launch_route_merge(x_kept, x_full, keep_idx, num_tokens)


@_route_merge_op.register_fake
def _(x_kept, x_full, keep_idx, num_tokens):
    return x_kept.new_empty(x_kept.shape[0], num_tokens, x_kept.shape[2])


@torch.library.custom_op("prx::route_split", mutates_args=())
def _route_split_op(grad: torch.Tensor, keep_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_route_split(grad, keep_idx)


@_route_split_op.register_fake
def _(grad, keep_idx):
    return grad.new_empty(grad.shape[0], keep_idx.shape[1], grad.shape[2]), torch.empty_like(grad)


# Saved for backward: keep_idx only (and N); the inverse index is rebuilt (B * N int32, tiny).
def _gather_setup(ctx, inputs, output):
    x, keep_idx = inputs
    ctx.save_for_backward(keep_idx)
    ctx.num_tokens = x.shape[1]


def _gather_backward(ctx, grad_out):
    (keep_idx,) = ctx.saved_tensors
    return _route_merge_op(grad_out.contiguous(), None, keep_idx, ctx.num_tokens), None


def _merge_setup(ctx, inputs, output):
    x_kept, x_full, keep_idx, num_tokens = inputs
    ctx.save_for_backward(keep_idx)
    ctx.has_full = x_full is not None


def _merge_backward(ctx, grad_out):
    (keep_idx,) = ctx.saved_tensors
    grad_kept, grad_full = _route_split_op(grad_out.contiguous(), keep_idx)
    return grad_kept, (grad_full if ctx.has_full else None), None, None


_route_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)
_route_merge_op.register_autograd(_merge_backward, setup_context=_merge_setup)


# ---------------------------------------------------------------- functional API


def select_kept_tokens(seeds: torch.Tensor, num_tokens: int, num_kept: int) -> torch.Tensor:
    """(B, num_kept) int64 kept token indices, ascending; see `kernels.ref.select_kept_tokens`."""
    if not 0 < num_kept <= num_tokens:
        raise ValueError(f"select_kept_tokens: cannot keep {num_kept} of {num_tokens} tokens")
    keys = _route_keys_op(seeds, num_tokens)
    return keys.topk(num_kept, dim=1, largest=False).indices.sort(dim=1).values


def route_gather(x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """(B, N, C) -> (B, K, C): the kept tokens."""
    return _route_gather_op(x, keep_idx)


def route_scatter(x_kept: torch.Tensor, x_full: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """(B, N, C): x_full with the kept rows replaced by x_kept."""
    return _route_merge_op(x_kept, x_full, keep_idx, x_full.shape[1])
