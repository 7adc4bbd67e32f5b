"""Find a pretrained transformers model offline: a local directory, or a hub id in the HF cache.

Frozen towers (text encoder, REPA and DINO teachers) are never downloaded at run time, so a run
with a missing model stops at start with a message that says how to get it. Each caller raises
its own subclass of `PretrainedMissing` so train.py can name what is missing; catching the base
class catches them all.
"""

from __future__ import annotations

from pathlib import Path


class PretrainedMissing(RuntimeError):
    """A pretrained model that the config names is not on this machine."""


def resolve_pretrained(name: str, what: str, option: str,
                       error: type[PretrainedMissing] = PretrainedMissing) -> Path:
    """The local directory of `name`: itself if it is a directory, else its Hugging Face cache snapshot.

    what: how the message names the model ("REPA teacher"); option: the config field that picks
    it ("repa.teacher"). Raises `error` when the directory lacks a config.json or the hub id is not
    cached (the cache is $HF_HUB_CACHE, default ~/.cache/huggingface/hub; nothing is downloaded).
    """
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise error(f"{what} directory {path} has no config.json (a transformers save_pretrained "
                        f"directory is expected; set --set {option}=/path/to/dir)")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):  # ValueError: not a valid hub id either
        # `hf` is the CLI of huggingface_hub >= 1.0, `huggingface-cli` the one before it.
        raise error(
            f"{what} {name!r} not found in the Hugging Face cache or as a directory: on a machine "
            f"with network, download it with `hf download {name}` (`huggingface-cli download {name}` "
            "with huggingface_hub < 1.0; gated models need their licence accepted on the Hub first) "
            f"and copy ~/.cache/huggingface here, or set --set {option}=/path/to/dir"
        ) from None
