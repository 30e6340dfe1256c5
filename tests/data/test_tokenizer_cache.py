"""The run's tokenizer is trained once and read back from the workdir (same ids), a bad
tokenizer kind is refused naming the field, and a kept tokenizer trained with other settings
(another vocabulary size) is refused rather than silently read back."""

import json

import pytest

from common.config import ConfigError
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


def test_bpe_kept_for_another_vocab_size_is_refused(tmp_path):
    """A run killed before its first checkpoint, restarted with another vocabulary: today the
    old tokenizer is read back silently and the run ends with exit 0 and the wrong vocab."""
    load_or_train_bpe(tmp_path, [TEXT], 300)
    with pytest.raises(ConfigError, match=r"data\.vocab_size=280: .* trained with vocab_size=300"):
        load_or_train_bpe(tmp_path, lambda: pytest.fail("retrained"), 280)
    assert load_or_train_bpe(tmp_path, lambda: pytest.fail("retrained"), 300).vocab_size > 257


def test_bpe_without_a_record_is_compared_by_size(tmp_path):
    """A tokenizer kept before records existed: its size is all there is to compare."""
    tok = load_or_train_bpe(tmp_path, [TEXT], 300)
    record = tmp_path / "tokenizer.json.params.json"
    record.unlink()
    with pytest.raises(ConfigError, match=rf"data\.vocab_size=512: .* vocab_size={tok.vocab_size}"):
        load_or_train_bpe(tmp_path, [TEXT], 512)
    assert not record.exists()
    load_or_train_bpe(tmp_path, [TEXT], tok.vocab_size)  # the same size: accepted, recorded
    assert json.loads(record.read_text()) == {"kind": "bpe", "vocab_size": tok.vocab_size}


def test_wordpiece_kept_with_other_settings_is_refused(tmp_path):
    load_or_train_wordpiece(tmp_path, [TEXT], 120)
    with pytest.raises(ConfigError) as e:
        load_or_train_wordpiece(tmp_path, [TEXT], 150, lowercase=False)
    assert e.value.problems[:2] == [
        f"data.vocab_size=150: {tmp_path / 'vocab.txt'} was trained with vocab_size=120",
        f"data.lowercase=False: {tmp_path / 'vocab.txt'} was trained with lowercase=True",
    ]
