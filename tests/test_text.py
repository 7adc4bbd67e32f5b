"""The text tower loads offline, pads and masks, precomputes exactly; missing encoders fail clearly."""

import shutil

import pytest
import torch

from prx.config import TextConfig, tiny
from prx.text import (
    MINILM_PACKAGE,
    CaptionTable,
    TextEncoderMissing,
    TextTower,
    clean_prompt,
    pad_text,
    resolve_encoder_path,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def minilm():
    return TextTower(tiny().text, CPU)


def test_minilm_loads_offline_and_encodes(minilm):
    assert minilm.hidden_size == tiny().model.text_dim == 384
    seqs = minilm.encode(["a red circle", "a small blue square in the top right corner"])
    assert seqs[0].shape[1] == 384 and seqs[0].shape[0] < seqs[1].shape[0]
    text, mask = minilm(["a red circle", "a small blue square in the top right corner"])
    assert text.shape[1] % tiny().text.pad_to_multiple == 0
    assert mask.sum(1).tolist() == [seqs[0].shape[0], seqs[1].shape[0]]
    assert torch.equal(text[0, : seqs[0].shape[0]], seqs[0])
    assert torch.count_nonzero(text[0, seqs[0].shape[0]:]) == 0
    # real encoder, real meaning: a caption is closer to its paraphrase than to another scene
    a, b, c = (minilm.encode([s])[0].mean(0) for s in ("a red circle", "a circle that is red",
                                                       "two green triangles at the bottom"))
    cos = torch.nn.functional.cosine_similarity
    assert cos(a, b, dim=0) > cos(a, c, dim=0)


def test_empty_caption_is_cached(minilm):
    first = minilm.empty()
    assert first is minilm.empty()
    assert first.shape == (2, 384)  # [CLS] [SEP]


def test_caption_table_equals_direct_encoding(minilm):
    captions = [f"a shape number {i} " + "very " * (i % 7) + "small" for i in range(300)]
    table = CaptionTable(minilm, captions)
    assert len(table) == 300
    again = CaptionTable(minilm, captions)
    for i in (0, 17, 255, 256, 299):
        assert torch.equal(table[i], again[i])  # deterministic: chunks are fixed
        torch.testing.assert_close(table[i], minilm.encode([captions[i]])[0], rtol=1e-4, atol=1e-4)


def test_sorted_chunks_give_each_caption_what_one_call_gives(minilm):
    """Sorted by length and encoded 3 to a call, each caption's embedding is the one it gets in a
    single padded call (to fp32 rounding: the padding is masked out), in the order given."""
    captions = ["a red circle", "", "a small blue square in the top right corner of the picture", "two dots",
                "a green triangle below a yellow star", "a red circle", "one"]
    whole = minilm.encode(captions, chunk=0)
    sorted_chunks = minilm.encode(captions, chunk=3)
    assert [s.shape for s in sorted_chunks] == [s.shape for s in whole]
    for got, want, caption in zip(sorted_chunks, whole, captions):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=caption)
        torch.testing.assert_close(got, minilm.encode([caption])[0], rtol=1e-5, atol=1e-5, msg=caption)
    assert torch.equal(sorted_chunks[0], sorted_chunks[5])  # the same caption, the same chunk shape
    assert not torch.allclose(whole[0][:2], whole[3][:2])  # not every caption the same


# Web captions as they come: mojibake (UTF-8 read as Latin-1), entities escaped once and twice,
# stray whitespace, and ones that need nothing.
DIRTY = ["  cafÃ© &amp;amp; bar\n", "Fish &amp; chips", "&lt;b&gt;bold&lt;/b&gt;", "donâ€™t stop", "\tplain text ",
         "a red circle on the left", "", "&#39;quoted&#39; &quot;twice&quot;"]


def test_cleaning_is_the_one_diffusers_prx_pixel_pipeline_applies():
    pixel = pytest.importorskip("diffusers.pipelines.prx.pipeline_prx_pixel")
    assert [clean_prompt(c) for c in DIRTY] == [pixel._basic_clean(c) for c in DIRTY]
    assert clean_prompt(DIRTY[0]) == "café & bar" and clean_prompt(DIRTY[3]) == "don't stop"


def test_every_road_to_the_encoder_cleans(minilm):
    """Training (the caption table, the per-batch encoding) and sampling all call `encode`: a dirty
    caption gives its clean form's embedding, so an exported model meets at inference what it
    was trained on."""
    cleaned = [clean_prompt(c) for c in DIRTY]
    assert cleaned != DIRTY
    direct, clean = minilm.encode(DIRTY), minilm.encode(cleaned)
    table = CaptionTable(minilm, DIRTY)
    for i, (a, b) in enumerate(zip(direct, clean)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(table[i], b, rtol=1e-5, atol=1e-6)


def test_pad_text_rounds_up():
    emb, mask = pad_text([torch.ones(3, 4), torch.ones(5, 4)], multiple=8)
    assert emb.shape == (2, 8, 4) and mask.sum(1).tolist() == [3, 5]


def test_t5gemma_checkpoint_loads_encoder_only(tmp_path):
    """A random T5Gemma encoder-decoder saved as the real checkpoint is (transformers format)."""
    from transformers import T5GemmaConfig, T5GemmaForConditionalGeneration

    module = dict(vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    config = T5GemmaConfig(encoder=module, decoder=module, vocab_size=30522)
    full = T5GemmaForConditionalGeneration(config)
    full.save_pretrained(tmp_path)
    for f in resolve_encoder_path(MINILM_PACKAGE).iterdir():  # any real tokenizer will do
        if f.name.startswith(("tokenizer", "vocab", "special_tokens")):
            shutil.copy(f, tmp_path / f.name)
    tower = TextTower(TextConfig(encoder=str(tmp_path), max_tokens=16), CPU)
    assert tower.hidden_size == 32
    text, mask = tower(["a red circle", "a much longer caption with many more words in it"])
    assert text.shape[2] == 32 and mask.shape == text.shape[:2]
    assert not any(p.requires_grad for p in tower.model.parameters())
    # the encoder's weights are the saved ones, not a fresh initialisation
    saved = full.model.encoder.layers[0].self_attn.q_proj.weight
    loaded = tower.model.encoder.layers[0].self_attn.q_proj.weight
    assert torch.equal(saved, loaded)


def test_missing_encoder_says_how_to_get_it(tmp_path):
    with pytest.raises(TextEncoderMissing, match="huggingface-cli download google/t5gemma-2b-2b-ul2"):
        resolve_encoder_path("google/t5gemma-2b-2b-ul2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TextEncoderMissing, match="no config.json"):
        resolve_encoder_path(str(tmp_path / "empty"))
