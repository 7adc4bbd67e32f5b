"""Bad settings through the real command lines (`train.cli`, `prx.eval.sample.cli`): each stops
with exit status 2 and one line, `error: ...`, that names the setting and its value, before any
work: the run directory (or the sample output directory) is never created."""

from pathlib import Path

import pytest
import torch

import train
from prx.eval import sample


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ----------------------------------------------------------------------------- train.py


@pytest.mark.parametrize("argv, named", [
    (["--set", "model.depth=0"], ["model.depth=0", "integer >= 1"]),
    (["--set", "model.num_heads=0"], ["model.num_heads=0", "integer >= 1"]),
    (["--set", "model.patch_size=-4"], ["model.patch_size=-4"]),
    (["--set", "data.resolution=0"], ["data.resolution=0"]),
    (["--batch-size", "0"], ["train.batch_size=0"]),
    (["--steps", "0"], ["train.steps=0"]),
    (["--steps", "-3"], ["train.steps=-3"]),
    (["--lr", "0"], ["optim.lr=0.0", "> 0"]),
    (["--lr", "nan"], ["optim.lr=nan", "finite"]),
    (["--set", "optim.grad_clip=0"], ["optim.grad_clip=0.0", "> 0"]),
    (["--set", "optim.beta2=inf"], ["optim.beta2=inf"]),
    (["--set", "flow.t_floor=0"], ["flow.t_floor=0.0", "(0, 1]"]),
    (["--set", "train.log_every=0"], ["train.log_every=0"]),
    (["--set", "train.sample_every=-1"], ["train.sample_every=-1"]),
    (["--set", "train.max_bad_steps=0"], ["train.max_bad_steps=0"]),
    (["--set", "eval.num_prompts=0"], ["eval.num_prompts=0", ">= 2"]),
    (["--set", "eval.num_prompts=1"], ["eval.num_prompts=1", ">= 2"]),  # broke the chance score at step 0
    (["--set", "eval.grid_prompts=0"], ["eval.grid_prompts=0"]),  # broke the first evaluation's grid
    (["--set", "eval.sample_steps=0"], ["eval.sample_steps=0"]),
    (["--set", "eval.guidance=nan"], ["eval.guidance=nan"]),
    (["--seed", "-1"], ["train.seed=-1"]),  # broke the held-out prompts (numpy seeds are >= 0)
    (["--set", "text.max_tokens=0"], ["text.max_tokens=0"]),
    (["--set", "model.hidden_dim=130", "--set", "model.num_heads=5"], ["head dim 26"]),
    (["--steps", "5", "--set", "train.steps=10"], ["--steps 5", "--set train.steps=10", "train.steps"]),
    (["--set", "model.depth=3", "--steps", "4", "--set", "train.steps=9"], ["--steps 4", "--set train.steps=9"]),
    (["--data", "/shards", "--set", "data.source=shapes"], ["--data /shards", "--set data.source=shapes"]),
    (["--set", "data.source=webdataset"], ["data.source='webdataset'", "--data"]),
    (["--set", "data.path=/shards"], ["data.path='/shards'", "data.source='shapes'"]),
    (["--device", "tpu"], ["train.device='tpu'", "auto, cpu, cuda"]),
    (["--steps", "two"], ["--steps", "'two'"]),
])
def test_a_bad_training_setting_stops_before_any_work(tmp_path, capsys, argv, named):
    run = tmp_path / "run"
    assert train.cli(argv + ["--run-dir", str(run)]) == 2
    line = one_error_line(capsys)
    assert all(part in line for part in named), line
    assert not run.exists()  # no config.json, metrics.jsonl or checkpoints: validation came first


def test_a_run_dir_that_is_a_file_is_named(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("")
    assert train.cli(["--run-dir", str(file / "run")]) == 2
    assert f"train.run_dir='{file / 'run'}'" in one_error_line(capsys)


def test_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without one
    assert train.cli(["--device", "cuda", "--steps", "1", "--run-dir", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: train.device=cuda but torch.cuda.is_available() is False"), line
    assert "use --device cpu or auto" in line
    assert not (tmp_path / "run").exists()  # the device is chosen before the run directory is made


# ----------------------------------------------------------------------------- prx.eval.sample


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A one-step tiny run's checkpoint (patch 4, 32 px): about 3 s on 2 cores."""
    run = tmp_path_factory.mktemp("run")
    assert train.main(["--run-dir", str(run), "--steps", "1", "--set", "train.sample_every=0",
                       "--set", "eval.final=false", "--set", "data.shapes_length=50", "--set", "model.depth=2"]) == 0
    return run / "checkpoints" / "step_00000001"


def sample_argv(checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--prompt", "a red circle", "--steps", "1", "--out", str(out), *extra]


@pytest.mark.parametrize("extra, named", [
    (["--count", "0"], ["--count=0", "integer >= 1"]),
    (["--count", "-2"], ["--count=-2"]),
    (["--steps", "0"], ["--steps=0", "integer >= 1"]),
    (["--guidance", "nan"], ["--guidance=nan", "finite"]),
    (["--guidance", "-1"], ["--guidance=-1.0", ">= 0"]),
    (["--size", "0"], ["--size=0"]),
    (["--size", "30"], ["--size=30", "model.patch_size=4"]),
    (["--prompt", " "], ["--prompt=' '", "non-empty"]),
    (["--device", "tpu"], ["--device='tpu'"]),
    (["--count", "many"], ["--count", "'many'"]),
])
def test_a_bad_sampling_argument_stops_before_any_work(checkpoint, tmp_path, capsys, extra, named):
    out = tmp_path / "out"
    assert sample.cli(sample_argv(checkpoint, out, *extra)) == 2
    line = one_error_line(capsys)
    assert all(part in line for part in named), line
    assert not out.exists()


def test_a_sampling_output_that_is_a_file_is_refused(checkpoint, tmp_path, capsys):
    out = tmp_path / "out.png"
    out.write_bytes(b"")
    assert sample.cli(sample_argv(checkpoint, out)) == 2
    assert f"--out='{out}'" in one_error_line(capsys) and out.read_bytes() == b""


@pytest.mark.parametrize("make, says", [
    (lambda ckpt, tmp: tmp / "missing", "no such directory; pass a checkpoint directory, RUN/checkpoints/step_N"),
    (lambda ckpt, tmp: ckpt / "meta.pt", "is a file; pass a checkpoint directory, RUN/checkpoints/step_N"),
    (lambda ckpt, tmp: tmp, "is not a checkpoint (it has no meta.pt); pass a checkpoint directory"),
    (lambda ckpt, tmp: ckpt.parent.parent, "is a run directory; pass one of its checkpoints, e.g. "),
])
def test_a_path_that_is_no_checkpoint_names_it_and_what_to_pass(checkpoint, tmp_path, capsys, make, says):
    path = make(checkpoint, tmp_path)
    assert sample.cli(sample_argv(path, tmp_path / "out")) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: --checkpoint={path}") and says in line, line
    if "run directory" in says:
        assert line.endswith(str(checkpoint))
    assert not (tmp_path / "out").exists()


def test_sampling_device_cuda_without_a_gpu_is_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert sample.cli(sample_argv(checkpoint, tmp_path / "out", "--device", "cuda")) == 2
    assert one_error_line(capsys).startswith("error: --device=cuda but torch.cuda.is_available() is False")


def test_good_sampling_arguments_still_sample(checkpoint, tmp_path, capsys):
    """The checks refuse only what is wrong: guidance 0 (unconditional) and an odd seed sample."""
    out = tmp_path / "new" / "out"
    assert sample.cli(sample_argv(checkpoint, out, "--guidance", "0", "--seed", "-3", "--size", "16")) == 0
    assert (out / "grid_step1.png").exists() and len(list(out.glob("step1_*.png"))) == 1
    assert capsys.readouterr().err == ""
