"""records/record.py keeps what a record needs and compares a rerun with it (the runs themselves
are stand-ins here: a real one is a fresh clone and `make speedrun`, minutes each)."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def record(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("record", ROOT / "records" / "record.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "RECORDS", tmp_path)
    return module


def fake_run(scenes: dict[int, float], walls: dict[int, float]):
    def run_seed(seed, train_args, log_path):
        log_path.write_text(f"seed {seed} {train_args}\n")
        score = {"kind": "eval", "step": 2000, "shapes_color": 0.9, "shapes_shape": 0.8, "shapes_position": 0.7,
                 "shapes_all_correct": scenes[seed]}
        return {"seed": seed, "wall_s": walls[seed], "score": score, "config": {"train": {"seed": seed}}}
    return run_seed


def test_a_record_keeps_command_config_logs_scores_and_the_median(record, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(record, "run_seed", fake_run({0: 0.80, 1: 0.74, 2: 0.86}, {0: 500.0, 1: 590.0, 2: 520.0}))
    folder = record.new("muon", [0, 1, 2], ["--set", "optim.name=muon"])
    assert sorted(p.name for p in folder.iterdir()) == ["command.txt", "config.json", "record.md", "scores.json",
                                                      "seed0.log", "seed1.log", "seed2.log"]
    scores = json.loads((folder / "scores.json").read_text())
    assert scores["median_all_correct"] == 0.80
    assert (scores["min_all_correct"], scores["max_all_correct"]) == (0.74, 0.86)
    assert scores["median_wall_s"] == 520.0 and scores["max_wall_s"] == 590.0
    assert scores["train_args"] == ["--set", "optim.name=muon"] and scores["machine"]["device"].startswith("CPU")
    assert "--seed S --set optim.name=muon" in (folder / "command.txt").read_text()
    assert json.loads((folder / "config.json").read_text()) == {"train": {"seed": 0}}
    md = (folder / "record.md").read_text()
    assert "| 1 | 74.0% |" in md and "Median 80.0%" in md and "longest 9.8 min" in md
    with pytest.raises(SystemExit, match="records/muon exists already"):
        record.new("muon", [0], [])

    monkeypatch.setattr(record, "run_seed", fake_run({1: 0.74, 2: 0.70}, {1: 600.0, 2: 530.0}))
    capsys.readouterr()
    record.rerun(folder, [1, 2])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("seed 1: 74.0% of scenes (recorded 74.0%, same)")
    assert out[1].startswith("seed 2: 70.0% of scenes (recorded 86.0%, differs)")
    with pytest.raises(SystemExit, match="has no seed 7"):
        record.rerun(folder, [7])
