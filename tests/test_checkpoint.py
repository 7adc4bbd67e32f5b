"""Checkpoints: DCP shards published atomically, the latest pointer, safe loading, versions."""

import errno
import json
import pickle
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

from prx.run.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    CheckpointWriter,
    _file_sums,
    checkpoint_dir,
    latest_checkpoint,
    load_model_weights,
    load_train_state,
    read_meta,
    verify_checkpoint,
)


def reseal(path):
    """Rewrite the manifest to match the files: what an attacker who edits a checkpoint can do."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"] = _file_sums(p for p in path.iterdir() if p.name != "manifest.json")
    (path / "manifest.json").write_text(json.dumps(manifest))


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
    assert latest_checkpoint(tmp_path).name == "step_00000010"  # the newest complete one instead
    (d / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "step_00000010"
    shutil.rmtree(d / "step_00000010")
    shutil.rmtree(d / "step_00000005")
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
    reseal(path)
    with pytest.raises(CheckpointError, match=r"cannot be read safely: Unsupported global: GLOBAL print was not an allowed global by default; it was not written by this trainer, and must not be loaded with weights_only=False$"):
        read_meta(path)
    path = save(tmp_path, 2, model, opt)
    (path / ".metadata").write_bytes(pickle.dumps(Payload(), protocol=2))
    reseal(path)
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


def test_pruning_keeps_the_most_recently_written_not_the_highest_name(tmp_path):
    """A run resumed from an earlier step writes names that sort before the abandoned ones;
    pruning by name would delete every new checkpoint right after writing it."""
    model, opt = trained_pair()
    for step in (10, 20, 30):
        save(tmp_path, step, model, opt, keep=2)
    save(tmp_path, 20, model, opt, keep=2)  # resumed from step 10: its own step 20
    assert latest_checkpoint(tmp_path).name == "step_00000020"
    save(tmp_path, 25, model, opt, keep=2)
    names = sorted(p.name for p in checkpoint_dir(tmp_path).glob("step_*"))
    assert names == ["step_00000020", "step_00000025"]
    assert latest_checkpoint(tmp_path).name == "step_00000025"


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_damaged_checkpoint_is_never_loaded(tmp_path, damage):
    model, opt = trained_pair()
    save(tmp_path, 1, model, opt)
    path = save(tmp_path, 2, model, opt)
    shard = path / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        expected = "__0_0.distcp differs from what was saved"
    elif damage == "truncate":
        shard.write_bytes(bytes(data[:-7]))
        expected = f"__0_0.distcp has {len(data) - 7:,} bytes, not the {len(data):,}"
    elif damage == "delete":
        shard.unlink()
        expected = "__0_0.distcp is missing"
    else:
        (path / "manifest.json").write_text("{not json")
        expected = "has no readable manifest.json"
    fresh, fresh_opt = trained_pair(seed=1)
    with pytest.raises(CheckpointError, match=expected) as err:
        load_train_state(path, fresh, fresh_opt)
    assert "--resume" in str(err.value) and "step_00000001" in str(err.value)  # names an intact one
    with pytest.raises(CheckpointError, match=expected):
        load_model_weights(path, fresh)
    verify_checkpoint(checkpoint_dir(tmp_path) / "step_00000001")  # the other stays good
    if damage == "manifest":  # an unreadable manifest is an incomplete checkpoint: not latest
        assert latest_checkpoint(tmp_path).name == "step_00000001"


def test_non_finite_state_is_not_saved(tmp_path):
    model, opt = trained_pair()
    save(tmp_path, 1, model, opt)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="hold NaN or inf, so they were not saved; the newest good "
                                              "checkpoint is .*step_00000001"):
        save(tmp_path, 2, model, opt)
    assert sorted(p.name for p in checkpoint_dir(tmp_path).iterdir()) == ["latest", "step_00000001"]


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_removes_the_partial_save_and_keeps_the_previous(tmp_path, monkeypatch):
    model, opt = trained_pair()
    save(tmp_path, 1, model, opt)
    monkeypatch.setattr(dcp, "save", no_space)
    with pytest.raises(CheckpointError, match=r"no space left on .*checkpoints: checkpoint step 2 was not "
                                              r"written and its partial files were removed; the previous "
                                              r"checkpoint \(.*step_00000001\) is intact"):
        save(tmp_path, 2, model, opt)
    assert sorted(p.name for p in checkpoint_dir(tmp_path).iterdir()) == ["latest", "step_00000001"]
    verify_checkpoint(latest_checkpoint(tmp_path))


def test_failed_background_save_is_reported_at_the_next_check(tmp_path, monkeypatch):
    from concurrent.futures import Future

    model, opt = trained_pair()
    save(tmp_path, 1, model, opt)
    failed = Future()
    failed.set_exception(OSError(errno.ENOSPC, "No space left on device"))
    monkeypatch.setattr(dcp, "async_save", lambda *args, **kwargs: failed)
    writer = CheckpointWriter(tmp_path, asynchronous=True)
    writer.save(2, model, opt, {"step": 2, "config": {}}, {"torch": torch.get_rng_state()})
    with pytest.raises(CheckpointError, match="no space left on"):
        writer.check_background_save()
    assert sorted(p.name for p in checkpoint_dir(tmp_path).iterdir()) == ["latest", "step_00000001"]
    writer.close()  # nothing pending any more
