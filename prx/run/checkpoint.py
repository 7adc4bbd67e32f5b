"""Sharded checkpoints with torch.distributed.checkpoint (DCP), atomic, safe to load.

Layout of a run:

    <run_dir>/checkpoints/step_00001500/   .metadata, __<rank>_0.distcp (model + optimizer shards),
                                           meta.pt (config, step, data position), rng_rank<r>.pt
    <run_dir>/checkpoints/latest           the name of the newest complete checkpoint

Every rank writes its own shards into a hidden `.step_*.tmp` directory; once all have
finished, rank 0 renames it (atomic on POSIX) and only then moves `latest`. A crash at any
moment leaves the previous checkpoint as latest, never a torn one. DCP reshards on load, so a
run saved on W processes resumes on any other number.

Loading never unpickles code: `meta.pt` and RNG files load with `torch.load(weights_only=True)`;
DCP's pickled `.metadata` goes through an unpickler that admits only DCP's own metadata
classes; DCP's non-tensor entries load with weights_only=True (`SafeLoadPlanner`).
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from prx.run.distributed import barrier, process_rank

# Single-process runs save and load without a process group, which DCP announces every time.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

# Bump when the layout or the config schema changes; checkpoints of other formats then fail with a
# clear message. 3: the sampling settings live in `eval` only; `train.kernels` replaced `optim.muon_backend`.
CHECKPOINT_FORMAT = 3
_NAME = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    pass


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


# ----------------------------------------------------------------------------- safe reading


class _MetadataUnpickler(pickle.Unpickler):
    """Admits the classes DCP's .metadata is made of, and nothing else."""

    _ALLOWED = {
        ("torch", "Size"), ("torch.serialization", "_get_layout"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict"),
    }

    def find_class(self, module: str, name: str):
        if module == "torch.distributed.checkpoint.metadata" or (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            data = stream.read()
        try:
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        except Exception as exc:
            raise CheckpointError(f"checkpoint metadata {path} cannot be read safely: {exc}") from None
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but non-tensor entries load with weights_only=True."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._traverse import set_element

            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} cannot be read safely: {exc}") from None


# ----------------------------------------------------------------------------- saving


def _is_main() -> bool:
    return process_rank() == 0


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CheckpointWriter:
    """Writes the checkpoints of one run; every rank calls `save` with the same step.

    Synchronous: shards, RNG states and meta are written, then published (rename, `latest`).
    Asynchronous (`asynchronous=True`): the state is copied to CPU memory and written by a
    background thread while training goes on; it is published when the next save starts or at
    `close()`, so `latest` trails by one save until then.
    """

    def __init__(self, run_dir: str | Path, keep: int = 0, asynchronous: bool = False):
        self.directory = checkpoint_dir(run_dir)
        self.keep = keep
        self.asynchronous = asynchronous
        self._pending = None  # (future, temporary dir, final dir) of an asynchronous save
        self._cpu_group = None

    def save(self, step: int, model, optimizer, meta: dict, rng: dict, extra: dict | None = None) -> Path:
        """Every rank calls this. `extra`: more named state dicts of tensors (e.g. {"ema": ...}),
        saved sharded beside the model and optimizer."""
        self.close()  # publish the previous asynchronous save first
        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f".step_{step:08d}.tmp"
        if _is_main():
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier attempt
            tmp.mkdir(parents=True)
        barrier()
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state, **(extra or {})}
        torch.save(rng, tmp / f"rng_rank{process_rank()}.pt")
        if _is_main():
            torch.save({"format": CHECKPOINT_FORMAT, **meta}, tmp / "meta.pt")
        if self.asynchronous:
            response = dcp.async_save(state, checkpoint_id=tmp, process_group=self._checkpoint_group(),
                                      no_dist=not dist.is_initialized())
            self._pending = (getattr(response, "upload_completion", response), tmp, final)
        else:
            dcp.save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())
            self._publish(tmp, final)
        return final

    def close(self) -> None:
        """Wait for an asynchronous save and publish it."""
        if self._pending is not None:
            future, tmp, final = self._pending
            self._pending = None
            future.result()
            self._publish(tmp, final)

    def _publish(self, tmp: Path, final: Path) -> None:
        barrier()  # every shard is on disk
        if _is_main():
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _write_atomic(self.directory / "latest", final.name.encode() + b"\n")
            if self.keep > 0:
                for old in sorted(p for p in self.directory.iterdir() if _NAME.match(p.name))[:-self.keep]:
                    shutil.rmtree(old)
        barrier()

    def _checkpoint_group(self):
        """Asynchronous DCP needs a CPU backend: a gloo group beside NCCL, made once."""
        if not dist.is_initialized():
            return None
        if self._cpu_group is None:
            self._cpu_group = dist.new_group(backend="gloo")
        return self._cpu_group


# ----------------------------------------------------------------------------- loading


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names, or None when the run has no complete checkpoint."""
    pointer = checkpoint_dir(run_dir) / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    return path if _NAME.match(path.name) and (path / "meta.pt").exists() else None


def read_meta(path: str | Path) -> dict:
    """Config, step and data position of a checkpoint directory; checks the format."""
    path = Path(path)
    if not (path / "meta.pt").exists():
        hint = " (a file: checkpoints are directories since format 2)" if path.is_file() else ""
        raise CheckpointError(f"{path} is not a checkpoint directory with a meta.pt{hint}")
    meta = _torch_load(path / "meta.pt")
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {found!r}; this version reads format {CHECKPOINT_FORMAT}. "
            "Resume it with the version of the trainer that wrote it."
        )
    return meta


def _dcp_load(state: dict, path: Path, no_dist: bool) -> None:
    SafeFileSystemReader(path).read_metadata()  # fails here, with a plain message, on foreign data
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner(), no_dist=no_dist)
    except (Exception, CheckpointException) as exc:  # DCP's is a BaseException with per-rank tracebacks
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise CheckpointError(f"checkpoint {path} could not be loaded: {lines[-1] if lines else exc}") from None


def load_train_state(path: str | Path, model, optimizer, extra: dict | None = None) -> dict | None:
    """Every rank calls this: model and optimizer (resharded to this world size), and `extra`
    state dicts of live tensors, filled in place; returns this rank's saved RNG state, or None
    when the checkpoint had fewer ranks."""
    path = Path(path)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state, **(extra or {})}
    _dcp_load(state, path, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    rng_path = path / f"rng_rank{process_rank()}.pt"
    return _torch_load(rng_path) if rng_path.exists() else None


def load_model_weights(path: str | Path, model, ema: bool = True) -> str:
    """Only the model's weights (sampling, evaluation), in one process: the EMA weights when the
    checkpoint has them and `ema` (docs/recipe.md section 6: sampling uses the EMA), else the trained
    ones. Returns which: "ema" or "model"."""
    path = Path(path)
    saved = SafeFileSystemReader(path).read_metadata().state_dict_metadata
    source = "ema" if ema and any(key.startswith("ema.") for key in saved) else "model"
    weights = model.state_dict()
    if source == "ema":  # the EMA holds parameters only; buffers come from the model state
        names = {name for name, _ in model.named_parameters()}
        state = {"ema": {k: v for k, v in weights.items() if k in names},
                 "model": {k: v for k, v in weights.items() if k not in names}}
    else:
        state = {"model": weights}
    _dcp_load(state, path, no_dist=True)
    model.load_state_dict({**state["model"], **state.get("ema", {})})
    return source


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
