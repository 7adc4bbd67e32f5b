"""The whole recipe on CPU: TREAD, REPA, LPIPS, DINO and EMA on together in the tiny trainer,
with small random teachers written in the real formats (transformers, torchvision, lpips)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from prx.config import from_dict
from prx.model.denoiser import PRX
from prx.run.checkpoint import load_model_weights, read_meta
from tests.test_lpips import CHANNELS, vgg16_state
from tests.test_train import straight_and_resumed
from tests.tiny_dino import save_tiny_dino

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--set", "model.hidden_dim=64", "--set", "model.num_heads=4", "--set", "model.depth=3",
         "--set", "data.shapes_length=128", "--batch-size", "8", "--set", "train.sample_every=0",
         "--set", "eval.final=false", "--set", "train.log_every=1"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    save_tiny_dino("v3", root / "repa")  # DINOv3 layout, patch 16, 32 wide
    save_tiny_dino("v2", root / "dino")  # DINOv2-with-registers layout, patch 14
    torch.save(vgg16_state(), root / "vgg16.pth")
    g = torch.Generator().manual_seed(1)
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(CHANNELS)},
               root / "heads.pth")
    return root


def recipe_args(root: Path) -> list[str]:
    """Every piece on: TREAD over block 1 (of 3), REPA on block 1 (so only kept tokens align),
    LPIPS 0.1 and DINO 0.01 (at 28 px: 2 x 2 patches of 14, to keep the CPU test quick), EMA."""
    sets = ["tread.enabled=true", "tread.route_start=1", "tread.route_end=1",
            "repa.enabled=true", f"repa.teacher={root / 'repa'}", "repa.teacher_dim=32", "repa.block=1",
            "repa.projector_dim=32",
            "perceptual.lpips_weight=0.1", f"perceptual.lpips_vgg={root / 'vgg16.pth'}",
            f"perceptual.lpips_heads={root / 'heads.pth'}",
            "perceptual.dino_weight=0.01", f"perceptual.dino_teacher={root / 'dino'}",
            "perceptual.dino_resolution=28",
            "ema.enabled=true", "ema.every=2"]
    return SMALL + [arg for s in sets for arg in ("--set", s)]


def records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def test_every_piece_on_trains_and_logs_each_term(tmp_path, teachers):
    run = tmp_path / "run"
    train.main(recipe_args(teachers) + ["--run-dir", str(run), "--steps", "60", "--lr", "3e-3",
                                        "--set", "optim.warmup_steps=10"])
    rs = records(run)
    assert len(rs) == 60
    for r in rs:
        terms = [r[f"loss_{n}"] for n in ("diffusion", "repa", "lpips", "dino")]
        assert r["loss"] == pytest.approx(sum(terms), rel=1e-5)
        assert -0.5 <= r["loss_repa"] <= 0.5 and r["loss_lpips"] > 0 and r["loss_dino"] >= 0  # -0.5 cos
    first, last = (sum(r["loss_diffusion"] for r in part) / 15 for part in (rs[:15], rs[-15:]))
    assert last < 0.7 * first, (first, last)
    repa_first, repa_last = (sum(r["loss_repa"] for r in part) / 15 for part in (rs[:15], rs[-15:]))
    assert repa_last < min(repa_first, 0)  # the projector learns to align (cosine > 0, rising)


def test_every_piece_on_resumes_exactly(tmp_path, teachers):
    args = recipe_args(teachers) + ["--set", "train.checkpoint_every=3"]
    straight, stopped = straight_and_resumed(args, tmp_path)
    a, b = records(straight), records(stopped)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-identical
    weights = []
    for run in (straight, stopped):
        path = run / "checkpoints" / "step_00000006"
        model = PRX(from_dict(read_meta(path)["config"]).model)
        assert load_model_weights(path, model) == "ema"  # sampling takes the EMA weights
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    trained = PRX(from_dict(read_meta(straight / "checkpoints" / "step_00000006")["config"]).model)
    assert load_model_weights(straight / "checkpoints" / "step_00000006", trained, ema=False) == "model"
    assert any(not torch.equal(weights[0][k], v) for k, v in trained.state_dict().items())


@pytest.mark.parametrize("option, missing", [("repa.teacher", "REPA teacher"),
                                             ("perceptual.dino_teacher", "DINO perceptual teacher"),
                                             ("perceptual.lpips_vgg", "VGG16 weights for LPIPS")])
def test_a_missing_teacher_stops_the_run_before_the_first_step(tmp_path, teachers, option, missing):
    args = recipe_args(teachers) + ["--set", f"{option}={tmp_path / 'nowhere'}", "--run-dir", str(tmp_path / "run"),
                                    "--steps", "2"]
    result = subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: ") and missing in error and "nowhere" in error, error
    assert not records(tmp_path / "run") if (tmp_path / "run" / "metrics.jsonl").exists() else True
