"""Config: presets carry the recipe's values; bad values stop with one clear message."""

import dataclasses
import json
import re

import pytest

from prx.config import (
    FIELD_RULES,
    PRESETS,
    Config,
    ConfigError,
    apply_override,
    field_meanings,
    flat_fields,
    from_dict,
    parse_args,
    preset,
    save_json,
    tiny,
    validate,
)
from prx.config_rules import show


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


# ----------------------------------------------------------------------------- field rules


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_is_valid(name):
    assert validate(preset(name)) == preset(name)


def test_every_field_of_every_section_has_a_rule():
    """A new field without a rule (or a rule left for a removed field) fails here."""
    assert set(flat_fields(Config())) == set(FIELD_RULES)


def set_field(cfg: Config, name: str, value) -> Config:
    """`cfg` with one field set to any Python value (even one --set cannot parse)."""
    if "." not in name:
        return dataclasses.replace(cfg, **{name: value})
    section, field = name.split(".")
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{field: value})})


@pytest.mark.parametrize("name", sorted(FIELD_RULES))
def test_validate_checks_every_field(name):
    """Each field is really checked: a value of no field's type is refused, naming the field."""
    with pytest.raises(ConfigError, match=f"^{re.escape(name)}=\\[1\\]: must be "):
        validate(set_field(tiny(), name, [1]))


def test_the_choices_of_a_field_are_the_ones_its_comment_lists():
    meanings = field_meanings()
    for name, rule in FIELD_RULES.items():
        if rule.description.startswith("one of "):
            for choice in rule.description.removeprefix("one of ").split(", "):
                assert choice in re.findall(r"[\w-]+", meanings[name]), (name, choice)


@pytest.mark.parametrize("assignment", [
    "model.patch_size=0", "model.bottleneck_dim=0", "model.hidden_dim=-8", "model.depth=0", "model.depth=-1",
    "model.num_heads=0", "model.num_heads=-4", "model.mlp_ratio=0", "model.mlp_ratio=nan", "model.text_dim=0",
    "model.time_embed_dim=63", "model.time_embed_dim=0", "model.rope_theta=inf", "model.rope_theta=1",
    "model.attention=flash3", "model.fused_ops=apex",
    "flow.timestep_shift=0", "flow.timestep_shift=-inf", "flow.uniform_fraction=1.5", "flow.t_min=0", "flow.t_min=1",
    "flow.noise_scale=0", "flow.t_floor=0", "flow.t_floor=1.01", "flow.caption_dropout=1",
    "flow.caption_dropout=-0.1",
    "text.encoder= ", "text.max_tokens=0", "text.pad_to_multiple=0",
    "data.source=laion", "data.resolution=0", "data.resolution=-32", "data.shapes_length=0", "data.buckets=round",
    "data.crop=left", "data.decoder=gpu", "data.workers=-1", "data.caption_key=", "data.caption_key=a:0",
    "data.caption_key=a:1,a:2", "data.caption_key=a:x", "data.caption_key=a:-1,b:3", "data.caption_key=a,",
    "data.max_bad_fraction=nan",
    "data.max_bad_fraction=1.5",
    "optim.name=sgd", "optim.lr=0", "optim.lr=-1e-3", "optim.lr=nan", "optim.lr=inf", "optim.beta1=1",
    "optim.beta2=1", "optim.beta2=-0.5", "optim.eps=0", "optim.weight_decay=-0.1", "optim.warmup_steps=-1",
    "optim.grad_clip=0", "optim.grad_clip=nan", "optim.muon_momentum=1", "optim.muon_update_scale=0",
    "optim.ns_steps=0", "optim.ns_coefficients=newton",
    "tread.probability=1", "tread.probability=-0.5", "tread.route_start=-1", "tread.route_end=-2",
    "tread.span=middle", "tread.self_guidance=-1", "tread.self_guidance=nan",
    "repa.teacher=", "repa.block=-1", "repa.weight=nan", "repa.weight=-0.5", "repa.projector_dim=0",
    "repa.teacher_dim=0",
    "perceptual.lpips_weight=-0.1", "perceptual.lpips_scale=0", "perceptual.lpips_scale=2",
    "perceptual.lpips_t_max=0", "perceptual.dino_weight=inf", "perceptual.dino_teacher=",
    "perceptual.dino_resolution=0",
    "ema.decay=1", "ema.decay=nan", "ema.every=0",
    "train.steps=0", "train.steps=-5", "train.batch_size=0", "train.seed=-1", f"train.seed={2**64}",
    "train.device=tpu", "train.precision=fp8", "train.threads=-1", "train.run_dir=", "train.log_every=0",
    "train.sample_every=-1", "train.checkpoint_every=-5", "train.keep_checkpoints=-1", "train.max_bad_steps=0",
    "train.kernels=triton",
    "parallel.data_parallel=zero", "parallel.activation_checkpointing=some",
    "parallel.checkpoint_every_n_blocks=0", "parallel.micro_batch=-1",
    "eval.num_prompts=0", "eval.num_prompts=1", "eval.num_prompts=-150", "eval.grid_prompts=0",
    "eval.sample_steps=0", "eval.guidance=nan", "eval.guidance=-1", "eval.guidance=inf",
    "eval.prompts=/nonexistent/prompts.txt",
])
def test_a_value_out_of_its_range_names_field_value_and_range(assignment):
    name = assignment.split("=")[0]
    cfg = apply_override(tiny(), assignment)
    value = flat_fields(cfg)[name]
    with pytest.raises(ConfigError) as caught:
        validate(cfg)
    message = str(caught.value)
    assert message.startswith(f"{name}={show(value)}: must be "), message
    assert "\n" not in message


@pytest.mark.parametrize("assignment", [
    "train.sample_every=0", "train.checkpoint_every=0", "train.keep_checkpoints=0", "train.threads=0",
    "parallel.micro_batch=0", "optim.warmup_steps=0", "eval.guidance=0", "eval.guidance=1", "eval.num_prompts=2",
    "eval.seed=-7", f"train.seed={2**64 - 1}", "flow.t_floor=1", "tread.probability=0", "optim.beta2=0",
    "perceptual.lpips_scale=1", "flow.uniform_fraction=1", "data.workers=0", "model.patch_size=1",
])
def test_the_edges_of_each_range_are_accepted(assignment):
    validate(apply_override(tiny(), assignment))


@pytest.mark.parametrize("assignments, message", [
    (["model.num_heads=5"], "model.num_heads=5 does not divide model.hidden_dim=128"),
    (["model.hidden_dim=130", "model.num_heads=5"], "head dim 26: must be a multiple of 4"),
    (["model.mlp_ratio=0.001"], "model.mlp_ratio=0.001 x model.hidden_dim=128 leaves the MLP no hidden unit"),
    (["data.resolution=30"], "data.resolution=30 is not a multiple of model.patch_size=4"),
    (["data.source=webdataset"], "data.source='webdataset' needs data.path: pass --data"),
    (["data.path=/shards"], "data.path='/shards' is set but data.source='shapes' does not read it"),
    (["tread.enabled=true", "tread.route_end=4"], "tread: blocks 2..4 are not inside the model's 4 blocks"),
    (["tread.enabled=true", "tread.route_start=3", "tread.route_end=2"], "tread: blocks 3..2 are not inside"),
    (["tread.enabled=true", "tread.span=penultimate", "model.depth=2"], "tread: blocks 1..0 are not inside"),
    (["tread.self_guidance=2"], "tread.self_guidance=2.0 needs tread.enabled=true"),
    (["repa.enabled=true", "repa.block=4"], "repa.block=4 is not one of the model's 4 blocks"),
    (["parallel.micro_batch=5"], "parallel.micro_batch=5 does not divide train.batch_size=32"),
    (["parallel.micro_batch=64"], "parallel.micro_batch=64 does not divide train.batch_size=32"),
])
def test_fields_that_do_not_fit_together_are_named_together(assignments, message):
    cfg = tiny()
    for assignment in assignments:
        cfg = apply_override(cfg, assignment)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(cfg)


def test_eval_prompts_is_a_file_with_prompts_for_real_data_only(tmp_path):
    prompts, blank = tmp_path / "prompts.txt", tmp_path / "blank.txt"
    prompts.write_text("a red fox\n")
    blank.write_text("\n  \n")
    shards = ["--data", str(tmp_path / "shards")]
    assert parse_args(shards + ["--set", f"eval.prompts={prompts}"])[0].eval.prompts == str(prompts)
    with pytest.raises(ConfigError, match=re.escape(f"eval.prompts='{blank}': must be empty, or a readable text")):
        parse_args(shards + ["--set", f"eval.prompts={blank}"])
    with pytest.raises(ConfigError, match="is read only for webdataset data"):
        parse_args(["--set", f"eval.prompts={prompts}"])


def test_the_run_dir_must_be_a_writable_directory_and_nothing_is_created(tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    assert parse_args(["--run-dir", str(tmp_path / "new" / "run")])[0].train.run_dir == str(tmp_path / "new" / "run")
    assert not (tmp_path / "new").exists()
    for run_dir in (file, file / "run"):
        with pytest.raises(ConfigError) as caught:
            parse_args(["--run-dir", str(run_dir)])
        assert str(caught.value) == (f"train.run_dir='{run_dir}': must be a directory that exists or can be "
                                     f"created, and is writable ({file} is a file)")


# ----------------------------------------------------------------------------- conflicts


@pytest.mark.parametrize("argv, first, second", [
    (["--steps", "5", "--set", "train.steps=10"], "--steps 5", "--set train.steps=10"),
    (["--batch-size", "8", "--set", "train.batch_size=16"], "--batch-size 8", "--set train.batch_size=16"),
    (["--lr", "0.01", "--set", "optim.lr=0.1"], "--lr 0.01", "--set optim.lr=0.1"),
    (["--seed", "1", "--set", "train.seed=2"], "--seed 1", "--set train.seed=2"),
    (["--run-dir", "/tmp/a", "--set", "train.run_dir=/tmp/b"], "--run-dir /tmp/a", "--set train.run_dir=/tmp/b"),
    (["--device", "cpu", "--set", "train.device=cuda"], "--device cpu", "--set train.device=cuda"),
    (["--data", "/shards", "--set", "data.source=shapes"], "--data /shards", "--set data.source=shapes"),
    (["--data", "/shards", "--set", "data.path=/other"], "--data /shards", "--set data.path=/other"),
    (["--set", "model.depth=3", "--steps", "4", "--set", "train.steps=9"], "--steps 4", "--set train.steps=9"),
    (["--steps", "5", "--steps", "6"], "--steps 5", "--steps 6"),
])
def test_one_field_given_twice_with_different_values_names_both(argv, first, second):
    with pytest.raises(ConfigError) as caught:
        parse_args(argv)
    message = str(caught.value)
    assert first in message and second in message and "give one" in message, message


def test_the_same_value_given_twice_is_no_conflict():
    cfg, args = parse_args(["--steps", "5", "--set", "train.steps=5", "--set", "model.depth=3",
                            "--set", "model.depth=3", "--data", "/shards", "--set", "data.source=webdataset"])
    assert (cfg.train.steps, cfg.model.depth, cfg.data.path) == (5, 3, "/shards")
    assert args.steps == 5 and args.data == "/shards" and args.lr is None  # one value per flag


def test_repeated_sets_layer_and_the_last_wins():
    """Scripts extend a base list of --sets; a later --set of a field replaces an earlier one."""
    cfg, _ = parse_args(["--set", "model.depth=3", "--set", "model.depth=2", "--set", "train.steps=7",
                         "--set", "train.steps=8"])
    assert (cfg.model.depth, cfg.train.steps) == (2, 8)
    with pytest.raises(ConfigError, match=r"--steps 9 and --set train.steps=7 both set train.steps"):
        parse_args(["--set", "train.steps=7", "--set", "train.steps=8", "--steps", "9"])


def test_a_usage_mistake_is_one_config_error():
    with pytest.raises(ConfigError, match=r"^argument --steps: invalid int value: 'abc' \(see --help\)$"):
        parse_args(["--steps", "abc"])
