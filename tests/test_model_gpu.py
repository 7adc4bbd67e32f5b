"""GPU checks of the denoiser (skipped without CUDA): attention backends in bf16 at PRX shapes."""

import pytest
import torch

from prx.model.attention import KeyPadding, attention, resolve_backend

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("backend", ["sdpa", "flash"])
def test_lowp_attention_backends_within_twice_torch_rounding(backend):
    device = torch.device("cuda")
    if backend == "flash" and resolve_backend("auto", device) != "flash":
        pytest.skip("FlashAttention is not installed")
    g = torch.Generator(device).manual_seed(0)
    b, n, t, h, d = 4, 256, 64, 28, 64  # 512 px PRX: 256 image tokens, padded captions
    q = torch.randn(b, n, h, d, device=device, generator=g)
    k = torch.randn(b, t + n, h, d, device=device, generator=g)
    v = torch.randn(b, t + n, h, d, device=device, generator=g)
    text_mask = torch.arange(t, device=device)[None] < torch.tensor([5, 17, 64, 40], device=device)[:, None]
    ref = attention(q, k, v, KeyPadding.build(text_mask, n, "math"))  # fp32
    lowp = [x.bfloat16() for x in (q, k, v)]
    torch_lowp = attention(*lowp, KeyPadding.build(text_mask, n, "math")).float()
    ours = attention(*lowp, KeyPadding.build(text_mask, n, backend)).float()
    bound = 2 * (torch_lowp - ref).abs().max() + 1e-3
    assert (ours - ref).abs().max() <= bound
