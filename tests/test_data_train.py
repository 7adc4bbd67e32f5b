"""The trainer on webdataset shards: aspect buckets change the grid per step; resume is exact."""

import train
from tests.test_data_reader import make_shards
from tests.test_train import SMALL, read_metrics


def test_training_on_shards_resumes_exactly(tmp_path, capsys):
    make_shards(tmp_path / "shards", shards=2, per_shard=24)
    common = SMALL + ["--data", str(tmp_path / "shards" / "part-{000..001}.tar"),
                      "--set", "data.workers=1", "--set", "data.crop=random", "--set", "train.checkpoint_every=3"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train.main(common + ["--run-dir", str(straight), "--steps", "6"])
    train.main(common + ["--run-dir", str(stopped), "--steps", "3"])
    train.main(common + ["--run-dir", str(stopped), "--steps", "6", "--resume", "auto"])
    a, b = read_metrics(straight), read_metrics(stopped)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-identical, not just close
    assert all(r["loss"] > 0 for r in a)
    out = capsys.readouterr().out
    assert "data: 2 shard(s), 48 samples" in out and "5 bucket(s)" in out
