"""DINO teachers load offline from a directory or the HF cache, frozen; missing ones fail clearly."""

import pytest
import torch

from prx.hub import PretrainedMissing
from prx.recipe.repa import RepaProjector
from prx.recipe.teachers import FrozenDino, TeacherMissing, load_dino, teacher_input_size
from tests.tiny_dino import fake_hub_cache, save_tiny_dino

MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    """An empty $HF_HUB_CACHE, so no test depends on what this machine has cached."""
    import huggingface_hub.constants

    cache = tmp_path / "hf_hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))  # read at import time
    return cache


def test_teacher_input_size_matches_the_denoiser_grid():
    assert teacher_input_size((16, 16), 16) == (256, 256)  # 512 px, patch 32 -> DINOv3-L/16
    assert teacher_input_size((16, 16), 14) == (224, 224)  # -> DINOv2-L/14
    assert teacher_input_size((32, 32), 16) == (512, 512)  # 1024 px
    assert teacher_input_size((12, 21), 16) == (192, 336)  # an aspect bucket: rows, cols per axis
    assert teacher_input_size((21, 12), 14) == (294, 168)


@pytest.mark.parametrize("kind, patch", [("v2", 14), ("v3", 16)])
def test_patch_tokens_are_normed_patch_tokens_without_cls_and_registers(tmp_path, kind, patch):
    original = save_tiny_dino(kind, tmp_path / kind)
    teacher = load_dino(str(tmp_path / kind), "cpu")
    assert (teacher.patch_size, teacher.hidden_size, teacher.num_registers) == (patch, 32, 4)
    images = torch.rand(2, 3, 2 * patch, 3 * patch)  # a non-square 2 x 3 grid
    tokens = teacher.patch_tokens(images)
    assert tokens.shape == (2, 6, 32) and tokens.dtype == torch.float32
    # independent computation on the saved model: ImageNet-normalised input, the last block's
    # output through the final LayerNorm, CLS and the 4 registers dropped
    with torch.no_grad():
        out = original(pixel_values=(images - MEAN) / STD, output_hidden_states=True)
        norm = original.layernorm if kind == "v2" else original.norm
        expected = norm(out.hidden_states[-1])[:, 1 + 4:]
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not a multiple of the patch"):
        teacher.patch_tokens(torch.rand(1, 3, 2 * patch + 1, 2 * patch))


def test_teacher_is_frozen_and_outside_modules(tmp_path):
    save_tiny_dino("v3", tmp_path / "v3")
    teacher = load_dino(str(tmp_path / "v3"), "cpu")
    assert not teacher.model.training  # DINOv3 jitters its RoPE positions in training mode
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert not isinstance(teacher, torch.nn.Module)
    # attached to a module by mistake, its weights still stay out of checkpoints and the optimizer
    projector = RepaProjector(16, 24, 32)
    keys, params = set(projector.state_dict()), len(list(projector.parameters()))
    projector.teacher = teacher
    projector.train()
    assert set(projector.state_dict()) == keys and len(list(projector.parameters())) == params
    assert not teacher.model.training


def test_hub_id_loads_from_the_offline_cache(empty_hub_cache):
    original = fake_hub_cache(empty_hub_cache, "facebook/dinov2-with-registers-tiny", "v2", seed=3)
    teacher = load_dino("facebook/dinov2-with-registers-tiny", "cpu")
    assert isinstance(teacher, FrozenDino) and teacher.patch_size == 14
    saved = original.embeddings.patch_embeddings.projection.weight
    assert torch.equal(teacher.model.embeddings.patch_embeddings.projection.weight, saved)  # not a fresh init


def test_missing_teacher_says_how_to_get_it(tmp_path, empty_hub_cache):
    name = "facebook/dinov3-vitl16-pretrain-lvd1689m"
    with pytest.raises(TeacherMissing, match=f"huggingface-cli download {name}") as info:
        load_dino(name, "cpu")
    message = str(info.value)
    assert "REPA teacher" in message and "--set repa.teacher=/path/to/dir" in message
    assert isinstance(info.value, PretrainedMissing) and isinstance(info.value, RuntimeError)
    with pytest.raises(TeacherMissing, match="--set perceptual.dino_teacher="):
        load_dino("facebook/dinov2-with-registers-base", "cpu", what="DINO perceptual teacher",
                  option="perceptual.dino_teacher")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherMissing, match="no config.json"):
        load_dino(str(tmp_path / "empty"), "cpu")
    save_tiny_dino("v3", tmp_path / "no_weights")
    (tmp_path / "no_weights" / "model.safetensors").unlink()
    with pytest.raises(TeacherMissing, match="no loadable weights"):
        load_dino(str(tmp_path / "no_weights"), "cpu")


def test_a_non_dino_model_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=64)).save_pretrained(tmp_path / "bert")
    with pytest.raises(TeacherMissing, match="'bert' model"):
        load_dino(str(tmp_path / "bert"), "cpu")
