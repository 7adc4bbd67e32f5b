"""The logging backends beside metrics.jsonl: what TensorBoard and W&B offline files hold afterwards,
the one-line message when a package is missing, and RunLog forwarding its records."""

import io
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prx.config_rules import ConfigError
from prx.run.log_backends import open_backends, record_scalars
from prx.run.runlog import RunLog
from tests.dev_deps import dev_dependency


def write_png(path: Path, width: int = 48, height: int = 24) -> Path:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2, 0] = 255  # left half red: a grid read back the wrong way round shows
    Image.fromarray(pixels).save(path)
    return path


def test_record_scalars_tags_by_kind_and_leaves_out_what_is_not_a_number():
    record = {"kind": "train", "step": 10, "loss": 0.5, "loss_t0.0-0.3": 1.5, "loss_repa": None,
              "skipped": 0, "grad_norm": float("nan"), "note": "text", "flag": True}
    assert record_scalars(record) == {"train/loss": 0.5, "train/loss_t0.0-0.3": 1.5, "train/skipped": 0.0}
    assert record_scalars({"kind": "val", "step": 5, "val_loss_t0.062": 0.25}) == {"val/val_loss_t0.062": 0.25}


def test_tensorboard_event_file_holds_the_scalars_image_and_config(tmp_path):
    dev_dependency("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    backends = open_backends(True, "off", "p", tmp_path, {"train": {"steps": 60, "lr": 1e-3}})
    assert len(backends) == 1
    (tb,) = backends
    tb.scalars(10, {"train/loss": 0.5, "train/loss_t0.0-0.3": 2.0})
    tb.scalars(20, {"train/loss": 0.25})
    tb.scalars(20, {"metrics/fid": 41.5})
    tb.image("samples", 20, write_png(tmp_path / "grid.png"))
    tb.close()

    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(10, 0.5), (20, 0.25)]
    assert [(e.step, e.value) for e in events.Scalars("train/loss_t0.0-0.3")] == [(10, 2.0)]
    assert [(e.step, e.value) for e in events.Scalars("metrics/fid")] == [(20, 41.5)]
    (image,) = events.Images("samples")
    assert (image.step, image.width, image.height) == (20, 48, 24)
    decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"))
    assert decoded[0, 0].tolist() == [255, 0, 0] and decoded[0, -1].tolist() == [0, 0, 0]  # HWC, not transposed
    (text,) = events.Tensors("config/text_summary")
    config_text = text.tensor_proto.string_val[0].decode()
    assert config_text.startswith("```json") and '"steps": 60' in config_text


def wandb_records(path: Path) -> list:
    """The protobuf Records of a .wandb file: W&B's leveldb-style log (a 7-byte header, then
    32 KiB blocks of chunks, each with a 7-byte header: crc, length, type 1 full / 2 first /
    3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


def wandb_items(records: list, record_type: str) -> list[dict]:
    """The key -> value of each record of a type ("history": one row per log call; "config")."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == record_type:
            items = record.history.item if record_type == "history" else record.config.update
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return rows


@pytest.fixture
def wandb_offline_env(tmp_path, monkeypatch):
    """Offline, quiet, and every W&B file under tmp_path (none in the home directory)."""
    for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_RUN_ID", "WANDB_RESUME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb_home"))


def test_wandb_offline_writes_the_run_files_and_the_logged_values(tmp_path, wandb_offline_env):
    dev_dependency("wandb")
    run_dir = tmp_path / "tiny"
    run_dir.mkdir()
    start = time.perf_counter()
    (wb,) = open_backends(False, "offline", "prx-test", run_dir, {"train": {"steps": 60}})
    wb.scalars(10, {"train/loss": 0.5, "train/loss_t0.0-0.3": 2.0})
    wb.scalars(20, {"train/loss": 0.25})
    wb.image("samples", 20, write_png(tmp_path / "grid.png"))
    wb.close()
    seconds = time.perf_counter() - start
    assert seconds < 15, f"W&B offline init + finish took {seconds:.1f} s"

    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    (offline,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    records = wandb_records(offline / f"run-{run_id}.wandb")
    history = wandb_items(records, "history")
    assert [(row["_step"], row["train/loss"]) for row in history if "train/loss" in row] == [(10, 0.5), (20, 0.25)]
    assert any(row.get("train/loss_t0.0-0.3") == 2.0 for row in history)
    (image,) = [row for row in history if row.get("samples/_type") == "image-file"]
    assert (image["_step"], image["samples/width"], image["samples/height"]) == (20, 48, 24)
    assert list(offline.glob("files/media/images/samples_*.png"))
    assert any(row.get("train") == {"steps": 60} for row in wandb_items(records, "config"))

    # a resumed run (same run dir) logs into the same W&B run
    (again,) = open_backends(False, "offline", "prx-test", run_dir, {"train": {"steps": 120}})
    assert again.run.id == run_id and again.run.config["train"] == {"steps": 120}  # the resumed run's config
    again.close()


@pytest.mark.parametrize("tensorboard, wandb, missing, advice", [
    (True, "off", ("tensorboard", "torch.utils.tensorboard"), "pip install tensorboard (or turn it off: "
     "--set train.tensorboard=false)"),
    (False, "offline", ("wandb",), "pip install wandb (or turn it off: --set train.wandb=off)"),
    (True, "online", ("wandb",), "pip install wandb"),
])
def test_a_missing_package_is_one_line_saying_what_to_install(tmp_path, monkeypatch, tensorboard, wandb, missing,
                                                               advice):
    for module in missing:
        monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    with pytest.raises(ConfigError) as error:
        open_backends(tensorboard, wandb, "p", tmp_path, {})
    assert advice in str(error.value) and "\n" not in str(error.value)


def test_a_refused_backend_closes_the_ones_already_opened(tmp_path, monkeypatch):
    dev_dependency("tensorboard")
    from prx.run import log_backends

    closed, close = [], log_backends.TensorBoardBackend.close
    monkeypatch.setattr(log_backends.TensorBoardBackend, "close", lambda self: (closed.append(self), close(self)))
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match="pip install wandb"):
        open_backends(True, "offline", "p", tmp_path, {})
    assert len(closed) == 1


def test_nothing_asked_for_opens_nothing_and_imports_neither(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    assert open_backends(False, "off", "p", tmp_path, {}) == []


class FakeBackend:
    def __init__(self):
        self.calls = []

    def scalars(self, step, values):
        self.calls.append(("scalars", step, values))

    def image(self, tag, step, path):
        self.calls.append(("image", tag, step, path))

    def config(self, config):
        self.calls.append(("config", config))

    def close(self):
        self.calls.append(("close",))


def test_runlog_forwards_each_record_s_numbers_and_grids_then_closes(tmp_path, capsys):
    fake = FakeBackend()
    log = RunLog(tmp_path, 100, 0, True, backends=[fake])
    log.write({"kind": "chance", "color": 0.2, "count": 210})
    log.write({"kind": "train", "step": 10, "loss": 0.5, "grad_norm": 1.0, "loss_t0.0-0.3": None,
               "loss_t0.3-0.6": 0.4, "loss_t0.6-1.0": 0.1, "loss_diffusion": 0.5, "lr": 1e-3, "skipped": 0,
               "epoch": 0.1, "sec_per_step": 0.2, "img_per_s": 160.0, "peak_mem_gib": None})
    log.write({"kind": "val", "step": 10, "val_loss": 0.3, "val_loss_t0.062": None})
    log.image("samples", 10, tmp_path / "grid.png")
    log.close()
    log.close()  # a second close (an error path after the end) closes nothing twice

    assert fake.calls[0] == ("scalars", 0, {"chance/color": 0.2, "chance/count": 210.0})
    kind, step, train = fake.calls[1]
    assert (kind, step) == ("scalars", 10)
    assert train["train/loss"] == 0.5 and train["train/loss_t0.3-0.6"] == 0.4 and train["train/img_per_s"] == 160.0
    assert "train/loss_t0.0-0.3" not in train and "train/peak_mem_gib" not in train and "train/step" not in train
    assert fake.calls[2] == ("scalars", 10, {"val/val_loss": 0.3})
    assert fake.calls[3:] == [("image", "samples", 10, tmp_path / "grid.png"), ("close",)]
    assert "step      10/100 | loss 0.5000" in capsys.readouterr().out  # the fixed line is unchanged
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3


def test_runlog_off_rank_zero_forwards_nothing(tmp_path):
    fake = FakeBackend()
    log = RunLog(tmp_path, 100, 0, False, backends=[fake])
    log.write({"kind": "val", "step": 10, "val_loss": 0.3})
    log.image("samples", 10, tmp_path / "grid.png")
    log.close()
    assert fake.calls == [] and not (tmp_path / "metrics.jsonl").exists()
