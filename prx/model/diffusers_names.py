"""Our denoiser in Hugging Face diffusers' terms: `PRXTransformer2DModel` (pixel variant) and the
`FlowMatchEulerDiscreteScheduler` config of our Euler sampler. Written against diffusers 0.42.1.

The tensors have the reference's layout (prx/model/reference_weights.py), so the transformer is
a rename table plus one widening, and `tests/test_export.py` proves both against the real package:

- names: attention parts sit under `attention.` (`img_qkv_proj`, `to_out.0`, `txt_kv_proj`), the
  RMSNorm scales are `norm_q`, `norm_k`, `norm_added_k` `.weight`; the rest are the reference's.
- the timestep sinusoid: diffusers builds it 256 wide (`MLPEmbedder(in_dim=256)`), ours is
  `model.time_embed_dim` = D wide. Our frequency k, exp(-ln(10000) k / (D/2)), is diffusers'
  frequency 256k/D, bit for bit when D divides 256 (the two quotients differ by a power of two), so
  time_in.fc1's cos and sin columns go to those places and the other 256 - D columns are zero:
  the same function. The tiny preset's D = 64 exports this way.
- RoPE: axes_dim [head_dim/2, head_dim/2], rows on the first half, adjacent pairs (ours).
- resolution-aware conditioning (`model.resolution_embeds`, diffusers' `resolution_embeds`, on in
  the PRX-7B pixel model): `resolution_embedder.mlp.{in,out}_layer`, the reference's own names; both
  sides embed the image height and width in pixels, 128 + 128 wide.
"""

from __future__ import annotations

import torch

from prx.config import ModelConfig
from prx.model.denoiser import PRX
from prx.model.reference_weights import compile_renames, rename, rename_state, training_only_names

DIFFUSERS_VERSION = "0.42.1"  # the version the export is tested against (tests/test_export.py)
DIFFUSERS_TIME_DIM = 256  # diffusers' PRXTransformer2DModel: MLPEmbedder(in_dim=256)

# ours -> diffusers (prx.run.init_weights reads it backwards); "{i}" stands for a block index. Our
# RMSNorm `scale` leaves become `weight`.
DIFFUSERS_RENAMES = {
    "img_in.down": "img_in.0",
    "img_in.up": "img_in.1",
    "time_in.fc1": "time_in.in_layer",
    "time_in.fc2": "time_in.out_layer",
    "txt_in": "txt_in",
    "resolution_in.fc1": "resolution_embedder.mlp.in_layer",  # model.resolution_embeds; the reference's names
    "resolution_in.fc2": "resolution_embedder.mlp.out_layer",
    "blocks.{i}.attn.qkv": "blocks.{i}.attention.img_qkv_proj",
    "blocks.{i}.attn.out": "blocks.{i}.attention.to_out.0",
    "blocks.{i}.attn.q_norm": "blocks.{i}.attention.norm_q",
    "blocks.{i}.attn.k_norm": "blocks.{i}.attention.norm_k",
    "blocks.{i}.attn.text_kv": "blocks.{i}.attention.txt_kv_proj",
    "blocks.{i}.attn.text_k_norm": "blocks.{i}.attention.norm_added_k",
    "blocks.{i}.mlp.gate": "blocks.{i}.gate_proj",
    "blocks.{i}.mlp.up": "blocks.{i}.up_proj",
    "blocks.{i}.mlp.down": "blocks.{i}.down_proj",
    "blocks.{i}.modulation": "blocks.{i}.modulation.lin",
    "final.linear": "final_layer.linear",
    "final.modulation": "final_layer.adaLN_modulation.1",
}
_TO_DIFFUSERS = compile_renames(DIFFUSERS_RENAMES)


def export_problem(cfg: ModelConfig) -> str | None:
    """Why diffusers' PRXTransformer2DModel cannot hold this model (one line naming the field), or None."""
    d = cfg.time_embed_dim
    if d % 2 or DIFFUSERS_TIME_DIM % d:
        return (f"model.time_embed_dim={d}: diffusers' PRXTransformer2DModel embeds timesteps "
                f"{DIFFUSERS_TIME_DIM} wide; only an even width that divides {DIFFUSERS_TIME_DIM} maps onto it exactly")
    if cfg.head_dim % 4:
        return f"model.hidden_dim/num_heads={cfg.head_dim}: diffusers' 2-D RoPE needs a head dim divisible by 4"
    if cfg.rope_theta != int(cfg.rope_theta):
        return f"model.rope_theta={cfg.rope_theta}: diffusers' config holds a whole number"
    return None


def transformer_config(cfg: ModelConfig) -> dict:
    """config.json of the diffusers transformer folder (the arguments of PRXTransformer2DModel)."""
    return {
        "_class_name": "PRXTransformer2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": 3,  # pixel space: RGB patches, no VAE
        "patch_size": cfg.patch_size,
        "context_in_dim": cfg.text_dim,
        "hidden_size": cfg.hidden_dim,
        "mlp_ratio": cfg.mlp_ratio,  # both sides take int(hidden * ratio)
        "num_heads": cfg.num_heads,
        "depth": cfg.depth,
        "axes_dim": [cfg.head_dim // 2, cfg.head_dim // 2],
        "theta": int(cfg.rope_theta),
        "time_factor": 1000.0,  # ours: the sinusoid of 1000 t
        "time_max_period": 10000,
        "bottleneck_size": cfg.bottleneck_dim,
        "resolution_embeds": cfg.resolution_embeds,
    }


def widen_time_weight(weight: torch.Tensor) -> torch.Tensor:
    """time_in.fc1.weight (h, D) -> (h, 256): our D-wide [cos | sin] columns at diffusers' places."""
    h, d = weight.shape
    half, stride = d // 2, DIFFUSERS_TIME_DIM // d
    wide = weight.new_zeros(h, DIFFUSERS_TIME_DIM)
    places = torch.arange(half) * stride
    wide[:, places] = weight[:, :half]  # cos of our frequency k = diffusers' frequency stride * k
    wide[:, DIFFUSERS_TIME_DIM // 2 + places] = weight[:, half:]  # sin
    return wide


def to_diffusers_state_dict(model: PRX) -> dict[str, torch.Tensor]:
    """The denoiser's tensors under diffusers' names, contiguous, on the CPU. The REPA projector is
    training-only and left out (`training_only_names`); any other tensor without a name raises."""
    if problem := export_problem(model.cfg):
        raise ValueError(problem)
    state = model.state_dict()
    renamed, unknown = rename_state(state, _TO_DIFFUSERS, skip=set(training_only_names(state)))
    if unknown:
        raise KeyError(f"{len(unknown)} parameter(s) of the model have no diffusers name, e.g. {unknown[:5]}")
    time_weight = rename("time_in.fc1.weight", _TO_DIFFUSERS)
    out = {}
    for theirs, tensor in renamed.items():
        if theirs == time_weight:
            tensor = widen_time_weight(tensor)
        if theirs.endswith(".scale"):  # our RMSNorm scales; diffusers' RMSNorm calls it weight
            theirs = theirs.removesuffix(".scale") + ".weight"
        out[theirs] = tensor.detach().cpu().contiguous()
    return out


# ----------------------------------------------------------------------------- the sampler


def scheduler_config(shift: float, steps: int) -> dict:
    """scheduler_config.json of a FlowMatchEulerDiscreteScheduler whose sigmas at `steps` steps are
    our sampler's, shift(linspace(1, 0, steps + 1)) (prx.recipe.flow.sampling_sigmas).

    Its set_timesteps(N) gives shift(linspace(1, m, N)) and a final 0, with m = shift(1/T) fixed at
    construction (T = num_train_timesteps; the shift is applied there and again per call). Ours is
    m = 1/N: s / (T + s - 1) = 1/N, so T = s (N - 1) + 1, a whole number for the schedule to exist
    (PRX's s = 3, 50 steps: T = 148). The pipeline feeds the model t = timestep / T = sigma and
    divides by max(t, 0.05), our flow.t_floor. Other step counts need another T (the model card
    says how); diffusers' default schedule (T = 1000) differs from ours at every step count.
    """
    train_timesteps = shift * (steps - 1) + 1
    if abs(train_timesteps - round(train_timesteps)) > 1e-9:
        raise ValueError(f"flow.timestep_shift={shift} and {steps} steps: diffusers' scheduler gives our "
                         f"sigmas only when shift * (steps - 1) is a whole number; pick another --steps")
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": int(round(train_timesteps)),
        "shift": float(shift),
        "use_dynamic_shifting": False,
        "shift_terminal": None,
        "invert_sigmas": False,
        "stochastic_sampling": False,
    }
