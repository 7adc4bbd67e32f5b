"""The reference-name converter, proved against an independent forward pass.

`reference_forward` below is written from docs/recipe.md section 1 and the reference's parameter names
alone (plain tensor ops, explicit loops over heads, complex-number RoPE, explicit masks), not
from prx/model/denoiser.py. If the converter or the model got a layout wrong (q/k/v order, head order,
RoPE axis or pairing, modulation chunk order, patch flattening), the outputs would differ.
"""

import dataclasses
import math

import pytest
import torch

from prx.config import ModelConfig
from prx.model.denoiser import PRX
from prx.model.reference_weights import (
    convert_reference_state_dict,
    load_reference_state_dict,
    read_weights_file,
    to_reference_state_dict,
)

CFG = ModelConfig(patch_size=4, bottleneck_dim=16, hidden_dim=48, depth=2, num_heads=3,
                  mlp_ratio=2.5, text_dim=20, time_embed_dim=32)


def random_reference_state_dict(cfg: ModelConfig, seed=0) -> dict[str, torch.Tensor]:
    """Every reference parameter, random (modulations and output non-zero on purpose)."""
    g = torch.Generator().manual_seed(seed)
    h, d, p = cfg.hidden_dim, cfg.head_dim, cfg.patch_dim

    def r(*shape):
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])

    sd = {
        "img_in.0.weight": r(cfg.bottleneck_dim, p), "img_in.0.bias": r(cfg.bottleneck_dim),
        "img_in.1.weight": r(h, cfg.bottleneck_dim), "img_in.1.bias": r(h),
        "time_in.in_layer.weight": r(h, cfg.time_embed_dim), "time_in.in_layer.bias": r(h),
        "time_in.out_layer.weight": r(h, h), "time_in.out_layer.bias": r(h),
        "txt_in.weight": r(h, cfg.text_dim), "txt_in.bias": r(h),
        "final_layer.linear.weight": r(p, h), "final_layer.linear.bias": r(p),
        "final_layer.adaLN_modulation.1.weight": r(2 * h, h), "final_layer.adaLN_modulation.1.bias": r(2 * h),
    }
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        sd.update({
            b + "img_qkv_proj.weight": r(3 * h, h), b + "attn_out.weight": r(h, h),
            b + "qk_norm.query_norm.scale": 1 + 0.3 * r(d), b + "qk_norm.key_norm.scale": 1 + 0.3 * r(d),
            b + "txt_kv_proj.weight": r(2 * h, h), b + "k_norm.scale": 1 + 0.3 * r(d),
            b + "gate_proj.weight": r(cfg.mlp_hidden_dim, h), b + "up_proj.weight": r(cfg.mlp_hidden_dim, h),
            b + "down_proj.weight": r(h, cfg.mlp_hidden_dim),
            b + "modulation.lin.weight": r(6 * h, h), b + "modulation.lin.bias": r(6 * h),
        })
    return sd


def reference_forward(sd, cfg: ModelConfig, images, t, txt, txt_mask):
    """docs/recipe.md section 1 in plain ops, on images (B, 3, H, W) -> x-hat images."""
    B, C, H, W = images.shape
    P, h, nh, d = cfg.patch_size, cfg.hidden_dim, cfg.num_heads, cfg.head_dim
    gh, gw = H // P, W // P
    lin = lambda x, name, bias=True: x @ sd[name + ".weight"].T + (sd[name + ".bias"] if bias else 0)

    # patches: token (r, c) row-major, each flattened (channel, row, column)
    tokens = []
    for r_ in range(gh):
        for c_ in range(gw):
            tokens.append(images[:, :, r_ * P:(r_ + 1) * P, c_ * P:(c_ + 1) * P].reshape(B, -1))
    x = torch.stack(tokens, 1)
    img = lin(lin(x, "img_in.0"), "img_in.1")

    half = cfg.time_embed_dim // 2
    freqs = torch.tensor([math.exp(-math.log(10000) * k / half) for k in range(half)], dtype=torch.float64)
    args = 1000 * t[:, None] * freqs[None]
    vec = lin(torch.nn.functional.silu(lin(torch.cat([args.cos(), args.sin()], -1), "time_in.in_layer")),
              "time_in.out_layer")
    txt = lin(txt, "txt_in")

    def rms(v, scale):
        return v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6) * scale

    def ln(v):
        mu = v.mean(-1, keepdim=True)
        return (v - mu) / torch.sqrt((v - mu).pow(2).mean(-1, keepdim=True) + 1e-6)

    # RoPE as complex rotation of adjacent pairs: first d/2 dims by row, last d/2 by column
    def rope(v):  # v (B, N, d)
        out = torch.empty_like(v)
        q = d // 2
        for n in range(gh * gw):
            pos = (n // gw, n % gw)
            for axis in range(2):
                for k in range(q // 2):
                    angle = pos[axis] / (10000 ** (2 * k / q))
                    j = axis * q + 2 * k
                    z = torch.complex(v[:, n, j], v[:, n, j + 1]) * complex(math.cos(angle), math.sin(angle))
                    out[:, n, j], out[:, n, j + 1] = z.real, z.imag
        return out

    for i in range(cfg.depth):
        b = f"blocks.{i}."
        mod = lin(torch.nn.functional.silu(vec), b + "modulation.lin")
        s1, c1, g1, s2, c2, g2 = (mod[:, k * h:(k + 1) * h][:, None] for k in range(6))
        xa = (1 + c1) * ln(img) + s1
        qkv = lin(xa, b + "img_qkv_proj", bias=False)
        tkv = lin(txt, b + "txt_kv_proj", bias=False)
        heads = []
        for hd in range(nh):
            sl = slice(hd * d, (hd + 1) * d)
            q = rope(rms(qkv[..., sl], sd[b + "qk_norm.query_norm.scale"]))
            k = rope(rms(qkv[..., h:][..., sl], sd[b + "qk_norm.key_norm.scale"]))
            v = qkv[..., 2 * h:][..., sl]
            tk = rms(tkv[..., sl], sd[b + "k_norm.scale"])
            tv = tkv[..., h:][..., sl]
            keys, values = torch.cat([tk, k], 1), torch.cat([tv, v], 1)
            scores = q @ keys.transpose(1, 2) / math.sqrt(d)
            valid = torch.cat([txt_mask, torch.ones(B, gh * gw, dtype=torch.bool)], 1)
            scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
            heads.append(scores.softmax(-1) @ values)
        img = img + g1 * lin(torch.cat(heads, -1), b + "attn_out", bias=False)
        xm = (1 + c2) * ln(img) + s2
        gate = torch.nn.functional.gelu(lin(xm, b + "gate_proj", bias=False), approximate="tanh")
        img = img + g2 * lin(gate * lin(xm, b + "up_proj", bias=False), b + "down_proj", bias=False)

    fmod = lin(torch.nn.functional.silu(vec), "final_layer.adaLN_modulation.1")
    shift, scale = fmod[:, None, :h], fmod[:, None, h:]
    out = lin((1 + scale) * ln(img) + shift, "final_layer.linear")
    result = torch.empty_like(images)
    for n in range(gh * gw):
        r_, c_ = divmod(n, gw)
        result[:, :, r_ * P:(r_ + 1) * P, c_ * P:(c_ + 1) * P] = out[:, n].reshape(B, C, P, P)
    return result


def test_reference_weights_give_the_reference_forward():
    from kernels.ref import patchify, unpatchify

    torch.manual_seed(0)
    sd = random_reference_state_dict(CFG)
    model = PRX(CFG).double()
    load_reference_state_dict(model, {k: v.double() for k, v in sd.items()})
    B, H, W, T = 2, 8, 12, 5  # a non-square 2 x 3 patch grid catches row/column mix-ups
    images = torch.randn(B, 3, H, W, dtype=torch.float64)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    txt = torch.randn(B, T, CFG.text_dim, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)

    expected = reference_forward({k: v.double() for k, v in sd.items()}, CFG, images, t, txt, mask)
    ours = model(patchify(images, CFG.patch_size), t, txt, mask, (H // 4, W // 4)).x_hat
    ours = unpatchify(ours, CFG.patch_size, H, W)
    assert expected.abs().mean() > 0.1  # the check is not vacuous
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)


def test_round_trip_and_prefixes():
    model = PRX(CFG)
    for p in model.parameters():
        torch.nn.init.normal_(p)
    ref = to_reference_state_dict(model)
    assert set(ref) == set(random_reference_state_dict(CFG))
    wrapped = {f"model._orig_mod.{k}": v for k, v in ref.items()}
    other = PRX(CFG)
    load_reference_state_dict(other, wrapped)
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k


def test_resolution_embeds_keep_the_reference_names():
    """The PRX-7B pixel option: the reference and diffusers both call it resolution_embedder.mlp
    (diffusers' conversion script carries those names over unchanged)."""
    model = PRX(dataclasses.replace(CFG, resolution_embeds=True))
    for p in model.parameters():
        torch.nn.init.normal_(p)
    ref = to_reference_state_dict(model)
    assert {k for k in ref if k.startswith("resolution")} == {
        f"resolution_embedder.mlp.{layer}.{leaf}" for layer in ("in_layer", "out_layer") for leaf in ("weight", "bias")}
    other = PRX(model.cfg)
    load_reference_state_dict(other, ref)
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k


def test_bad_state_dicts_fail_clearly():
    model = PRX(CFG)
    sd = random_reference_state_dict(CFG)
    with pytest.raises(KeyError, match="lacks 1 parameter"):
        load_reference_state_dict(model, {k: v for k, v in sd.items() if k != "txt_in.bias"})
    with pytest.raises(KeyError, match="no counterpart"):
        convert_reference_state_dict({**sd, "blocks.0.mystery.weight": torch.zeros(1)})
    bigger = PRX(dataclasses.replace(CFG, hidden_dim=60, num_heads=3))
    with pytest.raises(ValueError, match="shape mismatch"):
        load_reference_state_dict(bigger, sd)


def test_read_weights_file_formats(tmp_path):
    from safetensors.torch import save_file

    sd = random_reference_state_dict(CFG)
    save_file(sd, tmp_path / "w.safetensors")
    torch.save({"state_dict": sd}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        loaded = read_weights_file(tmp_path / name)
        assert set(loaded) == set(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_weights_file(tmp_path / "missing.safetensors")


def test_repa_projector_is_left_out_of_the_reference_names():
    from prx.model.reference_weights import training_only_names
    from prx.recipe.repa import RepaProjector

    model = PRX(CFG, RepaProjector(CFG.hidden_dim, 8, 8))
    ref = to_reference_state_dict(model)
    assert None not in ref
    assert set(ref) == set(random_reference_state_dict(CFG))  # every denoiser tensor, nothing else
    assert len(training_only_names(model.state_dict())) == 6  # 3 Linear layers, weight and bias
