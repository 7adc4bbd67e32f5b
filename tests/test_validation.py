"""Held-out data, the validation loss at fixed timesteps, and the log line's MFU arithmetic."""

import dataclasses

import pytest
import torch

from prx.config import ConfigError, DataConfig, EvalConfig, TrainConfig, TreadConfig, tiny, validate
from prx.data.heldout import HeldOut
from prx.data.shapes import make_scene
from prx.data.shards import ShardError, split_shards
from prx.data.webdata import ShardBatches
from prx.eval.validation import ValidationLoss, timestep_key, validation_timesteps
from prx.model.denoiser import PRX, training_flops_per_image
from prx.recipe.flow import flow_loss
from prx.run.distributed import DistInfo
from prx.run.utilization import Utilization, step_flops
from tests.test_data_reader import make_shards
from tests.tiny_text import save_tiny_text_encoder

SINGLE = DistInfo(0, 1, 0, torch.device("cpu"))


class Lines:
    """What ValidationLoss logs through (RunLog's print and write)."""

    def __init__(self):
        self.lines, self.records = [], []

    def print(self, line):
        self.lines.append(line)

    def write(self, record):
        self.records.append(record)


def small_config(**eval_fields):
    cfg = tiny()
    model = dataclasses.replace(cfg.model, hidden_dim=32, depth=2, num_heads=2, text_dim=32)
    return dataclasses.replace(cfg, model=model, data=dataclasses.replace(cfg.data, shapes_length=64),
                               eval=dataclasses.replace(cfg.eval, **eval_fields))


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    from prx.text import TextTower

    path = save_tiny_text_encoder(tmp_path_factory.mktemp("text"))
    return TextTower(dataclasses.replace(tiny().text, encoder=str(path)), torch.device("cpu"))


def test_stratified_timesteps_and_their_names():
    t = validation_timesteps(8)
    assert t.tolist() == [(k + 0.5) / 8 for k in range(8)]
    assert timestep_key(0.0625) == "val_loss_t0.062" and timestep_key(0.9375) == "val_loss_t0.938"


def test_shapes_held_out_scenes_are_past_the_training_set():
    cfg = small_config()
    heldout = HeldOut(cfg)
    assert heldout.available and heldout.usable(10_000) == 10_000
    assert heldout.captions([0, 3]) == [make_scene(cfg.train.seed, 64 + i).caption for i in (0, 3)]
    images = heldout.images([0, 1])
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 32, 32)
    assert heldout.key()["first_scene"] == 64


def test_held_out_shards_are_left_out_of_training(tmp_path):
    paths = make_shards(tmp_path / "d", shards=3, per_shard=8)
    assert split_shards(str(tmp_path / "d"), val_shards=1) == (paths[:2], paths[2:])
    assert split_shards(str(tmp_path / "d")) == (paths, [])
    assert split_shards(str(tmp_path / "d" / "part-00{0,1}.tar"), str(paths[2])) == (paths[:2], [paths[2]])
    with pytest.raises(ShardError, match="holds out every one of the 3"):
        split_shards(str(tmp_path / "d"), val_shards=3)
    data = DataConfig(source="webdataset", path=str(tmp_path / "d"), resolution=32, workers=0, val_shards=1,
                      buckets="square")
    training = ShardBatches(data, 4, torch.device("cpu"), 0, 4, log=lambda line: None)
    assert len(training.shards) == 16  # two shards of 8
    cfg = dataclasses.replace(tiny(), data=data)
    heldout = HeldOut(cfg)
    assert heldout.usable(100) == 8 and heldout.captions([0, 7]) == ["caption 16", "caption 23"]
    assert heldout.images([0]).shape == (1, 3, 32, 32)


def test_held_out_data_rules():
    webdata = DataConfig(source="webdataset", path="shards")
    with pytest.raises(ConfigError, match="eval.metrics='fid' compares generated images with held-out"):
        validate(dataclasses.replace(tiny(), data=webdata, eval=EvalConfig(metrics="fid")))
    with pytest.raises(ConfigError, match="read only for webdataset data"):
        validate(dataclasses.replace(tiny(), data=DataConfig(source="shapes", val_shards=2)))
    with pytest.raises(ConfigError, match="both name held-out data"):
        validate(dataclasses.replace(tiny(), data=dataclasses.replace(webdata, val_path="v", val_shards=1)))
    with pytest.raises(ConfigError, match="eval.metrics"):
        validate(dataclasses.replace(tiny(), eval=EvalConfig(metrics="fid,is")))


def test_validation_loss_is_fixed_and_independent_of_the_batching(tower):
    cfg = small_config(val_samples=6, val_timesteps=4)
    torch.manual_seed(0)
    model = PRX(cfg.model)
    with torch.no_grad():  # off the adaLN-Zero init, where every block is the identity
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    heldout = HeldOut(cfg)
    whole = ValidationLoss(cfg, heldout, tower, SINGLE, Lines(), batch_size=6)
    one_by_one = ValidationLoss(cfg, heldout, tower, SINGLE, Lines(), batch_size=1)
    a, b = whole.losses(model), one_by_one.losses(model)
    assert torch.equal(a, whole.losses(model))  # same images, timesteps and noise every time
    torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    assert a.shape == (4,) and bool((a > 0).all())
    # an independent recomputation of the first timestep's loss: the velocity loss of x-hat
    images = heldout.images(list(range(6)))
    t = torch.full((6,), 0.125)
    import kernels
    from prx.rng import mix_seed

    seeds = torch.tensor([mix_seed(cfg.eval.seed, 0, i) for i in range(6)])
    x_t, x = kernels.patchify_and_noise(images, t, cfg.model.patch_size, seeds=seeds)
    text, mask = tower(heldout.captions(list(range(6))))
    with torch.no_grad():
        x_hat = model(x_t, t, text, mask, (8, 8)).x_hat
    assert a[0].item() == pytest.approx(flow_loss(x_hat, x, t, cfg.flow.t_floor)[1].mean().item(), rel=1e-6)
    with torch.no_grad():
        model.blocks[0].mlp.down.weight.add_(0.1)
    assert not torch.equal(a, whole.losses(model))


def test_validation_record_and_line(tower):
    cfg = small_config(val_samples=4, val_timesteps=2)
    lines = Lines()
    record = ValidationLoss(cfg, HeldOut(cfg), tower, SINGLE, lines, batch_size=4)(PRX(cfg.model), 7)
    assert set(record) == {"kind", "step", "val_loss", "val_loss_t0.250", "val_loss_t0.750"}
    assert record["val_loss"] == pytest.approx((record["val_loss_t0.250"] + record["val_loss_t0.750"]) / 2)
    assert lines.records == [record] and lines.lines[0].startswith("val step 7: loss ")


def test_step_flops_credit_only_the_tokens_tread_keeps():
    cfg = small_config()
    dense = step_flops(cfg, 64, 16, 32)
    assert dense == 32 * training_flops_per_image(cfg.model, 64, 16)
    routed = dataclasses.replace(cfg, tread=TreadConfig(enabled=True, route_start=0, route_end=0, probability=0.5))
    one_block = training_flops_per_image(cfg.model, 64, 16) - training_flops_per_image(
        dataclasses.replace(cfg.model, depth=1), 64, 16)  # a whole block's FLOPs at 64 tokens
    half_block = training_flops_per_image(cfg.model, 64, 16, routed_blocks=1, kept_tokens=32) - \
        training_flops_per_image(dataclasses.replace(cfg.model, depth=1), 64, 16)
    assert step_flops(routed, 64, 16, 32) == 32 * training_flops_per_image(cfg.model, 64, 16, 1, 32)
    assert 0.4 * one_block < half_block < 0.6 * one_block  # the attention part is quadratic in tokens


def test_mfu_against_a_configured_peak():
    cpu = torch.device("cpu")
    assert Utilization(tiny(), cpu, 1).take(0.5) == {"peak_mem_gib": None, "mfu": None}  # none on the CPU
    cfg = dataclasses.replace(tiny(), train=dataclasses.replace(TrainConfig(), batch_size=32, peak_tflops=2.0))
    util = Utilization(cfg, cpu, world_size=2)
    util.add_step(64, 16)
    util.add_step(64, 24)
    flops = (step_flops(cfg, 64, 16, 32) + step_flops(cfg, 64, 24, 32)) / 2
    assert util.take(0.01)["mfu"] == pytest.approx(flops / 0.01 / 2 / 2e12, abs=1e-4)
    assert util.take(0.01)["mfu"] is None  # a window without steps


def test_the_log_line_shows_mfu_and_peak_memory_when_measured():
    from prx.run.runlog import format_train_line

    record = dict(step=5, loss=0.5, grad_norm=1.0, lr=1e-3, img_per_s=100, sec_per_step=0.3)
    assert format_train_line({**record, "mfu": 0.412, "peak_mem_gib": 61.27}, 10).endswith(
        "0.300 s/step | MFU 41.2% | peak 61.3 GiB")
    assert format_train_line({**record, "mfu": None, "peak_mem_gib": None}, 10).endswith("0.300 s/step")
