"""Triton kernels of the trainer behind one dispatch rule; each op has a PyTorch reference of the
same signature in `kernels.ref`.

The rule: an op runs its Triton kernel when its main tensor is on a CUDA device (and triton
imports), its reference elsewhere. The model, the optimizer, the losses, evaluation and the
benchmarks call the functions below and nothing else. `pin(...)` overrides the rule for a
whole run (`train.kernels=reference`: PyTorch on the GPU too, a fallback and a baseline), and
`pinned(...)` inside a block ("triton" runs the kernels on CPU tensors: the Triton interpreter,
in tests).

Files, one op family each, in layers (kernel, launcher, registered op with autograd, functional
API): patchify.py (patchify + noise, unpatchify), routing.py (TREAD selection, gather,
scatter), muon.py (batched Newton-Schulz), muon_update.py (Muon's momentum into a bank, and the
parameter update), flow_matching.py (velocity loss), lpips_head.py
(LPIPS distance heads), cosine.py (masked cosine alignment); launch.py holds what the launchers
share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from kernels import ref

try:
    from kernels import cosine as _cosine
    from kernels import flow_matching as _flow_matching
    from kernels import lpips_head as _lpips_head
    from kernels import muon as _muon
    from kernels import muon_update as _muon_update
    from kernels import patchify as _patchify
    from kernels import routing as _routing
except ImportError:  # no triton on this machine: the references run
    _cosine = _flow_matching = _lpips_head = _muon = _muon_update = _patchify = _routing = None

Tensor = torch.Tensor
PROVIDERS = ("auto", "triton", "reference")
_pinned = "auto"


def pin(provider: str) -> None:
    """Set the provider for every op from now on: "auto" (the rule), "triton" or "reference"."""
    global _pinned
    if provider not in PROVIDERS:
        raise ValueError(f"kernel provider {provider!r}: use one of {', '.join(PROVIDERS)}")
    if provider == "triton" and _patchify is None:
        raise RuntimeError("the Triton kernels need the triton package, which does not import here")
    _pinned = provider


@contextlib.contextmanager
def pinned(provider: str) -> Iterator[None]:
    """`pin(provider)` inside the block, the previous provider after it."""
    previous = _pinned
    pin(provider)
    try:
        yield
    finally:
        pin(previous)


def uses_triton(x: Tensor) -> bool:
    """The one dispatch rule (see the module docstring)."""
    if _pinned == "auto":
        return x.is_cuda and _patchify is not None
    return _pinned == "triton"


def _impl(x: Tensor, kernel_module):
    return kernel_module if uses_triton(x) else ref


# ---------------------------------------------------------------- patchify + noise, TREAD routing


def patchify_and_noise(images: Tensor, t: Tensor, patch_size: int, noise: Tensor | None = None,
                       seeds: Tensor | None = None, noise_offset: int = 0, noise_scale: float = 1.0,
                       out_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """uint8 or [-1, 1] images (B, 3, H, W), t (B,) -> (x_t, x) in patch layout, out_dtype.
    Noise from `noise` (B, L, 3 p p), or drawn from int64 per-sample `seeds` (B,) and
    `noise_offset` (the same numbers on CPU and GPU, up to float rounding). No gradient."""
    return _impl(images, _patchify).patchify_and_noise(images, t, patch_size, noise, seeds, noise_offset,
                                                       noise_scale, out_dtype)


def unpatchify(patches: Tensor, patch_size: int, height: int, width: int) -> Tensor:
    """(B, L, C p p) -> (B, C, H, W), differentiable (the backward is a patchify)."""
    return _impl(patches, _patchify).unpatchify(patches, patch_size, height, width)


def select_kept_tokens(seeds: Tensor, num_tokens: int, num_kept: int) -> Tensor:
    """TREAD: (B, num_kept) int64 kept token indices, ascending, sample b keyed by seeds[b] only
    (identical on every device)."""
    return _impl(seeds, _routing).select_kept_tokens(seeds, num_tokens, num_kept)


def route_gather(x: Tensor, keep_idx: Tensor) -> Tensor:
    """TREAD: (B, N, C) -> (B, K, C), the kept tokens; differentiable."""
    return _impl(x, _routing).route_gather(x, keep_idx)


def route_scatter(x_kept: Tensor, x_full: Tensor, keep_idx: Tensor) -> Tensor:
    """TREAD: (B, N, C), x_full with its kept rows replaced by x_kept; differentiable in both."""
    return _impl(x_full, _routing).route_scatter(x_kept, x_full, keep_idx)


route_gather_table = ref.route_gather_table  # (N, ...) RoPE tables / positions -> (B, K, ...); tiny


# ---------------------------------------------------------------- Muon


def newton_schulz(bank: Tensor, coefficients: list[tuple[float, float, float]], norm_safety: float = 1.0,
                  eps: float = 1e-7, out_scale: float = 1.0, method: str = "standard") -> Tensor:
    """Approximate orthogonal polar factor of every matrix of a bank (K, R, C), times out_scale, in its
    dtype. method "standard" iterates on X; "gram" evaluates the same polynomial on X X^T (fewer
    FLOPs unless square; computes in fp16 for half banks), see kernels/muon.py."""
    return _impl(bank, _muon).newton_schulz(bank, coefficients, norm_safety, eps, out_scale, method)


def momentum_to_bank(grads: Sequence[Tensor], buffers: Sequence[Tensor], momentum: float, nesterov: bool,
                     dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Muon's momentum for K same-shape matrices, in place in `buffers`; returns the bank (K, R, C)
    of the updates (Nesterov or plain) in `dtype`, ready for `newton_schulz`. Gradients are only read."""
    return _impl(grads[0], _muon_update).momentum_to_bank(grads, buffers, momentum, nesterov, dtype)


def apply_update(params: Sequence[Tensor], updates: Sequence[Tensor], step_size: float, decay: float = 1.0) -> None:
    """p <- p * decay - step_size * o for each (parameter, orthogonalised update) pair, in place."""
    _impl(params[0], _muon_update).apply_update(params, updates, step_size, decay)


# ---------------------------------------------------------------- losses


def flow_loss(x_hat: Tensor, x: Tensor, t: Tensor, t_floor: float = 0.05,
              weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Velocity-space loss of an x-prediction: (mean of weight * per_sample, per_sample (B,)), fp32."""
    return _impl(x_hat, _flow_matching).flow_loss(x_hat, x, t, t_floor, weight)


def lpips_distance(preds: Sequence[Tensor], targets: Sequence[Tensor], weights: Sequence[Tensor],
                   eps: float = 1e-10) -> Tensor:
    """LPIPS heads summed over layers, (B,): per layer the spatial mean of
    sum_c w_c (unit(pred) - unit(target))_c^2; gradient to preds only."""
    return _impl(preds[0], _lpips_head).lpips_distance(preds, targets, weights, eps)


def cosine_alignment(a: Tensor, b: Tensor, mask: Tensor | None = None,
                     eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """(mean over valid tokens of cos(a, b), per-sample mean (B,)), fp32; gradient to a only."""
    return _impl(a, _cosine).cosine_alignment(a, b, mask, eps)
