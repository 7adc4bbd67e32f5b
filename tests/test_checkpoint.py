"""Checkpoints: atomic writes, the latest pointer, safe loading, version checks."""

import pickle

import pytest
import torch

from prx.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)


def test_save_load_and_latest(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for step in (10, 20, 30):
        save_checkpoint(tmp_path, step, {"step": step, "w": torch.full((2,), float(step))}, keep=2)
    assert latest_checkpoint(tmp_path).name == "step_00000030.pt"
    assert sorted(p.name for p in checkpoint_dir(tmp_path).glob("step_*.pt")) == [
        "step_00000020.pt", "step_00000030.pt"]
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 30 and state["format"] == CHECKPOINT_FORMAT
    assert torch.equal(state["w"], torch.full((2,), 30.0))


def test_half_written_save_is_never_latest(tmp_path):
    save_checkpoint(tmp_path, 5, {"step": 5})
    # a crash mid-save leaves a temporary file (and maybe a torn final file) but no pointer move
    d = checkpoint_dir(tmp_path)
    (d / ".step_00000010.pt.tmp.1234").write_bytes(b"PK\x03\x04 torn")
    assert latest_checkpoint(tmp_path).name == "step_00000005.pt"
    (d / "latest").write_text("step_00000099.pt\n")  # pointer to a file that is gone
    assert latest_checkpoint(tmp_path) is None


def test_foreign_and_old_files_fail_clearly(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"format": CHECKPOINT_FORMAT - 1, "step": 1}, path)
    with pytest.raises(CheckpointError, match="has format 0; this version reads format 1"):
        load_checkpoint(path)

    class Payload:  # arbitrary code in a pickle must not run
        def __reduce__(self):
            return (print, ("unpickled!",))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"format": CHECKPOINT_FORMAT, "x": Payload()}, protocol=2))
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_checkpoint(evil)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
