"""The cuDNN key-count rule (pytorch issue 196678): masked SDPA calls never have 64 mod 128 keys,
and the masked zero keys it appends change no output and no gradient. The rule runs on CPU here
by forcing it (`cudnn_rule=True`); tests/test_model_gpu.py checks it against cuDNN itself."""

import pytest
import torch
import torch.nn.functional as F

from prx.config import ModelConfig
from prx.data.buckets import bucket_sizes
from prx.model.attention import KeyPadding, attention, cudnn_safe_key_count, math_attention
from prx.model.denoiser import PRX
from prx.model.tread import TokenRoute, kept_count


def image_token_counts() -> list[int]:
    """Every block's image-token count we can meet: the aspect buckets of 512 and 1024 px (patch 32,
    256 and 1024 at the square), and what TREAD keeps of each at routing shares 0.25 to 0.75."""
    dense = {h * w // 32**2 for res in (512, 1024) for h, w in bucket_sizes(res, 32)} | {128, 256, 512, 1024}
    return sorted(dense | {kept_count(n, p) for n in dense for p in (0.25, 0.5, 0.75)})


def test_safe_key_count_leaves_no_count_at_64_mod_128_and_moves_only_those():
    counts = image_token_counts()
    assert 256 in counts and 128 in counts and 242 in counts  # square, routed square, a bucket
    moved = 0
    for text in range(257):  # every caption length up to max_tokens, not just multiples of 16
        for image in counts:
            keys = text + image
            safe = cudnn_safe_key_count(keys)
            assert safe % 128 != 64
            if keys % 128 == 64:
                assert safe == keys + 64 and safe % 128 == 0
                moved += 1
            else:
                assert safe == keys  # every other count is left alone: no cost there
    assert moved > 0  # the sweep does meet the bad remainder


def test_key_padding_extends_the_mask_only_where_the_rule_applies():
    text_mask = torch.arange(64)[None] < torch.tensor([5, 64])[:, None]
    pad = KeyPadding.build(text_mask, 256, "sdpa", cudnn_rule=True)  # 320 keys -> 384
    assert pad.extra_keys == 64 and pad.sdpa_mask.shape == (2, 1, 1, 384)
    assert not pad.sdpa_mask[..., 320:].any()  # the appended keys are masked out
    assert torch.equal(pad.sdpa_mask[:, 0, 0, :320], pad.key_valid)
    assert KeyPadding.build(text_mask, 192, "sdpa", cudnn_rule=True).extra_keys == 0  # 256 keys
    # Where cuDNN cannot run the rule is off: CPU SDPA, math, flash varlen, and no mask at all.
    assert KeyPadding.build(text_mask, 256, "sdpa").extra_keys == 0  # CPU tensors
    assert KeyPadding.build(text_mask, 256, "math").extra_keys == 0
    assert KeyPadding.build(text_mask, 256, "flash", cudnn_rule=True).extra_keys == 0
    no_mask = KeyPadding.build(None, 256, "sdpa", cudnn_rule=True)
    assert no_mask.sdpa_mask is None and no_mask.extra_keys == 0


def qkv(b, n, t, h, d, extreme: bool, seed=0):
    """q (B, N, H, D), k, v (B, T + N, H, D); `extreme`: the first half of the query rows score
    about -100 against every key, so their log-sum-exp is near -100 + ln(keys), below -88.7."""
    g = torch.Generator().manual_seed(seed)
    q = 0.1 * torch.randn(b, n, h, d, generator=g)
    k = 0.1 * torch.randn(b, t + n, h, d, generator=g)
    v = torch.randn(b, t + n, h, d, generator=g)
    if extreme:
        q[:, : n // 2, :, 0] = 1.0
        q[:, n // 2 :, :, 0] = 0.0
        k[..., 0] = -100.0 * d**0.5  # score = q . k / sqrt(d) = -100 on the extreme rows
    return q, k, v


def grads(q, k, v, pad, dout):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = attention(*leaves, pad)
    out.backward(dout)
    return out, [x.grad for x in leaves]


def reference(q, k, v, mask, dout, dtype):
    """Output and q, k, v gradients of softmax(q k^T / sqrt(d), masked) v in `dtype`."""
    leaves = [x.detach().to(dtype).clone().requires_grad_() for x in (q, k, v)]
    scores = torch.einsum("bnhd,blhd->bhnl", leaves[0], leaves[1]) / q.shape[-1] ** 0.5
    out = torch.einsum("bhnl,blhd->bnhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), leaves[2])
    out.backward(dout.to(dtype))
    return [out.detach()] + [x.grad for x in leaves]


@pytest.mark.parametrize("extreme", [False, True])
@pytest.mark.parametrize("backend", ["sdpa", "math"])
@pytest.mark.parametrize("n, t", [(256, 64), (128, 64), (257, 63)])  # 320, 192 and 320 keys
def test_appended_keys_change_no_output_and_no_gradient(n, t, backend, extreme):
    b, h, d = 2, 2, 16
    q, k, v = qkv(b, n, t, h, d, extreme)
    text_mask = torch.arange(t)[None] < torch.tensor([5, t])[:, None]  # one padded caption, one full
    if extreme:  # the premise: some rows are where the cuDNN bug bites
        scores = torch.einsum("bnhd,blhd->bhnl", q.double(), k.double()) / d**0.5
        valid = torch.cat([text_mask, torch.ones(b, n, dtype=torch.bool)], 1)[:, None, None]
        lse = scores.masked_fill(~valid, float("-inf")).logsumexp(-1)
        assert (lse < -88.7).any() and (lse > 0).any()
    dout = torch.randn(b, n, h, d, generator=torch.Generator().manual_seed(1))
    padded = KeyPadding.build(text_mask, n, backend, cudnn_rule=True)
    assert padded.extra_keys == 64
    out, (dq, dk, dv) = grads(q, k, v, padded, dout)

    # The plain softmax without the rule in fp64, and its own fp32 rounding error as the tolerance
    # (the scores of -100 carry an fp32 error near 800 * 6e-8 = 5e-5, which the softmax amplifies).
    ref_mask = KeyPadding.build(text_mask, n, "math").sdpa_mask
    ref64, ref32 = (reference(q, k, v, ref_mask, dout, dtype) for dtype in (torch.float64, torch.float32))
    assert dk.shape == k.shape and dv.shape == v.shape  # the gradients of the original keys only
    bounds = [2 * (r.double() - exact).abs().max() + 1e-6 * exact.abs().max() for exact, r in zip(ref64, ref32)]
    for ours, exact, bound in zip((out, dq, dk, dv), ref64, bounds):
        assert torch.isfinite(ours).all()
        assert (ours.double() - exact).abs().max() <= bound

    # and the same as the unpadded call of the same backend, to the same fp32 rounding bound: on the
    # extreme rows dq carries the rounding of the -100 scores (2.5e-5 of a 3e-2 maximum, measured on
    # this CPU), which a fixed rtol of 1e-5 does not allow whatever the padding does.
    plain_out, plain_grads = grads(q, k, v, KeyPadding.build(text_mask, n, backend, cudnn_rule=False), dout)
    for ours, plain, bound in zip((out, dq, dk, dv), (plain_out, *plain_grads), bounds):
        assert (ours.double() - plain.double()).abs().max() <= bound


def test_math_attention_reference_is_unchanged_by_masked_zero_keys():
    q, k, v = qkv(2, 8, 4, 2, 8, extreme=False)
    mask = KeyPadding.build(torch.ones(2, 4, dtype=torch.bool), 8, "math").sdpa_mask
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    wide = [F.pad(x, (0, 0, 0, 64)) for x in (kh, vh)]
    torch.testing.assert_close(math_attention(qh, *wide, F.pad(mask, (0, 64), value=False)),
                               math_attention(qh, kh, vh, mask), rtol=1e-6, atol=1e-6)


CFG = ModelConfig(patch_size=4, bottleneck_dim=16, hidden_dim=64, depth=4, num_heads=4, text_dim=24,
                  time_embed_dim=32, attention="sdpa")


@pytest.mark.parametrize("t, grid", [(64, (16, 16)), (48, (16, 17))])  # keys 320 | 192 and 320 | 184
def test_every_block_of_a_routed_forward_avoids_64_mod_128(monkeypatch, t, grid):
    """Dense and TREAD-routed blocks each build their keys; with the rule forced on, no SDPA call
    of the forward sees 64 mod 128 keys, and x-hat and every gradient match the rule off."""
    torch.manual_seed(0)
    model = PRX(CFG)
    for p in model.parameters():  # zero-init modulations would make every block the identity
        torch.nn.init.normal_(p, std=0.1)
    b, n = 2, grid[0] * grid[1]
    g = torch.Generator().manual_seed(0)
    x, tt = torch.randn(b, n, CFG.patch_dim, generator=g), torch.rand(b, generator=g)
    text = torch.randn(b, t, CFG.text_dim, generator=g)
    mask = torch.arange(t)[None] < torch.tensor([7, t])[:, None]
    keep = torch.stack([torch.randperm(n, generator=g)[: kept_count(n, 0.5)].sort().values for _ in range(b)])
    route = TokenRoute(keep, 1, 2)

    def run(rule: bool):
        build, sdpa, seen = KeyPadding.build, F.scaled_dot_product_attention, []

        def recording_sdpa(q, k, v, attn_mask=None, **kw):
            seen.append(k.shape[-2])
            return sdpa(q, k, v, attn_mask=attn_mask, **kw)

        with monkeypatch.context() as m:
            m.setattr(KeyPadding, "build", staticmethod(
                lambda tm, num, backend: build(tm, num, backend, cudnn_rule=rule)))
            m.setattr(F, "scaled_dot_product_attention", recording_sdpa)
            model.zero_grad()
            out = model(x, tt, text, mask, grid, route=route).x_hat
            out.square().mean().backward()
        return out, {k: p.grad.clone() for k, p in model.named_parameters()}, seen

    out_off, grads_off, keys_off = run(False)
    out_on, grads_on, keys_on = run(True)
    dense_keys, routed_keys = t + n, t + kept_count(n, 0.5)
    assert keys_off == [dense_keys, routed_keys, routed_keys, dense_keys]  # blocks 0, 1-2 routed, 3
    assert any(k % 128 == 64 for k in keys_off)  # the case is really met
    assert keys_on == [cudnn_safe_key_count(k) for k in keys_off]
    assert all(k % 128 != 64 for k in keys_on)
    torch.testing.assert_close(out_on, out_off, rtol=1e-5, atol=1e-6)
    for name, grad in grads_off.items():
        torch.testing.assert_close(grads_on[name], grad, rtol=1e-4, atol=1e-6, msg=name)
