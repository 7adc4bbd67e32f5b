"""The GPU check's plumbing, on the CPU: its deadline, its packing, and bench/collect.py, which
adds the rows that come back to bench/results/ (GPU time is too scarce to lose a result to them)."""

import csv
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from bench.collect import collect

ROOT = Path(__file__).resolve().parents[1]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def test_collect_appends_new_rows_once(tmp_path):
    results, out = tmp_path / "results", tmp_path / "out"
    write_csv(results / "step.csv", ["device", "ms"], [["CPU", "10"]])
    write_csv(out / "step.csv", ["device", "ms"], [["CPU", "10"], ["NVIDIA H100", "2"]])
    write_csv(out / "muon.csv", ["device", "ms"], [["NVIDIA H100", "5"]])
    assert collect(out, results) == {"muon.csv": 1, "step.csv": 1}
    assert collect(out, results) == {"muon.csv": 0, "step.csv": 0}  # collecting twice adds nothing
    with (results / "step.csv").open() as f:
        assert list(csv.reader(f)) == [["device", "ms"], ["CPU", "10"], ["NVIDIA H100", "2"]]
    with (results / "muon.csv").open() as f:
        assert list(csv.reader(f)) == [["device", "ms"], ["NVIDIA H100", "5"]]


def test_collect_refuses_other_columns(tmp_path):
    write_csv(tmp_path / "results" / "step.csv", ["device", "ms"], [])
    write_csv(tmp_path / "out" / "step.csv", ["device", "ms_per_step"], [["H100", "2"]])
    with pytest.raises(SystemExit, match="columns"):
        collect(tmp_path / "out", tmp_path / "results")


def gpu_check(tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, **env})


def test_gpu_check_skips_what_the_budget_cannot_hold_and_names_it(tmp_path):
    done = gpu_check(tmp_path, ONLY="data recipe", BUDGET_S="30")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "bench_data skipped" in done.stdout and "bench_recipe skipped" in done.stdout
    assert 'ONLY="data recipe" bash bench/gpu_check.sh' in done.stdout


def test_gpu_check_refuses_an_unknown_section_and_packs_its_output(tmp_path):
    done = gpu_check(tmp_path, ONLY="stpe", PACK="1")
    assert done.returncode == 1 and "unknown section 'stpe'" in done.stdout
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["gpu_check.tar.gz"]
    with tarfile.open(tmp_path / "out" / "gpu_check.tar.gz") as archive:
        assert archive.getnames() == ["."]  # nothing ran, so nothing but the folder itself
