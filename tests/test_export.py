"""`python -m prx.export` against the real diffusers package: a small random model, saved by the
trainer's own checkpoint writer (with EMA and a REPA projector), exported, then opened by
diffusers' PRXTransformer2DModel, FlowMatchEulerDiscreteScheduler and PRXPixelPipeline."""

import dataclasses
import json

import pytest
import torch

from kernels.ref import patchify, unpatchify
from prx.config import EmaConfig, EvalConfig, FlowConfig, ModelConfig, RepaConfig, TextConfig, tiny
from prx.export import cli, export
from prx.model.denoiser import PRX
from prx.recipe.ema import EMA
from prx.recipe.flow import sampling_sigmas
from prx.recipe.repa import RepaProjector
from prx.run.checkpoint import CheckpointWriter
from tests.dev_deps import dev_dependency
from tests.tiny_text import WIDTH, save_tiny_text_encoder

diffusers = dev_dependency("diffusers")
ftfy = dev_dependency("ftfy")  # the pipeline's prompt cleaning

# time_embed_dim 64 as in the tiny preset: exported by widening time_in to diffusers' 256
MODEL = ModelConfig(patch_size=4, bottleneck_dim=16, hidden_dim=48, depth=2, num_heads=3, mlp_ratio=2.5,
                    text_dim=WIDTH, time_embed_dim=64)
STEPS, SHIFT = 6, 3.0  # the scheduler then needs num_train_timesteps = 3 * 5 + 1 = 16


def run_config(encoder: str, ema: bool = True, resolution_embeds: bool = False):
    base = tiny()
    return dataclasses.replace(
        base, preset="tiny", model=dataclasses.replace(MODEL, resolution_embeds=resolution_embeds),
        flow=FlowConfig(timestep_shift=SHIFT),
        text=TextConfig(encoder=encoder, max_tokens=32, pad_to_multiple=8),
        data=dataclasses.replace(base.data, resolution=16),
        eval=EvalConfig(sample_steps=STEPS, guidance=3.0),
        repa=RepaConfig(enabled=True, projector_dim=8, teacher_dim=8), ema=EmaConfig(enabled=ema))


def random_weights(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # modulations and output non-zero, so the check is not vacuous
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def write_checkpoint(run_dir, cfg, model: PRX | None = None):
    """A checkpoint as train.py writes one: model + REPA projector, optimizer, EMA, meta. Without
    `model`, random weights: the EMA's `random_weights(0)`, the trained ones `random_weights(1)`;
    with it, both are its weights."""
    given = model is not None
    if not given:
        model = PRX(cfg.model, RepaProjector(cfg.model.hidden_dim, 8, 8))
        random_weights(model, 0)
    ema = EMA(model) if cfg.ema.enabled else None  # the EMA keeps these weights ...
    if not given:
        random_weights(model, 1)  # ... the trained ones move on
    optimizer = torch.optim.AdamW(model.parameters())
    meta = {"config": cfg.to_dict(), "step": 7, "schedule": {"step": 7}}
    return CheckpointWriter(run_dir).save(7, model, optimizer, meta, {"torch": torch.get_rng_state()},
                                          {"ema": ema.state_dict()} if ema else None)


def ours(seed: int, cfg) -> PRX:
    """Our denoiser with the weights of `random_weights(seed)` (0: the EMA's, 1: the trained)."""
    model = PRX(cfg.model, RepaProjector(cfg.model.hidden_dim, 8, 8))
    random_weights(model, seed)
    model.repa_projector = None
    return model.eval()


# without and with resolution-aware conditioning (model.resolution_embeds, diffusers' resolution_embeds)
@pytest.fixture(scope="module", params=[False, True], ids=["plain", "resolution_embeds"])
def exported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cfg = run_config(str(save_tiny_text_encoder(root / "text")), resolution_embeds=request.param)
    checkpoint = write_checkpoint(root / "run", cfg)
    export(checkpoint, root / "out", copy_text=True)
    export(checkpoint, root / "trained", ema=False)
    return cfg, checkpoint, root


def assert_same_function(theirs, model64: PRX, model32: PRX) -> None:
    """diffusers' transformer `theirs` (fp64) computes our denoiser's function: on non-square images
    both ways (rows and columns cannot trade places), with and without text padding, to within our
    own fp32 rounding error (model32: the same weights in fp32)."""
    g = torch.Generator().manual_seed(2)
    p = model64.cfg.patch_size
    # t dyadic and in fp32 on both sides: diffusers computes the sinusoid in fp32 always, and
    # then 1000 t freq rounds alike in both orders of the product
    t = torch.tensor([0.5, 0.25])
    txt = torch.randn(2, 5, model64.cfg.text_dim, generator=g, dtype=torch.float64)
    for H, W in ((2 * p, 3 * p), (3 * p, 2 * p)):
        images = torch.randn(2, 3, H, W, generator=g, dtype=torch.float64)
        for mask in (torch.tensor([[1, 1, 1, 0, 0], [1] * 5], dtype=torch.bool), None):
            grid = (H // p, W // p)
            ref = unpatchify(model64(patchify(images, p), t, txt, mask, grid).x_hat, p, H, W)
            low = unpatchify(model32(patchify(images.float(), p), t, txt.float(), mask, grid).x_hat, p, H, W)
            got = theirs(images, t, txt, mask).sample
            # diffusers keeps RoPE, RMSNorm's variance and the sinusoid in fp32 even in an fp64
            # model: bound its error by our own fp32 rounding error (measured: 2e-7 vs 3e-5)
            assert ref.abs().mean() > 0.1
            assert (got - ref).abs().max() <= 2 * (low.double() - ref).abs().max(), (H, W, mask is None)


def test_folder_loads_strictly_and_its_transformer_is_ours(exported):
    from diffusers import PRXTransformer2DModel

    cfg, _, root = exported
    for folder, seed in (("out", 0), ("trained", 1)):  # EMA by default, --no-ema the trained weights
        theirs, info = PRXTransformer2DModel.from_pretrained(root / folder / "transformer", torch_dtype=torch.float64,
                                                             output_loading_info=True)
        assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
        assert (theirs.resolution_embedder is not None) == cfg.model.resolution_embeds
        assert_same_function(theirs, ours(seed, cfg).double(), ours(seed, cfg))


def test_scheduler_sigmas_are_our_samplers(exported):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from prx.model.diffusers_names import scheduler_config

    _, _, root = exported
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root / "out" / "scheduler")
    cases = [(scheduler, SHIFT, STEPS)] + [
        (FlowMatchEulerDiscreteScheduler.from_config(scheduler_config(s, n)), s, n) for s, n in ((3.0, 50), (1.0, 25))]
    for sched, s, n in cases:
        sched.set_timesteps(n)
        torch.testing.assert_close(sched.sigmas, sampling_sigmas(n, s), rtol=0, atol=3e-8)  # fp32 rounding
    default = FlowMatchEulerDiscreteScheduler(shift=3.0)  # what the issue warns of
    default.set_timesteps(50)
    assert (default.sigmas - sampling_sigmas(50, 3.0)).abs().max() > 1e-3


def test_pipeline_images_are_our_samplers(exported):
    from diffusers import PRXPixelPipeline

    from prx.eval.sampling import generate
    from prx.recipe.flow import guided
    from prx.rng import per_sample_normal
    from prx.text import TextTower, pad_text

    cfg, _, root = exported
    index = json.loads((root / "out" / "model_index.json").read_text())
    assert index["noise_scale"] == cfg.flow.noise_scale and index["prompt_max_tokens"] == 32
    pipe = PRXPixelPipeline.from_pretrained(root / "out")  # text encoder copied: nothing else to pass
    model = ours(0, cfg)
    tower = TextTower(cfg.text, torch.device("cpu"))
    captions = ["a red circle on the left", "a blue square"]
    expected = generate(model, tower, captions, cfg, seed=5)
    # the same noise, as an image; first the prompts' embeddings from our tower
    side, p = cfg.data.resolution, cfg.model.patch_size
    noise = cfg.flow.noise_scale * per_sample_normal(((side // p) ** 2, cfg.model.patch_dim), 5, 0, [0, 1],
                                                     torch.device("cpu"))
    latents = unpatchify(noise, p, side, side)
    got = []
    # one prompt a call: with guidance, diffusers 0.42.1's PRX pipelines pass one timestep per
    # guidance half (repeat(2)), which fails for a batch of more than one prompt
    for i, seq in enumerate(tower.encode(captions)):
        text, mask = pad_text([seq], 8)
        empty, empty_mask = pad_text([tower.empty()], 8)
        got.append(pipe(prompt_embeds=text, prompt_attention_mask=mask, negative_prompt_embeds=empty,
                        negative_prompt_attention_mask=empty_mask, latents=latents[i:i + 1],
                        num_inference_steps=STEPS, guidance_scale=cfg.eval.guidance, height=side, width=side,
                        use_resolution_binning=False, output_type="pt").images)
    got = torch.cat(got)
    # our sampler's own fp32 rounding: the same sampling with the model, text and noise in fp64
    seqs = tower.encode(captions)
    text, mask = pad_text([s.double() for s in seqs] + [tower.empty().double()] * 2, 8)
    model64 = ours(0, cfg).double()
    grid = (side // p, side // p)

    def denoise(x, sigma):
        cond, uncond = model64(torch.cat([x, x]), torch.cat([sigma, sigma]), text, mask, grid).x_hat.chunk(2)
        return guided(cond, uncond, cfg.eval.guidance)

    sigmas64 = sampling_sigmas(STEPS, SHIFT).double()
    x = noise.double()
    for i in range(STEPS):  # euler_sample's steps, in fp64 throughout
        x = x - (sigmas64[i] - sigmas64[i + 1]) * (x - denoise(x, sigmas64[i].expand(2))) / sigmas64[i].clamp_min(0.05)
    exact = unpatchify(x, p, side, side).clamp(-1, 1)
    ours_error = (expected.double() - exact).abs().max()
    assert expected.abs().mean() > 0.1 and 0 < ours_error < 1e-3
    # within fp32 rounding: the pipeline's error is at most twice our own sampler's
    assert (got.clamp(-1, 1).double() - exact).abs().max() <= 2 * ours_error, ours_error
    # and by the pipeline's own prompt path (ftfy cleaning, its tokenizer call padded to
    # prompt_max_tokens, the copied text encoder, "" as the negative prompt): the same images
    by_prompt = torch.cat([pipe(prompt=caption, latents=latents[i:i + 1], num_inference_steps=STEPS,
                                guidance_scale=cfg.eval.guidance, height=side, width=side,
                                use_resolution_binning=False, output_type="pt").images
                           for i, caption in enumerate(captions)])
    assert (by_prompt.clamp(-1, 1).double() - exact).abs().max() <= 2 * ours_error, ours_error


def test_user_mistakes_are_one_line(exported, tmp_path, capsys):
    cfg, checkpoint, root = exported
    no_ema = write_checkpoint(tmp_path / "run", dataclasses.replace(cfg, ema=EmaConfig(enabled=False)))
    (tmp_path / "file").write_text("x")
    cases = [
        (["--checkpoint", str(tmp_path / "missing"), "--out", str(tmp_path / "a")], "no such directory"),
        (["--checkpoint", str(checkpoint), "--out", str(tmp_path / "file")], "is a file"),
        (["--checkpoint", str(no_ema), "--out", str(tmp_path / "b")], "no EMA weights"),
    ]
    for argv, message in cases:
        assert cli(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert cli(["--checkpoint", str(no_ema), "--out", str(tmp_path / "b"), "--no-ema"]) == 0
    card = (tmp_path / "b" / "README.md").read_text()
    assert "preset: `tiny`, step 7" in card and "from_pretrained(DIR, text_encoder=" in card


def test_sampling_cli_reads_an_export_folder(exported, tmp_path, capsys):
    from prx.eval import sample

    _, checkpoint, root = exported
    for source, extra in ((root / "out", []), (checkpoint, []), (root / "trained", []), (checkpoint, ["--no-ema"])):
        out = tmp_path / f"{source.name}{''.join(extra)}"
        assert sample.cli(["--checkpoint", str(source), "--prompt", "a red circle", "--steps", "2",
                           "--out", str(out), *extra]) == 0
    printed = capsys.readouterr().out
    assert f"{root / 'out'}: export of step 7, EMA weights" in printed and "trained weights" in printed
    image = "step7_000.png"
    assert (tmp_path / "out" / image).read_bytes() == (tmp_path / checkpoint.name / image).read_bytes()
    assert (tmp_path / "trained" / image).read_bytes() == (tmp_path / f"{checkpoint.name}--no-ema" / image).read_bytes()
    assert (tmp_path / "out" / image).read_bytes() != (tmp_path / "trained" / image).read_bytes()
    for argv, message in (([str(root / "out"), "--no-ema"], "holds only EMA weights; pass the checkpoint"),
                          ([str(root / "out" / "transformer")], "a diffusers folder without prx_export.json")):
        assert sample.cli(["--checkpoint", argv[0], "--prompt", "a red circle", "--out", str(tmp_path / "x"),
                           *argv[1:]]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_export_parity_benchmark_scores_both_samplers_alike(tmp_path):
    """bench/export_parity.py on a 3-step shapes run: the pipeline's images are ours to float32
    rounding, so the two shapes scores are equal."""
    import train
    from bench.export_parity import main as parity
    from tests.test_train import SMALL

    train.main(SMALL + ["--run-dir", str(tmp_path / "run"), "--steps", "3", "--set", "eval.num_prompts=3",
                        "--set", "eval.sample_steps=4", "--set", "eval.grid_prompts=3",
                        # the full lr from step 1 (no warmup, no cooldown): weights away from their init
                        "--set", "optim.warmup_steps=1", "--set", "optim.cooldown_fraction=0"])
    rows = parity(["--checkpoint", str(tmp_path / "run" / "checkpoints" / "step_00000003"),
                   "--out", str(tmp_path / "out"), "--csv-dir", str(tmp_path)])
    ours, theirs = rows
    assert ours["max_pixel_difference"] == 0 and 0 < theirs["max_pixel_difference"] < 1e-3
    assert [ours[k] for k in ("color", "shape", "position")] == [theirs[k] for k in ("color", "shape", "position")]
    assert (tmp_path / "out" / "grid_diffusers.png").is_file() and (tmp_path / "export_parity.csv").is_file()
