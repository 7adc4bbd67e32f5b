"""The one dispatch road (kernels/__init__.py): references on CPU tensors, kernels when pinned."""

import pytest
import torch

import kernels
from kernels import patchify, ref, routing


def spy(monkeypatch, module, name, calls):
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        calls.append(f"{module.__name__}.{name}")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)


def test_cpu_tensors_take_the_reference_and_pinned_triton_takes_the_kernel(monkeypatch):
    calls = []
    for module in (ref, patchify, routing):
        for name in ("unpatchify", "route_gather"):
            if hasattr(module, name):
                spy(monkeypatch, module, name, calls)
    patches, x = torch.randn(2, 6, 48), torch.randn(2, 9, 5)
    keep = torch.tensor([[0, 3, 8], [1, 2, 4]])
    expected = (ref.unpatchify(patches, 4, 8, 12), ref.route_gather(x, keep))
    calls.clear()
    assert not kernels.uses_triton(patches)
    got = (kernels.unpatchify(patches, 4, 8, 12), kernels.route_gather(x, keep))
    assert calls == ["kernels.ref.unpatchify", "kernels.ref.route_gather"]
    calls.clear()
    with kernels.pinned("triton"):
        assert kernels.uses_triton(patches)
        pinned = (kernels.unpatchify(patches, 4, 8, 12), kernels.route_gather(x, keep))
    assert calls == ["kernels.patchify.unpatchify", "kernels.routing.route_gather"]
    assert not kernels.uses_triton(patches)  # the previous provider is back after the block
    for a, b, c in zip(expected, got, pinned):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_pin_names_the_providers():
    with pytest.raises(ValueError, match="use one of auto, triton, reference"):
        kernels.pin("cuda")
    with kernels.pinned("reference"):
        assert not kernels.uses_triton(torch.zeros(1))
