"""End to end on CPU: the tiny trainer learns, resumes exactly, samples, and reports bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from prx.config import from_dict
from prx.eval import sample
from prx.model.denoiser import PRX
from prx.run.checkpoint import load_model_weights, read_meta
from tests.test_parallel import torchrun

ROOT = Path(__file__).resolve().parents[1]
# A very small model on a small slice of the shapes set: seconds per run.
SMALL = ["--set", "model.hidden_dim=64", "--set", "model.num_heads=4", "--set", "model.depth=2",
         "--set", "data.shapes_length=128", "--batch-size", "8", "--set", "train.sample_every=0",
         "--set", "eval.final=false", "--set", "train.log_every=1", "--set", "eval.val_every=0"]


def read_metrics(run_dir: Path, kind="train") -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def straight_and_resumed(args: list[str], tmp_path: Path, steps: int = 6) -> tuple[Path, Path]:
    """The same run twice: straight through, and stopped at half way (train.stop_after, the
    schedule still the whole run's) then resumed with --resume auto. Returns the two run folders."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert train.main(args + ["--run-dir", str(straight), "--steps", str(steps)]) == 0
    assert train.main(args + ["--run-dir", str(stopped), "--steps", str(steps),
                              "--set", f"train.stop_after={steps // 2}"]) == 0
    assert (stopped / "checkpoints" / f"step_{steps // 2:08d}").is_dir()
    assert train.main(args + ["--run-dir", str(stopped), "--steps", str(steps), "--resume", "auto"]) == 0
    return straight, stopped


def test_tiny_training_lowers_the_loss(tmp_path):
    run = tmp_path / "run"
    train.main(SMALL + ["--run-dir", str(run), "--steps", "80", "--lr", "3e-3",
                        "--set", "optim.warmup_steps=10"])
    losses = [r["loss"] for r in read_metrics(run)]
    assert len(losses) == 80
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)


def test_lr_warms_up_holds_and_cools_down_to_zero():
    from prx.config import tiny

    cfg = tiny()
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.cooldown_fraction, cfg.train.steps = 1e-3, 10, 0.0, 100
    constant = [train.lr_at(s, cfg) for s in range(100)]
    assert constant[0] == pytest.approx(1e-4) and constant[9] == constant[99] == pytest.approx(1e-3)
    cfg.optim.cooldown_fraction = 0.4  # the last 40 of 100 steps
    cooled = [train.lr_at(s, cfg) for s in range(100)]
    assert cooled[:60] == constant[:60]  # untouched until the last 40 steps
    assert cooled[60] == pytest.approx(1e-3) and cooled[80] == pytest.approx(0.5e-3)
    assert cooled[99] == pytest.approx(1e-3 / 40)  # the last step's lr is one step from zero
    assert all(a > b for a, b in zip(cooled[60:], cooled[61:]))


def test_resume_continues_exactly(tmp_path):
    straight, stopped = straight_and_resumed(SMALL + ["--set", "train.checkpoint_every=3"], tmp_path)
    a, b = read_metrics(straight), read_metrics(stopped)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-identical, not just close
    weights = []
    for run in (straight, stopped):
        model = PRX(from_dict(read_meta(run / "checkpoints" / "step_00000006")["config"]).model)
        load_model_weights(run / "checkpoints" / "step_00000006", model)
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    metas = [read_meta(run / "checkpoints" / "step_00000006") for run in (straight, stopped)]
    assert metas[0]["data"] == metas[1]["data"]


def test_evaluation_writes_grid_and_score_and_sampling_cli(tmp_path, capsys):
    run = tmp_path / "run"
    train.main(SMALL + ["--run-dir", str(run), "--steps", "2", "--set", "eval.final=true",
                        "--set", "eval.num_prompts=6", "--set", "eval.grid_prompts=4",
                        "--set", "eval.sample_steps=2"])
    assert (run / "samples" / "step_00000002.png").exists()
    score = json.loads((run / "shapes_score.json").read_text())
    assert score["step"] == 2 and 0.0 <= score["shapes_color"] <= 1.0
    assert read_metrics(run, "chance")  # the chance level is logged next to it
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 2

    out = tmp_path / "samples"
    sample.main(["--checkpoint", str(run / "checkpoints" / "step_00000002"), "--prompt", "a red circle",
                 "--prompt", "a blue square at the top", "--count", "2", "--steps", "2", "--out", str(out)])
    assert len(list(out.glob("step2_*.png"))) == 4 and (out / "grid_step2.png").exists()
    from PIL import Image

    assert Image.open(out / "step2_000.png").size == (32, 32)


def test_bad_config_exits_with_one_clear_message():
    proc = subprocess.run([sys.executable, "train.py", "--set", "model.num_heads=5"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: model.num_heads=5 does not divide model.hidden_dim=128"]


def test_out_of_memory_names_the_settings_that_lower_it(tmp_path):
    """A step that runs out of device memory stops with exit status 2 and one message naming a
    smaller micro-batch (the global batch kept) and activation checkpointing. The error is raised
    by the model's forward, as CUDA raises it, through the real command line."""
    inject = ("import runpy, sys, torch, prx.model.denoiser\n"
              "def forward(*args, **kwargs):\n"
              "    raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB')\n"
              "prx.model.denoiser.PRX.forward = forward\n"
              "sys.argv = ['train.py'] + sys.argv[1:]\n"
              "runpy.run_path('train.py', run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", inject, *SMALL, "--run-dir", str(tmp_path), "--steps", "2",
                           "--set", "parallel.micro_batch=4"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: out of device memory with micro-batch 4 per process at 32 px "
                              "(CUDA out of memory. Tried to allocate 20.00 GiB)"), message
    assert "--set parallel.micro_batch=2 (gradient accumulation keeps the global batch of 8)" in message
    assert "--set parallel.activation_checkpointing=full" in message


def test_resolution_embeds_are_trained(tmp_path):
    """model.resolution_embeds: its MLP gets gradients and the optimizer moves it. Like time_in, not
    before step 3 (adaLN-Zero): step 1 moves only the zero-initialised output projection, step 2
    then the modulations, and only once those are non-zero does a gradient reach the conditioning vector."""
    run = tmp_path / "run"
    train.main(SMALL + ["--run-dir", str(run), "--steps", "3", "--set", "model.resolution_embeds=true",
                        "--set", "train.checkpoint_every=1"])
    states = []
    for step in (2, 3):
        checkpoint = run / "checkpoints" / f"step_{step:08d}"
        model = PRX(from_dict(read_meta(checkpoint)["config"]).model)
        load_model_weights(checkpoint, model, ema=False)
        states.append(model.state_dict())
    moved = {k for k in states[0] if k.startswith("resolution_in.") and not torch.equal(states[0][k], states[1][k])}
    assert moved == {f"resolution_in.{layer}.{leaf}" for layer in ("fc1", "fc2") for leaf in ("weight", "bias")}


def test_resume_with_another_model_is_refused(tmp_path):
    run = tmp_path / "run"
    train.main(SMALL + ["--run-dir", str(run), "--steps", "1"])
    with pytest.raises(train.ConfigError, match=r"belongs to a run with other settings \(model.depth 2 -> 3\)"):
        train.main(SMALL + ["--run-dir", str(run), "--steps", "2", "--resume", "auto",
                            "--set", "model.depth=3"])


def test_two_processes_match_one(tmp_path):
    """torchrun with 2 CPU processes (gloo, DDP) gives the losses of 1 process, same global batch."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = SMALL + ["--steps", "3", "--set", "train.threads=1", "--set", "eval.val_every=2", "--set",
                    "eval.val_samples=6"]
    subprocess.run([sys.executable, "train.py", *args, "--run-dir", str(one)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    subprocess.run([*torchrun(2), "train.py", *args, "--run-dir", str(two)],
                   cwd=ROOT, check=True, capture_output=True, timeout=300)
    a, b = read_metrics(one), read_metrics(two)
    assert len(a) == len(b) == 3
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
    # the validation loss, each rank scoring half the held-out samples, averaged over ranks
    val_one, val_two = read_metrics(one, "val"), read_metrics(two, "val")
    assert [r["step"] for r in val_one] == [r["step"] for r in val_two] == [2, 3]
    for ra, rb in zip(val_one, val_two):
        assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-5)
