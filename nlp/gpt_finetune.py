"""GPT-1 supervised fine-tuning (Radford et al. 2018, sections 3.2 and 3.3).

* Input transformations (section 3.3, figure 1): every task input becomes one token
  sequence the pre-trained model can read: a single text is ``<start> text <extract>``, a
  pair (entailment) ``<start> premise <delim> hypothesis <extract>``. The three task tokens
  are new, randomly initialised embedding rows appended to the vocabulary
  (``add_task_tokens``); nothing else about the pre-trained model changes.
* Head (section 3.2, eq. 3): ``P(y | x) = softmax(h_L[extract] W_y)``, a linear layer on the
  final transformer state at the ``<extract>`` token (the last block's output for GPT-1's
  post-LN model; after ``ln_f`` for a pre-LN GPT-2/3), with dropout 0.1 on that state
  during training (section 4.1: "We add dropout to the classifier with a rate of 0.1").
* Objective (eq. 5): ``L3 = L2 + lambda * L1``, the task cross-entropy plus the language-model
  loss on the same inputs as an auxiliary objective, ``lambda = 0.5``.

``GPTClassifier`` pairs an ``nlp.gpt.GPT`` with an ``ExtractHead``; its params are
``{"gpt": <GPT params>, "head": <head params>}``, so the ``gpt`` part is exactly what GPT
pre-training (or ``nlp.gpt_convert``) produces, after ``add_task_tokens``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common import sharding as sh
from common import validation
from common.layers import dense
from common.losses import cross_entropy
from nlp.gpt import GPT

Array = jax.Array
AUX_LM_WEIGHT = 0.5  # lambda of eq. 5


@dataclasses.dataclass(frozen=True)
class TaskTokens:
    """Ids of the three task tokens of section 3.3 (appended after the text vocabulary)."""

    start: int
    delimiter: int
    extract: int

    @classmethod
    def after(cls, vocab_size: int) -> TaskTokens:
        """The three ids that follow a vocabulary of ``vocab_size`` tokens."""
        return cls(vocab_size, vocab_size + 1, vocab_size + 2)


def add_task_tokens(
    gpt_params: dict[str, Any], rng: jax.Array, count: int = 3, std: float = 0.02
) -> dict[str, Any]:
    """GPT params with ``count`` new rows N(0, std^2) appended to the token embedding (the
    output projection is tied to it, so the model's vocabulary grows by ``count``)."""
    table = gpt_params["wte"]["embedding"]  # [vocab, d_model]
    new = std * jax.random.normal(rng, (count, table.shape[1]), jnp.float32)
    return {
        **gpt_params,
        "wte": {
            **gpt_params["wte"],
            "embedding": jnp.concatenate([table, new.astype(table.dtype)], 0),
        },
    }


def single_input(
    ids: Sequence[int], max_len: int, task: TaskTokens, pad_id: int = 0
) -> tuple[np.ndarray, int]:
    """``<start> text <extract>`` padded to ``max_len`` (the text truncated to fit):
    ``(tokens [max_len] int32, position of <extract>)``."""
    if max_len < 3:
        raise ValueError(f"max_len={max_len} leaves no room for <start> text <extract>")
    seq = [task.start, *list(ids)[: max_len - 2], task.extract]
    return _pad(seq, max_len, pad_id), len(seq) - 1


def pair_input(
    first: Sequence[int], second: Sequence[int], max_len: int, task: TaskTokens, pad_id: int = 0
) -> tuple[np.ndarray, int]:
    """``<start> first <delim> second <extract>``; when too long, the longer text loses
    tokens from its end until the pair fits. Returns ``(tokens [max_len], extract pos)``."""
    if max_len < 5:
        raise ValueError(f"max_len={max_len} leaves no room for <start> a <delim> b <extract>")
    a, b = list(first), list(second)
    while len(a) + len(b) > max_len - 3:
        if len(a) >= len(b):
            a.pop()
        else:
            b.pop()
    seq = [task.start, *a, task.delimiter, *b, task.extract]
    return _pad(seq, max_len, pad_id), len(seq) - 1


def _pad(seq: list[int], max_len: int, pad_id: int) -> np.ndarray:
    out = np.full(max_len, pad_id, np.int32)
    out[: len(seq)] = seq
    return out


def encode_single(
    texts: Sequence[Sequence[int]], labels: Sequence[int], max_len: int, task: TaskTokens
) -> dict[str, np.ndarray]:
    """Batched ``single_input``: ``tokens [n, max_len]``, ``extract [n]``, ``labels [n]``."""
    rows = [single_input(ids, max_len, task) for ids in texts]
    return {
        "tokens": np.stack([r[0] for r in rows]),
        "extract": np.array([r[1] for r in rows], np.int32),
        "labels": np.asarray(labels, np.int32),
    }


class ExtractHead(nn.Module):
    """``W_y`` of eq. 3: logits from the final state at the ``<extract>`` token."""

    num_labels: int
    dropout: float = 0.1  # on the extracted state, before W_y (section 4.1)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, hidden: Array, extract: Array, *, deterministic: bool = True) -> Array:
        # hidden: [batch, len, d_model]; extract: [batch] int -> logits [batch, num_labels].
        h = jnp.take_along_axis(hidden, extract[:, None, None], axis=1)[:, 0]  # [batch, d]
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)  # [batch, d]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return dense(self.num_labels, (sh.EMBED, None), name="out", **kw)(h).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class GPTClassifier:
    """A GPT with an ``ExtractHead``; params ``{"gpt": ..., "head": ...}``.

    The final hidden state is read with flax's ``capture_intermediates`` (the output of the
    last block, or of ``ln_f`` for pre-LN models), so ``nlp.gpt.GPT`` is used unchanged and
    one forward pass yields both the LM logits (for the auxiliary loss) and the state.
    """

    gpt: GPT  # its vocab_size includes the three task tokens
    num_labels: int
    head_dropout: float = 0.1  # ExtractHead.dropout

    def __post_init__(self):
        problems = validation.positive_ints(self, "num_labels")
        problems += validation.fractions(self, "head_dropout")
        validation.check(self, problems)

    @property
    def head(self) -> ExtractHead:
        return ExtractHead(
            self.num_labels,
            dropout=self.head_dropout,
            dtype=self.gpt.dtype,
            param_dtype=self.gpt.param_dtype,
        )

    @property
    def _final(self) -> str:
        return "ln_f" if self.gpt.pre_norm else f"h_{self.gpt.num_layers - 1}"

    def init(self, rng: jax.Array, tokens: Array) -> dict[str, Any]:
        """Variables ``{"params": {"gpt", "head"}}`` (logically partitioned boxes)."""
        g_rng, h_rng = jax.random.split(rng)
        gpt_params = self.gpt.init(g_rng, tokens)["params"]
        hidden = jnp.zeros((tokens.shape[0], tokens.shape[1], self.gpt.d_model), self.gpt.dtype)
        head = self.head.init(h_rng, hidden, jnp.zeros((tokens.shape[0],), jnp.int32))
        return {"params": {"gpt": gpt_params, "head": head["params"]}}

    def apply(
        self,
        params: dict[str, Any],  # {"gpt", "head"}
        tokens: Array,  # [batch, len]
        extract: Array,  # [batch] positions of <extract>
        *,
        deterministic: bool = True,
        rng: jax.Array | None = None,
    ) -> tuple[Array, Array]:
        """``(LM logits [b, len, vocab], class logits [b, num_labels])``, float32."""
        final = self._final
        if deterministic:
            gpt_rngs = head_rngs = None
        else:
            if rng is None:
                raise ValueError("deterministic=False needs an rng for dropout")
            gpt_rng, head_rng = jax.random.split(rng)
            gpt_rngs, head_rngs = {"dropout": gpt_rng}, {"dropout": head_rng}
        logits, state = self.gpt.apply(
            {"params": params["gpt"]},
            tokens,
            deterministic=deterministic,
            rngs=gpt_rngs,
            capture_intermediates=lambda mdl, method: mdl.name == final and method == "__call__",
            mutable=["intermediates"],
        )
        out = state["intermediates"][final]["__call__"][0]
        hidden = out if self.gpt.pre_norm else out[0]  # a block returns (x, cache)
        class_logits = self.head.apply(
            {"params": params["head"]},
            hidden,
            extract,
            deterministic=deterministic,
            rngs=head_rngs,
        )
        return logits, class_logits


def finetune_loss_fn(clf: GPTClassifier, lm_weight: float = AUX_LM_WEIGHT):
    """Eq. 5 for ``common.training``: ``L_task + lm_weight * L_LM`` (mean nats each).

    ``batch``: ``tokens [b, len]``, ``extract [b]``, ``labels [b]``. The LM loss scores each
    next token of the transformed input up to and including ``<extract>``. Aux metrics:
    ``task_loss``, ``lm_loss``, ``acc``.
    """

    def loss_fn(params, batch, rng):
        lm_logits, class_logits = clf.apply(
            params, batch["tokens"], batch["extract"], deterministic=False, rng=rng
        )
        task_total, n = cross_entropy(class_logits, batch["labels"])
        task_loss = task_total / n
        positions = jnp.arange(batch["tokens"].shape[1] - 1)[None]  # target index - 1
        weights = positions < batch["extract"][:, None]  # targets 1..extract
        lm_total, count = cross_entropy(lm_logits[:, :-1], batch["tokens"][:, 1:], weights)
        lm_loss = lm_total / jnp.maximum(count, 1.0)
        acc = jnp.mean(jnp.argmax(class_logits, -1) == batch["labels"])
        return task_loss + lm_weight * lm_loss, {
            "task_loss": task_loss,
            "lm_loss": lm_loss,
            "acc": acc,
        }

    return loss_fn
