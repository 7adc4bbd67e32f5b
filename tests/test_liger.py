"""Liger-Kernel as the denoiser's fused ops (model.fused_ops=liger): CUDA only, so the numeric
checks are GPU-marked; on the CPU the option must stop the run with one clear message."""

import dataclasses

import pytest
import torch

import train
from prx.config import ConfigError, ModelConfig
from prx.model.denoiser import PRX

CFG = ModelConfig(patch_size=4, bottleneck_dim=16, hidden_dim=256, depth=2, num_heads=4, text_dim=32,
                  time_embed_dim=32)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the option runs")
def test_liger_on_the_cpu_stops_with_one_message(tmp_path):
    with pytest.raises(ConfigError, match="model.fused_ops=liger .* CUDA GPU"):
        train.main(["--set", "model.fused_ops=liger", "--steps", "1", "--run-dir", str(tmp_path)])


def test_bad_choice_is_refused():
    with pytest.raises(ConfigError, match="model.fused_ops='fast': must be one of torch, liger"):
        train.main(["--set", "model.fused_ops=fast", "--steps", "1"])


def test_the_option_reaches_every_norm_including_the_final_layer():
    """Built on any device (the kernels run only in forward): every module with a fused switch has
    it on, the final layer's LayerNorm included, and none has it by default."""
    fused = PRX(dataclasses.replace(CFG, fused_ops="liger"))
    switches = [m.fused for m in fused.modules() if hasattr(m, "fused")]
    assert len(switches) > 2 * CFG.depth and all(switches) and fused.final.fused
    assert not any(m.fused for m in PRX(CFG).modules() if hasattr(m, "fused"))


def twin_models(device):
    torch.manual_seed(0)
    plain = PRX(CFG).to(device)
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.05)
    fused = PRX(dataclasses.replace(CFG, fused_ops="liger")).to(device)
    fused.load_state_dict(plain.state_dict())
    return plain, fused


def inputs(device, batch=4):
    g = torch.Generator(device).manual_seed(1)
    mask = torch.arange(12, device=device)[None] < torch.tensor([3, 12, 7, 9], device=device)[:, None]
    return (torch.randn(batch, 64, CFG.patch_dim, device=device, generator=g), torch.rand(batch, device=device, generator=g),
            torch.randn(batch, 12, CFG.text_dim, device=device, generator=g), mask, (8, 8))


@pytest.mark.gpu
def test_liger_model_matches_torch_within_twice_torch_rounding():
    """|liger_bf16 - fp32| <= 2 |torch_bf16 - fp32| + atol, output and every gradient."""
    pytest.importorskip("liger_kernel")
    device = torch.device("cuda")
    plain, fused = twin_models(device)
    x, t, text, mask, grid = inputs(device)
    reference = plain(x, t, text, mask, grid).x_hat  # fp32
    reference.square().mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in plain.named_parameters()}
    plain.zero_grad()
    results = {}
    for name, model in (("torch", plain), ("liger", fused)):
        with torch.autocast("cuda", torch.bfloat16):
            out = model(x, t, text, mask, grid).x_hat.float()
        out.square().mean().backward()
        results[name] = (out, {n: p.grad.clone() for n, p in model.named_parameters()})
    bound = 2 * (results["torch"][0] - reference).abs().max() + 1e-3
    assert (results["liger"][0] - reference).abs().max() <= bound
    for n, ref_grad in ref_grads.items():
        torch_err = (results["torch"][1][n] - ref_grad).abs().max()
        liger_err = (results["liger"][1][n] - ref_grad).abs().max()
        assert liger_err <= 2 * torch_err + 1e-3 * ref_grad.abs().max() + 1e-6, n


@pytest.mark.gpu
def test_liger_block_compiles_fullgraph():
    pytest.importorskip("liger_kernel")
    device = torch.device("cuda")
    _, fused = twin_models(device)
    x, t, text, mask, grid = inputs(device)
    eager = fused(x, t, text, mask, grid)
    for block in fused.blocks:
        block.compile(fullgraph=True)  # raises on any graph break
    torch.testing.assert_close(fused(x, t, text, mask, grid), eager, rtol=1e-4, atol=1e-4)
