"""prepare -> read round trip from each source kind; bad input counted; a crashed run resumes."""

import json

import pytest

from prx.data import prepare
from prx.data.shards import ShardSet, find_shards
from tests.test_data_reader import encode, smooth_image


def image_folder(root, count=12):
    root.mkdir()
    for n in range(count):
        (root / f"img{n:02d}.png").write_bytes(encode(smooth_image(40 + 8 * (n % 3), 48, n), "PNG"))
        if n == 3:
            continue  # no caption
        if n % 2:
            (root / f"img{n:02d}.txt").write_text(f"caption {n}\n")
        else:
            (root / f"img{n:02d}.json").write_text(json.dumps({"caption": f"caption {n}"}))
    (root / "img99.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")  # corrupt
    (root / "img99.txt").write_text("caption of a broken file")
    return root


def run(source, out, *extra):
    return prepare.main([str(source), str(out), "--workers", "1", "--quiet", *extra])


def read_all(out):
    shards = ShardSet(find_shards(str(out)))
    return [shards.read(i) for i in range(len(shards))]


def test_folder_round_trip_and_bad_input_summary(tmp_path, capsys):
    source = image_folder(tmp_path / "images")
    assert run(source, tmp_path / "out", "--shard-size", "8KB") == 0
    summary = json.loads((tmp_path / "out" / "prepare_summary.json").read_text())
    assert summary["samples"] == 11 and summary["skipped"] == {"image without caption": 1, "corrupt image": 1}
    assert summary["shards"] >= 3  # 8 KB shards hold a few images each
    samples = read_all(tmp_path / "out")
    assert [c for _, c in samples] == [f"caption {n}" for n in range(12) if n != 3]
    # Image bytes are kept as they were (PNG in, PNG out): decoded pixels are identical.
    import io

    import numpy as np
    from PIL import Image

    first = np.asarray(Image.open(io.BytesIO(samples[0][0])))
    assert np.array_equal(first, smooth_image(40, 48, 0))
    assert "skipped: 1 corrupt image, 1 image without caption" in capsys.readouterr().out


def test_jsonl_csv_and_max_side(tmp_path):
    source = image_folder(tmp_path / "images", count=4)
    rows = [{"image": f"images/img{n:02d}.png", "caption": f"row {n}"} for n in range(4)]
    (tmp_path / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "list.csv").write_text("image,caption\n" + "".join(f"{r['image']},{r['caption']}\n" for r in rows))
    for name in ("list.jsonl", "list.csv"):
        out = tmp_path / f"out_{name}"
        assert run(tmp_path / name, out, "--max-side", "24") == 0
        samples = read_all(out)
        assert [c for _, c in samples] == [f"row {n}" for n in range(4)]
        import io

        from PIL import Image

        assert all(max(Image.open(io.BytesIO(b)).size) == 24 for b, _ in samples)
    assert source.exists()
    (tmp_path / "bad.jsonl").write_text(json.dumps({"path": "x.png", "caption": "c"}) + "\n")
    assert run(tmp_path / "bad.jsonl", tmp_path / "out_bad") == 2  # names the missing column


def test_parquet_with_image_bytes(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="pyarrow is optional (pip install pyarrow)")
    import pyarrow.parquet as pq

    images = [{"bytes": encode(smooth_image(32, 32, n)), "path": None} for n in range(5)]
    images[2] = {"bytes": b"garbage", "path": None}
    table = pa.table({"image": images, "caption": [f"p{n}" for n in range(5)]})
    pq.write_table(table, tmp_path / "data.parquet")
    assert run(tmp_path / "data.parquet", tmp_path / "out") == 0
    assert [c for _, c in read_all(tmp_path / "out")] == ["p0", "p1", "p3", "p4"]


def test_a_crashed_prepare_resumes_to_the_same_shards(tmp_path, monkeypatch):
    source = image_folder(tmp_path / "images", count=16)
    assert run(source, tmp_path / "straight", "--shard-size", "6KB") == 0
    closed = []
    original = prepare.ShardWriter.close

    def crash_after_two_shards(self):
        if len(closed) == 2:
            raise KeyboardInterrupt  # as if the machine went away mid-shard
        closed.append(self.number)
        original(self)

    monkeypatch.setattr(prepare.ShardWriter, "close", crash_after_two_shards)
    assert run(source, tmp_path / "resumed", "--shard-size", "6KB") == 130  # one line, no traceback
    assert not list((tmp_path / "resumed").glob("*.tmp"))  # the shard in progress was dropped
    assert len(list((tmp_path / "resumed").glob("*.tar"))) == 2
    monkeypatch.setattr(prepare.ShardWriter, "close", original)
    assert run(source, tmp_path / "resumed", "--shard-size", "6KB") == 0
    straight = sorted((tmp_path / "straight").glob("*.tar"))
    resumed = sorted((tmp_path / "resumed").glob("*.tar"))
    assert [p.name for p in straight] == [p.name for p in resumed] and len(straight) > 2
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(straight, resumed))
    assert not list((tmp_path / "resumed").glob("*.tmp"))


def test_text_encoder_stores_the_caption_embeddings_too(tmp_path, capsys):
    from prx.data.text_store import StoredText, TextIdentity
    from prx.text import MINILM_PACKAGE

    source = image_folder(tmp_path / "images", count=6)
    assert run(source, tmp_path / "out", "--shard-size", "8KB", "--text-encoder", MINILM_PACKAGE,
               "--max-tokens", "32") == 0
    out = capsys.readouterr().out
    shards = find_shards(str(tmp_path / "out"))
    assert f"{len(shards)} shard(s) embedded, 0 already current; 5 captions" in out
    stored = StoredText(ShardSet(shards), TextIdentity(MINILM_PACKAGE, 32), ["caption"])
    import torch

    from prx.config import TextConfig
    from prx.text import TextTower

    want = TextTower(TextConfig(encoder=MINILM_PACKAGE, max_tokens=32), torch.device("cpu")).encode(["caption 5"])[0]
    torch.testing.assert_close(stored.read(4, "caption"), want, rtol=8e-3, atol=1e-6)  # sample 4 is img05; bf16
    assert run(source, tmp_path / "other", "--text-encoder", MINILM_PACKAGE, "--max-tokens", "0") == 2
    assert "--max-tokens 0" in capsys.readouterr().err
