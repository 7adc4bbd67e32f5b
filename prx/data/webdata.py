"""Image-caption batches from webdataset shards: the trainer's data source for `--data`.

    batches = ShardBatches(cfg, patch_size, device, rank, world_size, log=print)
    batch = batches.next_batch()   # ImageBatch: uint8 (B, 3, H, W) on `device`, B captions

Every batch comes from one aspect bucket (`prx.data.buckets`); batch number k is a pure function
of (seed, k): which samples, their crops, and the stand-ins for bad samples. So a resumed run
continues exactly from the saved batch count, and a run on W ranks reads the same global batch
as a run on one (each rank decodes its slots r, r + W, ...).

Decoding: DALI on the GPU when available (`prx.data.dali`: nvJPEG, resize on the GPU), otherwise
DataLoader worker processes with Pillow. Both crop the same source box and resize it with a
linear antialiased filter, so they agree up to the JPEG decoders' rounding (tests check this).
Every image becomes 8-bit RGB by `prx.data.images.to_rgb8` (16-bit gray scaled, alpha over
white, palettes and CMYK converted); a batch holding an image that is not plain 8-bit gray or RGB
is decoded with Pillow even when DALI is on, as DALI would drop the alpha and its handling of
16-bit and CMYK files is not the same. A sample that fails to decode, or is over the pixel limit,
is replaced by another sample of its bucket, drawn from (seed, k, slot), and counted against its
shard.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from prx.config import caption_fields
from prx.data.buckets import BucketBatches, assign_buckets, bucket_sizes, crop_box, describe_buckets
from prx.data.images import DECODE_ERRORS, is_plain_rgb8, open_image, to_rgb8
from prx.data.shards import ShardError, ShardSet, split_shards
from prx.data.stream import BatchSource, ImageBatch
from prx.data.text_store import StoredText
from prx.rng import mix_seed

MAX_STAND_INS = 16  # attempts to find a decodable stand-in for a bad sample before giving up


def decode_image(data: bytes, out_h: int, out_w: int, offset=(0.5, 0.5), dct_scaling: bool = True
                 ) -> torch.Tensor:
    """Encoded image -> uint8 (3, out_h, out_w): crop the covering box, resize (bilinear, antialiased).
    Raises ImageTooLarge over the pixel limit (`prx.data.images`), OSError etc. on corrupt data."""
    with open_image(data) as im:
        width, height = im.size
        box = crop_box(width, height, out_h, out_w, offset)
        # JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale when the box is still at least the
        # output size (decoding 1024 px sources for 512 px training is then much cheaper).
        scale = dct_scaling and im.draft("RGB", (max(1, round(width * out_w / (box[2] - box[0]))),
                                                 max(1, round(height * out_h / (box[3] - box[1])))))
        if scale:
            factor = im.size[0] / width
            box = tuple(v * factor for v in box)
        rgb = to_rgb8(im).resize((out_w, out_h), Image.Resampling.BILINEAR, box=box)
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)


class _CountFrom(Sampler):
    """Batch numbers start, start + 1, ... (the loader asks for batches by number)."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        return itertools.count(self.start)


class BatchReader(Dataset):
    """Batch number -> this rank's samples (read, and decoded on the CPU unless `encoded_only`)."""

    def __init__(self, shards: ShardSet, order: BucketBatches, sizes, seed: int, random_crop: bool,
                 caption_key: str, encoded_only: bool = False, stored: StoredText | None = None):
        self.shards, self.order, self.sizes, self.seed = shards, order, sizes, seed
        self.random_crop, self.encoded_only = random_crop, encoded_only
        self.fields = caption_fields(caption_key)  # [(field, probability)]
        self.stored = stored  # the shards' caption embeddings, read with the captions

    def offset(self, number: int, slot: int) -> tuple[float, float]:
        if not self.random_crop:
            return 0.5, 0.5
        g = torch.Generator().manual_seed(mix_seed(self.seed, number, slot, 0xC409))  # 0xC409: crop
        u, v = torch.rand(2, generator=g).tolist()
        return u, v

    def caption_field(self, number: int, slot: int) -> str:
        """The caption field this slot of batch `number` reads: drawn by weight, keyed like the crop."""
        if len(self.fields) == 1:
            return self.fields[0][0]
        g = torch.Generator().manual_seed(mix_seed(self.seed, number, slot, 0xCA97))  # 0xCA97: caption
        u, total = torch.rand(1, generator=g).item(), 0.0
        for name, probability in self.fields:
            total += probability
            if u < total:
                return name
        return self.fields[-1][0]  # u within rounding of 1

    def stand_in(self, bucket: int, number: int, slot: int, attempt: int) -> int:
        members = self.order.bucket_members(bucket)
        g = torch.Generator().manual_seed(mix_seed(self.seed, number, slot, attempt, 0xBAD))
        return int(members[torch.randint(len(members), (1,), generator=g)])

    def __getitem__(self, number: int) -> dict:
        item, needs_pillow = self.read_batch(number, self.encoded_only)
        if needs_pillow:  # DALI would decode one of its images differently (alpha, 16 bits, CMYK...)
            item, _ = self.read_batch(number, encoded_only=False)
        return item

    def read_batch(self, number: int, encoded_only: bool) -> tuple[dict, bool]:
        """(batch, whether one of its images needs Pillow): decoded images, or with `encoded_only`
        the bytes and crop boxes for DALI."""
        bucket, indices = self.order.batch(number)
        out_h, out_w = self.sizes[bucket]
        images, captions, texts, encoded, boxes, bad = [], [], [], [], [], []
        needs_pillow = False
        for i, slot in zip(indices, self.order.slots):
            offset, field = self.offset(number, slot), self.caption_field(number, slot)
            for attempt in range(MAX_STAND_INS + 1):
                try:
                    data, caption = self.shards.read(i, field)
                    if encoded_only:
                        with open_image(data) as im:  # the header only: bad ones get a stand-in here too
                            needs_pillow = needs_pillow or not is_plain_rgb8(im)
                        row = self.shards.rows[i]
                        boxes.append(crop_box(int(row["width"]), int(row["height"]), out_h, out_w, offset))
                        encoded.append(data)  # bytes: DataLoader's conversion leaves them alone
                    else:
                        images.append(decode_image(data, out_h, out_w, offset))
                    captions.append(caption)
                    if self.stored is not None:
                        texts.append(self.stored.read(i, field))
                    break
                except DECODE_ERRORS as err:
                    bad.append((int(self.shards.shard_of[i]), f"{type(err).__name__}: {err}"))
                    i = self.stand_in(bucket, number, slot, attempt)
            else:
                raise ShardError(f"batch {number}: no decodable image in {MAX_STAND_INS} tries in bucket "
                                 f"{out_h}x{out_w}; last shard tried {self.shards.shard_name(i)}")
        result = {"number": number, "bucket": bucket, "indices": indices, "captions": captions, "bad": bad,
                  "text": texts if self.stored is not None else None}
        if encoded_only:
            result.update(encoded=encoded, boxes=boxes)
        else:
            result["images"] = torch.stack(images)
        return result, needs_pillow

    def __len__(self) -> int:  # the stream is endless; DataLoader never asks (sampler-driven)
        raise TypeError("BatchReader is indexed by batch number without end")


class ShardBatches(BatchSource):
    """The trainer's view of webdataset shards: aspect-bucketed batches (Pillow workers or DALI)."""

    def __init__(self, cfg, patch_size: int, device: torch.device, seed: int, batch_size: int,
                 rank: int = 0, world_size: int = 1, log=print, progress=None, shards: ShardSet | None = None,
                 stored: StoredText | None = None):
        d = cfg
        self.device, self.log = device, log
        self.shards = shards or ShardSet(split_shards(d.path, d.val_path, d.val_shards)[0], d.max_bad_fraction,
                                         progress)
        self.sizes = bucket_sizes(d.resolution, patch_size, square=d.buckets == "square")
        buckets = assign_buckets(self.shards.aspects, self.sizes)
        self.order = BucketBatches(buckets, len(self.sizes), batch_size, seed, rank, world_size)
        if self.order.batches_per_epoch == 0:
            raise ShardError(f"no aspect bucket holds a full global batch of {batch_size} among the "
                             f"{len(self.shards)} samples of --data {d.path}; lower --batch-size or "
                             "use --set data.buckets=square")
        self.decoder = pick_decoder(d.decoder, device)
        self.reader = BatchReader(self.shards, self.order, self.sizes, seed, d.crop == "random",
                                  d.caption_key, encoded_only=self.decoder != "cpu", stored=stored)
        self.workers = d.workers
        self.seen, self.bad = Counter(), Counter()  # per shard id, decode time
        self._batches = None
        self._dali = None
        log(f"data: {len(self.shards.shards)} shard(s), {len(self.shards):,} samples; skipped while "
            f"indexing: {self.shards.bad_summary()}; decoder {self.decoder}; "
            + describe_buckets(self.sizes, self.order, patch_size))

    def prompts(self, count: int, caption_key: str = "caption") -> list[str]:
        """Fixed evaluation prompts: the captions of the first `count` samples with one."""
        return [caption for _, caption in self.prompt_samples(count, caption_key)]

    def prompt_samples(self, count: int, caption_key: str = "caption") -> list[tuple[int, str]]:
        """(sample index, caption) of the first `count` samples with a caption."""
        found = []
        for i in range(len(self.shards)):
            caption = self.shards.read(i, caption_key)[1]
            if caption:
                found.append((i, caption))
            if len(found) == count:
                break
        return found

    def load_state_dict(self, state: dict) -> None:
        if self._batches is not None:
            raise RuntimeError("load the data position before the first batch")
        super().load_state_dict(state)

    def _start(self):
        workers = self.workers
        loader = DataLoader(self.reader, batch_size=None, sampler=_CountFrom(self.order.position),
                            num_workers=workers, prefetch_factor=4 if workers else None,
                            pin_memory=self.device.type == "cuda" and self.decoder == "cpu")
        return iter(loader)

    def next_batch(self) -> ImageBatch:
        if self._batches is None:
            self._batches = self._start()
        item = next(self._batches)
        assert item["number"] == self.order.position, "batches arrived out of order"
        if "images" not in item:  # DALI's batch (the reader decoded it with Pillow when it had to)
            item = self._decode_with_dali(item)
        self._count(item)
        self.order.position += 1
        return ImageBatch(item["images"].to(self.device, non_blocking=True), item["captions"], text=item["text"])

    def _decode_with_dali(self, item: dict) -> dict:
        from prx.data.dali import DaliDecoder

        if self._dali is None:
            self._dali = DaliDecoder(len(self.slots), self.device if self.decoder == "dali" else None)
        out_h, out_w = self.sizes[item["bucket"]]
        try:
            encoded = [np.frombuffer(data, np.uint8) for data in item["encoded"]]
            item["images"] = self._dali.decode(encoded, item["boxes"], out_h, out_w)
            return item
        except RuntimeError as err:  # DALI stops the whole batch at one bad image: redo it on the CPU
            self.log(f"data: DALI failed on batch {item['number']} ({str(err).splitlines()[0][:200]}); "
                     "decoding it with Pillow")
            self._dali = None  # rebuild: a pipeline that raised is not reused
            return self.reader.read_batch(item["number"], encoded_only=False)[0]

    def _count(self, item: dict) -> None:
        for i in item["indices"]:
            self.seen[int(self.shards.shard_of[i])] += 1
        for shard_id, reason in item["bad"]:
            self.bad[shard_id] += 1
            self.log(f"data: skipped a bad sample in {self.shards.shards[shard_id]} ({reason[:200]}); "
                     f"{self.bad[shard_id]} bad of {self.seen[shard_id]} read from it")
            self.shards.check_bad(shard_id, self.bad[shard_id], self.seen[shard_id], "decoding")

    def close(self) -> None:
        self._batches = None  # DataLoader workers exit when their iterator is collected


def pick_decoder(choice: str, device: torch.device) -> str:
    """'cpu', 'dali' (GPU) or 'dali-cpu' (DALI's CPU backend, for tests and benchmarks)."""
    if choice == "auto":
        if device.type != "cuda":
            return "cpu"
        try:
            import nvidia.dali  # noqa: F401
        except ImportError:
            return "cpu"
        return "dali"
    if choice == "dali" and device.type != "cuda":
        raise ShardError("data.decoder=dali needs a CUDA device; use auto, cpu or dali-cpu")
    return choice
