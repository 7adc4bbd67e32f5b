"""Liger-Kernel's fused GeGLU, RMSNorm and LayerNorm for the denoiser (`model.fused_ops=liger`).

An option, not the default: its Triton kernels run on CUDA GPUs only (not under the CPU
interpreter), and whether they beat the per-block compiled torch ops at PRX's shapes is what
`bench/bench_liger.py` measures; the default follows that measurement. The functions here keep
the model's math: GeGLU with the tanh GELU, RMSNorm computed wholly in fp32 ("gemma" casting,
as `prx.model.denoiser.RMSNorm`), LayerNorm without affine (unit weight, zero bias).
"""

from __future__ import annotations

import torch

from prx.config import ConfigError


def _liger():
    try:
        from liger_kernel.transformers import functional
    except ImportError as exc:
        raise ConfigError(
            f"model.fused_ops=liger needs the liger-kernel package ({exc}): pip install liger-kernel, "
            "or set --set model.fused_ops=torch") from None
    return functional


def check_available(device: torch.device) -> None:
    """Fail at start, with one message, where the Liger path cannot run."""
    if device.type != "cuda":
        raise ConfigError("model.fused_ops=liger runs Liger-Kernel's Triton kernels, which need a CUDA GPU; "
                          "set --set model.fused_ops=torch on this device")
    _liger()


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up, one fused kernel forward and backward."""
    return _liger().liger_geglu(gate, up)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim with a learnable scale, all in fp32 ("gemma" casting)."""
    shape = x.shape
    out = _liger().liger_rms_norm(x.reshape(-1, shape[-1]), weight, eps, offset=0.0, casting_mode="gemma",
                                  in_place=False)
    return out.reshape(shape)


_UNIT: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine parameters: Liger's kernel with weight 1 and bias 0."""
    key = (x.shape[-1], x.device, x.dtype)
    if key not in _UNIT:
        _UNIT[key] = (torch.ones(x.shape[-1], device=x.device, dtype=x.dtype),
                      torch.zeros(x.shape[-1], device=x.device, dtype=x.dtype))
    weight, bias = _UNIT[key]
    shape = x.shape
    return _liger().liger_layer_norm(x.reshape(-1, shape[-1]), weight, bias, eps).reshape(shape)
