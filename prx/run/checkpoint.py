"""Sharded checkpoints with torch.distributed.checkpoint (DCP), atomic, safe to load.

Layout of a run:

    <run_dir>/checkpoints/step_00001500/   .metadata, __<rank>_0.distcp (model + optimizer shards),
                                           meta.pt (config, step, data position), rng_rank<r>.pt,
                                           manifest.json (size and SHA-256 of each file, written last)
    <run_dir>/checkpoints/latest           the name of the newest complete checkpoint

Every rank writes its own shards into a hidden `.step_*.tmp` directory and hashes them; once all
have finished, rank 0 writes the manifest, renames the directory (atomic on POSIX) and only then
moves `latest`. A crash at any moment leaves the previous checkpoint as latest, never a torn one;
a failed save (a full disk) removes its partial directory and says so. DCP reshards on load, so
a run saved on W processes resumes on any other number.

Nothing damaged is trained on: loading first checks every file against the manifest (flipped
bytes, a truncated shard, a missing file each stop with one line naming the file), and a save
refuses weights or optimizer state that hold NaN or inf. Hashing costs about 0.3 s a save per
rank at PRX scale (~14 GB of model, optimizer and EMA state over 32 ranks, SHA-256 at ~1.5 GB/s).

Loading never unpickles code: `meta.pt` and RNG files load with `torch.load(weights_only=True)`;
DCP's pickled `.metadata` goes through an unpickler that admits only DCP's own metadata
classes; DCP's non-tensor entries load with weights_only=True (`SafeLoadPlanner`).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import time
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
# 4: manifest.json with the SHA-256 of every file.
CHECKPOINT_FORMAT = 4
MANIFEST = "manifest.json"
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
        raise CheckpointError(f"{path} cannot be read safely: {_refusal(exc)}") from None


def _refusal(exc: Exception) -> str:
    """torch's refusal, without its advice to load with weights_only=False (which runs whatever
    code the file holds): only the line that says what the file asked for."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if line.startswith("WeightsUnpickler error:")]
    if named:
        what = named[0].removeprefix("WeightsUnpickler error:").split(". Please use")[0].strip()
        return f"{what}; it was not written by this trainer, and must not be loaded with weights_only=False"
    return lines[-1] if lines else type(exc).__name__


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

    Synchronous: shards, RNG states and meta are written, hashed, then published (rename,
    `latest`). Asynchronous (`asynchronous=True`): the state is copied to CPU memory and written by
    a background thread while training goes on; it is published when the next save starts or at
    `close()`, so `latest` trails by one save until then. `check_background_save`, called every
    step, reports a failed background write at once instead of at the next save.

    Pruning keeps the `keep` most recently written complete checkpoints (by the time in their
    manifests, not by name: a run resumed from an earlier step writes names that sort before the
    abandoned ones) and never the one just written.
    """

    def __init__(self, run_dir: str | Path, keep: int = 0, asynchronous: bool = False):
        self.directory = checkpoint_dir(run_dir)
        self.keep = keep
        self.asynchronous = asynchronous
        self._pending = None  # (future, step, temporary dir, final dir) of an asynchronous save
        self._cpu_group = None

    def save(self, step: int, model, optimizer, meta: dict, rng: dict, extra: dict | None = None) -> Path:
        """Every rank calls this. `extra`: more named state dicts of tensors (e.g. {"ema": ...}),
        saved sharded beside the model and optimizer."""
        self.close()  # publish the previous asynchronous save first
        final = self.directory / f"step_{step:08d}"
        tmp = self.directory / f".step_{step:08d}.tmp"
        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state, **(extra or {})}
        if not _all_finite(state):
            raise CheckpointError(
                f"step {step}: the weights or optimizer state hold NaN or inf, so they were not saved; "
                f"the newest good checkpoint is {self.newest_good()}; resume from it with --resume PATH "
                "and a lower optim.lr")
        try:
            if _is_main():
                shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier attempt
                tmp.mkdir(parents=True)
            barrier()
            torch.save(rng, tmp / f"rng_rank{process_rank()}.pt")
            if _is_main():
                torch.save({"format": CHECKPOINT_FORMAT, **meta}, tmp / "meta.pt")
            if self.asynchronous:
                response = dcp.async_save(state, checkpoint_id=tmp, process_group=self._checkpoint_group(),
                                          no_dist=not dist.is_initialized())
                self._pending = (getattr(response, "upload_completion", response), step, tmp, final)
            else:
                dcp.save(state, checkpoint_id=tmp, no_dist=not dist.is_initialized())
                self._seal_and_publish(tmp, final)
        except (Exception, CheckpointException) as exc:  # DCP's is a BaseException
            raise self._failed(exc, step, tmp) from None
        return final

    def check_background_save(self) -> None:
        """Raise now if the background save failed (a full disk), rather than at the next save."""
        if self._pending is not None and self._pending[0].done() and self._pending[0].exception() is not None:
            self.close()

    def close(self) -> None:
        """Wait for an asynchronous save and publish it."""
        if self._pending is not None:
            future, step, tmp, final = self._pending
            self._pending = None
            try:
                future.result()
                self._seal_and_publish(tmp, final)
            except (Exception, CheckpointException) as exc:
                raise self._failed(exc, step, tmp) from None

    def _failed(self, exc: BaseException, step: int, tmp: Path) -> CheckpointError:
        """Remove the partial save (which also frees the space it took) and name what happened."""
        if _is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        kept = f"the previous checkpoint ({self.newest_good()}) is intact"
        if _no_space(exc) or self._short_of_space():
            return CheckpointError(f"no space left on {self.directory}: checkpoint step {step} was not written "
                                   f"and its partial files were removed; {kept}. Free space, then continue "
                                   "with --resume auto")
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        return CheckpointError(f"checkpoint step {step} could not be written to {self.directory} "
                               f"({type(exc).__name__}: {lines[-1] if lines else exc}); {kept}")

    def _short_of_space(self) -> bool:
        """Less room left than the newest checkpoint takes. A full disk does not always surface as
        ENOSPC: torch.save's zip writer reports it as "unexpected pos" (seen on a full tmpfs)."""
        newest = latest_checkpoint(self.directory.parent)
        need = sum(f.stat().st_size for f in newest.iterdir()) if newest else 0
        return need > 0 and shutil.disk_usage(self.directory).free < need

    def newest_good(self) -> str:
        """The newest intact checkpoint of the run (for messages), or that there is none."""
        newest = latest_checkpoint(self.directory.parent)
        return str(newest) if newest else "none (no checkpoint was written yet)"

    def _seal_and_publish(self, tmp: Path, final: Path) -> None:
        # every rank hashes the files it wrote; rank 0 gathers the sums into the manifest
        rank = process_rank()
        own = sorted(tmp.glob(f"__{rank}_*.distcp")) + [tmp / f"rng_rank{rank}.pt"]
        _write_atomic(tmp / f".sums_rank{rank}.json", json.dumps(_file_sums(own)).encode())
        barrier()  # every shard is on disk and hashed
        if _is_main():
            sums = {}
            for part in sorted(tmp.glob(".sums_rank*.json")):
                sums.update(json.loads(part.read_text()))
                part.unlink()
            unhashed = [p for p in tmp.iterdir() if p.name not in sums]  # .metadata, meta.pt
            sums.update(_file_sums(unhashed))
            manifest = {"format": CHECKPOINT_FORMAT, "written": time.time(), "files": sums}
            _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _write_atomic(self.directory / "latest", final.name.encode() + b"\n")
            if self.keep > 0:
                others = [c for c in complete_checkpoints(self.directory.parent) if c != final]
                for old in others[:max(len(others) - (self.keep - 1), 0)]:
                    shutil.rmtree(old)
        barrier()

    def _checkpoint_group(self):
        """Asynchronous DCP needs a CPU backend: a gloo group beside NCCL, made once."""
        if not dist.is_initialized():
            return None
        if self._cpu_group is None:
            self._cpu_group = dist.new_group(backend="gloo")
        return self._cpu_group


def _file_sums(paths) -> dict:
    return {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in paths}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _no_space(exc: BaseException) -> bool:
    """A full disk, however DCP wrapped it (its per-rank failures arrive as text)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    return "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc)


def _all_finite(state) -> bool:
    """Whether every floating-point tensor of a (nested) state dict is finite, on every rank."""
    flags = []

    def visit(value):
        if isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            local = value.to_local() if hasattr(value, "to_local") else value
            flags.append(torch.isfinite(local).all())

    visit(state)
    if not flags:
        return True
    finite = torch.stack([f.to(flags[0].device) for f in flags]).all().float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


# ----------------------------------------------------------------------------- loading


def _manifest(path: Path) -> dict | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        return manifest if isinstance(manifest.get("files"), dict) else None
    except (OSError, ValueError, AttributeError):
        return None


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's published checkpoints (a manifest written), oldest written first."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        manifest = _manifest(path) if _NAME.match(path.name) else None
        if manifest is not None:
            found.append((float(manifest.get("written", 0.0)), path.name, path))
    return [path for _, _, path in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint `latest` names; when that pointer is missing or names a checkpoint that is
    gone, the most recently written complete one; None when the run has none."""
    pointer = checkpoint_dir(run_dir) / "latest"
    named = pointer.parent / pointer.read_text().strip() if pointer.is_file() else None
    if named is not None and _NAME.match(named.name) and _manifest(named) is not None:
        return named
    complete = complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def verify_checkpoint(path: str | Path) -> None:
    """Every file of a checkpoint against the size and SHA-256 its save recorded; one line naming
    the first damaged file. With several ranks each hashes a share of the files."""
    path = Path(path)
    manifest = _manifest(path)
    if manifest is None and (path / "meta.pt").is_file():
        read_meta(path)  # a checkpoint of another format says so
    if manifest is None:
        what = "is not a checkpoint directory" if not path.is_dir() else (
            f"has no readable {MANIFEST}: it was not completely written, or by a version before format 4")
        raise CheckpointError(f"{path} {what}{_earlier_hint(path)}")
    names = sorted(manifest["files"])
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    damage = []
    for name in names[rank::world]:
        expected, file = manifest["files"][name], path / name
        if not file.is_file():
            damage.append(f"{name} is missing")
        elif file.stat().st_size != expected.get("bytes"):
            damage.append(f"{name} has {file.stat().st_size:,} bytes, not the {expected.get('bytes'):,} "
                          "it was saved with")
        elif _sha256(file) != expected.get("sha256"):
            damage.append(f"{name} differs from what was saved (SHA-256 mismatch)")
    if world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, damage)
        damage = [line for part in everyone for line in part]
    if damage:
        raise CheckpointError(f"checkpoint {path} is damaged: {damage[0]}{_earlier_hint(path)}")


def _earlier_hint(path: Path) -> str:
    others = [c for c in complete_checkpoints(path.parent.parent) if c.resolve() != path.resolve()]
    return f"; resume from another checkpoint, e.g. --resume {others[-1]}" if others else ""


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
        raise CheckpointError(f"checkpoint {path} could not be loaded: {_refusal(exc)}") from None


def load_train_state(path: str | Path, model, optimizer, extra: dict | None = None) -> dict | None:
    """Every rank calls this: model and optimizer (resharded to this world size), and `extra`
    state dicts of live tensors, filled in place; returns this rank's saved RNG state, or None
    when the checkpoint had fewer ranks."""
    path = Path(path)
    verify_checkpoint(path)
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
    verify_checkpoint(path)
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
