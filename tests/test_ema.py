"""EMA of the weights: the math against a hand computation, the update cadence, swapping the EMA
weights in and the training weights back bit for bit, state-dict resume, and FSDP2 (2 gloo
processes) against one process, including a DCP checkpoint saved sharded and loaded unsharded."""

import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from prx.recipe.ema import EMA

ROOT = Path(__file__).resolve().parents[1]


def model_fp64(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def train_weights(step: int, like: nn.Module) -> list[torch.Tensor]:
    """The weights an optimizer would leave after `step` steps (fresh random values)."""
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in like.parameters()]


def set_weights(model: nn.Module, values) -> None:
    with torch.no_grad():
        for p, v in zip(model.parameters(), values):
            p.copy_(v)


def test_ema_math_matches_hand_computation_every_3():
    model = model_fp64()
    decay = 0.9
    ema = EMA(model, decay=decay, every=3)
    expected = [p.detach().clone() for p in model.parameters()]  # the shadow starts as the weights
    for step in range(1, 10):
        weights = train_weights(step, model)
        set_weights(model, weights)
        updated = ema.update(step)
        assert updated == (step % 3 == 0)
        if step % 3 == 0:
            expected = [decay * e + (1 - decay) * w for e, w in zip(expected, weights)]
        for e, s in zip(expected, ema.shadow):
            torch.testing.assert_close(s, e, rtol=1e-14, atol=1e-14)
    # after steps 3, 6, 9 the shadow is 0.9^3 w0 + 0.9^2 0.1 w3 + 0.9 0.1 w6 + 0.1 w9: far from w9
    assert not torch.allclose(ema.shadow[0], model[0].weight)


def test_update_only_every_n_steps_and_not_at_step_0():
    model = model_fp64()
    ema = EMA(model, decay=0.5, every=10)
    before = [s.clone() for s in ema.shadow]
    set_weights(model, train_weights(1, model))
    for step in [0, 1, 5, 9, 11, 19]:
        assert not ema.update(step)
        assert all(torch.equal(s, b) for s, b in zip(ema.shadow, before)), step
    assert ema.update(10)
    assert all(not torch.equal(s, b) for s, b in zip(ema.shadow, before))
    assert ema.update(20)


def test_state_dict_is_keyed_by_parameter_name_and_live():
    model = model_fp64()
    ema = EMA(model)
    state = ema.state_dict()
    assert list(state) == [name for name, _ in model.named_parameters()]
    assert all(state[n] is s for n, s in zip(ema.names, ema.shadow))  # DCP loads into these in place
    assert all(not s.requires_grad for s in ema.shadow)
    assert all(s.data_ptr() != p.data_ptr() for s, p in zip(ema.shadow, model.parameters()))


def test_swapped_into_puts_ema_in_and_restores_training_weights_bit_for_bit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3))  # fp32, as in training
    ema = EMA(model, decay=0.999, every=1)
    for step in range(1, 4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))  # stands in for optimizer steps
        ema.update(step)
    training = [p.detach().clone() for p in model.parameters()]
    shadow = [s.clone() for s in ema.shadow]
    x = torch.randn(4, 5)
    expected = torch.func.functional_call(model, dict(zip(ema.names, shadow)), (x,))
    with ema.swapped_into(model) as swapped:
        assert swapped is model
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), shadow))
        assert torch.equal(model(x), expected)
        with pytest.raises(RuntimeError, match="inside swapped_into"):
            ema.update(3)
        with pytest.raises(RuntimeError, match="inside swapped_into"):
            ema.state_dict()
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), training))
    assert all(torch.equal(s, t) for s, t in zip(ema.shadow, shadow))
    assert not torch.equal(model(x), expected)  # the EMA really differed from the training weights
    # an error while sampling still restores
    with pytest.raises(ZeroDivisionError), ema.swapped_into(model):
        raise ZeroDivisionError
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), training))
    assert all(torch.equal(s, t) for s, t in zip(ema.shadow, shadow))
    # gradients and autograd leaves are untouched by the swap
    assert all(p.requires_grad and p.is_leaf for p in model.parameters())


def test_swapped_into_rejects_another_model():
    ema = EMA(model_fp64())
    other = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()  # names 0.*, 1.* not 0.*, 2.*
    with pytest.raises(ValueError, match="other parameters"):
        with ema.swapped_into(other):
            pass
    with pytest.raises(ValueError, match="shadow of 0.weight"):
        with ema.swapped_into(model_fp64().float()):
            pass


def test_state_dict_round_trip_resumes_identically(tmp_path):
    model_a = model_fp64()
    ema_a = EMA(model_a, decay=0.8, every=2)
    for step in range(1, 6):
        set_weights(model_a, train_weights(step, model_a))
        ema_a.update(step)
    torch.save({"ema": ema_a.state_dict()}, tmp_path / "ema.pt")
    # the resumed run: a fresh model holding the step-5 training weights, the EMA from the file
    model_b = model_fp64(seed=1)
    set_weights(model_b, train_weights(5, model_b))
    ema_b = EMA(model_b, decay=0.8, every=2)
    assert not torch.equal(ema_b.shadow[0], ema_a.shadow[0])
    ema_b.load_state_dict(torch.load(tmp_path / "ema.pt", weights_only=True)["ema"])
    for step in range(6, 11):
        for model, ema in ((model_a, ema_a), (model_b, ema_b)):
            set_weights(model, train_weights(step, model))
            ema.update(step)
    assert all(torch.equal(a, b) for a, b in zip(ema_a.shadow, ema_b.shadow))
    with pytest.raises(KeyError, match="missing"):
        ema_b.load_state_dict({k: v for k, v in ema_a.state_dict().items() if k != "0.bias"})
    with pytest.raises(ValueError, match="shape"):
        ema_b.load_state_dict({k: v.T if v.dim() == 2 else v for k, v in ema_a.state_dict().items()})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_two_processes_equal_one_process(tmp_path):
    from tests import ema_worker

    single, sharded, ckpt = tmp_path / "single.pt", tmp_path / "sharded.pt", tmp_path / "dcp"
    ema_worker.run(str(single))  # in this process, no process group
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                    "--master-port", str(free_port()), str(ROOT / "tests" / "ema_worker.py"),
                    str(sharded), str(ckpt)], cwd=ROOT, check=True, timeout=120, capture_output=True)
    a, b = torch.load(single, weights_only=True), torch.load(sharded, weights_only=True)
    assert not a["sharded"] and b["sharded"]  # the 2-process shadows were DTensors
    assert a.keys() == b.keys()
    for key in a:
        if key != "sharded":  # elementwise lerp and copies: bit for bit; the forward to rounding
            atol = 1e-6 if key.startswith("out") else 0.0
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=atol, msg=key)
    for key in a:
        if key.startswith("restored."):
            name = key.removeprefix("restored.")
            assert not torch.equal(a[key], a[f"shadow.{name}"])  # the swap had something to undo
            assert torch.equal(a[f"swapped.{name}"], a[f"shadow.{name}"])
    assert not torch.allclose(a["out_ema"], a["out_train"])
    for r in (a, b):  # the forward after the swap sees the training weights again
        assert torch.equal(r["out_train"], r["out_before"])
    # the checkpoint saved by 2 ranks (sharded) loads into a 1-process EMA (DCP reshards)
    model = ema_worker.small_model()
    ema = EMA(model, ema_worker.DECAY, ema_worker.EVERY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "torch.distributed is disabled": no process group here
        dcp.load({"ema": ema.state_dict()}, checkpoint_id=str(ckpt))
    for name, s in ema.state_dict().items():
        assert torch.equal(s, a[f"shadow.{name}"]), name
