"""Triton kernels of the trainer, each with a PyTorch reference of the same signature in `ref`.

The model calls the functions exported here; it picks kernel or reference once, by device.
Until a kernel lands for an op, the reference is what runs.
"""

# ---------------------------------------------------------------- patchify + noise, TREAD routing
# The Triton kernel on CUDA tensors, the reference of the same signature (kernels.ref) elsewhere.
import torch as _torch

from kernels import ref as _ref

try:
    from kernels import patchify as _patchify_kernels
    from kernels import routing as _routing_kernels
except ImportError:  # no triton on this machine: the references run
    _patchify_kernels = _routing_kernels = None


def _use_triton(x: _torch.Tensor) -> bool:
    return x.is_cuda and _patchify_kernels is not None


def patchify_and_noise(images: _torch.Tensor, t: _torch.Tensor, patch_size: int,
                       noise: _torch.Tensor | None = None, seeds: _torch.Tensor | None = None,
                       noise_offset: int = 0, noise_scale: float = 1.0,
                       out_dtype: _torch.dtype = _torch.float32) -> tuple[_torch.Tensor, _torch.Tensor]:
    """uint8 or [-1, 1] images (B, 3, H, W), t (B,) -> (x_t, x) in patch layout, out_dtype.
    Noise from `noise` (B, L, 3 p p), or drawn from int64 per-sample `seeds` (B,) and
    `noise_offset` (the same numbers on CPU and GPU, up to float rounding). No gradient."""
    impl = _patchify_kernels if _use_triton(images) else _ref
    return impl.patchify_and_noise(images, t, patch_size, noise, seeds, noise_offset, noise_scale, out_dtype)


def unpatchify(patches: _torch.Tensor, patch_size: int, height: int, width: int) -> _torch.Tensor:
    """(B, L, C p p) -> (B, C, H, W), differentiable (the backward is a patchify)."""
    impl = _patchify_kernels if _use_triton(patches) else _ref
    return impl.unpatchify(patches, patch_size, height, width)


def select_kept_tokens(seeds: _torch.Tensor, num_tokens: int, num_kept: int) -> _torch.Tensor:
    """TREAD: (B, num_kept) int64 kept token indices, ascending, sample b keyed by seeds[b] only
    (identical on every device)."""
    impl = _routing_kernels if _use_triton(seeds) else _ref
    return impl.select_kept_tokens(seeds, num_tokens, num_kept)


def route_gather(x: _torch.Tensor, keep_idx: _torch.Tensor) -> _torch.Tensor:
    """TREAD: (B, N, C) -> (B, K, C), the kept tokens; differentiable."""
    impl = _routing_kernels if _use_triton(x) else _ref
    return impl.route_gather(x, keep_idx)


def route_scatter(x_kept: _torch.Tensor, x_full: _torch.Tensor, keep_idx: _torch.Tensor) -> _torch.Tensor:
    """TREAD: (B, N, C), x_full with its kept rows replaced by x_kept; differentiable in both."""
    impl = _routing_kernels if _use_triton(x_full) else _ref
    return impl.route_scatter(x_kept, x_full, keep_idx)


route_gather_table = _ref.route_gather_table  # (N, ...) RoPE tables / positions -> (B, K, ...)


# ---------------------------------------------------------------- losses: flow matching, LPIPS head, cosine
try:
    from kernels import losses as _loss_kernels
except ImportError:  # no triton on this machine: the references run
    _loss_kernels = None


def _loss_impl(x: _torch.Tensor):
    return _loss_kernels if x.is_cuda and _loss_kernels is not None else _ref


def flow_loss(x_hat: _torch.Tensor, x: _torch.Tensor, t: _torch.Tensor, t_floor: float = 0.05,
              weight: _torch.Tensor | None = None) -> tuple[_torch.Tensor, _torch.Tensor]:
    """Velocity-space loss of an x-prediction: (mean of weight * per_sample, per_sample (B,)), fp32."""
    return _loss_impl(x_hat).flow_loss(x_hat, x, t, t_floor, weight)


def lpips_distance(preds, targets, weights, eps: float = 1e-10) -> _torch.Tensor:
    """LPIPS heads summed over layers, (B,): per layer the spatial mean of
    sum_c w_c (unit(pred) - unit(target))_c^2; gradient to preds only."""
    return _loss_impl(preds[0]).lpips_distance(preds, targets, weights, eps)


def cosine_alignment(a: _torch.Tensor, b: _torch.Tensor, mask: _torch.Tensor | None = None,
                     eps: float = 1e-8) -> tuple[_torch.Tensor, _torch.Tensor]:
    """(mean over valid tokens of cos(a, b), per-sample mean (B,)), fp32; gradient to a only."""
    return _loss_impl(a).cosine_alignment(a, b, mask, eps)
