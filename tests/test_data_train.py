"""The trainer on webdataset shards: aspect buckets change the grid per step; resume is exact."""

import train
from tests.test_data_reader import make_shards
from tests.test_train import SMALL, read_metrics, straight_and_resumed


def test_training_on_shards_resumes_exactly(tmp_path, capsys):
    make_shards(tmp_path / "shards", shards=2, per_shard=24)
    common = SMALL + ["--data", str(tmp_path / "shards" / "part-{000..001}.tar"),
                      "--set", "data.workers=1", "--set", "data.crop=random", "--set", "train.checkpoint_every=3"]
    straight, stopped = straight_and_resumed(common, tmp_path)
    a, b = read_metrics(straight), read_metrics(stopped)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-identical, not just close
    assert all(r["loss"] > 0 for r in a)
    out = capsys.readouterr().out
    assert "data: 2 shard(s), 48 samples" in out and "5 bucket(s)" in out


def test_real_data_runs_sample_a_grid_of_fixed_prompts(tmp_path, capsys):
    """No labels, no score: a captioned grid of the first captions (or of a prompts file)."""
    make_shards(tmp_path / "shards", shards=1, per_shard=24)
    common = SMALL + ["--data", str(tmp_path / "shards"), "--set", "data.workers=0", "--steps", "2",
                      "--set", "eval.final=true", "--set", "eval.grid_prompts=3", "--set", "eval.sample_steps=2"]
    train.main(common + ["--run-dir", str(tmp_path / "first")])
    assert (tmp_path / "first" / "samples" / "step_00000002.png").exists()
    assert not (tmp_path / "first" / "shapes_score.json").exists()
    (tmp_path / "prompts.txt").write_text("a red fox\n\na blue boat\n")
    train.main(common + ["--run-dir", str(tmp_path / "file"), "--set", f"eval.prompts={tmp_path / 'prompts.txt'}"])
    assert (tmp_path / "file" / "samples" / "step_00000002.png").exists()
    assert capsys.readouterr().out.count("samples step 2:") == 2
