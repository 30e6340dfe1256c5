"""WordPiece: trained on the real plays, equal to Hugging Face's BertTokenizer on the same
vocab.txt, vocab.txt round-trips, and a vocabulary file in the wrong format is named."""

from __future__ import annotations

import pytest

from common.data import shakespeare
from common.data.wordpiece import SPECIAL_TOKENS, WordPieceTokenizer, read_vocab_file

SAMPLE = "If music be the food of love, play on; Give me excess of it, that, surfeiting,"


@pytest.fixture(scope="module")
def trained(tfds_dir):
    plays = shakespeare.load_plays("train[:6]", tfds_dir)
    return WordPieceTokenizer.train([p["text"] for p in plays], vocab_size=1500)


def test_trained_vocab_has_specials_first_and_continuations(trained):
    vocab = trained.vocab()
    assert tuple(vocab[:5]) == SPECIAL_TOKENS
    assert trained.special_ids == (0, 1, 2, 3, 4)
    assert 1000 < trained.vocab_size <= 1500
    assert any(t.startswith("##") for t in vocab)
    pieces = trained.tokens(SAMPLE)
    assert pieces[:4] == ["if", "music", "be", "the"]  # lower-cased, split on punctuation
    assert "," in pieces and ";" in pieces
    # The ## pieces glue back into their words (the decoder re-attaches "," but not ";").
    assert trained.decode(trained.encode(SAMPLE)) == SAMPLE.lower().replace(";", " ;")


def test_vocab_txt_round_trip_and_equals_hf_bert_tokenizer(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "vocab.txt"
    trained.save_vocab(path)
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[:5] == list(SPECIAL_TOKENS) and lines[-1] == ""
    loaded = WordPieceTokenizer.from_vocab_file(path)
    assert loaded.vocab() == trained.vocab()
    text = shakespeare.markdown_to_text(shakespeare.play_files()[-1][1].read_text())[:5000]
    assert loaded.encode(text) == trained.encode(text)
    assert "[UNK]" in loaded.tokens("\u2603 snowman")  # a character never seen
    reference = transformers.BertTokenizer(vocab=str(path), do_lower_case=True)
    assert reference(text, add_special_tokens=False)["input_ids"] == loaded.encode(text)
    # Special tokens in text keep their ids (never split into pieces).
    ids = loaded.encode("[CLS] o [MASK] [SEP]")
    assert ids[0] == 2 and ids[-2:] == [4, 3]


@pytest.mark.parametrize(
    "content, message",
    [
        ("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe 7\n", r"vocab\.txt:6 .*one token per line"),
        ('{"[PAD]": 0, "[UNK]": 1}\n', r":1 .*one token per line"),
        ("#version: 0.2\nt h\n", r":1 .*one token per line"),
        ("[PAD]\n[UNK]\n\n[CLS]\n", r":3 .*one token per line"),
        ("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nthe\n", r":7 repeats token 'the'"),
        ("[PAD]\n[UNK]\nthe\n", r"lacks the special token\(s\) \[CLS\], \[SEP\], \[MASK\]"),
        ("", "is empty"),
    ],
)
def test_wrong_vocab_format_is_named(tmp_path, content, message):
    path = tmp_path / "vocab.txt"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        WordPieceTokenizer.from_vocab_file(path)


def test_unreadable_vocab_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="No vocabulary file"):
        read_vocab_file(tmp_path / "missing.txt")
    path = tmp_path / "vocab.bin"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(ValueError, match="not a vocab.txt"):
        read_vocab_file(path)
    with pytest.raises(ValueError, match="exceed the 5 special tokens"):
        WordPieceTokenizer.train(["a b c"], vocab_size=5)
