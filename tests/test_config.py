"""Config: presets carry the recipe's values; bad values stop with one clear message."""

import json

import pytest

from prx.config import ConfigError, apply_override, from_dict, parse_args, preset, save_json, tiny, validate


def test_prx_presets_carry_the_recipe():
    for name, resolution, steps in (("prx_small_512", 512, 100_000), ("prx_small_1024", 1024, 20_000)):
        cfg = validate(preset(name))
        m = cfg.model
        assert (m.patch_size, m.hidden_dim, m.depth, m.num_heads, m.head_dim) == (32, 1792, 16, 28, 64)
        assert (m.mlp_hidden_dim, m.bottleneck_dim, m.text_dim, m.time_embed_dim) == (6272, 256, 2304, 256)
        assert cfg.data.resolution == resolution and cfg.train.steps == steps
        assert cfg.tokens_per_image == (resolution // 32) ** 2
        assert (cfg.flow.timestep_shift, cfg.flow.uniform_fraction, cfg.flow.t_floor) == (3.0, 0.1, 0.05)
        assert (cfg.flow.caption_dropout, cfg.eval.sample_steps, cfg.eval.guidance) == (0.1, 50, 3.5)
        o = cfg.optim
        assert (o.lr, o.beta1, o.beta2, o.eps, o.weight_decay) == (1e-4, 0.9, 0.95, 1e-8, 0.0)
        assert (o.warmup_steps, o.grad_clip) == (1000, 0.2)
        assert cfg.text.encoder == "google/t5gemma-2b-2b-ul2" and cfg.text.max_tokens == 256


def test_cli_flags_and_overrides():
    cfg, args = parse_args(["--preset", "tiny", "--steps", "7", "--lr", "0.01",
                            "--set", "model.depth=3", "--set", "train.run_dir=/tmp/x",
                            "--set", "eval.final=false", "--resume", "auto"])
    assert cfg.train.steps == 7 and cfg.optim.lr == 0.01 and cfg.model.depth == 3
    assert cfg.train.run_dir == "/tmp/x" and cfg.eval.final is False and args.resume == "auto"
    assert parse_args([])[0].preset == "tiny"


@pytest.mark.parametrize("argv, message", [
    (["--set", "model.depthh=3"], "model has no field 'depthh'"),
    (["--set", "modle.depth=3"], "unknown section"),
    (["--set", "model.depth=three"], "expected int"),
    (["--set", "model.depth"], "expected section.field=value"),
    (["--set", "data.resolution=30"], "not a multiple of model.patch_size"),
    (["--set", "model.num_heads=5"], "does not divide model.hidden_dim"),
    (["--preset", "huge"], "unknown preset"),
    (["--set", "train.precision=fp8"], "train.precision"),
])
def test_bad_values_stop_with_a_clear_message(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_dict_round_trip(tmp_path):
    cfg = apply_override(tiny(), "model.depth=5")
    save_json(cfg, tmp_path / "config.json")
    assert from_dict(json.loads((tmp_path / "config.json").read_text())) == cfg
    with pytest.raises(ConfigError, match="unknown fields"):
        from_dict({"model": {"bogus": 1}})


def test_every_field_has_a_meaning_and_print_config_shows_the_resolved_values(capsys):
    import train
    from prx.config import field_meanings

    meanings = field_meanings()
    assert len(meanings) > 80 and all(meanings.values()), [k for k, v in meanings.items() if not v]
    assert meanings["flow.t_floor"].startswith("v = (x_t - x) / max(t, t_floor)")
    assert train.main(["--preset", "tiny", "--set", "model.depth=7", "--print-config"]) == 0
    lines = capsys.readouterr().out.splitlines()
    depth = next(line for line in lines if line.split()[:1] == ["model.depth"])
    assert depth.split()[1] == "7" and "number of blocks" in depth
    assert sum(line.startswith("  ") for line in lines) == len(meanings)  # one line per field
