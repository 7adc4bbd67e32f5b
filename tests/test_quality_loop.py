"""Quality metrics in the training loop and from `python -m prx.evaluate`, with tiny random feature
networks; a missing feature network stops a run before its first step, naming it."""

import json

import pytest
import torch

import train
from prx import evaluate
from tests.test_train import SMALL, read_metrics
from tests.tiny_dino import save_tiny_dino


def save_tiny_clip(path):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=14, projection_dim=16)
    CLIPVisionModelWithProjection(config).save_pretrained(path)
    return path


def test_a_missing_feature_network_stops_the_run_before_step_1(tmp_path, capsys):
    run = tmp_path / "run"
    missing = tmp_path / "weights" / "pt_inception-2015-12-05-6726825d.pth"
    status = train.cli(SMALL + ["--run-dir", str(run), "--steps", "3", "--set", "eval.metrics=fid",
                                "--set", f"eval.inception={missing}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1
    assert err[0].startswith("error: FID Inception weights") and str(missing) in err[0]
    assert "eval.inception" in err[0] and "pt_inception-2015-12-05-6726825d.pth" in err[0]
    assert not (run / "checkpoints").exists()  # no step ran
    assert not (run / "metrics.jsonl").exists() or not read_metrics(run)
    status = train.cli(SMALL + ["--run-dir", str(tmp_path / "run2"), "--steps", "3", "--set", "eval.metrics=cmmd",
                                "--set", f"eval.clip={tmp_path / 'no-clip'}"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "CMMD feature net (CLIP)" in err and "eval.clip" in err


def test_metrics_in_the_loop_match_the_evaluate_command(tmp_path, capsys):
    clip, dino, cache = save_tiny_clip(tmp_path / "clip"), tmp_path / "dino", tmp_path / "cache"
    save_tiny_dino("v2", dino)
    metric_args = ["--set", "eval.metrics=cmmd,dino_mmd", "--set", "eval.metrics_samples=4",
                   "--set", f"eval.clip={clip}", "--set", f"eval.dino={dino}", "--set", f"eval.reference_cache={cache}",
                   "--set", "eval.sample_steps=2", "--set", "eval.final=true", "--set", "eval.num_prompts=5",
                   "--set", "eval.grid_prompts=2", "--set", "eval.val_every=2", "--set", "eval.val_samples=8"]
    run = tmp_path / "run"
    assert train.main(SMALL + metric_args + ["--run-dir", str(run), "--steps", "2"]) == 0
    [record] = read_metrics(run, "metrics")
    assert record["step"] == 2 and record["samples"] == 4
    assert record["cmmd"] > 0 and record["dino_mmd"] > 0
    cached = sorted(cache.glob("*.safetensors"))
    assert len(cached) == 2  # one per metric, computed once
    stamps = [p.stat().st_mtime_ns for p in cached]
    capsys.readouterr()

    # the same protocol from the command, on the run's checkpoint: the same numbers, the cache reused
    out = tmp_path / "evaluation.json"
    checkpoint = run / "checkpoints" / "step_00000002"
    assert evaluate.cli([str(checkpoint), "--out", str(out), "--set", f"eval.reference_cache={cache}"]) == 0
    results = json.loads(out.read_text())
    assert results["cmmd"] == pytest.approx(record["cmmd"], rel=1e-5)
    assert results["dino_mmd"] == pytest.approx(record["dino_mmd"], rel=1e-5)
    assert "held-out real images (once; cached)" not in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in sorted(cache.glob("*.safetensors"))] == stamps
    # the validation loss of the command is the loop's at the same step, with the run's settings
    [val] = read_metrics(run, "val")
    assert results["val_loss"] == pytest.approx(val["val_loss"], rel=1e-5)
    assert results["val_loss_t0.062"] == pytest.approx(val["val_loss_t0.062"], rel=1e-5)


def test_evaluate_command_refusals(tmp_path, capsys):
    assert evaluate.cli([str(tmp_path / "nothing")]) == 2
    assert "MODEL=" in capsys.readouterr().err


def test_the_shapes_score_of_the_command_is_the_loops(tmp_path, capsys):
    """`prx.evaluate --shapes` on a run's last checkpoint gives the loop's final score, and takes
    other sampling settings (how guidance and self-guidance are compared without training again)."""
    run = tmp_path / "run"
    shapes = ["--set", "eval.final=true", "--set", "eval.num_prompts=10", "--set", "eval.grid_prompts=2",
              "--set", "eval.sample_steps=3"]
    assert train.main(SMALL + shapes + ["--run-dir", str(run), "--steps", "2"]) == 0
    [loop] = read_metrics(run, "eval")
    out = tmp_path / "evaluation.json"
    checkpoint = run / "checkpoints" / "step_00000002"
    assert evaluate.cli([str(checkpoint), "--shapes", "--no-val", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    for key in ("shapes_color", "shapes_shape", "shapes_position", "shapes_all_correct"):
        assert results[key] == loop[key]
    assert results["sampling"] == {"steps": 3, "guidance": 3.0, "self_guidance": 0.0}
    assert (tmp_path / "samples" / "step_00000002.png").exists()
    assert evaluate.cli([str(checkpoint), "--shapes", "--no-val", "--out", str(out), "--set", "eval.sample_steps=1",
                         "--set", "eval.guidance=1.0"]) == 0
    assert json.loads(out.read_text())["sampling"] == {"steps": 1, "guidance": 1.0, "self_guidance": 0.0}
    capsys.readouterr()
    assert evaluate.cli([str(checkpoint), "--no-val"]) == 2
    assert "no --shapes" in capsys.readouterr().err
