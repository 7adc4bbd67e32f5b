"""Pretrained weights for the start of a new run (`train.py --init-from PATH`): step 0, a fresh
optimizer and data order, only the weights taken from PATH. PATH is one of

- our checkpoint directory (RUN/checkpoints/step_N): its trained weights, not the EMA, since
  fine-tuning continues the trained weights (a new EMA starts from them);
- a diffusers folder as `python -m prx.export` writes it (the export root or its transformer/);
- a .safetensors file in our names, the reference's or diffusers' (told apart by the names).

Every tensor of the denoiser must be there with this model's shape; a mismatch stops before the
first step with one line naming the tensor and the config field to change. Training-only tensors
(the REPA projector, `training_only_names`) may be absent or extra: skipped, with a log line.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path

import torch

from prx.config import ModelConfig, from_dict
from prx.model import diffusers_names
from prx.model.denoiser import PRX
from prx.model.reference_weights import (
    compile_renames,
    convert_reference_state_dict,
    rename_state,
    training_only_names,
)
from prx.run.checkpoint import CheckpointError, load_model_weights, read_meta

# diffusers -> ours: the inverse of the export's table (kept there, in one place).
_FROM_DIFFUSERS = compile_renames({v: k for k, v in diffusers_names.DIFFUSERS_RENAMES.items()})

# The model fields that decide tensor shapes; a source's values of these are what a hint names.
SHAPE_FIELDS = ("patch_size", "bottleneck_dim", "hidden_dim", "depth", "num_heads", "mlp_ratio", "text_dim",
                "time_embed_dim", "resolution_embeds")
# diffusers' config.json key -> our field
_DIFFUSERS_FIELDS = {"patch_size": "patch_size", "bottleneck_size": "bottleneck_dim", "hidden_size": "hidden_dim",
                     "depth": "depth", "num_heads": "num_heads", "mlp_ratio": "mlp_ratio",
                     "context_in_dim": "text_dim", "theta": "rope_theta",
                     "resolution_embeds": "resolution_embeds"}
# our tensor name -> the fields its shape follows (first match; the last is the catch-all)
_FIELDS_OF = (
    (r"^img_in\.down\.", "model.patch_size / model.bottleneck_dim"),
    (r"^img_in\.up\.", "model.bottleneck_dim / model.hidden_dim"),
    (r"^time_in\.fc1\.", "model.time_embed_dim / model.hidden_dim"),
    (r"^txt_in\.", "model.text_dim / model.hidden_dim"),
    (r"^resolution_in\.", "model.resolution_embeds / model.hidden_dim"),
    (r"_norm\.scale$", "model.hidden_dim / model.num_heads"),
    (r"\.mlp\.", "model.hidden_dim / model.mlp_ratio"),
    (r"^final\.linear\.", "model.patch_size / model.hidden_dim"),
    (r"", "model.hidden_dim"),
)


@dataclasses.dataclass
class Source:
    """Weights in our names, and what is known of the model that made them."""

    what: str  # for messages: "checkpoint runs/a/checkpoints/step_00000002"
    state: dict[str, torch.Tensor]
    fields: dict | None = None  # the source's model fields (SHAPE_FIELDS and rope_theta), when it says


def load_initial_weights(path: str | Path, model: PRX, log: Callable[[str], None] = print) -> str:
    """Copy the weights at `path` into `model` (in place, any device); returns a line for the log."""
    source = read_source(Path(path), model.cfg)
    expected = model.state_dict()
    training_only = set(training_only_names(expected)) | set(training_only_names(source.state))
    fill = {}
    for name, tensor in expected.items():
        if name in training_only:
            continue
        if name not in source.state:
            raise CheckpointError(f"{name}: missing from {source.what}: {_hint(name, model.cfg, source)}")
        theirs = source.state[name]
        if theirs.shape != tensor.shape:
            raise CheckpointError(f"{name}: {source.what} has {tuple(theirs.shape)} vs model {tuple(tensor.shape)}: "
                                  f"{_hint(name, model.cfg, source)}")
        fill[name] = theirs
    extra = [name for name in source.state if name not in expected and name not in training_only]
    if extra:
        raise CheckpointError(f"{extra[0]}: in {source.what} but not in this model ({len(extra)} such tensor(s)): "
                              f"{_hint(extra[0], model.cfg, source)}")
    # REPA's projector: taken when both sides have it alike; else this run trains its own.
    for name in sorted(training_only):
        mine, theirs = expected.get(name), source.state.get(name)
        if mine is not None and theirs is not None and mine.shape == theirs.shape:
            fill[name] = theirs
    skipped = sorted(training_only - set(fill))
    if skipped:
        log(f"init-from: {len(skipped)} training-only tensor(s) not taken from the source (the REPA projector, "
            f"e.g. {skipped[0]}): {'fresh' if any(n in expected for n in skipped) else 'not used by this run'}")
    if source.fields:
        other = {k: v for k, v in source.fields.items() if getattr(model.cfg, k) != v}
        if "rope_theta" in other:  # no shape shows it, yet it changes what the weights compute
            raise CheckpointError(f"{source.what} was trained with rope_theta={other['rope_theta']}: "
                                  f"set model.rope_theta={other['rope_theta']} as the source model")
    model.load_state_dict({**expected, **fill})
    return f"init-from: {len(fill)} tensors from {source.what}; step 0 with a fresh optimizer and data order"


def _hint(name: str, cfg: ModelConfig, source: Source) -> str:
    """Which field to change: the source's differing values when it says, else the fields the tensor follows."""
    if source.fields:
        other = [f"model.{k}={source.fields[k]}" for k in SHAPE_FIELDS
                 if k in source.fields and source.fields[k] != getattr(cfg, k)]
        if other:
            return f"set {', '.join(other)} as the source model"
    block = re.match(r"^blocks\.(\d+)\.", name)
    if block and (int(block.group(1)) >= cfg.depth or not any(k.startswith(block.group(0)) for k in source.state)):
        fields = "model.depth"  # a block one side has and the other lacks
    elif name.startswith("resolution_in."):
        fields = "model.resolution_embeds"  # one side embeds the image size, the other does not
    elif name not in source.state:
        return "the source is not a complete PRX denoiser (no config field adds a single tensor)"
    else:
        fields = next(f for pattern, f in _FIELDS_OF if re.search(pattern, name))
    return f"set {fields} as the source model (this run: {_ours(cfg, fields)})"


def _ours(cfg: ModelConfig, fields: str) -> str:
    names = [f.strip().removeprefix("model.") for f in fields.split("/")]
    return ", ".join(f"model.{n}={getattr(cfg, n)}" for n in names)


# ----------------------------------------------------------------------------- the sources


def read_source(path: Path, cfg: ModelConfig) -> Source:
    """The weights at `path` in our names (a checkpoint, a diffusers folder or a file)."""
    if not path.exists():
        raise CheckpointError(f"--init-from {path}: no such file or directory")
    if path.is_dir() and (path / "meta.pt").is_file():
        return _from_checkpoint(path)
    if path.is_dir():
        folder = path / "transformer" if (path / "transformer" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"--init-from {path}: a folder that is neither a checkpoint (no meta.pt) nor a "
                                  "diffusers export (no transformer/config.json or config.json)")
        return _from_diffusers_folder(folder, cfg)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"--init-from {path}: not a .safetensors file (other formats are not read: "
                              "they could run code when unpickled)")
    return _from_file(path, cfg)


def _from_checkpoint(path: Path) -> Source:
    cfg = from_dict(read_meta(path)["config"])
    model = PRX(cfg.model)  # the denoiser only: a projector in the checkpoint is training-only
    load_model_weights(path, model, ema=False)
    fields = {k: getattr(cfg.model, k) for k in (*SHAPE_FIELDS, "rope_theta")}
    return Source(f"checkpoint {path}", model.state_dict(), fields)


def _from_diffusers_folder(folder: Path, cfg: ModelConfig) -> Source:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder / 'config.json'} is not readable JSON ({err})") from None
    what = f"diffusers folder {folder}"
    if config.get("in_channels", 3) != 3:
        raise CheckpointError(f"{what} is a latent model (in_channels={config['in_channels']}, decoded by a VAE); "
                              "this trainer trains pixel models (in_channels=3)")
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():  # sharded: the index names the file of every tensor
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["diffusion_pytorch_model.safetensors"]
    state = {}
    for name in files:
        state.update(_read_safetensors(folder / name))
    fields = {ours: config[theirs] for theirs, ours in _DIFFUSERS_FIELDS.items() if theirs in config}
    return Source(what, from_diffusers_names(state, cfg, what), fields)


def _from_file(path: Path, cfg: ModelConfig) -> Source:
    state = _read_safetensors(path)
    names = detect_names(state)
    what = f"{path} ({'our' if names == 'ours' else names} names)"
    if names == "diffusers":
        return Source(what, from_diffusers_names(state, cfg, what))
    if names == "reference":
        try:
            return Source(what, convert_reference_state_dict(state))
        except KeyError as err:
            raise CheckpointError(f"{path}: {err.args[0]}") from None
    return Source(what, state)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None


def detect_names(state: dict) -> str:
    """"diffusers", "reference" or "ours", by names only one of them uses."""
    if any(".attention.img_qkv_proj." in k for k in state):
        return "diffusers"
    if any(".img_qkv_proj." in k or k.startswith("final_layer.") or ".final_layer." in k for k in state):
        return "reference"
    return "ours"


def from_diffusers_names(state: dict[str, torch.Tensor], cfg: ModelConfig, what: str) -> dict[str, torch.Tensor]:
    """diffusers' names -> ours, the inverse of the export: RMSNorm `weight` back to `scale`, and
    time_in's 256-wide sinusoid columns narrowed to model.time_embed_dim (diffusers_names.widen_time_weight)."""
    renamed, unknown = rename_state(state, _FROM_DIFFUSERS)
    if unknown:
        raise CheckpointError(f"{unknown[0]}: in {what} but has no counterpart in our model "
                              f"({len(unknown)} such tensor(s))")
    out = {}
    for ours, tensor in renamed.items():
        if re.search(r"_norm\.weight$", ours):  # diffusers' RMSNorm weight is our scale
            ours = ours.removesuffix(".weight") + ".scale"
        if ours == "time_in.fc1.weight":
            tensor = _narrow_time_weight(tensor, cfg.time_embed_dim, what)
        out[ours] = tensor
    return out


def _narrow_time_weight(wide: torch.Tensor, d: int, what: str) -> torch.Tensor:
    """(h, 256) -> (h, D): the inverse of widen_time_weight, when the other columns are zero."""
    full = diffusers_names.DIFFUSERS_TIME_DIM
    if wide.ndim != 2 or wide.shape[1] != full or d == full:
        return wide  # a shape the match reports, or nothing to narrow
    if d % 2 or full % d:
        raise CheckpointError(f"time_in.fc1.weight: {what} embeds timesteps {full} wide: set "
                              f"model.time_embed_dim to a width that divides {full} (e.g. {full})")
    places = torch.arange(d // 2) * (full // d)
    kept = torch.zeros(full, dtype=torch.bool)
    kept[places] = kept[full // 2 + places] = True
    if wide[:, ~kept].any():
        raise CheckpointError(f"time_in.fc1.weight: {what} uses all {full} timestep frequencies: set "
                              f"model.time_embed_dim={full} as the source model")
    return torch.cat([wide[:, places], wide[:, full // 2 + places]], dim=1)
