"""kernels/routing.py against kernels/ref.py: the TREAD selection, route_gather / route_scatter
forward and every gradient, and the torch.library registration.

On the CPU the kernels run under the Triton interpreter in fp32 with odd sizes (N = 77 tokens);
the tests marked gpu run bf16 at the PRX shapes (batch 16, 256 and 1024 tokens of width 1792).
"""

import math

import pytest
import torch

from kernels import ref
from kernels import routing as kr

SEEDS = [7, 2**40 + 3, -12345]


def test_selection_matches_reference_and_is_sorted_distinct_in_range():
    seeds = torch.tensor(SEEDS)
    assert torch.equal(kr.launch_route_keys(seeds, 77), ref.route_keys(seeds, 77))
    for kept in (1, 38, 77):
        idx = kr.select_kept_tokens(seeds, 77, kept)
        assert idx.shape == (3, kept) and idx.dtype == torch.int64
        assert torch.equal(idx, ref.select_kept_tokens(seeds, 77, kept))
        assert bool((idx[:, 1:] > idx[:, :-1]).all())  # ascending, hence distinct
        assert int(idx.min()) >= 0 and int(idx.max()) < 77
    assert torch.equal(kr.select_kept_tokens(seeds, 77, 77), torch.arange(77).expand(3, 77))


def test_selection_is_reproducible_keyed_by_sample_and_uniform():
    seeds = torch.tensor(SEEDS)
    idx = kr.select_kept_tokens(seeds, 77, 38)
    assert torch.equal(idx, kr.select_kept_tokens(seeds, 77, 38))
    assert torch.equal(kr.select_kept_tokens(seeds[1:2], 77, 38), idx[1:2])  # alone, as on another rank
    assert not torch.equal(idx[0], idx[1])
    # Over many samples every token is kept with probability K / N (reference: same keys).
    many = ref.select_kept_tokens(torch.arange(4000), 77, 19)
    counts = torch.zeros(77).index_add_(0, many.flatten(), torch.ones(many.numel()))
    p = 19 / 77
    assert float((counts / 4000 - p).abs().max()) < 5 * math.sqrt(p * (1 - p) / 4000)


def test_api_on_cpu_runs_the_reference():
    import kernels

    seeds, x = torch.tensor(SEEDS), torch.randn(3, 77, 8)
    idx = kernels.select_kept_tokens(seeds, 77, 38)
    assert torch.equal(idx, kr.select_kept_tokens(seeds, 77, 38))
    assert torch.equal(kernels.route_scatter(kernels.route_gather(x, idx), x, idx), x)


def test_selection_rejects_bad_counts():
    for kept in (0, 78):
        with pytest.raises(ValueError, match="cannot keep"):
            kr.select_kept_tokens(torch.tensor([1]), 77, kept)


@pytest.mark.parametrize("tokens, kept, width", [(77, 38, 40), (77, 1, 300), (16, 16, 3)])
def test_gather_and_scatter_match_reference_forward_and_backward(tokens, kept, width):
    idx = ref.select_kept_tokens(torch.tensor(SEEDS), tokens, kept)
    x = torch.randn(3, tokens, width, requires_grad=True)
    full = torch.randn(3, tokens, width, requires_grad=True)
    scale = torch.randn(width, requires_grad=True)

    def routed(gather, scatter):
        return scatter(gather(x, idx) * scale, full, idx)

    out = routed(kr.route_gather, kr.route_scatter)
    want = routed(ref.route_gather, ref.route_scatter)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    grad = torch.randn_like(out)
    got_grads = torch.autograd.grad(out, (x, full, scale), grad)
    want_grads = torch.autograd.grad(want, (x, full, scale), grad)
    for got, expected in zip(got_grads, want_grads):
        torch.testing.assert_close(got, expected)


def test_scatter_restores_routed_tokens_unchanged():
    idx = kr.select_kept_tokens(torch.tensor(SEEDS), 77, 30)
    x = torch.randn(3, 77, 24)
    back = kr.route_scatter(kr.route_gather(x, idx) + 1.0, x, idx)
    kept = torch.zeros(3, 77, dtype=torch.bool).scatter_(1, idx, True)
    assert torch.equal(back[~kept], x[~kept])
    assert torch.equal(back[kept], x[kept] + 1.0)


def test_gather_table_gives_each_sample_its_kept_positions():
    idx = kr.select_kept_tokens(torch.tensor(SEEDS), 77, 38)
    positions = torch.stack(torch.meshgrid(torch.arange(7), torch.arange(11), indexing="ij"), -1).reshape(77, 2)
    kept = ref.route_gather_table(positions, idx)
    assert kept.shape == (3, 38, 2)
    assert torch.equal(kept[..., 0] * 11 + kept[..., 1], idx)
    cos = torch.randn(77, 1, 16)  # RoPE table of one head dim, shared by the batch
    assert torch.equal(ref.route_gather_table(cos, idx)[2, 5], cos[idx[2, 5]])


def test_bad_shapes_are_rejected():
    idx = torch.tensor([[0, 2]])
    with pytest.raises(ValueError, match="contiguous"):
        kr.route_gather(torch.randn(1, 4, 6).transpose(1, 2), idx)
    with pytest.raises(ValueError, match="keep_idx"):
        kr.route_gather(torch.randn(1, 4, 6), idx.int())
    with pytest.raises(ValueError, match="x_full"):
        kr.route_scatter(torch.randn(1, 2, 6), torch.randn(1, 4, 5), idx)


def test_ops_trace_under_torch_compile_fullgraph():
    """backend="aot_eager" on the CPU (the interpreter cannot run inside inductor code): dynamo
    with fullgraph (no graph break), fake tensors and both backwards; inductor is the gpu test."""
    seeds = torch.tensor(SEEDS)
    x = torch.randn(3, 77, 8, requires_grad=True)
    weight = torch.randn(8, 8, requires_grad=True)

    def span(x, seeds, weight):
        idx = kr.select_kept_tokens(seeds, 77, 38)
        return kr.route_scatter(kr.route_gather(x, idx) @ weight, x, idx).square().sum()

    loss = torch.compile(span, fullgraph=True, backend="aot_eager")(x, seeds, weight)
    grads = torch.autograd.grad(loss, (x, weight))
    want = span(x, seeds, weight)
    want_grads = torch.autograd.grad(want, (x, weight))
    torch.testing.assert_close(loss, want)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("op, args", [
    ("route_keys", lambda idx: (torch.tensor(SEEDS), 13)),
    ("route_gather", lambda idx: (torch.randn(3, 13, 5, requires_grad=True), idx)),
    ("route_merge", lambda idx: (torch.randn(3, 6, 5, requires_grad=True),
                                 torch.randn(3, 13, 5, requires_grad=True), idx, 13)),
    ("route_split", lambda idx: (torch.randn(3, 13, 5), idx)),
])
def test_op_registration_passes_opcheck(op, args):
    idx = ref.select_kept_tokens(torch.tensor(SEEDS), 13, 6)
    torch.library.opcheck(getattr(torch.ops.prx, op).default, args(idx))


# ---------------------------------------------------------------- GPU, bf16, PRX shapes


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [256, 1024])
def test_gpu_routing_bf16_prx_shapes(tokens):
    seeds = torch.tensor([2**40 + i for i in range(16)], device="cuda")
    idx = kr.select_kept_tokens(seeds, tokens, tokens // 2)
    assert torch.equal(idx.cpu(), ref.select_kept_tokens(seeds.cpu(), tokens, tokens // 2))
    x = torch.randn(16, tokens, 1792, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    full = torch.randn_like(x, requires_grad=True)
    kept = kr.route_gather(x, idx)
    assert torch.equal(kept, ref.route_gather(x, idx))  # a copy: exact in any dtype
    out = kr.route_scatter(kept * 2, full, idx)
    want = ref.route_scatter(ref.route_gather(x, idx) * 2, full, idx)
    assert torch.equal(out, want)
    grad = torch.randn_like(out)
    for got, expected in zip(torch.autograd.grad(out, (x, full), grad), torch.autograd.grad(want, (x, full), grad)):
        assert torch.equal(got, expected)


@pytest.mark.gpu
def test_gpu_ops_compile_with_inductor():
    seeds = torch.arange(4, device="cuda")
    x = torch.randn(4, 256, 128, device="cuda", requires_grad=True)
    weight = torch.randn(128, 128, device="cuda", requires_grad=True)

    def span(x, seeds, weight):
        idx = kr.select_kept_tokens(seeds, 256, 128)
        return kr.route_scatter(kr.route_gather(x, idx) @ weight, x, idx).square().mean()

    loss = torch.compile(span, fullgraph=True)(x, seeds, weight)
    grads = torch.autograd.grad(loss, (x, weight))
    want = span(x, seeds, weight)
    want_grads = torch.autograd.grad(want, (x, weight))
    torch.testing.assert_close(loss, want)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected)
