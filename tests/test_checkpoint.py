"""Checkpoints: DCP shards published atomically, the latest pointer, safe loading, versions."""

import pickle

import pytest
import torch

from prx.run.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    CheckpointWriter,
    checkpoint_dir,
    latest_checkpoint,
    load_model_weights,
    load_train_state,
    read_meta,
)


def trained_pair(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).square().sum().backward()
    opt.step()
    return model, opt


def save(run, step, model, opt, keep=0):
    return CheckpointWriter(run, keep).save(step, model, opt, {"step": step, "config": {}},
                                            {"torch": torch.get_rng_state()})


def test_save_load_and_latest(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    model, opt = trained_pair()
    for step in (10, 20, 30):
        save(tmp_path, step, model, opt, keep=2)
    assert latest_checkpoint(tmp_path).name == "step_00000030"
    assert sorted(p.name for p in checkpoint_dir(tmp_path).glob("step_*")) == ["step_00000020", "step_00000030"]
    assert read_meta(latest_checkpoint(tmp_path))["step"] == 30

    fresh, fresh_opt = trained_pair(seed=1)
    rng = load_train_state(latest_checkpoint(tmp_path), fresh, fresh_opt)
    assert torch.equal(rng["torch"], torch.get_rng_state()) or rng["torch"].dtype == torch.uint8
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"]) for k in sa)

    weights_only, _ = trained_pair(seed=2)
    load_model_weights(latest_checkpoint(tmp_path), weights_only)
    assert torch.equal(weights_only[0].weight, model[0].weight)


def test_half_written_save_is_never_latest(tmp_path):
    model, opt = trained_pair()
    save(tmp_path, 5, model, opt)
    d = checkpoint_dir(tmp_path)
    # a crash mid-save leaves a hidden temporary directory with some shards, never a pointer move
    (d / ".step_00000010.tmp").mkdir()
    (d / ".step_00000010.tmp" / "__0_0.distcp").write_bytes(b"torn")
    assert latest_checkpoint(tmp_path).name == "step_00000005"
    save(tmp_path, 10, model, opt)  # the next save of that step cleans the leftovers
    assert latest_checkpoint(tmp_path).name == "step_00000010"
    (d / "latest").write_text("step_00000099\n")  # pointer to a checkpoint that is gone
    assert latest_checkpoint(tmp_path) is None


def test_foreign_and_old_checkpoints_fail_clearly(tmp_path):
    model, opt = trained_pair()
    path = save(tmp_path, 1, model, opt)
    torch.save({"format": CHECKPOINT_FORMAT - 1, "step": 1}, path / "meta.pt")
    with pytest.raises(CheckpointError, match=f"has format {CHECKPOINT_FORMAT - 1}; this version reads"):
        read_meta(path)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        read_meta(tmp_path / "nowhere")


class Payload:  # arbitrary code in a pickle must never run
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_code_is_refused(tmp_path):
    model, opt = trained_pair()
    path = save(tmp_path, 1, model, opt)
    (path / "meta.pt").write_bytes(pickle.dumps({"format": CHECKPOINT_FORMAT, "x": Payload()}, protocol=2))
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        read_meta(path)
    path = save(tmp_path, 2, model, opt)
    (path / ".metadata").write_bytes(pickle.dumps(Payload(), protocol=2))
    with pytest.raises(CheckpointError, match="print, which is not allowed"):
        load_model_weights(path, model)


def test_asynchronous_save_publishes_on_close(tmp_path):
    from prx.run.checkpoint import CheckpointWriter

    model, opt = trained_pair()
    writer = CheckpointWriter(tmp_path, keep=0, asynchronous=True)
    writer.save(1, model, opt, {"step": 1, "config": {}}, {"torch": torch.get_rng_state()})
    expected = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():  # training goes on while the thread writes: the copy was taken first
        for p in model.parameters():
            p.add_(1.0)
    writer.close()
    assert latest_checkpoint(tmp_path).name == "step_00000001"
    fresh, _ = trained_pair(seed=3)
    load_model_weights(latest_checkpoint(tmp_path), fresh)
    for a, b in zip(expected, fresh.parameters()):
        assert torch.equal(a, b)
