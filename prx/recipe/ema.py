"""EMA of the model's weights (docs/recipe.md section 6): decay 0.999 applied every 10 optimizer steps;
sampling and evaluation use it.

Plain code the loop calls, no hooks:

    ema = EMA(model, cfg.ema.decay, cfg.ema.every)   # after parallelize (FSDP2 swaps parameters)
    ...
    optimizer.step(); step += 1
    ema.update(step)                                  # lerps when step % every == 0
    ...
    with ema.swapped_into(model):                     # EMA weights in, training weights back after
        samples = sample(model, ...)
    ...
    dcp.save({"model": ..., "ema": ema.state_dict()}) # live shadow tensors, keyed by parameter name

The shadow weights are detached clones of the parameters, so under FSDP2 they are DTensors sharded
exactly like the parameters, and each rank updates only its own shard (no communication). They
share the parameters' dtype (fp32 in PRX: a bf16 shadow could not resolve a 0.001 step).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from prx.names import canonical_name


def _reshard(model: nn.Module) -> None:
    """Put every FSDP2 module back on its sharded parameters. After a forward without backward
    (sampling, evaluation) the root keeps its gathered copies registered and reuses them in the
    next forward, so weights written into the shards would go unseen (and the gathered copies
    are not what named_parameters should return here)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class EMA:
    """Exponential moving average of every parameter of `model`, by parameter name.

    shadow <- decay * shadow + (1 - decay) * param, applied at optimizer steps every, 2 every, ...
    The shadow starts as a copy of the parameters at construction.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, every: int = 10) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if every < 1:
            raise ValueError(f"EMA every must be >= 1, got {every}")
        self.decay, self.every = float(decay), int(every)
        _reshard(model)  # the sharded parameters, even right after a no-grad forward
        named = list(model.named_parameters())
        self.names = [canonical_name(name) for name, _ in named]  # as checkpoints name them
        # The parameters the loop's optimizer updates in place: FSDP2 keeps these same (sharded)
        # objects registered between steps, so holding them is safe once the model is parallelised.
        self._params = [p for _, p in named]
        self.shadow = [p.detach().clone() for p in self._params]
        self._swapped = False

    # ---------------------------------------------------------------- the update

    @torch.no_grad()
    def update(self, step: int) -> bool:
        """Call after every optimizer step with `step` = optimizer steps done so far (1 after the
        first). Lerps the shadow toward the parameters when step is a positive multiple of
        `every`; returns whether it did."""
        self._check_not_swapped("update")
        if step <= 0 or step % self.every:
            return False
        # foreach needs one tensor type per call: DTensors (FSDP2) and plain tensors go apart.
        for dtensors in (True, False):
            pairs = [(s, p) for s, p in zip(self.shadow, self._params) if isinstance(s, DTensor) == dtensors]
            if pairs:
                shadow, params = zip(*pairs)
                torch._foreach_lerp_(list(shadow), [p.detach() for p in params], 1.0 - self.decay)
        return True

    # ---------------------------------------------------------------- sampling with the EMA weights

    @contextmanager
    def swapped_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Inside the block `model` holds the EMA weights; on exit (also on error) its training
        weights are back, bit for bit. The weights are exchanged one tensor at a time (one
        tensor of scratch memory), so while swapped the shadow holds the training weights and
        update / state_dict refuse to run. `model`'s parameter names must match this EMA's.
        FSDP2 modules are resharded on entry and on exit (see `_reshard`).
        """
        self._check_not_swapped("swapped_into")
        _reshard(model)
        params = self._matching_params(model)
        self._exchange(params)
        self._swapped = True
        try:
            yield model
        finally:
            _reshard(model)
            self._exchange(params)
            self._swapped = False

    @torch.no_grad()
    def _exchange(self, params: list[Tensor]) -> None:
        for shadow, param in zip(self.shadow, params):
            scratch = param.detach().clone()
            param.copy_(shadow)  # in place: FSDP2 all-gathers from the storage behind `param`
            shadow.copy_(scratch)

    def _matching_params(self, model: nn.Module) -> list[Tensor]:
        named = list(model.named_parameters())
        names = [canonical_name(name) for name, _ in named]
        if names != self.names:
            missing, extra = sorted(set(self.names) - set(names)), sorted(set(names) - set(self.names))
            raise ValueError(f"EMA was built for other parameters: missing {missing[:5]}, unexpected "
                             f"{extra[:5]}" + ("" if missing or extra else " (same names, other order)"))
        for name, (_, p), s in zip(names, named, self.shadow):
            if p.shape != s.shape or p.dtype != s.dtype or isinstance(p, DTensor) != isinstance(s, DTensor):
                raise ValueError(f"EMA shadow of {name} is {type(s).__name__} {tuple(s.shape)} {s.dtype}, "
                                 f"the parameter {type(p).__name__} {tuple(p.shape)} {p.dtype} "
                                 "(build the EMA after parallelising the model)")
        return [p for _, p in named]

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Tensor]:
        """{parameter name: shadow}; the live tensors (DTensors under FSDP2), not copies, so
        `dcp.load({"ema": ema.state_dict()}, ...)` restores the EMA in place (DCP reshards)."""
        self._check_not_swapped("state_dict")
        return dict(zip(self.names, self.shadow))

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Copy shadows from `state` (names must match exactly). A full tensor is sharded into a
        DTensor shadow (every rank must pass the same values), a DTensor into a plain one
        gathered (collective)."""
        self._check_not_swapped("load_state_dict")
        if set(state) != set(self.names):
            missing, extra = sorted(set(self.names) - set(state)), sorted(set(state) - set(self.names))
            raise KeyError(f"EMA state does not match the model: missing {missing[:5]}, "
                           f"unexpected {extra[:5]}")
        for name, shadow in zip(self.names, self.shadow):
            value = state[name]
            if value is shadow:
                continue  # already loaded in place (DCP)
            if isinstance(value, DTensor) and not isinstance(shadow, DTensor):
                value = value.full_tensor()
            elif isinstance(shadow, DTensor) and not isinstance(value, DTensor):
                value = distribute_tensor(value.to(shadow.device), shadow.device_mesh, shadow.placements)
            if value.shape != shadow.shape:
                raise ValueError(f"EMA state {name} has shape {tuple(value.shape)}, "
                                 f"expected {tuple(shadow.shape)}")
            shadow.copy_(value)

    def _check_not_swapped(self, what: str) -> None:
        if self._swapped:
            raise RuntimeError(f"EMA.{what} inside swapped_into: the shadow holds the training weights there")
