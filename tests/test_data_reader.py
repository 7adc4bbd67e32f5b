"""Webdataset shards: indexing, bad input, buckets, deterministic and resumable batches."""

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prx.config import DataConfig
from prx.data.buckets import BucketBatches, assign_buckets, bucket_sizes, crop_box
from prx.data.shards import ShardError, ShardSet, expand_braces, find_shards, load_index, scan_shard
from prx.data.webdata import ShardBatches, decode_image

SIZES = [(48, 64), (64, 48), (40, 40), (30, 60), (64, 32), (50, 50)]  # (height, width)


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """Low-frequency color noise: JPEG-friendly like photos, and every sample differs."""
    small = np.random.default_rng(seed).integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC))


def encode(array: np.ndarray, fmt: str = "JPEG") -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return out.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def make_shards(folder: Path, shards: int = 3, per_shard: int = 16, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        members = []
        for k in range(per_shard):
            n = s * per_shard + k
            h, w = SIZES[n % len(SIZES)]
            ext, fmt = [("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP")][n % 3]
            members.append((f"{n:06d}.{ext}", encode(smooth_image(h, w, seed + n), fmt)))
            members.append((f"{n:06d}.txt", f"caption {n}".encode()))
        paths.append(write_tar(folder / f"part-{s:03d}.tar", members))
    return paths


def data_config(path, **kw) -> DataConfig:
    return DataConfig(**{"source": "webdataset", "path": str(path), "resolution": 32, "workers": 0, **kw})


def test_brace_patterns_and_folders(tmp_path):
    assert expand_braces("a-{08..10}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]
    paths = make_shards(tmp_path / "d", shards=3, per_shard=2)
    assert find_shards(str(tmp_path / "d")) == paths
    assert find_shards(str(tmp_path / "d" / "part-{000..001}.tar")) == paths[:2]
    with pytest.raises(ShardError, match="does not exist"):
        find_shards(str(tmp_path / "d" / "part-{000..004}.tar"))


def test_index_reads_back_every_sample(tmp_path):
    paths = make_shards(tmp_path, shards=2, per_shard=5)
    shards = ShardSet(paths)
    assert len(shards) == 10
    for i in range(10):
        data, caption = shards.read(i)
        assert caption == f"caption {i}"
        h, w = SIZES[i % len(SIZES)]
        assert Image.open(io.BytesIO(data)).size == (w, h) == (shards.rows[i]["width"], shards.rows[i]["height"])
    # The saved index is used the second time, and rebuilt when the tar changes size.
    assert (tmp_path / "part-000.index.npz").exists()
    rows, _ = load_index(paths[0])
    assert np.array_equal(rows, scan_shard(paths[0])[0])


def test_bad_input_is_skipped_and_counted(tmp_path):
    good = encode(smooth_image(40, 40, 1))
    members = [("a.jpg", good), ("a.txt", b"fine"),
               ("b.jpg", good),                                  # no caption
               ("c.txt", b"no image"),                           # no image
               ("d.jpg", b"not an image at all"), ("d.txt", b"x"),  # corrupt header
               ("e.png", encode(smooth_image(40, 40, 2), "PNG")), ("e.json", b'{"caption": "from json"}'),
               ("f.jpg", good), ("f.txt", b"last")]
    path = write_tar(tmp_path / "bad.tar", members)
    rows, report = scan_shard(path)
    assert len(rows) == 3
    assert dict(report.bad) == {"image without caption": 1, "caption without image": 1, "corrupt image": 1}
    shards = ShardSet([path], max_bad_fraction=0.9)
    assert [shards.read(i)[1] for i in range(3)] == ["fine", "from json", "last"]

    # A tar cut in the middle of a member: the samples before the cut stay readable.
    data = path.read_bytes()
    cut = write_tar(tmp_path / "cut.tar", [])
    cut.write_bytes(data[: data.index(b"last") - 700])
    rows, report = scan_shard(cut)
    assert report.bad["truncated tar"] == 1 and 1 <= len(rows) <= 2
    # An empty shard and a file that is not a tar are counted, not fatal.
    empty = write_tar(tmp_path / "empty.tar", [])
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x01" * 1500)
    assert scan_shard(empty)[0].size == 0 and scan_shard(junk)[1].bad_total == 1
    assert len(ShardSet([path, empty, cut], max_bad_fraction=0.9)) >= 4
    # Above the limit, the error names the shard.
    with pytest.raises(ShardError, match="bad.tar: 3 of 6 samples are bad"):
        ShardSet([path], max_bad_fraction=0.2)


def test_buckets_cover_the_token_budget():
    for resolution, count in ((512, 11), (1024, 19)):
        sizes = bucket_sizes(resolution, 32)
        assert len(sizes) == count
        tokens = [h * w // 32**2 for h, w in sizes]
        budget = (resolution // 32) ** 2
        assert all(0.94 * budget <= t <= budget for t in tokens), tokens
        assert all(h % 32 == 0 and w % 32 == 0 for h, w in sizes)
        aspects = [w / h for h, w in sizes]
        assert min(aspects) <= 0.53 and max(aspects) >= 1.9 and aspects == sorted(aspects)
        # Every aspect in [0.5, 2] finds a bucket within 10 % of its own aspect.
        probe = np.exp(np.linspace(np.log(0.5), np.log(2), 200))
        nearest = np.array(aspects)[assign_buckets(probe, sizes)]
        assert np.all(np.abs(np.log(nearest / probe)) < np.log(1.1))
    assert bucket_sizes(512, 32, square=True) == [(512, 512)]


def test_crop_box_covers_and_centers():
    x0, y0, x1, y1 = crop_box(200, 100, 50, 50)  # wide source, square output: crop the sides
    assert (x0, y0, x1, y1) == (50.0, 0.0, 150.0, 100.0)
    for width, height in ((1120, 928), (752, 1392), (768, 1376), (333, 777)):  # float edge cases
        for out in ((512, 512), (352, 704), (40, 24)):
            for offset in ((0.0, 0.0), (0.5, 0.5), (1.0, 1.0)):
                x0, y0, x1, y1 = crop_box(width, height, *out, offset)
                assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
                assert abs((x1 - x0) / (y1 - y0) - out[1] / out[0]) < 1e-9
    image = decode_image(encode(smooth_image(100, 200, 3), "PNG"), 24, 40, (0.0, 0.5))
    assert image.shape == (3, 24, 40) and image.dtype == torch.uint8


def test_batches_are_one_bucket_deterministic_and_split_by_rank():
    aspects = np.array([w / h for h, w in SIZES] * 20)
    sizes = bucket_sizes(32, 4)
    buckets = assign_buckets(aspects, sizes)
    one = BucketBatches(buckets, len(sizes), 8, seed=3)
    again = BucketBatches(buckets, len(sizes), 8, seed=3)
    ranks = [BucketBatches(buckets, len(sizes), 8, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = []
    for k in range(2 * one.batches_per_epoch):
        bucket, indices = one.batch(k)
        assert len(set(buckets[indices])) == 1 and buckets[indices[0]] == bucket
        assert again.batch(k) == (bucket, indices)
        halves = [r.batch(k) for r in ranks]
        assert halves[0][1] + halves[1][1] != indices and sorted(halves[0][1] + halves[1][1]) == sorted(indices)
        assert indices[0::2] == halves[0][1] and halves[0][0] == halves[1][0] == bucket
        seen.append(indices)
    first_epoch = sum(seen[: one.batches_per_epoch], [])
    assert len(set(first_epoch)) == len(first_epoch)  # no sample twice in an epoch
    assert seen[: one.batches_per_epoch] != seen[one.batches_per_epoch:]  # epochs differ
    assert BucketBatches(buckets, len(sizes), 8, seed=4).batch(0) != one.batch(0)


def test_loader_resumes_exactly_with_workers(tmp_path):
    make_shards(tmp_path, shards=3, per_shard=16)
    cpu = torch.device("cpu")
    cfg = data_config(tmp_path, crop="random", workers=2)
    straight = ShardBatches(cfg, 4, cpu, seed=5, batch_size=4, log=lambda m: None)
    batches = [straight.next_batch() for _ in range(6)]
    assert len({b.images.shape for b in batches}) > 1  # several buckets take turns
    resumed = ShardBatches(data_config(tmp_path, crop="random"), 4, cpu, seed=5, batch_size=4, log=lambda m: None)
    resumed.load_state_dict({**straight.state_dict(), "batches": 3})
    for b, r in zip(batches[3:], (resumed.next_batch() for _ in range(3))):
        assert torch.equal(b.images, r.images) and b.captions == r.captions
    assert straight.state_dict()["batches"] == 6
    with pytest.raises(ValueError, match="resume with the same --data"):
        ShardBatches(cfg, 4, cpu, seed=6, batch_size=4, log=lambda m: None).load_state_dict(straight.state_dict())
    straight.close()


def test_corrupt_image_in_a_batch_gets_a_stand_in_then_the_shard_is_named(tmp_path):
    good = [encode(smooth_image(96, 96, n)) for n in range(8)]
    truncated = good[0][: len(good[0]) * 3 // 4]  # the header parses, the decode fails
    members = []
    for n in range(8):
        members += [(f"{n}.jpg", truncated if n < 2 else good[n]), (f"{n}.txt", f"c{n}".encode())]
    write_tar(tmp_path / "s.tar", members)
    logs = []
    batches = ShardBatches(data_config(tmp_path, max_bad_fraction=0.5), 4, torch.device("cpu"), seed=0,
                           batch_size=4, log=logs.append)
    for _ in range(2):  # one epoch: both truncated images come up once
        batch = batches.next_batch()
        assert batch.images.shape == (4, 3, 32, 32) and not any(c in ("c0", "c1") for c in batch.captions)
    assert sum(batches.bad.values()) >= 2 and any("skipped a bad sample" in m for m in logs)
    strict = ShardBatches(data_config(tmp_path, max_bad_fraction=0.0), 4, torch.device("cpu"), seed=0,
                          batch_size=4, log=lambda m: None)
    with pytest.raises(ShardError, match=r"s\.tar: \d+ of \d+ samples are bad while decoding"):
        for _ in range(8):
            strict.next_batch()
