"""The fault suite, run side: faults injected through the real command line (`train.cli`, the
function `python train.py` calls, or the process itself for signals), asserting the exit status,
the one-line message and what is on disk afterwards. Data faults: test_faults_data.py; bad
settings: test_faults_config.py."""

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.optim.optimizer import register_optimizer_step_post_hook

import train
from prx.eval import sample
from prx.eval.periodic import ShapesEvaluation
from prx.run.checkpoint import CHECKPOINT_FORMAT, checkpoint_dir, latest_checkpoint, verify_checkpoint
from tests.test_checkpoint import Payload, reseal
from tests.test_train import ROOT, SMALL, read_metrics

RUN = SMALL + ["--set", "train.checkpoint_every=2", "--set", "train.keep_checkpoints=0"]


def cli(capsys, *argv) -> tuple[int, list[str]]:
    """Exit status and stderr lines of one `python train.py ...`."""
    status = train.cli([*RUN, *argv])
    return status, capsys.readouterr().err.strip().splitlines()


def snapshot(run: Path) -> dict:
    return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A 6-step run stopped after step 4 (the schedule the whole run's), checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert train.cli([*RUN, "--run-dir", str(run), "--steps", "6", "--set", "train.stop_after=4"]) == 0
    return run


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> list[dict]:
    """The train records of the same run straight through 6 steps."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert train.cli([*RUN, "--run-dir", str(run), "--steps", "6"]) == 0
    return read_metrics(run)


@pytest.fixture
def used(finished, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


def same_losses(a: list[dict], b: list[dict]) -> bool:
    return [(r["step"], r["loss"]) for r in a] == [(r["step"], r["loss"]) for r in b]


# ----------------------------------------------------------------------------- no work lost


def test_a_new_run_in_a_used_run_dir_is_refused_and_touches_nothing(used, capsys):
    before = snapshot(used)
    status, err = cli(capsys, "--run-dir", str(used), "--steps", "4")
    assert status == 2 and len(err) == 1, err
    assert "already holds checkpoints" in err[0] and "--resume auto" in err[0] and "fresh --run-dir" in err[0]
    assert snapshot(used) == before


@pytest.mark.parametrize("pointer", ["missing", "names a deleted checkpoint", "crash after step 4 was logged"])
def test_resume_auto_continues_from_the_newest_complete_checkpoint(used, straight, capsys, pointer):
    latest = checkpoint_dir(used) / "latest"
    if pointer == "missing":
        latest.unlink()
    elif pointer == "names a deleted checkpoint":
        latest.write_text("step_00000099\n")
    else:  # steps 3 and 4 were logged, then the process died before their checkpoint
        shutil.rmtree(checkpoint_dir(used) / "step_00000004")
    status, _ = cli(capsys, "--run-dir", str(used), "--steps", "6", "--resume", "auto")
    assert status == 0
    records = read_metrics(used)
    assert same_losses(records, straight)  # each step once, the same losses as without the fault
    assert latest_checkpoint(used).name == "step_00000006"


@pytest.mark.parametrize("change, named", [
    (["--seed", "1"], "train.seed 0 -> 1"),
    (["--set", "data.shapes_length=64"], "data.shapes_length 128 -> 64"),
    (["--set", "model.depth=3"], "model.depth 2 -> 3"),
])
def test_resuming_another_run_names_the_fields_and_leaves_the_run_alone(used, capsys, change, named):
    before = snapshot(used)
    status, err = cli(capsys, "--run-dir", str(used), "--steps", "6", "--resume", "auto", *change)
    assert status == 2 and len(err) == 1 and named in err[0], err
    assert snapshot(used) == before  # config.json, metrics and checkpoints as they were


def test_a_fresh_start_keeps_the_metrics_of_an_attempt_without_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 9.0}\n')
    assert cli(capsys, "--run-dir", str(run), "--steps", "2")[0] == 0
    assert (run / "metrics.jsonl.1").read_text() == '{"kind": "train", "step": 1, "loss": 9.0}\n'
    assert [r["step"] for r in read_metrics(run)] == [1, 2]


def test_resuming_an_earlier_checkpoint_prunes_by_write_order(used, capsys):
    """From step 2 beside an abandoned step 4: pruning by name would delete the new checkpoints."""
    status, _ = cli(capsys, "--run-dir", str(used), "--steps", "6", "--set", "train.keep_checkpoints=2",
                    "--resume", str(checkpoint_dir(used) / "step_00000002"))
    assert status == 0
    assert sorted(p.name for p in checkpoint_dir(used).glob("step_*")) == ["step_00000004", "step_00000006"]
    assert latest_checkpoint(used).name == "step_00000006"
    for path in checkpoint_dir(used).glob("step_*"):
        verify_checkpoint(path)


def test_a_failing_final_evaluation_cannot_cost_the_final_checkpoint(tmp_path, monkeypatch):
    def broken(self, *args):
        raise RuntimeError("the evaluation broke")

    monkeypatch.setattr(ShapesEvaluation, "__call__", broken)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="the evaluation broke"):
        train.cli([*RUN, "--run-dir", str(run), "--steps", "2", "--set", "eval.final=true"])
    assert latest_checkpoint(run).name == "step_00000002"
    verify_checkpoint(latest_checkpoint(run))


# ----------------------------------------------------------------------------- corruption


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x5A
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped shard byte": (lambda c: flip_a_byte(c / "__0_0.distcp"), "__0_0.distcp differs from what was saved"),
    "truncated metadata": (lambda c: (c / ".metadata").write_bytes((c / ".metadata").read_bytes()[:-9]),
                           ".metadata has"),
    "deleted RNG file": (lambda c: (c / "rng_rank0.pt").unlink(), "rng_rank0.pt is missing"),
    "no manifest": (lambda c: (c / "manifest.json").unlink(), "has no readable manifest.json"),
    "code in meta.pt": (lambda c: ((c / "meta.pt").write_bytes(pickle.dumps(
        {"format": CHECKPOINT_FORMAT, "x": Payload()}, protocol=2)), reseal(c)),
        "cannot be read safely: Unsupported global: GLOBAL print"),
    "code in .metadata": (lambda c: ((c / ".metadata").write_bytes(pickle.dumps(Payload(), protocol=2)),
                                     reseal(c)), "refers to __builtin__.print, which is not allowed"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_never_trained_on(used, capsys, damage):
    injure, expected = DAMAGE[damage]
    newest = checkpoint_dir(used) / "step_00000004"
    injure(newest)
    before = snapshot(used)
    status, err = cli(capsys, "--run-dir", str(used), "--steps", "6", "--resume", str(newest))
    assert status == 2 and len(err) == 1, err
    assert expected in err[0], err[0]
    assert "Re-running" not in err[0] and "weights_only` set to `False`" not in err[0]  # torch's unsafe advice
    assert snapshot(used) == before  # nothing trained, nothing saved, config.json kept
    if damage not in ("code in meta.pt", "code in .metadata"):
        assert "--resume " in err[0] and "step_00000002" in err[0]  # names an intact one
    status = sample.cli(["--checkpoint", str(newest), "--prompt", "a red circle", "--out", str(used / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert not (used / "s").exists()


# ----------------------------------------------------------------------------- NaN, non-finite state


def test_a_run_of_nan_steps_is_logged_as_skipped_and_the_abort_names_a_good_checkpoint(tmp_path, capsys,
                                                                                       monkeypatch):
    real = train.micro_batch_loss
    calls = []

    def nan_from_step_3(*args, **kwargs):
        loss = real(*args, **kwargs)
        calls.append(1)
        if len(calls) > 2:
            loss.terms = {name: value * float("nan") for name, value in loss.terms.items()}
        return loss

    monkeypatch.setattr(train, "micro_batch_loss", nan_from_step_3)
    run = tmp_path / "run"
    status, err = cli(capsys, "--run-dir", str(run), "--steps", "10", "--set", "train.max_bad_steps=3")
    assert status == 2 and len(err) == 1, err
    assert "step 5: the gradient was NaN or inf in 3 steps in a row" in err[0]
    assert err[0].endswith(f"the newest good checkpoint is {checkpoint_dir(run) / 'step_00000004'}"), err[0]
    records = {r["step"]: r for r in read_metrics(run)}
    assert records[3]["loss"] is None and records[3]["skipped"] == 1  # no "loss 0.0000"
    verify_checkpoint(checkpoint_dir(run) / "step_00000004")  # skipped steps left the weights as they were


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_weights_that_became_inf_are_never_saved(tmp_path, capsys, optimizer):
    calls = []

    def poison_after_the_third_step(opt, args, kwargs):
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                opt.param_groups[0]["params"][0].fill_(float("inf"))

    hook = register_optimizer_step_post_hook(poison_after_the_third_step)
    run = tmp_path / "run"
    try:
        status, err = cli(capsys, "--run-dir", str(run), "--steps", "6", "--set", f"optim.name={optimizer}")
    finally:
        hook.remove()
    assert status == 2 and len(err) == 1, err
    assert "step 4: the weights or optimizer state hold NaN or inf, so they were not saved" in err[0]
    assert str(checkpoint_dir(run) / "step_00000002") in err[0]
    assert sorted(p.name for p in checkpoint_dir(run).iterdir()) == ["latest", "step_00000002"]


# ----------------------------------------------------------------------------- full disk


def fail_second(real):
    calls = []

    def save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)
    return save


def test_a_full_disk_stops_with_one_line_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dcp, "save", fail_second(dcp.save))
    run = tmp_path / "run"
    status, err = cli(capsys, "--run-dir", str(run), "--steps", "6")
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: no space left on {checkpoint_dir(run)}: checkpoint step 4 was not written")
    assert sorted(p.name for p in checkpoint_dir(run).iterdir()) == ["latest", "step_00000002"]  # no .tmp
    verify_checkpoint(latest_checkpoint(run))


def test_a_failed_background_save_stops_the_run_at_the_next_step(tmp_path, capsys, monkeypatch):
    real, calls = dcp.async_save, []

    def async_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            failed = Future()
            failed.set_exception(OSError(errno.ENOSPC, "No space left on device"))
            return failed
        return real(*args, **kwargs)

    monkeypatch.setattr(dcp, "async_save", async_save)
    run = tmp_path / "run"
    status, err = cli(capsys, "--run-dir", str(run), "--steps", "8", "--set", "train.async_checkpoint=true")
    assert status == 2 and len(err) == 1 and "no space left on" in err[0], err
    assert read_metrics(run)[-1]["step"] == 5  # reported one step after the save, not at the next one
    assert latest_checkpoint(run).name == "step_00000002"


def test_a_really_full_disk(small_disk, capsys):
    """One checkpoint of this model takes 2.2 MiB with Muon (weights, momentum, Adam moments of the
    vectors), 3.0 MiB with AdamW: on the 3.5 MiB disk the second cannot fit."""
    run = small_disk / "run"
    status, err = cli(capsys, "--run-dir", str(run), "--steps", "6")
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: no space left on {checkpoint_dir(run)}: checkpoint step 4 was not written")
    assert sorted(p.name for p in checkpoint_dir(run).iterdir()) == ["latest", "step_00000002"]
    verify_checkpoint(latest_checkpoint(run))


# ----------------------------------------------------------------------------- Ctrl-C


SLOW_STEPS = ("import runpy, sys, time, prx.model.denoiser\n"
              "forward = prx.model.denoiser.PRX.forward\n"
              "def slow(*args, **kwargs):\n"
              "    time.sleep(0.5)\n"
              "    return forward(*args, **kwargs)\n"
              "prx.model.denoiser.PRX.forward = slow\n"
              "sys.argv = ['train.py'] + sys.argv[1:]\n"
              "runpy.run_path('train.py', run_name='__main__')\n")


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_checkpoints_and_a_second_stops_at_once(tmp_path, presses):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STEPS, *RUN, "--run-dir", str(run), "--steps", "50",
                             "--set", "train.checkpoint_every=0"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:  # wait for the first step
        if line.startswith("step "):
            break
    for _ in range(presses):  # apart: two signals before the handler runs would count as one
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Ctrl-C: checkpointing at the end of this step" in err
    if presses == 1:
        assert "stopped by SIGINT after step" in out
        verify_checkpoint(latest_checkpoint(run))
        assert json.loads((run / "config.json").read_text())["train"]["steps"] == 50
    else:
        assert err.strip().splitlines()[-1].startswith("error: stopped at once by Ctrl-C")
        assert "Traceback" not in err
        assert latest_checkpoint(run) is None and not list(checkpoint_dir(run).glob(".step_*"))
