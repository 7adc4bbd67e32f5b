"""The recipe's optimizer (docs/recipe.md section 6): Muon for the 2-D block weights, Adam for the rest.

One `torch.optim.Optimizer` with two kinds of parameter group, so the trainer, the LR schedule
and the checkpoints see a single optimizer:

- "muon": every 2-D weight inside `model.blocks` (qkv, attention out, text kv, MLP gate/up/down,
  modulation). Per step: momentum buf <- lerp(buf, g, 1 - mu); Nesterov u = lerp(g, buf, mu);
  O = NewtonSchulz(u) (5 steps on the wide orientation, after Frobenius normalisation; by
  default evaluated on the Gram matrix u u^T in fp16, `optim.newton_schulz`, kernels/muon.py);
  p <- p (1 - lr wd) - lr * 0.2 sqrt(max(rows, cols)) * O. The 0.2 sqrt(max) factor gives O
  the RMS of a typical Adam update, so one lr fits both groups.
- "adam": everything else (embeddings, final layer, norm scales, biases), Adam with decoupled
  weight decay, in foreach ops.

Matrices of one shape form a bank that is orthogonalised in one batched call (PRX small: 112
matrices in 6 shapes), between two fused element-wise passes (kernels/muon_update.py: momentum,
Nesterov and the cast into the bank; the scaled, decayed update). Under FSDP2 the parameters
are row shards; every matrix has an owner rank, chosen by Newton-Schulz FLOP so the busiest
rank carries about the mean (prx/muon_owners.py), the shards travel to their owner in one
all-to-all per bank, the owner orthogonalises its whole matrices, and a second all-to-all sends
each rank the rows of its shards. The update is the same as on one process. Under DDP (plain
tensors) every rank orthogonalises every matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

import kernels
from prx.muon_owners import assign_owners, describe_plan
from prx.names import canonical_name

# Jordan's quintic (Muon, 2024): one (a, b, c) for every step; it stops short of convergence
# on purpose (singular values end in about [0.7, 1.2]) for speed in 5 steps.
JORDAN = (3.4445, -4.7750, 2.0315)
# Polar Express (Amsel et al. 2025, arXiv 2505.16932, Algorithm 1): per-step minimax
# coefficients, divided by a 1.01 safety factor (a / 1.01, b / 1.01^3, c / 1.01^5) for bf16,
# with the input normalised by 1.01 ||X||_F.
_POLAR_EXPRESS = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
)
_POLAR_LIMIT = (1.875, -1.25, 0.375)  # every later step (no safety factor)


@dataclass(frozen=True)
class NewtonSchulzSchedule:
    coefficients: tuple[tuple[float, float, float], ...]
    norm_safety: float = 1.0
    eps: float = 1e-7
    method: str = "standard"  # how the polynomial is evaluated: "standard" on X, "gram" on X X^T (kernels/muon.py)

    @staticmethod
    def named(name: str, steps: int, method: str = "standard") -> "NewtonSchulzSchedule":
        if name == "jordan":
            return NewtonSchulzSchedule((JORDAN,) * steps, method=method)
        if name == "polar_express":
            safe = tuple((a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in _POLAR_EXPRESS)
            coefficients = (safe + (_POLAR_LIMIT,) * steps)[:steps]
            return NewtonSchulzSchedule(coefficients, norm_safety=1.01, method=method)
        raise ValueError(f"unknown Newton-Schulz schedule {name!r}: use jordan or polar_express")


def is_muon_parameter(name: str, param: torch.Tensor) -> bool:
    """2-D weights inside the transformer blocks (docs/recipe.md section 6); all else goes to Adam."""
    return name.startswith("blocks.") and param.ndim == 2


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _row_counts(rows: int, world: int) -> list[int]:
    """Rows of each rank's shard under FSDP2's dim-0 sharding (torch.chunk sizes, then empty)."""
    sizes = [len(chunk) for chunk in torch.arange(rows).chunk(world)]
    return sizes + [0] * (world - len(sizes))


class MuonAdam(torch.optim.Optimizer):
    """Muon for the groups with kind "muon", Adam for kind "adam" (build with `build_optimizer`).

    `ns_dtype` is the dtype of the banks Newton-Schulz runs on (bf16 as in the recipe on a GPU,
    fp32 on a CPU, `bank_dtype`; tests use fp32/fp64 for exact comparisons).
    `newton_schulz(bank, coefficients, norm_safety, eps)` orthogonalises a bank:
    `kernels.newton_schulz` (the Triton kernels on CUDA tensors, the batched torch reference
    elsewhere) unless a benchmark passes another, e.g. the compiled reference.
    """

    def __init__(self, groups: list[dict], lr: float, schedule: NewtonSchulzSchedule,
                 ns_dtype: torch.dtype = torch.bfloat16, newton_schulz=kernels.newton_schulz):
        super().__init__(groups, dict(lr=lr, weight_decay=0.0))
        self.schedule = schedule
        self.ns_dtype = ns_dtype
        self.newton_schulz = newton_schulz
        self._banks: dict[int, list[tuple[tuple[int, int], list[int]]]] = {}
        self._owners: dict[tuple[int, int], dict[int, int]] = {}  # (group, world) -> owner of each matrix

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonAdam.step takes no closure")
        for index, group in enumerate(self.param_groups):
            if group["kind"] == "muon":
                self._muon_step(index, group)
            else:
                self._adam_step(group)

    def _adam_step(self, group: dict) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        beta1, beta2 = group["betas"]
        for p in params:
            if not self.state[p]:
                self.state[p].update(step=torch.zeros((), dtype=torch.float32),
                                     exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
        states = [self.state[p] for p in params]
        grads = [p.grad for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        step = steps[0].item()  # one group steps together
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, math.sqrt(1 - beta2**step))
        torch._foreach_add_(denominators, group["eps"])
        if group["weight_decay"]:
            torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
        torch._foreach_addcdiv_(params, exp_avgs, denominators, value=-group["lr"] / (1 - beta1**step))

    def _muon_step(self, index: int, group: dict) -> None:
        params = group["params"]
        missing = [i for i, p in enumerate(params) if p.grad is None]
        if missing:
            raise RuntimeError(f"Muon: {len(missing)} parameter(s) of group {index} have no gradient; "
                               "every Muon matrix must take part in each step (banks and owners are fixed)")
        for p in params:
            if not self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        decay = 1 - group["lr"] * group["weight_decay"]
        # Per bank, two element-wise passes (kernels/muon_update.py: 24 B an element instead of the
        # 52 of foreach ops and a stack): momentum, Nesterov and the cast into the bank in one;
        # p <- p (1 - lr wd) - lr_scaled O in the other. On the local rows under FSDP2.
        layout = self._bank_layout(index, params)
        owners = self._owner_plan(index, layout)
        for shape, members in layout:
            lr_scaled = group["lr"] * group["update_scale"] * math.sqrt(max(shape))
            local_params = [_local(params[i]) for i in members]
            bank = kernels.momentum_to_bank([_local(params[i].grad) for i in members],
                                            [_local(self.state[params[i]]["momentum_buffer"]) for i in members],
                                            group["momentum"], group["nesterov"], self.ns_dtype)
            results = self._orthogonalize_packed(shape, bank, [owners[i] for i in members],
                                                 sharded=isinstance(params[members[0]], DTensor))
            kernels.apply_update(local_params, results, lr_scaled, decay)

    def _owner_plan(self, index: int, layout) -> dict[int, int]:
        """Parameter index -> the rank that orthogonalises it under FSDP2, balanced by Newton-Schulz
        FLOP (prx/muon_owners.py); fixed for the run, the same on every rank."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        if (index, world) not in self._owners:
            members = [i for _, bank in layout for i in bank]
            shapes = [shape for shape, bank in layout for _ in bank]
            self._owners[(index, world)] = dict(zip(members, assign_owners(shapes, world, self._matrix_cost)))
        return self._owners[(index, world)]

    def _matrix_cost(self, rows: int, cols: int) -> int:
        """Newton-Schulz FLOP of one matrix, as the symmetric kernels execute it with this schedule."""
        return kernels.ref.newton_schulz_flops(rows, cols, len(self.schedule.coefficients), symmetric=True,
                                               method=self.schedule.method)

    def describe_owners(self, world: int) -> str:
        """The owner plan of each Muon group on `world` ranks, for the run log."""
        return "; ".join(
            describe_plan([shape for shape, bank in self._bank_layout(i, group["params"]) for _ in bank],
                          world, self._matrix_cost)
            for i, group in enumerate(self.param_groups) if group["kind"] == "muon")

    def _orthogonalize_packed(self, shape, bank: torch.Tensor, owners, sharded: bool) -> list[torch.Tensor]:
        """Newton-Schulz of a packed local bank (K, rows here, C); under FSDP2 its rows travel to the
        matrices' owners and back."""
        if not sharded or not dist.is_initialized() or dist.get_world_size() == 1:
            return list(self._orthogonalize(bank).unbind(0))
        return self._orthogonalize_sharded(shape, list(bank.unbind(0)), owners)

    def _bank_layout(self, index: int, params: list[torch.Tensor]) -> list[tuple[tuple[int, int], list[int]]]:
        """Group members by full (global) shape, in parameter order; fixed for the run."""
        if index not in self._banks:
            banks: dict[tuple[int, int], list[int]] = {}
            for i, p in enumerate(params):
                banks.setdefault(tuple(p.shape), []).append(i)
            self._banks[index] = list(banks.items())
        return self._banks[index]

    def _orthogonalize(self, bank: torch.Tensor) -> torch.Tensor:
        schedule = self.schedule
        return self.newton_schulz(bank, list(schedule.coefficients), schedule.norm_safety, schedule.eps,
                                  method=schedule.method)

    def _orthogonalize_sharded(self, shape, local_updates, owners) -> list[torch.Tensor]:
        """Row shards -> whole matrices on their owners -> Newton-Schulz -> row shards back."""
        world, rank = dist.get_world_size(), dist.get_rank()
        rows, cols = shape
        counts = _row_counts(rows, world)
        if local_updates[0].shape[0] != counts[rank]:
            raise RuntimeError(f"Muon: rank {rank} holds {local_updates[0].shape[0]} rows of a {shape} "
                               f"matrix, expected {counts[rank]} (dim-0 sharding as FSDP2's fully_shard)")
        offsets = [sum(counts[:q]) for q in range(world)]
        owner_of = [o % world for o in owners]
        mine = [j for j, o in enumerate(owner_of) if o == rank]
        owned_by = [[j for j, o in enumerate(owner_of) if o == q] for q in range(world)]
        device = local_updates[0].device
        element = torch.empty((), dtype=self.ns_dtype).element_size()

        # 1. Each rank sends its rows of matrix j to owner(j); the owner receives, from every
        #    rank q, q's rows of each of its matrices (in matrix order). Bytes travel as uint8,
        #    which every backend carries (gloo has no bf16).
        send = torch.cat([local_updates[j].to(self.ns_dtype).reshape(-1) for q in range(world)
                          for j in owned_by[q]] or [torch.empty(0, dtype=self.ns_dtype, device=device)])
        send_splits = [len(owned_by[q]) * counts[rank] * cols * element for q in range(world)]
        recv_splits = [len(mine) * counts[q] * cols * element for q in range(world)]
        received = self._all_to_all(send, send_splits, recv_splits, device)
        whole = torch.empty((len(mine), rows, cols), dtype=self.ns_dtype, device=device)
        start = 0
        for q in range(world):
            n = len(mine) * counts[q] * cols
            whole[:, offsets[q]:offsets[q] + counts[q]] = received[start:start + n].view(len(mine), counts[q], cols)
            start += n

        # 2. Orthogonalise the owned matrices.
        if mine:
            whole = self._orthogonalize(whole)

        # 3. Send every rank q the rows of its shard of each owned matrix; collect own rows.
        back = torch.cat([whole[:, offsets[q]:offsets[q] + counts[q]].reshape(-1) for q in range(world)])
        send_splits = [len(mine) * counts[q] * cols * element for q in range(world)]
        recv_splits = [len(owned_by[q]) * counts[rank] * cols * element for q in range(world)]
        returned = self._all_to_all(back, send_splits, recv_splits, device)
        results: list[torch.Tensor | None] = [None] * len(local_updates)
        start = 0
        for q in range(world):
            for j in owned_by[q]:
                n = counts[rank] * cols
                results[j] = returned[start:start + n].view(counts[rank], cols)
                start += n
        return results

    def _all_to_all(self, values: torch.Tensor, send_splits, recv_splits, device) -> torch.Tensor:
        out = torch.empty(sum(recv_splits), dtype=torch.uint8, device=device)
        dist.all_to_all_single(out, values.contiguous().view(torch.uint8), recv_splits, send_splits)
        return out.view(self.ns_dtype)


def bank_dtype(device: torch.device) -> torch.dtype:
    """Muon's bank dtype: bf16 where the Triton kernels run (half the bytes they move), fp32 on a
    CPU, where the reference multiplies in fp32 anyway and half storage only adds casts: the tiny
    model's Newton-Schulz took 25 ms a step in fp32 against 38 ms in bf16 banks with fp16 Gram
    storage (2026-12-07, 2 CPU cores), and lands 1e-3 times closer to the exact iteration."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW over everything, or Muon + Adam split as docs/recipe.md section 6 (cfg.optim.name)."""
    o = cfg.optim
    if o.name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                                 weight_decay=o.weight_decay, foreach=True)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    muon = [p for name, p in named if is_muon_parameter(canonical_name(name), p)]
    adam = [p for name, p in named if not is_muon_parameter(canonical_name(name), p)]
    groups = [
        dict(params=muon, kind="muon", momentum=o.muon_momentum, nesterov=o.muon_nesterov,
             update_scale=o.muon_update_scale, weight_decay=o.weight_decay),
        dict(params=adam, kind="adam", betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay),
    ]
    schedule = NewtonSchulzSchedule.named(o.ns_coefficients, o.ns_steps, method=o.newton_schulz)
    device = next(model.parameters()).device
    return MuonAdam([g for g in groups if g["params"]], o.lr, schedule, ns_dtype=bank_dtype(device))
