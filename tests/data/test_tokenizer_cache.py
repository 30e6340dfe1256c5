"""The run's tokenizer is trained once and read back from the workdir (same ids), and a bad
tokenizer kind is refused naming the field."""

import pytest

from common.data.bpe import load_or_train_bpe
from common.data.wordpiece import load_or_train_wordpiece

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind " * 20


def test_bpe_is_trained_once_then_loaded(tmp_path):
    calls = []

    def texts():
        calls.append(1)
        return [TEXT]

    a = load_or_train_bpe(tmp_path, texts, 300)
    assert (tmp_path / "tokenizer.json").is_file() and calls == [1]
    b = load_or_train_bpe(tmp_path, texts, 300)
    assert calls == [1]  # loaded, not retrained
    assert a.encode(TEXT) == b.encode(TEXT) and b.vocab_size == a.vocab_size
    with pytest.raises(ValueError, match="data.tokenizer='sentencepiece'"):
        load_or_train_bpe(tmp_path, texts, 300, kind="sentencepiece")


def test_wordpiece_is_trained_once_then_loaded(tmp_path):
    a = load_or_train_wordpiece(tmp_path, [TEXT], 120)
    assert (tmp_path / "vocab.txt").is_file()
    b = load_or_train_wordpiece(tmp_path, lambda: pytest.fail("retrained"), 120)
    assert a.encode(TEXT) == b.encode(TEXT)
