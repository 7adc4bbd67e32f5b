"""A tiny random text encoder in the transformers format (BERT, 32 wide, 2 layers) with a word-level
vocabulary of the shapes captions, for runs where the tiny preset's MiniLM package is not
installed: a bare GPU machine has no room to carry its 90 MB."""

from pathlib import Path

import torch

from prx.data.shapes import make_scene

WIDTH = 32
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def save_tiny_text_encoder(path: Path, seed: int = 0) -> Path:
    """Write the encoder and its tokenizer to `path` (for --set text.encoder=PATH); returns path."""
    from transformers import BertConfig, BertModel, BertTokenizer

    path.mkdir(parents=True, exist_ok=True)
    captions = [make_scene(seed, i).caption.lower() for i in range(500)]
    words = sorted({w.strip(",.") for c in captions for w in c.split()} - {""})
    (path / "vocab.txt").write_text("\n".join(SPECIAL + words) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)  # positional: transformers 4 and 5
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(SPECIAL) + len(words), hidden_size=WIDTH, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=2 * WIDTH, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)
    return path
