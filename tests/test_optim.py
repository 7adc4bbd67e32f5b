"""Muon + Adam (prx.optim) against plain per-parameter implementations of the same math."""

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kernels.ref import newton_schulz
from prx.config import ModelConfig, preset
from prx.model.denoiser import PRX
from prx.optim import MuonAdam, NewtonSchulzSchedule, bank_dtype, build_optimizer, is_muon_parameter
from prx.run.parallel import apply_activation_checkpointing
from tests.test_parallel import torchrun

ROOT = Path(__file__).resolve().parents[1]
CFG = ModelConfig(patch_size=4, bottleneck_dim=16, hidden_dim=48, depth=2, num_heads=4, text_dim=24,
                  time_embed_dim=32)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(9, 5)
        self.tall = nn.Linear(4, 7, bias=False)

    def forward(self, x):
        return self.tall(self.wide(x)[..., :4])


class Blocks(nn.Module):
    """Odd-shaped matrices inside `blocks` (two banks, one tall), plus non-Muon parameters."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.embed = nn.Linear(3, 4)
        self.scale = nn.Parameter(torch.ones(5))


def muon_optimizer(model, **kwargs):
    cfg = preset("prx_small_512")
    cfg.optim.ns_coefficients = kwargs.pop("schedule", "jordan")
    opt = build_optimizer(model, cfg)
    opt.ns_dtype = kwargs.pop("ns_dtype", torch.float64)
    assert not kwargs
    return opt


def fake_gradients(model, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def reference_step(params_muon, params_adam, state, step, lr, schedule, mu=0.95, betas=(0.9, 0.95), eps=1e-8):
    """docs/recipe.md section 6, one parameter at a time, written out plainly."""
    for p in params_muon:
        buf = state.setdefault(p, torch.zeros_like(p))
        buf.mul_(mu).add_(p.grad, alpha=1 - mu)
        u = (1 - mu) * p.grad + mu * buf
        o = newton_schulz(u.double(), list(schedule.coefficients), schedule.norm_safety, schedule.eps)
        p.sub_(lr * 0.2 * math.sqrt(max(p.shape)) * o.to(p.dtype))
    for p in params_adam:
        m, v = state.setdefault(p, (torch.zeros_like(p), torch.zeros_like(p)))
        m.mul_(betas[0]).add_(p.grad, alpha=1 - betas[0])
        v.mul_(betas[1]).add_(p.grad**2, alpha=1 - betas[1])
        m_hat, v_hat = m / (1 - betas[0] ** step), v / (1 - betas[1] ** step)
        p.sub_(lr * m_hat / (v_hat.sqrt() + eps))


def test_parameter_split_follows_the_recipe():
    model = PRX(CFG)
    apply_activation_checkpointing(model, "full", 1)  # wrapper prefixes must not change the split
    opt = build_optimizer(model, preset("prx_small_512"))
    kinds = {g["kind"]: g["params"] for g in opt.param_groups}
    names = {id(p): n.replace("_checkpoint_wrapped_module.", "") for n, p in model.named_parameters()}
    muon = sorted(names[id(p)] for p in kinds["muon"])
    per_block = ["attn.out.weight", "attn.qkv.weight", "attn.text_kv.weight", "mlp.down.weight",
                 "mlp.gate.weight", "mlp.up.weight", "modulation.weight"]
    assert muon == sorted(f"blocks.{i}.{n}" for i in range(CFG.depth) for n in per_block)
    adam = {names[id(p)] for p in kinds["adam"]}
    assert {"blocks.0.attn.q_norm.scale", "img_in.down.weight", "txt_in.weight", "final.linear.weight",
            "time_in.fc1.weight", "blocks.1.modulation.bias"} <= adam
    assert len(muon) + len(adam) == len(list(model.parameters()))
    assert not is_muon_parameter("blocks.0.attn.q_norm.scale", torch.zeros(4))
    tiny = preset("tiny")
    assert isinstance(build_optimizer(model, tiny), MuonAdam)  # the tiny preset trains with Muon too
    adamw = dataclasses.replace(tiny, optim=dataclasses.replace(tiny.optim, name="adamw"))
    assert isinstance(build_optimizer(model, adamw), torch.optim.AdamW)


def test_muon_banks_are_bf16_on_a_gpu_and_fp32_on_a_cpu():
    """The recipe's bf16 banks are for the Triton kernels; on a CPU half storage only adds casts."""
    assert bank_dtype(torch.device("cuda", 0)) == torch.bfloat16
    assert bank_dtype(torch.device("cpu")) == torch.float32
    assert build_optimizer(PRX(preset("tiny").model), preset("tiny")).ns_dtype == torch.float32


@pytest.mark.parametrize("schedule", ["jordan", "polar_express"])
def test_steps_equal_a_per_parameter_reference(schedule):
    model, twin = Blocks(), Blocks()
    opt = muon_optimizer(model, schedule=schedule)
    s = NewtonSchulzSchedule.named(schedule, 5)
    muon_twin = [p for n, p in twin.named_parameters() if is_muon_parameter(n, p)]
    adam_twin = [p for n, p in twin.named_parameters() if not is_muon_parameter(n, p)]
    state = {}
    for step in range(1, 4):
        fake_gradients(model, step)
        fake_gradients(twin, step)
        opt.step()
        with torch.no_grad():
            reference_step(muon_twin, adam_twin, state, step, 1e-4, s)
        for (name, a), b in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=f"step {step}: {name}")
    moved = sum((a - b).abs().sum() for a, b in zip(model.parameters(), Blocks().parameters()))
    assert moved > 1e-4  # the parameters did change


def test_triton_kernels_inside_the_optimizer_equal_the_reference():
    """The kernels (interpreter, fp32) inside the optimizer give the torch reference's update."""
    import kernels

    model, twin = Blocks(), Blocks()
    with_kernels = muon_optimizer(model, ns_dtype=torch.float32)
    plain = muon_optimizer(twin, ns_dtype=torch.float32)
    for step in range(2):
        fake_gradients(model, step)
        fake_gradients(twin, step)
        with kernels.pinned("triton"):
            with_kernels.step()
        plain.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_adam_group_equals_torch_adam():
    model, twin = nn.Linear(7, 3), nn.Linear(7, 3)
    twin.load_state_dict(model.state_dict())
    ours = MuonAdam([dict(params=list(model.parameters()), kind="adam", betas=(0.9, 0.95), eps=1e-8,
                          weight_decay=0.1)], lr=1e-2, schedule=NewtonSchulzSchedule.named("jordan", 5))
    theirs = torch.optim.AdamW(twin.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                               foreach=False)
    for step in range(5):
        fake_gradients(model, step)
        fake_gradients(twin, step)
        ours.step()
        theirs.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_state_dict_resume_continues_identically():
    straight, resumed = Blocks(), Blocks()
    opt = muon_optimizer(straight, ns_dtype=torch.float32)
    for step in range(5):
        fake_gradients(straight, step)
        opt.step()
        if step == 1:
            saved_model = {k: v.clone() for k, v in straight.state_dict().items()}
            saved_opt = torch.load(_roundtrip(opt.state_dict()), weights_only=True)
    resumed.load_state_dict(saved_model)
    opt2 = muon_optimizer(resumed, ns_dtype=torch.float32)
    opt2.load_state_dict(saved_opt)
    for step in range(2, 5):
        fake_gradients(resumed, step)
        opt2.step()
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def _roundtrip(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_missing_gradient_is_a_clear_error():
    model = Blocks()
    opt = muon_optimizer(model)
    fake_gradients(model, 0)
    model.blocks[0].wide.weight.grad = None
    with pytest.raises(RuntimeError, match="no gradient"):
        opt.step()


@pytest.mark.slow
def test_two_processes_fsdp_equal_one_process(tmp_path):
    """FSDP2 row shards (uneven: 5 and 7 rows over 2 ranks) travel to owner ranks and back."""
    single = tmp_path / "single.pt"
    sharded = tmp_path / "sharded.pt"
    worker = ROOT / "tests" / "muon_worker.py"
    subprocess.run([sys.executable, str(worker), str(single)], cwd=ROOT, check=True, timeout=300,
                   capture_output=True)
    subprocess.run([*torchrun(2), str(worker), str(sharded)], cwd=ROOT, check=True, timeout=300,
                   capture_output=True)
    a, b = torch.load(single, weights_only=True), torch.load(sharded, weights_only=True)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-12, msg=name)


def old_muon_step(params, buffers, group, schedule, ns_dtype, newton_schulz):
    """The Muon step as prx/optim.py ran it before the fused kernels (kernels/muon_update.py):
    foreach momentum and Nesterov (over the gradients), foreach decay, stack per shape, add."""
    grads = [p.grad for p in params]
    mu, lr = group["momentum"], group["lr"]
    torch._foreach_lerp_(buffers, grads, 1 - mu)
    updates = buffers
    if group["nesterov"]:
        torch._foreach_lerp_(grads, buffers, mu)
        updates = grads
    if group["weight_decay"]:
        torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
    banks = {}
    for i, p in enumerate(params):
        banks.setdefault(tuple(p.shape), []).append(i)
    for shape, members in banks.items():
        bank = torch.stack([updates[i].to(ns_dtype) for i in members])
        o = newton_schulz(bank, list(schedule.coefficients), schedule.norm_safety, schedule.eps)
        for i, oi in zip(members, o.unbind(0)):
            params[i].add_(oi, alpha=-lr * group["update_scale"] * math.sqrt(max(shape)))


@pytest.mark.parametrize("provider", ["reference", "triton"])
@pytest.mark.parametrize("nesterov, weight_decay", [(True, 0.1), (False, 0.0), (True, 0.0), (False, 0.1)])
def test_fused_muon_step_equals_the_old_foreach_step(provider, nesterov, weight_decay):
    """Three steps of the fused step against the old one, with one Newton-Schulz (torch's): bit-equal
    with the references; with the kernels (interpreter) within 2e-7, measured at most 1.2e-7 on the
    parameters (2 ulp of these weights, |w| < 0.52) and 3e-8 on the buffers: the interpreter
    rounds each product once more than torch's fma (tests/test_kernels_muon_update.py)."""
    import kernels

    model, twin = Blocks(), Blocks()
    muon = [p for n, p in model.named_parameters() if is_muon_parameter(n, p)]
    old = [p for n, p in twin.named_parameters() if is_muon_parameter(n, p)]
    group = dict(kind="muon", momentum=0.9, nesterov=nesterov, update_scale=0.2, weight_decay=weight_decay)
    schedule = NewtonSchulzSchedule.named("jordan", 5)
    opt = MuonAdam([dict(params=muon, **group)], lr=0.05, schedule=schedule, ns_dtype=torch.float32,
                   newton_schulz=newton_schulz)  # the torch one in both: the element-wise work differs
    buffers = [torch.zeros_like(p) for p in old]
    with kernels.pinned(provider):
        for step in range(3):
            fake_gradients(model, step)
            fake_gradients(twin, step)
            opt.step()
            with torch.no_grad():
                old_muon_step(old, buffers, opt.param_groups[0], schedule, torch.float32, newton_schulz)
    for a, b, buf in zip(muon, old, buffers):
        assert torch.equal(a, b) if provider == "reference" else (a - b).abs().max() <= 2e-7
        torch.testing.assert_close(opt.state[a]["momentum_buffer"], buf, rtol=0, atol=2e-7)
    start = [p for n, p in Blocks().named_parameters() if is_muon_parameter(n, p)]
    assert sum((a - b).abs().sum() for a, b in zip(muon, start)) > 0.1  # they moved
