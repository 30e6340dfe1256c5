"""WordPiece tokenization as BERT does it (Devlin et al. 2019, section 3; Wu et al. 2016).

Text is normalised (optionally lower-cased, accents stripped, as ``bert-base-uncased``),
split on whitespace and punctuation, and each word is cut greedily into the longest
vocabulary pieces from the left, continuation pieces carrying a ``##`` prefix; a word with
no segmentation becomes ``[UNK]``. Built on Hugging Face ``tokenizers``, whose BERT
normaliser / pre-tokenizer / WordPiece model implement exactly this.

``WordPieceTokenizer.train`` learns a vocabulary from text (special tokens first:
``[PAD]`` 0, ``[UNK]`` 1, ``[CLS]`` 2, ``[SEP]`` 3, ``[MASK]`` 4); ``save_vocab`` /
``from_vocab_file`` write and read BERT's ``vocab.txt`` (one token per line, the line number
is the id), so a released BERT vocabulary loads with the ids BERT uses.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, CLS, SEP, MASK)
PREFIX = "##"  # marks a piece that continues a word


def _pipeline(model: models.WordPiece, lowercase: bool) -> Tokenizer:
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix=PREFIX)
    return tokenizer


def read_vocab_file(path: str | os.PathLike[str]) -> dict[str, int]:
    """Reads a BERT ``vocab.txt``: ``{token: line number}``.

    Raises ``ValueError`` naming the file and line when it is not one token per line (a
    line with inner whitespace, e.g. a ``token id`` table or a BPE merges file; an empty
    line; a repeated token; not UTF-8) or lacks a special token.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No vocabulary file at {path}.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a vocab.txt (UTF-8, one token per line): {e}") from e
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    vocab: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        token = raw.rstrip("\r")
        where = f"{path}:{number}"
        if not token or token.strip() != token or any(c.isspace() for c in token):
            raise ValueError(
                f"{where} is not a vocab.txt line (one token per line, no whitespace): {raw!r}"
            )
        if token in vocab:
            raise ValueError(f"{where} repeats token {token!r} (first on line {vocab[token] + 1})")
        vocab[token] = number - 1
    if not vocab:
        raise ValueError(f"{path} is empty: a vocab.txt has one token per line.")
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(
            f"{path} is not a BERT vocab.txt: it lacks the special token(s) {', '.join(missing)}"
        )
    return vocab


class WordPieceTokenizer:
    """BERT's WordPiece tokenizer: text <-> ids, with ``[PAD] [UNK] [CLS] [SEP] [MASK]``."""

    def __init__(self, tokenizer: Tokenizer, lowercase: bool):
        """Wraps a ``tokenizers.Tokenizer`` with a WordPiece model holding the specials."""
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"the tokenizer lacks the special token(s) {', '.join(missing)}")
        self.tokenizer = tokenizer
        self.lowercase = lowercase
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            tokenizer.token_to_id(t) for t in SPECIAL_TOKENS
        )

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids of ``[PAD] [UNK] [CLS] [SEP] [MASK]``, in that order."""
        return (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id)

    def vocab(self) -> list[str]:
        """Tokens in id order (what ``vocab.txt`` holds)."""
        by_id = self.tokenizer.get_vocab(with_added_tokens=True)
        tokens = sorted(by_id, key=by_id.get)
        if [by_id[t] for t in tokens] != list(range(len(tokens))):
            raise ValueError("the vocabulary's ids are not contiguous from 0")
        return tokens

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no ``[CLS]`` / ``[SEP]`` are added."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def tokens(self, text: str) -> list[str]:
        """The pieces of ``text`` as strings (continuations start with ``##``)."""
        return self.tokenizer.encode(text, add_special_tokens=False).tokens

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``: pieces joined, ``##`` continuations glued to their word."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def save_vocab(self, path: str | os.PathLike[str]) -> None:
        """Writes BERT's ``vocab.txt``: one token per line, line ``i`` is id ``i``."""
        pathlib.Path(path).write_text("\n".join(self.vocab()) + "\n", encoding="utf-8")

    @classmethod
    def from_vocab_file(
        cls, path: str | os.PathLike[str], lowercase: bool = True
    ) -> WordPieceTokenizer:
        """Loads a BERT ``vocab.txt`` (see ``read_vocab_file`` for the errors).

        ``lowercase`` must match the vocabulary (True for ``*-uncased`` BERTs).
        """
        vocab = read_vocab_file(path)
        model = models.WordPiece(vocab=vocab, unk_token=UNK, continuing_subword_prefix=PREFIX)
        tokenizer = _pipeline(model, lowercase)
        tokenizer.add_special_tokens(list(SPECIAL_TOKENS))  # never split; keep their ids
        return cls(tokenizer, lowercase)

    @classmethod
    def train(
        cls, texts: Iterable[str], vocab_size: int, lowercase: bool = True
    ) -> WordPieceTokenizer:
        """Learns a WordPiece vocabulary of (at most) ``vocab_size`` tokens from ``texts``.

        Ids: the five special tokens first, then the alphabet and pieces as learned.
        """
        if vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(
                f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}"
            )
        tokenizer = _pipeline(
            models.WordPiece(unk_token=UNK, continuing_subword_prefix=PREFIX), lowercase
        )
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size,
            min_frequency=0,
            special_tokens=list(SPECIAL_TOKENS),
            continuing_subword_prefix=PREFIX,
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer, lowercase)


def load_or_train_wordpiece(
    workdir: str | os.PathLike[str],
    texts: Iterable[str] | Callable[[], Iterable[str]],
    vocab_size: int,
    *,
    lowercase: bool = True,
    filename: str = "vocab.txt",
) -> WordPieceTokenizer:
    """The run's WordPiece vocabulary: trained on ``texts`` once (``texts`` may be a function,
    called only when training) and kept as ``workdir/filename`` (BERT's ``vocab.txt``), so a
    resumed run reads the same ids back. Only process 0 writes the file."""
    import jax

    path = os.path.join(os.fspath(workdir), filename)
    if os.path.exists(path):
        return WordPieceTokenizer.from_vocab_file(path, lowercase=lowercase)
    tok = WordPieceTokenizer.train(texts() if callable(texts) else texts, vocab_size, lowercase)
    if jax.process_index() == 0:
        os.makedirs(os.fspath(workdir), exist_ok=True)
        tok.save_vocab(f"{path}.tmp")
        os.replace(f"{path}.tmp", path)  # a kill never leaves half a vocabulary behind
    return tok
