"""The loss terms of a micro-batch (prx.recipe.loss_terms), as train.py and bench_recipe call them:
each term with its weight from the config, on the right tokens, loaded from real-format files."""

import dataclasses

import torch

import kernels
from prx.config import tiny
from prx.model.denoiser import PRX
from prx.model.tread import plan_route, route_seeds
from prx.recipe.dino_loss import dino_perceptual_distance
from prx.recipe.flow import flow_loss
from prx.recipe.loss_terms import LOSS_TERMS, Teachers, load_teachers, micro_batch_loss
from prx.recipe.repa import RepaProjector
from tests.test_lpips import CHANNELS, vgg16_state
from tests.tiny_dino import save_tiny_dino


def recipe_config(root):
    save_tiny_dino("v3", root / "repa")
    save_tiny_dino("v2", root / "dino")
    torch.save(vgg16_state(), root / "vgg16.pth")
    g = torch.Generator().manual_seed(1)
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(CHANNELS)},
               root / "heads.pth")
    cfg = tiny()
    return dataclasses.replace(
        cfg,
        tread=dataclasses.replace(cfg.tread, enabled=True, route_start=1, route_end=2),
        repa=dataclasses.replace(cfg.repa, enabled=True, teacher=str(root / "repa"), block=1, weight=0.5,
                                 projector_dim=16, teacher_dim=32),
        perceptual=dataclasses.replace(cfg.perceptual, lpips_weight=0.1, lpips_vgg=str(root / "vgg16.pth"),
                                       lpips_heads=str(root / "heads.pth"), dino_weight=0.01,
                                       dino_teacher=str(root / "dino"), dino_resolution=28))


def test_every_term_carries_its_weight_and_its_tokens(tmp_path):
    cfg = recipe_config(tmp_path)
    teachers = load_teachers(cfg, torch.device("cpu"), torch.float32)
    assert teachers.active_terms == LOSS_TERMS
    torch.manual_seed(0)
    model = PRX(cfg.model, RepaProjector(cfg.model.hidden_dim, 16, 32))
    for p in model.final.parameters():  # past adaLN-Zero: x-hat depends on the input
        torch.nn.init.normal_(p, std=0.1)
    grid, batch = (8, 8), 2
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    t = torch.tensor([0.3, 0.8])
    x_t, x = kernels.patchify_and_noise(images, t, 4, seeds=torch.tensor([5, 6]))
    route = plan_route(cfg.tread, cfg.model.depth, 64, route_seeds(0, 0, [0, 1], "cpu"))
    targets = teachers.repa_targets(images, grid)
    text, mask = torch.randn(batch, 8, cfg.model.text_dim), torch.ones(batch, 8, dtype=torch.bool)
    out = model(x_t, t, text, mask, grid, route=route, capture=1)
    loss = micro_batch_loss(cfg, out, x, t, (32, 32), teachers, targets, route)

    x_hat_image, x_image = (kernels.unpatchify(p, 4, 32, 32) for p in (out.x_hat, x))
    kept_targets = kernels.route_gather(targets.contiguous(), route.keep_idx)  # the kept tokens only
    expected = {
        "diffusion": flow_loss(out.x_hat, x, t, cfg.flow.t_floor)[0],
        "repa": -0.5 * kernels.cosine_alignment(out.captured, kept_targets)[0],
        "lpips": 0.1 * teachers.lpips.distance(x_hat_image, x_image).mean(),
        "dino": 0.01 * dino_perceptual_distance(teachers.dino, x_hat_image, x_image, 28).mean(),
    }
    assert list(loss.terms) == list(LOSS_TERMS)
    for name, value in expected.items():
        torch.testing.assert_close(loss.terms[name], value, rtol=1e-6, atol=1e-7, msg=name)
    torch.testing.assert_close(loss.total, sum(expected.values()), rtol=1e-6, atol=1e-7)
    assert torch.equal(loss.per_sample, flow_loss(out.x_hat, x, t, cfg.flow.t_floor)[1])
    loss.total.backward()
    assert model.repa_projector.in_layer.weight.grad.abs().sum() > 0


def test_without_teachers_only_the_diffusion_term_runs():
    cfg = tiny()
    model = PRX(cfg.model)
    x = torch.randn(3, 64, cfg.model.patch_dim)
    t = torch.tensor([0.1, 0.5, 0.9])
    out = model(x, t, torch.randn(3, 4, cfg.model.text_dim), None, (8, 8))
    loss = micro_batch_loss(cfg, out, x, t, (32, 32), Teachers(), None, None)
    assert Teachers().active_terms == ("diffusion",) and list(loss.terms) == ["diffusion"]
    vector = loss.detached()
    assert vector.shape == (len(LOSS_TERMS),) and torch.equal(vector[1:], torch.zeros(3))
    assert vector[0] == loss.total
