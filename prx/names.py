"""Parameter names as checkpoints store them, whatever wraps the model.

Activation checkpointing and torch.compile put `_checkpoint_wrapped_module.` and `_orig_mod.`
inside parameter names; the optimizer's Muon/Adam split, the EMA and checkpoints key on the
names without them, so a run saved with one set of wrappers loads with another.
"""

from __future__ import annotations

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def canonical_name(name: str) -> str:
    """A parameter's name without the wrappers' prefixes (activation checkpointing, torch.compile)."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name
