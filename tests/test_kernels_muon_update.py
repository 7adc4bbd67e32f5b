"""Muon's fused element-wise kernels (kernels/muon_update.py) against torch (kernels/ref.py).

On the CPU the kernels run under the Triton interpreter, whose `tl.fma` is a multiply and an add
in fp32: there the kernels must equal that unfused arithmetic bit for bit (which pins the
formula: the branch of torch's lerp, its coefficient, the order of the update), and torch's
fused results within the one extra rounding, bounds derived below. On a GPU (fp32 and bf16) the
bounds hold too; there `tl.fma` is one rounding, like torch's, so the results are expected bit-equal
to torch's (not yet measured: no GPU when this was written).
"""

import pytest
import torch

import kernels
from kernels import muon_update, ref
from prx.config import preset
from prx.model.denoiser import PRX
from prx.optim import is_muon_parameter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"
EPS = torch.finfo(torch.float32).eps


def randn(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE)


def matrices(layout: str, k: int, rows: int, cols: int, seed: int) -> list[torch.Tensor]:
    """K fp32 matrices laid out as the kernels meet them: separate tensors; views of one buffer
    in descending order (offsets from the first are negative); or views that start 4 bytes off
    16-byte alignment (an FSDP2 shard of a flat buffer may), which the kernels read unvectorised."""
    if layout == "separate":
        return [randn(rows, cols, seed=seed + i) for i in range(k)]
    if layout == "descending":
        return list(randn(k, rows, cols, seed=seed).unbind(0))[::-1]
    flat = randn(1 + k * rows * cols, seed=seed)
    return [flat[1 + i * rows * cols:1 + (i + 1) * rows * cols].view(rows, cols) for i in range(k)]


def unfused_lerp(start: torch.Tensor, end: torch.Tensor, weight: float) -> torch.Tensor:
    """torch.lerp's formula with the product rounded before the add (the interpreter's tl.fma)."""
    w = torch.tensor(weight, dtype=torch.float32, device=start.device)
    if abs(w.item()) < 0.5:
        return start + w * (end - start)
    return end + (w - 1) * (end - start)


def ratio(kernel: torch.Tensor, reference: torch.Tensor, scale: torch.Tensor) -> float:
    """The largest |kernel - reference| in units of EPS * scale."""
    return ((kernel.double() - reference.double()).abs() / (EPS * scale.double())).max().item()


# One fused rounding more per product (|c (end - start)| <= |g| + |buf| for |c| <= 1, and the
# result lies between start and end): buf differs from torch's by at most 0.5 + 1 = 1.5 EPS
# (|g| + |buf|); the Nesterov lerp adds its own 0.5 * 2 + 1 = 2 (its end, the new buf, is at
# most max(|g|, |buf|)) to the 1.5 it inherits through weight mu <= 1: 3.5.
BUFFER_BOUND, BANK_BOUND = 1.5, 3.5


@pytest.mark.parametrize("mu", [0.95, 0.3])  # the two branches of torch's lerp, in either lerp
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("layout, shape", [("separate", (3, 37, 53)), ("descending", (2, 64, 48)),
                                           ("unaligned", (2, 5, 300))])
def test_momentum_to_bank_matches_torch(layout, shape, nesterov, mu):
    grads = matrices(layout, *shape, seed=0)
    buffers = matrices(layout, *shape, seed=50)
    g0, b0 = [g.clone() for g in grads], [b.clone() for b in buffers]
    theirs = [b.clone() for b in buffers]
    bank = muon_update.momentum_to_bank(grads, buffers, mu, nesterov, torch.float32)
    expected = ref.momentum_to_bank(g0, theirs, mu, nesterov, torch.float32)
    assert bank.shape == (shape[0], *shape[1:]) and bank.dtype == torch.float32
    assert all(torch.equal(g, h) for g, h in zip(grads, g0))  # the gradients are only read
    for k in range(shape[0]):
        scale = g0[k].abs() + b0[k].abs()
        assert ratio(buffers[k], theirs[k], scale) <= BUFFER_BOUND, k
        assert ratio(bank[k], expected[k], scale) <= BANK_BOUND, k
        if INTERPRETED:
            buf = unfused_lerp(b0[k], g0[k], 1 - mu)
            assert torch.equal(buffers[k], buf), k
            assert torch.equal(bank[k], unfused_lerp(g0[k], buf, mu) if nesterov else buf), k


@pytest.mark.parametrize("dtype", [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.gpu)])
def test_the_bank_holds_the_update_rounded_to_nearest_even(dtype):
    """(bf16 on a GPU only: the interpreter converts bf16 wrongly.)"""
    grads, buffers = matrices("separate", 3, 37, 53, seed=1), matrices("separate", 3, 37, 53, seed=9)
    wide = muon_update.momentum_to_bank(grads, [b.clone() for b in buffers], 0.95, True, torch.float32)
    narrow = muon_update.momentum_to_bank(grads, buffers, 0.95, True, dtype)
    assert narrow.dtype == dtype and torch.equal(narrow, wide.to(dtype))


@pytest.mark.parametrize("decay", [1.0, 0.999])
@pytest.mark.parametrize("updates, shape", [("bank", (3, 37, 53)), ("transposed", (2, 70, 20)),
                                            ("separate", (2, 16, 33)), ("half", (2, 37, 53))])
def test_apply_update_matches_torch(updates, shape, decay):
    """O as Newton-Schulz hands it over: a bank's matrices, the transposed view of a tall bank,
    separate tensors (the sharded path's rows), or fp16 (standing in for bf16 on the CPU)."""
    k, rows, cols = shape
    params = matrices("unaligned" if updates == "separate" else "separate", k, rows, cols, seed=3)
    if updates == "transposed":
        o = list(randn(k, cols, rows, seed=4).mT.unbind(0))
    elif updates == "separate":
        o = [randn(rows, cols, seed=5 + i) for i in range(k)]
    else:
        o = list(randn(k, rows, cols, seed=4).to(torch.float16 if updates == "half" else torch.float32).unbind(0))
    step = 0.0123
    p0 = [p.clone() for p in params]
    theirs = [p.clone() for p in params]
    muon_update.apply_update(params, o, step, decay)
    ref.apply_update(theirs, o, step, decay)
    for i in range(k):
        # round(p decay) is common to both; then one product rounded once more: <= 0.5 EPS |s O|
        # before the final rounding, <= EPS |result| in it
        product = step * o[i].float().abs()
        assert ratio(params[i], theirs[i], product + theirs[i].abs()) <= 1.5, i
        if INTERPRETED:
            d = torch.tensor(decay, dtype=torch.float32)
            expected = p0[i] * d + o[i].float() * torch.tensor(-step, dtype=torch.float32)
            assert torch.equal(params[i], expected), i
    assert not torch.equal(params[0], p0[0])


def test_the_functional_api_follows_the_dispatch_rule(monkeypatch):
    calls = []
    for module in (ref, muon_update):
        for name in ("momentum_to_bank", "apply_update"):
            original = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, _f=original, _n=f"{module.__name__}.{name}", **kw:
                                calls.append(_n) or _f(*a, **kw))
    grads, buffers = matrices("separate", 2, 9, 7, seed=6), matrices("separate", 2, 9, 7, seed=7)
    for provider in ("reference", "triton"):
        with kernels.pinned(provider):
            bank = kernels.momentum_to_bank(grads, [b.clone() for b in buffers], 0.3, False, torch.float32)
            kernels.apply_update([b.clone() for b in buffers], list(bank.unbind(0)), 1.0)
    assert calls == ["kernels.ref.momentum_to_bank", "kernels.ref.apply_update",
                     "kernels.muon_update.momentum_to_bank", "kernels.muon_update.apply_update"]


def test_launchers_reject_what_the_kernels_cannot_read():
    g = [randn(6, 8, seed=8), randn(6, 8, seed=9)]
    with pytest.raises(ValueError, match="contiguous"):
        muon_update.momentum_to_bank([g[0], randn(8, 6, seed=1).mT], g, 0.9, True)
    with pytest.raises(ValueError, match="shape"):
        muon_update.momentum_to_bank(g, [g[0], randn(6, 9, seed=1)], 0.9, True)
    with pytest.raises(TypeError, match="fp32"):
        muon_update.momentum_to_bank(g, [x.double() for x in g], 0.9, True)
    with pytest.raises(ValueError, match="strides"):
        muon_update.apply_update(g, [g[0], randn(8, 6, seed=2).mT], 0.1)
    with pytest.raises(ValueError, match="column stride"):
        muon_update.apply_update([x.mT.contiguous().mT for x in g], g, 0.1)


def test_bytes_per_element_and_the_prx_small_total():
    """The counts the module docstring states and the benchmark divides by its times."""
    with torch.device("meta"):
        model = PRX(preset("prx_small_512").model)
    shapes = [tuple(p.shape) for name, p in model.named_parameters() if is_muon_parameter(name, p)]
    elements = sum(r * c for r, c in shapes)
    assert len(shapes) == 112 and elements == 1_156_055_040
    fused = muon_update.muon_update_bytes(shapes)
    assert fused == {"momentum_to_bank": 14 * elements, "apply_update": 10 * elements, "total": 24 * elements}
    assert muon_update.muon_update_bytes(shapes, fused=False)["total"] == 52 * elements
    assert muon_update.muon_update_bytes(shapes, fused=False, nesterov=False, weight_decay=False)["total"] \
        == 32 * elements
    assert muon_update.muon_update_bytes(shapes, nesterov=False, weight_decay=False)["total"] == 24 * elements
    assert round(fused["total"] / 1e9, 1) == 27.7  # GB, the docstring's number


@pytest.mark.gpu
@pytest.mark.parametrize("rows, cols", [(6272, 1792), (1792, 6272)])
def test_prx_shapes_on_the_gpu_within_one_rounding(rows, cols):
    grads, buffers = matrices("separate", 2, rows, cols, seed=10), matrices("separate", 2, rows, cols, seed=20)
    b0, theirs = [b.clone() for b in buffers], [b.clone() for b in buffers]
    bank = muon_update.momentum_to_bank(grads, buffers, 0.95, True, torch.float32)
    expected = ref.momentum_to_bank(grads, theirs, 0.95, True, torch.float32)
    for k in range(2):
        assert ratio(bank[k], expected[k], grads[k].abs() + b0[k].abs()) <= BANK_BOUND
    o = list(bank.bfloat16().mT.contiguous().mT.unbind(0)) if rows > cols else list(bank.bfloat16().unbind(0))
    mine = [b.clone() for b in b0]
    muon_update.apply_update(mine, o, 1e-3, 0.999)
    ref.apply_update(b0, o, 1e-3, 0.999)
    for k in range(2):
        assert ratio(mine[k], b0[k], 1e-3 * o[k].float().abs() + b0[k].abs()) <= 1.5
