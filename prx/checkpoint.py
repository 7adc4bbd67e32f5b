"""Checkpoints: one file per save, written atomically, found again through a `latest` pointer.

A save goes to a temporary file in the same directory, is flushed to disk, then renamed over
its final name (rename is atomic on POSIX), and only then does the `latest` pointer move. A
crash at any moment leaves either the previous checkpoint or the new one as latest, never a
torn file. Files load with `torch.load(weights_only=True)`: nothing in them is unpickled as code.

Layout: <run_dir>/checkpoints/step_00001500.pt and <run_dir>/checkpoints/latest (a file name).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

# Bump when the state layout changes; older files then fail with a clear message.
CHECKPOINT_FORMAT = 1
_NAME = re.compile(r"step_(\d+)\.pt$")


class CheckpointError(RuntimeError):
    pass


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def save_checkpoint(run_dir: str | Path, step: int, state: dict, keep: int = 0) -> Path:
    """Write `state` for `step` and point `latest` at it; keep the newest `keep` files (0: all)."""
    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:08d}.pt"
    _atomic_write(path, lambda f: torch.save({"format": CHECKPOINT_FORMAT, **state}, f))
    _atomic_write(directory / "latest", lambda f: f.write(path.name.encode() + b"\n"))
    if keep > 0:
        for old in sorted(directory.glob("step_*.pt"))[:-keep]:
            old.unlink()
    return path


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The file `latest` names, or None when the run has no complete checkpoint."""
    pointer = checkpoint_dir(run_dir) / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if _NAME.search(path.name) and path.exists() else None


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a torn or foreign file: say which and why
        raise CheckpointError(f"checkpoint {path} cannot be read safely: {exc}") from None
    found = state.get("format") if isinstance(state, dict) else None
    if found != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {found!r}; this version reads format {CHECKPOINT_FORMAT}. "
            "Resume it with the version of the trainer that wrote it."
        )
    return state


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_train_state(model, optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts on the CPU of rank 0, keyed by parameter
    name, so they load at any world size and with any wrapping (FSDP2, DDP, checkpointing,
    compile). Every rank must call it; ranks other than 0 get empty dicts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def restore_train_state(model, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Load full state dicts (from `gather_train_state`) into a possibly sharded model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))
