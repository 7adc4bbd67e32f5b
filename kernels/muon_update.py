"""Muon's element-wise work, fused: momentum, Nesterov, the cast and the packing into a bank in one
pass per bank; the parameter update (weight decay, scaled add) in one pass per bank.

- `momentum_to_bank(grads, buffers, mu, nesterov, dtype)`: for the K same-shape matrices of a
  bank, buf <- lerp(buf, g, 1 - mu) in place, u = lerp(g, buf, mu) (Nesterov) or buf, and u
  written in `dtype` (bf16 in training) into a new (K, R, C) bank. The gradient is only read.
- `apply_update(params, updates, step_size, decay)`: p <- p * decay - step_size * O for every
  matrix, O read in its own layout (the transposed view Newton-Schulz returns for tall banks is
  read as it lies, at no copy). decay = 1 - lr wd; the old code's two passes, p *= decay then
  p += -step_size O, are this formula with the same two roundings.

Same arithmetic as torch, rounding for rounding: lerp is torch's formula (aten/src/ATen/native/
Lerp.h: start + w (end - start) for |w| < 0.5, end - (end - start)(1 - w) otherwise) in one fma,
as torch's CPU kernel computes it (`lerp_vec`; on the 2-core CPU of the tests, torch 2.13: 0 of
10^6 fp32 results differ from the fused formula, 6 to 25 % from the unfused one) and its CUDA
kernel should (the same formula, which nvcc contracts to an fma; not measured on a GPU yet); the
update is round(p * decay), then one fma, as torch's `add_(o, alpha)` (CPU: 0 of 10^6 differ).
Under the Triton interpreter `tl.fma` is a multiply and an add in fp32 (two roundings), so the
CPU tests allow one rounding of the product more; on a GPU it is one fma.

DRAM bytes per element of the matrices (fp32 parameters, gradients and momentum; bf16 bank):
    before (torch foreach ops, then stack; prx/optim.py until issue 16)       bytes
      momentum   buf <- lerp(buf, g, 1 - mu)     read g, buf; write buf          12
      Nesterov   g <- lerp(g, buf, mu)           read g, buf; write g            12
      decay      p <- p (1 - lr wd)              read p; write p                  8
      cast       u.to(bf16), one per matrix      read u; write bf16               6
      stack      torch.stack into the bank       read bf16; write bf16            4
      update     p <- p - lr_s O                 read p, O; write p              10
      total 52 (40 without Nesterov, 44 without decay, 32 without both)
    after
      momentum_to_bank                           read g, buf; write buf, bank    14
      apply_update                               read p, O; write p              10
      total 24 with or without Nesterov and decay
PRX small's 112 block matrices hold 1,156,055,040 elements: 60.1 GB before, 27.7 GB after, an
ideal 12.5 ms and 5.8 ms at an H200's 4.8 TB/s (an estimate from the nominal bandwidth, not a
measurement). `muon_update_bytes` gives these counts to the benchmark. Under FSDP2 the rows of a
bank still go through torch.cat into the all-to-all's send buffer (read and write bf16, 4 B),
which keeps `MuonAdam._orthogonalize_sharded`'s contract: 28 B there instead of 52.

Launches: one per bank for each op, grid (tiles of a matrix, matrix). The matrices of a bank are
separate tensors, so each kernel takes the first tensor of each list as its typed base pointer
and an int64 table (2, K) of the others' offsets from it, in units of UNIT elements: UNIT is
16 bytes' worth when every tensor of the list starts 16-byte aligned (so the compiler knows
each matrix is aligned and vectorises to 16-byte accesses), 1 otherwise. The table is built on
the host per call (K <= 32 entries a list; one small host-to-device copy).
Limits: gradients and buffers contiguous; parameters with unit column stride, updates any
strides (all matrices of a list alike); one dtype per list; no autograd (optimizer step).
Tuned on: no GPU yet (1,024-element tiles, 32 x 64 update tiles, 4 warps; the GPU check
measures them; bench/kernel_resources.py checks registers and occupancy for sm_90a).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import triton
import triton.language as tl

from kernels import launch

# Elements a program of momentum_to_bank, (rows, cols) a program of apply_update, warps of both.
# GPU: 8 (momentum) or 16 (update) elements a thread, in 16-byte accesses. Compiled for sm_90a
# (bench/kernel_resources.py): momentum_to_bank 32 registers (16 blocks an SM), apply_update 32,
# or 34 with O transposed (16 or 12 blocks), no spills; an element-wise kernel needs 8 blocks
# (1,024 threads). Interpreter: a few programs per test matrix, so that the tests cross tile
# edges and masks (each program costs about a millisecond there).
GPU_MOMENTUM_TILE, GPU_UPDATE_TILE, GPU_WARPS = 1024, (32, 64), 4
INTERPRETER_MOMENTUM_TILE, INTERPRETER_UPDATE_TILE = 256, (16, 32)
ALIGNMENT = 16  # bytes: a 128-bit access


@triton.jit
def _lerp(start, end, weight):
    """torch.lerp(start, end, weight) in fp32, fused as torch fuses it (see the module docstring)."""
    small = tl.abs(weight) < 0.5
    coefficient = tl.where(small, weight, weight - 1.0)  # 1 - w is exact for w in [0.5, 1]
    return tl.fma(coefficient, end - start, tl.where(small, start, end))


@triton.jit
def _momentum_to_bank_kernel(
    grad_ptr, buffer_ptr, bank_ptr, offsets_ptr,
    numel, num_matrices,
    momentum_weight, nesterov_weight,
    NESTEROV: tl.constexpr, GRAD_UNIT: tl.constexpr, BUFFER_UNIT: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program (t, k): elements [t BLOCK, (t + 1) BLOCK) of matrix k, flat (both are contiguous)."""
    k = tl.program_id(1).to(tl.int64)
    grad = grad_ptr + tl.load(offsets_ptr + k) * GRAD_UNIT
    buffer = buffer_ptr + tl.load(offsets_ptr + num_matrices + k) * BUFFER_UNIT
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < numel
    g = tl.load(grad + offs, mask=inside).to(tl.float32)
    b = tl.load(buffer + offs, mask=inside).to(tl.float32)
    b = _lerp(b, g, momentum_weight).to(buffer_ptr.dtype.element_ty)
    tl.store(buffer + offs, b, mask=inside)
    u = b.to(tl.float32)  # the stored value, as torch's second lerp reads it
    if NESTEROV:
        u = _lerp(g, u, nesterov_weight)
    tl.store(bank_ptr + k * numel + offs, u.to(bank_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _apply_update_kernel(
    param_ptr, update_ptr, offsets_ptr,
    rows, cols, num_matrices,
    stride_pr, stride_pc, stride_ur, stride_uc,
    decay, negative_step,
    PARAM_UNIT: tl.constexpr, UPDATE_UNIT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (t, k): tile t of matrix k; p and O are each loaded in their own layout (the
    compiler converts one through shared memory when O is transposed)."""
    k = tl.program_id(1).to(tl.int64)
    col_tiles = tl.cdiv(cols, BLOCK_C)
    r = (tl.program_id(0) // col_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = (tl.program_id(0) % col_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    param = param_ptr + tl.load(offsets_ptr + k) * PARAM_UNIT
    update = update_ptr + tl.load(offsets_ptr + num_matrices + k) * UPDATE_UNIT
    inside = (r[:, None] < rows) & (c[None, :] < cols)
    r64, c64 = r[:, None].to(tl.int64), c[None, :].to(tl.int64)
    p_ptrs = param + r64 * stride_pr + c64 * stride_pc
    o = tl.load(update + r64 * stride_ur + c64 * stride_uc, mask=inside).to(tl.float32)
    p = tl.load(p_ptrs, mask=inside).to(tl.float32)
    p = tl.fma(o, negative_step, p * decay)
    tl.store(p_ptrs, p.to(param_ptr.dtype.element_ty), mask=inside)


# ----------------------------------------------------------------------------- launchers


def _check_list(op: str, name: str, tensors: Sequence[torch.Tensor], shape, device) -> None:
    first = tensors[0]
    for t in tensors:
        if t.dtype != first.dtype or t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{op}: {name} must all be fp32, fp16 or bf16 alike, got {t.dtype} and {first.dtype}")
        if tuple(t.shape) != shape or t.dim() != 2:
            raise ValueError(f"{op}: {name} must all be matrices of shape {shape}, got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"{op}: {name} on {t.device}, expected {device}")


def _offsets(tensors: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    """Offsets of each tensor's first element from the first tensor's, in units of UNIT elements,
    and UNIT (16 bytes' worth when every tensor starts 16-byte aligned, else 1)."""
    size = tensors[0].element_size()
    base = tensors[0].data_ptr()
    aligned = all(t.data_ptr() % ALIGNMENT == 0 for t in tensors)
    unit = ALIGNMENT // size if aligned else 1
    offsets = []
    for t in tensors:
        distance = t.data_ptr() - base
        if distance % (size * unit):
            raise ValueError(f"tensor at {t.data_ptr():#x} is not a whole number of elements from {base:#x}")
        offsets.append(distance // (size * unit))
    return offsets, unit


def _fp32(value: float) -> float:
    """The fp32 number a GPU kernel receives for a Python float (under the interpreter a float
    argument stays a double, and `w - 1.0` in the kernel would differ from the GPU's)."""
    return torch.tensor(value, dtype=torch.float32).item()


def _table(first: list[int], second: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([first, second], dtype=torch.int64).to(device, non_blocking=True)


def momentum_to_bank(grads: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor], momentum: float,
                     nesterov: bool, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """See the module docstring; like `kernels.ref.momentum_to_bank`. Returns the (K, R, C) bank."""
    if not grads or len(grads) != len(buffers):
        raise ValueError(f"momentum_to_bank: {len(grads)} gradients and {len(buffers)} buffers")
    shape, device = tuple(grads[0].shape), grads[0].device
    _check_list("momentum_to_bank", "gradients", grads, shape, device)
    _check_list("momentum_to_bank", "buffers", buffers, shape, device)
    if not all(t.is_contiguous() for t in (*grads, *buffers)):
        raise ValueError("momentum_to_bank: gradients and buffers must be contiguous")
    k, numel = len(grads), grads[0].numel()
    if numel >= 2**31:
        raise ValueError(f"momentum_to_bank: {numel} elements a matrix; the kernel indexes them in int32")
    bank = torch.empty((k, *shape), dtype=dtype, device=device)
    if numel == 0:  # an FSDP2 rank that holds no rows of these matrices
        return bank
    grad_offsets, grad_unit = _offsets(grads)
    buffer_offsets, buffer_unit = _offsets(buffers)
    block = INTERPRETER_MOMENTUM_TILE if launch.interpreting() else GPU_MOMENTUM_TILE
    _momentum_to_bank_kernel[(triton.cdiv(numel, block), k)](
        grads[0], buffers[0], bank, _table(grad_offsets, buffer_offsets, device),
        numel, k,
        _fp32(1 - momentum), _fp32(momentum),
        NESTEROV=bool(nesterov), GRAD_UNIT=grad_unit, BUFFER_UNIT=buffer_unit, BLOCK=block,
        num_warps=GPU_WARPS,
    )
    return bank


def apply_update(params: Sequence[torch.Tensor], updates: Sequence[torch.Tensor], step_size: float,
                 decay: float = 1.0) -> None:
    """p <- p * decay - step_size * O for each pair, in place; like `kernels.ref.apply_update`."""
    if not params or len(params) != len(updates):
        raise ValueError(f"apply_update: {len(params)} parameters and {len(updates)} updates")
    shape, device = tuple(params[0].shape), params[0].device
    _check_list("apply_update", "parameters", params, shape, device)
    if any(u.dtype != updates[0].dtype or not u.is_floating_point() for u in updates):
        raise TypeError("apply_update: the updates must be floating point, all of one dtype")
    if any(tuple(u.shape) != shape or u.device != device for u in updates):
        raise ValueError(f"apply_update: every update must be a {shape} matrix on {device}")
    if any(p.stride() != params[0].stride() or p.stride(1) != 1 for p in params):
        raise ValueError("apply_update: parameters must have unit column stride, all strides alike")
    if any(u.stride() != updates[0].stride() for u in updates):
        raise ValueError("apply_update: the updates must all have the same strides")
    rows, cols = shape
    if rows * cols == 0:
        return
    param_offsets, param_unit = _offsets(params)
    update_offsets, update_unit = _offsets(updates)
    (block_r, block_c) = INTERPRETER_UPDATE_TILE if launch.interpreting() else GPU_UPDATE_TILE
    tiles = triton.cdiv(rows, block_r) * triton.cdiv(cols, block_c)
    _apply_update_kernel[(tiles, len(params))](
        params[0], updates[0], _table(param_offsets, update_offsets, device),
        rows, cols, len(params),
        *params[0].stride(), *updates[0].stride(),
        _fp32(decay), _fp32(-step_size),
        PARAM_UNIT=param_unit, UPDATE_UNIT=update_unit, BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=GPU_WARPS,
    )


# ----------------------------------------------------------------------------- bytes, for the benchmark

# DRAM bytes per matrix element of each pass, by the element sizes: P of parameters, gradients and
# momentum (4 for fp32), B of the bank and of O (2 for bf16). The module docstring's table.
UNFUSED_PASSES = {
    "momentum": lambda P, B: 3 * P,       # read g, buf; write buf
    "nesterov": lambda P, B: 3 * P,       # read g, buf; write g
    "decay": lambda P, B: 2 * P,          # read p; write p
    "cast": lambda P, B: P + B,           # read u; write u in the bank dtype
    "stack": lambda P, B: 2 * B,          # read and write the bank dtype
    "update": lambda P, B: 2 * P + B,     # read p, O; write p
}
FUSED_PASSES = {
    "momentum_to_bank": lambda P, B: 3 * P + B,  # read g, buf; write buf and the bank
    "apply_update": lambda P, B: 2 * P + B,      # read p, O; write p
}


def muon_update_bytes(shapes: Iterable[tuple[int, int]], fused: bool = True, nesterov: bool = True,
                      weight_decay: bool = True, param_bytes: int = 4, bank_bytes: int = 2) -> dict[str, int]:
    """DRAM bytes of Muon's element-wise work (everything but Newton-Schulz) over matrices of
    `shapes` (one (rows, cols) per matrix): {pass: bytes} and "total". Fused: this module's two
    kernels; unfused: the torch foreach ops and stack they replace (their bytes do not depend on
    Nesterov or decay when fused). GB/s of a pass = its bytes / its time."""
    elements = sum(rows * cols for rows, cols in shapes)
    passes = dict(FUSED_PASSES if fused else UNFUSED_PASSES)
    if not fused and not nesterov:
        del passes["nesterov"]
    if not fused and not weight_decay:
        del passes["decay"]
    counts = {name: elements * per(param_bytes, bank_bytes) for name, per in passes.items()}
    return counts | {"total": sum(counts.values())}
