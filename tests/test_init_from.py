"""`train.py --init-from`: a new run starts from a checkpoint's trained weights, from an exported
diffusers folder, or from a safetensors file in our, reference or diffusers names; a mismatch or a
missing path is one line and exit status 2."""

import pytest
import torch
from safetensors.torch import save_file

import train
from prx.config import from_dict
from prx.export import main as export_main
from prx.model.denoiser import PRX
from prx.model.reference_weights import to_reference_state_dict
from prx.run.checkpoint import load_model_weights, read_meta
from prx.run.init_weights import load_initial_weights
from tests.test_train import SMALL, read_metrics

# EMA on and updated every step, so the trained weights and their EMA differ after 2 steps and
# a loader that took the EMA would fail the comparisons below.
SOURCE = SMALL + ["--set", "ema.enabled=true", "--set", "ema.every=1"]


class Stopped(Exception):
    """Raised by the hook once it saw the weights, so the run goes no further than its setup."""


def start_weights(monkeypatch, argv: list[str]) -> dict[str, torch.Tensor]:
    """The model's weights when train.py hands it to parallelize: the weights of step 0."""
    seen = {}

    def capture(model, *args, **kwargs):
        seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        raise Stopped

    monkeypatch.setattr(train, "parallelize", capture)
    with pytest.raises(Stopped):
        train.main(argv)
    monkeypatch.undo()
    return seen


def weights(checkpoint, ema: bool) -> PRX:
    model = PRX(from_dict(read_meta(checkpoint)["config"]).model)
    assert load_model_weights(checkpoint, model, ema=ema) == ("ema" if ema else "model")
    return model


def assert_same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 2-step run's final checkpoint, its trained weights, and its export folder (trained weights)."""
    root = tmp_path_factory.mktemp("init_from")
    assert train.main(SOURCE + ["--run-dir", str(root / "run"), "--steps", "2"]) == 0
    checkpoint = root / "run" / "checkpoints" / "step_00000002"
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(root / "export"), "--no-ema"]) == 0
    return root, checkpoint, weights(checkpoint, ema=False)


def test_a_new_run_starts_from_the_checkpoints_trained_weights(source, tmp_path, monkeypatch, capsys):
    _, checkpoint, trained = source
    fresh = start_weights(monkeypatch, SMALL + ["--run-dir", str(tmp_path / "fresh")])
    assert not all(torch.equal(fresh[k], v) for k, v in trained.state_dict().items())  # the check has teeth
    started = start_weights(monkeypatch, SMALL + ["--run-dir", str(tmp_path / "a"), "--init-from", str(checkpoint)])
    assert_same(started, trained.state_dict())
    ema = weights(checkpoint, ema=True).state_dict()
    assert not all(torch.equal(ema[k], v) for k, v in started.items())  # trained weights, not the EMA

    # and the run goes on from there: step 1 of a new run, its own optimizer
    run = tmp_path / "b"
    capsys.readouterr()
    assert train.main(SMALL + ["--run-dir", str(run), "--steps", "1", "--init-from", str(checkpoint)]) == 0
    assert [r["step"] for r in read_metrics(run)] == [1]
    assert f"tensors from checkpoint {checkpoint}; step 0" in capsys.readouterr().out


def test_the_export_folder_gives_back_the_same_weights(source, tmp_path, monkeypatch):
    root, _, trained = source  # root/export: the 2-step checkpoint exported with --no-ema
    for folder in (root / "export", root / "export" / "transformer"):
        started = start_weights(monkeypatch, SMALL + ["--run-dir", str(tmp_path / folder.name),
                                                      "--init-from", str(folder)])
        assert_same(started, trained.state_dict())


def test_safetensors_files_in_each_naming(source, tmp_path, monkeypatch):
    root, _, trained = source
    files = {"ours.safetensors": trained.state_dict(), "reference.safetensors": to_reference_state_dict(trained)}
    for name, state in files.items():
        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / name)
    diffusers_file = root / "export" / "transformer" / "diffusion_pytorch_model.safetensors"
    for path in (tmp_path / "ours.safetensors", tmp_path / "reference.safetensors", diffusers_file):
        started = start_weights(monkeypatch, SMALL + ["--run-dir", str(tmp_path / f"run_{path.stem}"),
                                                      "--init-from", str(path)])
        assert_same(started, trained.state_dict())


def test_training_only_tensors_are_skipped_with_a_log_line(source, tmp_path):
    _, _, trained = source
    state = {**trained.state_dict(), "repa_projector.0.weight": torch.ones(4, 64)}
    save_file(state, tmp_path / "with_projector.safetensors")
    model, lines = PRX(trained.cfg), []
    load_initial_weights(tmp_path / "with_projector.safetensors", model, lines.append)
    assert_same(model.state_dict(), trained.state_dict())
    assert len(lines) == 1 and "repa_projector.0.weight" in lines[0] and "not used by this run" in lines[0]


def one_line_error(capsys, argv: list[str]) -> str:
    assert train.cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_mismatches_and_missing_paths_are_one_line(source, tmp_path, capsys):
    _, checkpoint, trained = source
    base = SMALL + ["--steps", "1"]
    # another width: the first tensor whose shape differs, and the source's value to set
    err = one_line_error(capsys, base + ["--run-dir", str(tmp_path / "a"), "--set", "model.hidden_dim=128",
                                         "--init-from", str(checkpoint)])
    assert "img_in.up.weight" in err and "(64, 32) vs model (128, 32)" in err and "model.hidden_dim=64" in err, err
    # a file without a config: the fields the tensor's shape follows
    state = trained.state_dict()
    save_file(state, tmp_path / "ours.safetensors")
    err = one_line_error(capsys, base + ["--run-dir", str(tmp_path / "b"), "--set", "model.num_heads=2",
                                         "--init-from", str(tmp_path / "ours.safetensors")])
    assert "blocks.0.attn.q_norm.scale" in err and "model.num_heads" in err, err
    # a missing tensor, named; a missing block names model.depth
    del state["blocks.1.mlp.down.weight"]
    save_file(state, tmp_path / "partial.safetensors")
    err = one_line_error(capsys, base + ["--run-dir", str(tmp_path / "c"),
                                         "--init-from", str(tmp_path / "partial.safetensors")])
    assert "blocks.1.mlp.down.weight: missing from" in err and "not a complete PRX denoiser" in err, err
    save_file({k: v for k, v in state.items() if not k.startswith("blocks.1.")}, tmp_path / "shallow.safetensors")
    err = one_line_error(capsys, base + ["--run-dir", str(tmp_path / "c"),
                                         "--init-from", str(tmp_path / "shallow.safetensors")])
    assert "blocks.1.modulation.weight: missing from" in err and "set model.depth as" in err, err
    # a path that is not there
    missing = tmp_path / "nowhere" / "step_00000002"
    err = one_line_error(capsys, base + ["--run-dir", str(tmp_path / "d"), "--init-from", str(missing)])
    assert str(missing) in err and "train.init_from" in err, err
    # --resume restores weights of its own
    err = one_line_error(capsys, base + ["--run-dir", str(tmp_path / "e"), "--init-from", str(checkpoint),
                                         "--resume", "auto"])
    assert "--resume" in err and "--init-from" in err, err
    assert not (tmp_path / "a" / "checkpoints").exists()  # stopped before any step
