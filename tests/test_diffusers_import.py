"""From diffusers into the trainer and back (`prx.run.init_weights`, `prx.export`), against the real
diffusers package: a PRXTransformer2DModel built by diffusers itself, with all 256 timestep
frequencies in use and resolution-aware conditioning, imports as the same function; export ->
import -> export is bit-identical; latent models and a resolution_embeds mismatch are refused by name."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from prx.config import EmaConfig, ModelConfig, RepaConfig
from prx.export import export
from prx.model.denoiser import PRX
from prx.run.checkpoint import CheckpointError
from prx.run.init_weights import load_initial_weights
from tests.dev_deps import dev_dependency
from tests.test_export import (
    assert_same_function,
    random_weights,
    run_config,
    write_checkpoint,
)
from tests.tiny_text import WIDTH

diffusers = dev_dependency("diffusers")

# the PRX-7B pixel model's options (diffusers' conversion script: resolution_embeds, a bottleneck)
# at a toy size; diffusers' time embedding is always 256 wide, so ours is too
THEIRS = dict(in_channels=3, patch_size=4, context_in_dim=WIDTH, hidden_size=48, mlp_ratio=2.5, num_heads=3,
              depth=2, axes_dim=[8, 8], theta=10000, time_factor=1000.0, time_max_period=10000, bottleneck_size=16,
              resolution_embeds=True)
OURS = ModelConfig(patch_size=4, bottleneck_dim=16, hidden_dim=48, depth=2, num_heads=3, mlp_ratio=2.5,
                   text_dim=WIDTH, time_embed_dim=256, resolution_embeds=True)


def diffusers_folder(path, seed: int = 3, **changes):
    """A random PRXTransformer2DModel saved by diffusers (save_pretrained) under path/transformer."""
    from diffusers import PRXTransformer2DModel

    theirs = PRXTransformer2DModel(**{**THEIRS, **changes})
    random_weights(theirs, seed)
    theirs.save_pretrained(path / "transformer")
    return theirs.eval()


def imported(path, cfg: ModelConfig = OURS) -> PRX:
    """Our model as `train.py --init-from path` starts it."""
    model = PRX(cfg)
    load_initial_weights(path, model, log=lambda line: None)
    return model.eval()


def exported_tensors(model: PRX, root, name: str) -> dict:
    """`model` saved as train.py would, exported (trained weights); the exported transformer's tensors."""
    cfg = dataclasses.replace(run_config("unused"), model=model.cfg, ema=EmaConfig(enabled=False),
                              repa=RepaConfig(enabled=False))
    export(write_checkpoint(root / f"run_{name}", cfg, model), root / name, ema=False)
    return load_file(root / name / "transformer" / "diffusion_pytorch_model.safetensors")


def assert_bit_identical(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    different = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not different, different


def test_a_diffusers_model_imports_as_the_same_function(tmp_path):
    theirs = diffusers_folder(tmp_path)
    assert theirs.time_in.in_layer.weight.shape[1] == 256 and theirs.resolution_embedder is not None
    for path in (tmp_path, tmp_path / "transformer"):  # the pipeline folder or its transformer
        model32, model64 = imported(path), imported(path).double()
        assert_same_function(theirs.double(), model64, model32)


def test_diffusers_import_export_gives_back_its_tensors_and_config(tmp_path):
    theirs = diffusers_folder(tmp_path / "hub")
    tensors = exported_tensors(imported(tmp_path / "hub"), tmp_path, "out")
    assert_bit_identical(tensors, load_file(tmp_path / "hub" / "transformer" / "diffusion_pytorch_model.safetensors"))
    config = json.loads((tmp_path / "out" / "transformer" / "config.json").read_text())
    assert {k: config[k] for k in THEIRS} == {k: theirs.config[k] for k in THEIRS}


@pytest.mark.parametrize("time_embed_dim", [64, 256])  # 64: widened to 256 on export, narrowed on import
def test_export_import_export_is_bit_identical(tmp_path, time_embed_dim):
    model = PRX(dataclasses.replace(OURS, time_embed_dim=time_embed_dim))
    random_weights(model, 4)
    first = exported_tensors(model, tmp_path, "first")
    again = imported(tmp_path / "first", model.cfg)
    assert_bit_identical(again.state_dict(), model.state_dict())
    assert_bit_identical(exported_tensors(again, tmp_path, "second"), first)
    assert ((tmp_path / "first" / "transformer" / "config.json").read_text()
            == (tmp_path / "second" / "transformer" / "config.json").read_text())


def test_latent_models_and_mismatched_options_are_refused_by_name(tmp_path):
    diffusers_folder(tmp_path / "latent", in_channels=16, bottleneck_size=None)
    with pytest.raises(CheckpointError, match=r"is a latent model \(in_channels=16, decoded by a VAE\)"):
        imported(tmp_path / "latent")
    diffusers_folder(tmp_path / "hub")
    with pytest.raises(CheckpointError, match=r"^resolution_in\.fc[12]\.(weight|bias): in diffusers folder .* "
                                              r"set model\.resolution_embeds=True as the source model"):
        imported(tmp_path / "hub", dataclasses.replace(OURS, resolution_embeds=False))
    with pytest.raises(CheckpointError, match="uses all 256 timestep frequencies: set model.time_embed_dim=256"):
        imported(tmp_path / "hub", dataclasses.replace(OURS, time_embed_dim=64))
