"""`python -m prx.plot`: the PNGs it writes for two overlaid runs, and the one-line error for a run
folder without metrics."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from prx.plot import main, plot_runs, read_records, smooth_curve
from tests.dev_deps import dev_dependency

ROOT = Path(__file__).resolve().parents[1]
ALL_PLOTS = ["loss.png", "loss_terms.png", "loss_by_t.png", "validation.png", "metrics.png"]


def write_run(run_dir: Path, scale: float, with_repa: bool) -> Path:
    """A fake run's metrics.jsonl: chance, train every 10 steps (one window skipped: None), val,
    metrics and eval records, and a last line cut short as a crash leaves it."""
    run_dir.mkdir(parents=True)
    records = [{"kind": "chance", "color": 0.2, "shape": 0.33, "position": 0.23, "all_correct": 0.007, "count": 210}]
    for step in range(10, 310, 10):
        loss = scale * (20.0 / step + 0.3)
        skipped = step == 150
        records.append({"kind": "train", "step": step, "loss": None if skipped else loss, "grad_norm": 1.0,
                        "loss_diffusion": None if skipped else loss, "loss_t0.0-0.3": 3 * loss,
                        "loss_t0.3-0.6": loss, "loss_t0.6-1.0": loss / 3, "lr": 1e-3, "skipped": int(skipped),
                        "epoch": step / 100, "sec_per_step": 0.2, "img_per_s": 160.0, "peak_mem_gib": None,
                        **({"loss_repa": 0.1 * scale} if with_repa else {})})
        if step % 100 == 0:
            records.append({"kind": "val", "step": step, "val_loss": loss, "val_loss_t0.062": 2 * loss,
                            "val_loss_t0.5": loss, "val_loss_t0.938": None})
            records.append({"kind": "metrics", "step": step, "fid": 300.0 / step, "cmmd": None})
            records.append({"kind": "eval", "step": step, "shapes_color": step / 400, "shapes_shape": 0.4,
                            "shapes_position": 0.3, "shapes_all_correct": 0.01, "shapes_count": 210})
    lines = [json.dumps(r) for r in records]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + lines[1][:20])
    return run_dir


def assert_image(path: Path, min_width: int = 600, min_height: int = 300) -> None:
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= min_width and image.height >= min_height, image.size


def test_two_runs_make_every_plot(tmp_path):
    dev_dependency("matplotlib")
    runs = [write_run(tmp_path / "runs" / "tiny", 1.0, False), write_run(tmp_path / "other" / "repa", 0.8, True)]
    written = plot_runs(runs, tmp_path / "plots", smooth=5)
    assert [p.name for p in written] == ALL_PLOTS
    for path in written:
        assert_image(path)
    with Image.open(tmp_path / "plots" / "loss_terms.png") as terms, Image.open(written[0]) as loss:
        assert terms.width > loss.width  # two panels (diffusion, repa) beside each other


def test_the_legend_names_a_run_missing_from_the_first_panel(tmp_path, monkeypatch):
    dev_dependency("matplotlib")
    from prx import plot

    legends, save = [], plot.Figure.save

    def save_and_keep_legend(self, path):
        written = save(self, path)
        legends.append([text.get_text() for text in self.panels[0][1].get_legend().get_texts()])
        return written

    monkeypatch.setattr(plot.Figure, "save", save_and_keep_legend)
    a = write_run(tmp_path / "a", 1.0, False)
    b = write_run(tmp_path / "b", 1.0, False)
    lines = [r for r in (b / "metrics.jsonl").read_text().splitlines()[:-1] if '"metrics"' not in r]
    (b / "metrics.jsonl").write_text("\n".join(lines) + "\n")  # b has no fid: the first metrics panel
    plot_runs([a, b], tmp_path / "plots", smooth=5)
    assert legends[-1] == ["a", "b"]


def test_a_run_without_val_or_metrics_writes_only_the_training_plots(tmp_path):
    dev_dependency("matplotlib")
    run = tmp_path / "plain"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 10, "loss": 1.0, "loss_diffusion": 1.0,
                                                   "loss_t0.0-0.3": 2.0, "loss_t0.3-0.6": None,
                                                   "loss_t0.6-1.0": 0.5}) + "\n")
    written = plot_runs([run], run / "plots", smooth=5)
    assert [p.name for p in written] == ["loss.png", "loss_terms.png", "loss_by_t.png"]


def test_the_command_writes_into_the_first_run_s_plots_folder_and_prints_the_paths(tmp_path):
    dev_dependency("matplotlib")
    a, b = write_run(tmp_path / "a", 1.0, False), write_run(tmp_path / "b", 0.5, False)
    done = subprocess.run([sys.executable, "-m", "prx.plot", str(a), str(b), "--smooth", "3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(a / "plots" / name) for name in ALL_PLOTS]
    for name in ALL_PLOTS:
        assert_image(a / "plots" / name)


@pytest.mark.parametrize("contents", [None, "", "\n\n"])
def test_a_run_without_metrics_is_one_error_line_and_status_2(tmp_path, capsys, contents):
    run = tmp_path / "empty"
    run.mkdir()
    if contents is not None:
        (run / "metrics.jsonl").write_text(contents)
    assert main([str(run), "--out", str(tmp_path / "plots")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(run / "metrics.jsonl") in err
    assert not (tmp_path / "plots").exists()


def test_usage_mistakes_are_one_error_line_too(tmp_path, capsys):
    assert main([]) == 2
    assert main([str(tmp_path), "--smooth", "0"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)


def test_a_broken_line_in_the_middle_is_an_error_a_cut_last_line_is_not(tmp_path):
    run = write_run(tmp_path / "run", 1.0, False)
    assert read_records(run)[-1]["kind"] == "eval"  # the cut last line left out
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    assert main([str(run)]) == 2


def test_smoothing_is_centred_and_geometric_on_a_log_axis():
    assert smooth_curve([1.0, 3.0, 5.0, 7.0], 3, geometric=False) == [2.0, 3.0, 5.0, 6.0]
    assert smooth_curve([4.0], 5, geometric=False) == [4.0]
    assert smooth_curve([100.0, 1.0, 0.01], 3, geometric=True) == pytest.approx([10.0, 1.0, 0.1])
