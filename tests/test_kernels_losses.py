"""The fused loss kernels (kernels/flow_matching.py, lpips_head.py, cosine.py) against their
references (kernels/ref.py).

On the CPU the Triton kernels run under the interpreter in fp32 (odd shapes, forward and
gradient, op registration); the `gpu` tests check bf16 with the rule
|kernel - ref_fp32| <= 2 |torch_lowp - ref_fp32| + atol, and torch.compile with inductor.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from kernels import cosine as kc
from kernels import flow_matching as kf
from kernels import lpips_head as kl
from kernels import ref
from prx.recipe.lpips_heads import LPIPS_VGG_CHANNELS, load_lpips_heads, lpips_weights_path

CUDA = torch.device("cuda")


def _gen(seed: int, device="cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(seed)


def _grad(fn, x: torch.Tensor, *args):
    """(outputs, d(sum of outputs weighted by fixed random cotangents)/dx) of fn(x, *args)."""
    x = x.detach().clone().requires_grad_(True)
    outs = fn(x, *args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = _gen(123, x.device)
    loss = sum((o * torch.randn(o.shape, generator=g, device=x.device)).sum() for o in outs)
    (dx,) = torch.autograd.grad(loss, x)
    return tuple(o.detach() for o in outs), dx


# ----------------------------------------------------------------------------- flow-matching loss


@pytest.mark.parametrize("shape", [(3, 77, 123), (1, 5, 7), (4, 2, 3072)])
@pytest.mark.parametrize("weighted", [False, True])
def test_flow_loss_matches_reference(shape, weighted):
    g = _gen(0)
    x_hat, x = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.rand(shape[0], generator=g) * 0.99 + 0.001
    t[0] = 0.01  # below the 0.05 floor
    w = torch.rand(shape[0], generator=g) if weighted else None
    (mean, per), dx = _grad(kf.flow_loss, x_hat, x, t, 0.05, w)
    (mean_r, per_r), dx_r = _grad(ref.flow_loss, x_hat, x, t, 0.05, w)
    torch.testing.assert_close(per, per_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean, mean_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, dx_r, rtol=1e-5, atol=1e-8)


def test_flow_loss_gradient_to_x_mixed_dtypes_and_strides():
    g = _gen(1)
    x_hat = torch.randn(2, 33, 48, generator=g).half()  # fp16: exact under the interpreter
    x = torch.randn(2, 48, 33, generator=g).transpose(1, 2)  # not contiguous
    t = torch.tensor([0.2, 0.7])
    (_, per), dx = _grad(lambda x_, xh: kf.flow_loss(xh, x_, t), x, x_hat)
    (_, per_r), dx_r = _grad(lambda x_, xh: ref.flow_loss(xh, x_, t), x, x_hat)
    torch.testing.assert_close(per, per_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx, dx_r, rtol=1e-5, atol=1e-8)
    (_, _), dxh = _grad(lambda xh: kf.flow_loss(xh, x, t), x_hat)
    assert dxh.dtype == torch.float16 and dxh.shape == x_hat.shape
    torch.testing.assert_close(dxh.float(), -dx_r, rtol=1e-3, atol=1e-6)  # fp16 rounding of the output


def test_flow_loss_is_deterministic_and_zero_at_the_target():
    g = _gen(2)
    x = torch.randn(3, 40, 50, generator=g)
    x_hat = x + 0.1 * torch.randn(3, 40, 50, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9])
    a, b = kf.flow_loss(x_hat, x, t), kf.flow_loss(x_hat, x, t)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    zero, per = kf.flow_loss(x, x, t)
    assert zero.item() == 0.0 and torch.all(per == 0)


def test_prx_flow_loss_uses_the_reference_on_cpu_with_weights():
    from prx.recipe.flow import flow_loss

    g = _gen(3)
    x_hat, x = torch.randn(4, 6, 12, generator=g), torch.randn(4, 6, 12, generator=g)
    t, w = torch.rand(4, generator=g), torch.rand(4, generator=g)
    mean, per = flow_loss(x_hat, x, t, 0.05, w)
    mean_r, per_r = ref.flow_loss(x_hat, x, t, 0.05, w)
    assert torch.equal(mean, mean_r) and torch.equal(per, per_r)
    assert torch.equal(flow_loss(x_hat, x, t)[0], per_r.mean())


# ----------------------------------------------------------------------------- LPIPS head


@pytest.mark.parametrize("shape", [(2, 37, 9, 11), (1, 3, 1, 1), (3, 70, 5, 13)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_lpips_head_matches_reference(shape, channels_last):
    g = _gen(4)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    pred = torch.randn(shape, generator=g).relu().contiguous(memory_format=fmt)
    target = torch.randn(shape, generator=g).relu()  # NCHW while pred may be channels-last
    weight = torch.rand(shape[1], generator=g)
    (dist,), dp = _grad(kl.lpips_head_distance, pred, target, weight)
    (dist_r,), dp_r = _grad(ref.lpips_head_distance, pred, target, weight)
    torch.testing.assert_close(dist, dist_r, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dp, dp_r, rtol=1e-4, atol=1e-7)
    assert dp.stride() == pred.stride()


def _lpips_float64(pred, target, weight):
    def unit(f):
        return f / (f.square().sum(1, keepdim=True).sqrt() + 1e-10)

    diff = (unit(pred.double()) - unit(target.double())).square()
    return (diff * weight.double().reshape(1, -1, 1, 1)).sum(1).mean((1, 2))


def test_lpips_head_near_identical_features():
    # Distance ~1e-6 against terms ~0.3: a plain expansion (sum w u^2 - 2 sum w u v + sum w v^2)
    # is 2 % off here and the fp32 reference 1e-6; the kernel's delta form keeps ~1e-7.
    g = _gen(5)
    target = torch.randn(2, 64, 6, 7, generator=g).relu()
    pred = target + 0.001 * torch.randn(2, 64, 6, 7, generator=g)
    weight = torch.rand(64, generator=g)
    (dist,), dp = _grad(kl.lpips_head_distance, pred, target, weight)
    (dist_r,), dp_r = _grad(lambda p_: _lpips_float64(p_, target, weight), pred)
    assert dist_r.max() < 2e-6
    torch.testing.assert_close(dist.double(), dist_r, rtol=1e-6, atol=0)
    dp_r = dp_r.double()
    torch.testing.assert_close(dp.double(), dp_r, rtol=1e-5, atol=1e-5 * dp_r.abs().max().item())


def test_lpips_head_zero_and_tiny_feature_norms():
    # ReLU features can be 0 at every channel of a position, on either side. Where the target is
    # 0 or the pred tiny, the float64 formula is the truth; where the pred is exactly 0 the
    # derivative of p / (|p| + eps) is I / eps, so the gradient is 2 w (0 - v) / eps (the
    # reference's sqrt backward gives NaN there).
    g = _gen(6)
    pred = torch.randn(2, 8, 3, 4, generator=g).relu() + 0.01
    target = torch.randn(2, 8, 3, 4, generator=g).relu() + 0.01
    pred[0, :, 1, 2] = 0.0
    target[1, :, 0, 0] = 0.0
    pred[1, :, 2, 3] *= 1e-5
    weight = torch.rand(8, generator=g)
    (dist,), dp = _grad(kl.lpips_head_distance, pred, target, weight)
    torch.testing.assert_close(dist.double(), _lpips_float64(pred, target, weight), rtol=1e-6, atol=0)
    cot = torch.randn(2, generator=_gen(123))  # the cotangent _grad uses
    v = target[0, :, 1, 2] / (target[0, :, 1, 2].norm() + 1e-10)
    expected = cot[0] / 12 * 2 * weight * (0 - v) / 1e-10
    torch.testing.assert_close(dp[0, :, 1, 2], expected, rtol=1e-5, atol=0)
    (_,), dp64 = _grad(lambda p_: _lpips_float64(p_, target, weight), pred)
    keep = torch.ones_like(pred, dtype=torch.bool)
    keep[0, :, 1, 2] = False
    torch.testing.assert_close(dp[keep].double(), dp64[keep].double(), rtol=1e-5, atol=1e-6)


def _published_lpips(preds, targets, state):
    """The lpips package's formula, written as its code does it (normalize_tensor, the 1x1
    conv `lin{i}` of its state dict, spatial_average, sum over layers)."""
    total = 0
    for i, (f0, f1) in enumerate(zip(preds, targets)):
        n0 = f0 / (torch.sqrt(torch.sum(f0**2, dim=1, keepdim=True)) + 1e-10)
        n1 = f1 / (torch.sqrt(torch.sum(f1**2, dim=1, keepdim=True)) + 1e-10)
        total = total + F.conv2d((n0 - n1) ** 2, state[f"lin{i}.model.1.weight"]).mean([2, 3], keepdim=True)
    return total.reshape(-1)


@pytest.mark.skipif(importlib.util.find_spec("lpips") is None,
                    reason="the lpips package is not installed (pip install --no-deps lpips==0.1.4)")
def test_lpips_with_the_real_heads_equals_the_published_formula():
    heads = load_lpips_heads()
    assert [h.numel() for h in heads] == list(LPIPS_VGG_CHANNELS)
    assert all(h.min() >= 0 and h.max() > 0 for h in heads)
    state = torch.load(lpips_weights_path(), map_location="cpu", weights_only=True)
    g = _gen(7)
    sizes = [(9, 7), (5, 4), (3, 2), (2, 1), (1, 1)]  # odd, halving like VGG's stages
    preds = [torch.randn(2, c, h, w, generator=g).relu() for c, (h, w) in zip(LPIPS_VGG_CHANNELS, sizes)]
    targets = [torch.randn(2, c, h, w, generator=g).relu() for c, (h, w) in zip(LPIPS_VGG_CHANNELS, sizes)]
    torch.testing.assert_close(kl.lpips_distance(preds, targets, heads),
                               _published_lpips(preds, targets, state), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ref.lpips_distance(preds, targets, heads),
                               _published_lpips(preds, targets, state), rtol=1e-5, atol=1e-7)
    # LPIPS(x, x) = 0, and so is its gradient.
    same = [p.clone().requires_grad_(True) for p in preds]
    zero = kl.lpips_distance(same, preds, heads)
    assert torch.all(zero == 0)
    grads = torch.autograd.grad(zero.sum(), same)
    assert all(torch.all(gr == 0) for gr in grads)


def test_lpips_head_loader_reads_a_written_file_and_checks_it(tmp_path):
    g = _gen(8)
    state = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(LPIPS_VGG_CHANNELS)}
    path = tmp_path / "vgg.pth"
    torch.save(state, path)
    heads = load_lpips_heads(path)
    for i, head in enumerate(heads):
        assert torch.equal(head, state[f"lin{i}.model.1.weight"].reshape(-1))
    state["lin3.model.1.weight"][0, 5] = -0.1
    torch.save(state, path)
    with pytest.raises(ValueError, match="negative"):
        load_lpips_heads(path)
    state["lin3.model.1.weight"] = torch.rand(1, 256, 1, 1)
    torch.save(state, path)
    with pytest.raises(ValueError, match="lin3.model.1.weight has shape"):
        load_lpips_heads(path)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps lpips"):
        load_lpips_heads(tmp_path / "missing.pth")


def test_lpips_refuses_gradients_to_the_target():
    p = torch.rand(1, 4, 2, 2, requires_grad=True)
    with pytest.raises(ValueError, match="must not require grad"):
        kl.lpips_head_distance(p, torch.rand(1, 4, 2, 2, requires_grad=True), torch.rand(4))


# ----------------------------------------------------------------------------- cosine alignment


@pytest.mark.parametrize("shape", [(3, 21, 70), (2, 5, 300), (1, 1, 1)])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_cosine_alignment_matches_reference(shape, mask_kind):
    g = _gen(9)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(shape[:2], generator=g) > 0.4
        mask[0] = False  # a sample with no valid token: per-sample 0, no gradient
    elif mask_kind == "float":
        mask = torch.rand(shape[:2], generator=g)
    (mean, per), da = _grad(kc.cosine_alignment, a, b, mask)
    (mean_r, per_r), da_r = _grad(ref.cosine_alignment, a, b, mask)
    torch.testing.assert_close(per, per_r, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mean, mean_r, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(da, da_r, rtol=1e-4, atol=1e-7)
    if mask_kind == "bool":
        assert per[0] == 0 and torch.all(da[0] == 0)


def test_cosine_reference_is_torch_cosine_similarity():
    g = _gen(10)
    a, b = torch.randn(2, 6, 33, generator=g), torch.randn(2, 6, 33, generator=g)
    mean, per = ref.cosine_alignment(a, b)
    cos = F.cosine_similarity(a, b, dim=-1)
    torch.testing.assert_close(per, cos.mean(1))
    torch.testing.assert_close(mean, cos.mean())


def test_cosine_refuses_gradients_to_b_and_handles_strided_inputs():
    g = _gen(11)
    a = torch.randn(2, 40, 9, generator=g).transpose(1, 2)  # (2, 9, 40), D not contiguous
    b = torch.randn(2, 9, 40, generator=g)
    (mean,), _ = _grad(lambda a_: kc.cosine_alignment(a_, b)[0], a)
    torch.testing.assert_close(mean, ref.cosine_alignment(a, b)[0], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="b must not require grad"):
        kc.cosine_alignment(a.requires_grad_(), b.requires_grad_())


# ----------------------------------------------------------------------------- registration


def test_ops_pass_opcheck():
    g = _gen(12)
    a, b = torch.randn(2, 3, 5, generator=g, requires_grad=True), torch.randn(2, 3, 5, generator=g)
    torch.library.opcheck(torch.ops.prx.loss_sq_dist_per_sample, (a, b))
    p, q = torch.rand(2, 4, 3, 2, generator=g, requires_grad=True), torch.rand(2, 4, 3, 2, generator=g)
    torch.library.opcheck(torch.ops.prx.loss_lpips_head, (p, q, torch.rand(4, generator=g), 1e-10, True))
    mask = (torch.rand(2, 3, generator=g) > 0.5).float()
    torch.library.opcheck(torch.ops.prx.loss_cosine, (a, b, mask, 1e-8, True))
    torch.library.opcheck(torch.ops.prx.loss_cosine, (a.detach(), b, None, 1e-8, False))


def test_fullgraph_compile_traces_the_ops_on_cpu():
    # aot_eager: dynamo + AOTAutograd with fake tensors, no inductor (which needs a GPU for
    # these kernels); the inductor compile is the gpu test below.
    g = _gen(13)
    x_hat, x, t = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g), torch.tensor([0.3, 0.8])
    p, q, w = torch.rand(2, 5, 3, 3, generator=g), torch.rand(2, 5, 3, 3, generator=g), torch.rand(5, generator=g)
    a, b = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)

    def total(x_hat, p, a):
        return (kf.flow_loss(x_hat, x, t)[0] + kl.lpips_head_distance(p, q, w).sum()
                - 0.5 * kc.cosine_alignment(a, b)[0])

    def reference(x_hat, p, a):
        return ref.flow_loss(x_hat, x, t)[0] + ref.lpips_head_distance(p, q, w).sum() - 0.5 * ref.cosine_alignment(a, b)[0]

    torch._dynamo.reset()
    compiled = torch.compile(total, fullgraph=True, backend="aot_eager")
    leaves = [v.clone().requires_grad_(True) for v in (x_hat, p, a)]
    ref_leaves = [v.clone().requires_grad_(True) for v in (x_hat, p, a)]
    out, out_r = compiled(*leaves), reference(*ref_leaves)
    out.backward()
    out_r.backward()
    torch.testing.assert_close(out, out_r, rtol=1e-5, atol=1e-6)
    for leaf, leaf_r in zip(leaves, ref_leaves):
        torch.testing.assert_close(leaf.grad, leaf_r.grad, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- GPU, bf16


def _lowp_flow(x_hat, x, t):
    scale = (1.0 / t.clamp_min(0.05)).to(x_hat.dtype).reshape(-1, 1, 1)
    per = ((x.to(x_hat.dtype) - x_hat) * scale).square().flatten(1).mean(1)
    return per.mean(), per


def _lowp_lpips(p, q, w):
    def unit(f):
        return f / (f.square().sum(1, keepdim=True).sqrt() + 1e-10)

    return ((unit(p) - unit(q)).square() * w.to(p.dtype).reshape(1, -1, 1, 1)).sum(1).mean((1, 2))


def _lowp_cosine(a, b, mask=None):
    cos = F.cosine_similarity(a, b, dim=-1)
    return cos.mean(), cos.mean(1)


def _check_rule(kernel, ref32, lowp, atol):
    """max |kernel - ref_fp32| <= 2 max |torch_lowp - ref_fp32| + atol (flash-attention's rule)."""
    for k, r, lp in zip(kernel, ref32, lowp, strict=True):
        err = (k.float() - r.float()).abs().max().item()
        bound = 2 * (lp.float() - r.float()).abs().max().item() + atol
        assert err <= bound, f"kernel error {err:.3g} > bound {bound:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(16, 256, 3072), (3, 77, 123)])
def test_gpu_flow_loss_bf16(shape):
    g = _gen(20, "cuda")
    x = torch.randn(shape, generator=g, device=CUDA)
    x_hat = (x + 0.3 * torch.randn(shape, generator=g, device=CUDA)).bfloat16()
    t = torch.rand(shape[0], generator=g, device=CUDA).clamp_min(0.001)
    k_out, k_dx = _grad(kf.flow_loss, x_hat, x, t)
    r_out, r_dx = _grad(ref.flow_loss, x_hat.float(), x, t)
    l_out, l_dx = _grad(_lowp_flow, x_hat, x, t)
    assert k_dx.dtype == torch.bfloat16
    _check_rule(k_out, r_out, l_out, atol=1e-5)
    _check_rule([k_dx], [r_dx], [l_dx], atol=1e-8)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4, 64, 128, 128), (4, 512, 16, 16), (3, 70, 13, 11)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gpu_lpips_head_bf16(shape, channels_last):
    g = _gen(21, "cuda")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    q = torch.randn(shape, generator=g, device=CUDA).relu().bfloat16()
    p = (q.float() + 0.5 * torch.randn(shape, generator=g, device=CUDA)).relu().bfloat16()
    p, q = p.contiguous(memory_format=fmt), q.contiguous(memory_format=fmt)
    w = torch.rand(shape[1], generator=g, device=CUDA)
    k_out, k_dp = _grad(kl.lpips_head_distance, p, q, w)
    r_out, r_dp = _grad(ref.lpips_head_distance, p.float(), q.float(), w)
    l_out, l_dp = _grad(_lowp_lpips, p, q, w)
    _check_rule(k_out, r_out, l_out, atol=1e-5)
    _check_rule([k_dp], [r_dp], [l_dp], atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(16, 256, 1024), (16, 1024, 1024), (3, 21, 70)])
def test_gpu_cosine_alignment_bf16(shape):
    g = _gen(22, "cuda")
    b = torch.randn(shape, generator=g, device=CUDA)
    a = (b + torch.randn(shape, generator=g, device=CUDA)).bfloat16()
    b = b.bfloat16()
    k_out, k_da = _grad(kc.cosine_alignment, a, b)
    r_out, r_da = _grad(ref.cosine_alignment, a.float(), b.float())
    l_out, l_da = _grad(_lowp_cosine, a, b)
    _check_rule(k_out, r_out, l_out, atol=1e-5)
    _check_rule([k_da], [r_da], [l_da], atol=1e-7)


@pytest.mark.gpu
def test_gpu_inductor_compile_matches_eager():
    g = _gen(23, "cuda")
    x_hat = torch.randn(4, 64, 3072, generator=g, device=CUDA).bfloat16()
    x = torch.randn(4, 64, 3072, generator=g, device=CUDA)
    t = torch.rand(4, generator=g, device=CUDA)
    p = torch.rand(4, 128, 32, 32, generator=g, device=CUDA).bfloat16()
    q = torch.rand(4, 128, 32, 32, generator=g, device=CUDA).bfloat16()
    w = torch.rand(128, generator=g, device=CUDA)
    a = torch.randn(4, 256, 1024, generator=g, device=CUDA).bfloat16()
    b = torch.randn(4, 256, 1024, generator=g, device=CUDA).bfloat16()
    mask = torch.rand(4, 256, generator=g, device=CUDA) > 0.5

    def total(x_hat, p, a):
        return (kf.flow_loss(x_hat, x, t)[0] + 0.1 * kl.lpips_head_distance(p, q, w).mean()
                - 0.5 * kc.cosine_alignment(a, b, mask)[0])

    torch._dynamo.reset()
    compiled = torch.compile(total, fullgraph=True)
    eager_leaves = [v.clone().requires_grad_(True) for v in (x_hat, p, a)]
    comp_leaves = [v.clone().requires_grad_(True) for v in (x_hat, p, a)]
    out_e, out_c = total(*eager_leaves), compiled(*comp_leaves)
    out_e.backward()
    out_c.backward()
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    for le, lc in zip(eager_leaves, comp_leaves):
        # Same kernels; only the (B,) scale arithmetic that inductor fuses may differ by an fp32
        # ulp, which can flip one bf16 rounding of the gradient: bf16's own tolerance.
        torch.testing.assert_close(lc.grad, le.grad)


@pytest.mark.gpu
def test_gpu_prx_flow_loss_dispatches_to_the_kernel():
    from prx.recipe.flow import flow_loss

    x_hat = torch.randn(2, 16, 48, device=CUDA, requires_grad=True)
    x, t = torch.randn(2, 16, 48, device=CUDA), torch.tensor([0.2, 0.9], device=CUDA)
    mean, _ = flow_loss(x_hat, x, t)
    assert _has_op(mean.grad_fn)
    assert not _has_op(flow_loss(x_hat.cpu(), x.cpu(), t.cpu())[0].grad_fn)


def _has_op(fn, depth=0) -> bool:
    if fn is None or depth > 10:
        return False
    if "loss_sq_dist" in type(fn).__name__:
        return True
    return any(_has_op(nxt, depth + 1) for nxt, _ in fn.next_functions)
