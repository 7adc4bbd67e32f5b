"""DALI decoding: encoded images -> uint8 (B, 3, H, W), with nvJPEG and the resize on the GPU.

The pipeline is fed one batch at a time (`feed_input`): the encoded bytes (read by DataLoader
workers), each sample's crop box in source pixels and the bucket's output size. It decodes
("mixed": Huffman on the CPU, the rest on the GPU; "cpu" for DALI's CPU backend), resizes the box
with the same linear antialiased filter as the Pillow path, and returns CHW uint8. Synchronous
feeding keeps the batch order trivially exact; at 160 img/s per GPU the decode is a few ms per
step, so the lost overlap costs little (measure with bench/bench_data.py).

`nvidia-dali-cuda120` is an optional dependency (a 425 MB wheel); without it the trainer decodes
with Pillow. DALI's CPU backend needs no GPU, so tests compare it with the Pillow path anywhere.
"""

from __future__ import annotations

import numpy as np
import torch


class DaliMissing(ImportError):
    pass


def _import_dali():
    try:
        from nvidia import dali  # noqa: F401
    except ImportError:
        raise DaliMissing("DALI is not installed: `pip install nvidia-dali-cuda120` (Linux x86_64), "
                          "or decode with Pillow: --set data.decoder=cpu") from None
    return dali


class DaliDecoder:
    """A DALI pipeline for batches of up to `batch_size` images; `device` None: DALI's CPU backend."""

    def __init__(self, batch_size: int, device: torch.device | None, threads: int = 4):
        dali = _import_dali()
        from nvidia.dali import fn, types

        self.device = device
        gpu = device is not None and device.type == "cuda"
        device_id = (device.index if device.index is not None else torch.cuda.current_device()) if gpu else None
        pipe = dali.Pipeline(batch_size=batch_size, num_threads=threads, device_id=device_id,
                             exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
        with pipe:
            encoded = fn.external_source(name="encoded", dtype=types.UINT8)
            roi_start = fn.external_source(name="roi_start", dtype=types.FLOAT)
            roi_end = fn.external_source(name="roi_end", dtype=types.FLOAT)
            size = fn.external_source(name="size", dtype=types.FLOAT)
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB)
            images = fn.resize(images, size=size, roi_start=roi_start, roi_end=roi_end,
                               interp_type=types.INTERP_LINEAR, antialias=True)
            pipe.set_outputs(fn.transpose(images, perm=[2, 0, 1]))
        pipe.build()
        self.pipe, self.gpu = pipe, gpu

    def decode(self, encoded: list[np.ndarray], boxes: list[tuple[float, float, float, float]],
               out_h: int, out_w: int) -> torch.Tensor:
        """Decode, crop box (x0, y0, x1, y1) in source pixels, resize to (out_h, out_w)."""
        self.pipe.feed_input("encoded", encoded)
        self.pipe.feed_input("roi_start", [np.array([b[1], b[0]], np.float32) for b in boxes])
        self.pipe.feed_input("roi_end", [np.array([b[3], b[2]], np.float32) for b in boxes])
        self.pipe.feed_input("size", [np.array([out_h, out_w], np.float32)] * len(boxes))
        (images,) = self.pipe.run()
        images = images.as_tensor()
        if not self.gpu:
            return torch.from_numpy(np.array(images))
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(images.shape(), dtype=torch.uint8, device=self.device)
        feed_ndarray(images, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out
