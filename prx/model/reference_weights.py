"""Load weights saved by the PRX reference implementation (Photoroom/PRX) into our model.

The tensors have the same layout on both sides (qkv rows ordered q, k, v with heads major
inside each; text kv rows k then v; modulation chunks shift, scale, gate for attention then
MLP; final chunks shift, scale; patches flattened (channel, row, column), tokens row-major;
RoPE on adjacent pairs, rows on the first half of the head dim). Only the names differ, so the
converter is a rename table, and `tests/test_reference_weights.py` proves it by comparing our
model with an independent functional forward written against the reference names.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from prx.model.denoiser import PRX

# reference name -> ours; "{i}" stands for a block index.
_RENAMES = {
    "img_in.0": "img_in.down",
    "img_in.1": "img_in.up",
    "time_in.in_layer": "time_in.fc1",
    "time_in.out_layer": "time_in.fc2",
    "txt_in": "txt_in",
    "resolution_embedder.mlp.in_layer": "resolution_in.fc1",  # model.resolution_embeds (PRX-7B pixel)
    "resolution_embedder.mlp.out_layer": "resolution_in.fc2",
    "blocks.{i}.img_qkv_proj": "blocks.{i}.attn.qkv",
    "blocks.{i}.attn_out": "blocks.{i}.attn.out",
    "blocks.{i}.qk_norm.query_norm": "blocks.{i}.attn.q_norm",
    "blocks.{i}.qk_norm.key_norm": "blocks.{i}.attn.k_norm",
    "blocks.{i}.txt_kv_proj": "blocks.{i}.attn.text_kv",
    "blocks.{i}.k_norm": "blocks.{i}.attn.text_k_norm",
    "blocks.{i}.gate_proj": "blocks.{i}.mlp.gate",
    "blocks.{i}.up_proj": "blocks.{i}.mlp.up",
    "blocks.{i}.down_proj": "blocks.{i}.mlp.down",
    "blocks.{i}.modulation.lin": "blocks.{i}.modulation",
    "final_layer.linear": "final.linear",
    "final_layer.adaLN_modulation.1": "final.modulation",
}
# Wrappers that training frameworks put in front of parameter names.
_PREFIXES = ("module.", "model.", "_orig_mod.", "denoiser.")


def compile_renames(table: dict[str, str]) -> list[tuple[re.Pattern, str]]:
    """{"a.{i}.b": "c.{i}.d"} -> rules that `rename` applies to full names ending in weight, bias or scale."""
    rules = []
    for src, dst in table.items():
        pattern = re.escape(src).replace(re.escape("{i}"), r"(?P<i>\d+)")
        rules.append((re.compile(rf"^{pattern}\.(?P<leaf>weight|bias|scale)$"), dst))
    return rules


_TO_OURS = compile_renames(_RENAMES)
_TO_REFERENCE = compile_renames({v: k for k, v in _RENAMES.items()})


def rename(name: str, rules) -> str | None:
    """`name` renamed by the first rule that matches, the leaf kept; None when none does."""
    for pattern, dst in rules:
        m = pattern.match(name)
        if m:
            groups = m.groupdict()
            base = dst.replace("{i}", groups["i"]) if "i" in groups else dst
            return f"{base}.{groups['leaf']}"
    return None


def rename_state(state: dict[str, torch.Tensor], rules, skip=()) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the tensors of `state` under their names by `rules`, the names no rule matches); names in
    `skip` are left out. Callers raise their own message for the unmatched."""
    out, unknown = {}, []
    for name, tensor in state.items():
        if name in skip:
            continue
        new = rename(name, rules)
        if new is None:
            unknown.append(name)
        else:
            out[new] = tensor
    return out, unknown


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def convert_reference_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reference names -> our names; unknown names raise, listing a few of them."""
    out, unknown = rename_state(_strip_prefixes(dict(sd)), _TO_OURS)
    if unknown:
        raise KeyError(f"{len(unknown)} parameter(s) of the reference state dict have no "
                       f"counterpart here, e.g. {unknown[:5]}")
    return out


# Trained beside the denoiser but never used to sample (REPA's projector, docs/recipe.md
# section 4): exports leave these out on purpose, and `training_only_names` lists what was left.
TRAINING_ONLY_PREFIXES = ("repa_projector.",)


def training_only_names(names) -> list[str]:
    """The names among `names` that exports leave out: tensors only training uses."""
    return [name for name in names if name.startswith(TRAINING_ONLY_PREFIXES)]


def to_reference_state_dict(model: PRX) -> dict[str, torch.Tensor]:
    """Our state dict under the reference's names (for exporting back), the denoiser only: the
    REPA projector is training-only and left out (`training_only_names`); any other tensor without
    a reference name raises."""
    state = model.state_dict()
    out, unknown = rename_state(state, _TO_REFERENCE, skip=set(training_only_names(state)))
    if unknown:
        raise KeyError(f"{len(unknown)} parameter(s) of the model have no reference name, e.g. {unknown[:5]}")
    return out


def load_reference_state_dict(model: PRX, sd: dict[str, torch.Tensor]) -> None:
    """Copy a reference-named state dict into `model`; every tensor must be present and fit."""
    converted = convert_reference_state_dict(sd)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise KeyError(f"reference state dict lacks {len(missing)} parameter(s), e.g. "
                       f"{[rename(k, _TO_REFERENCE) for k in missing[:5]]}")
    wrong = [f"{k}: {tuple(converted[k].shape)} vs {tuple(v.shape)}"
             for k, v in expected.items() if converted[k].shape != v.shape]
    if wrong:
        raise ValueError(f"shape mismatch (reference vs this model's config): {wrong[:5]}")
    model.load_state_dict(converted)


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch file loaded with weights_only=True."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # common containers around the tensors
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state
