"""Autoregressive generation with a KV cache, the whole loop compiled.

Works for any decoder that follows the ``nlp.gpt.GPT`` protocol: ``model.init_cache(batch,
length)`` and ``model.apply(params, tokens, cache=..., cache_index=...) -> (logits, cache)``.
The prompt is run once (prefill), then one token per ``lax.while_loop`` iteration.
Sampling: greedy (``temperature=0``), temperature, top-k and top-p (nucleus), combinable.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp


def sample_logits(
    logits: jax.Array,
    rng: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> jax.Array:
    """One token per row from ``logits [batch, vocab]``; ``temperature == 0`` is greedy."""
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [batch, 1]
        logits = jnp.where(logits < kth, neg, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
        keep = before < top_p  # always keeps the most likely token
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, neg, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def check_lengths(model: Any, prompt_len: int, max_new_tokens: int) -> None:
    if prompt_len < 1:
        raise ValueError("the prompt must hold at least one token")
    if prompt_len + max_new_tokens > model.max_len:
        raise ValueError(
            f"prompt of {prompt_len} tokens + {max_new_tokens} new tokens exceeds "
            f"the model's context max_len={model.max_len}"
        )


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id")
)
def _generate(model, params, prompt, rng, *, max_new_tokens, temperature, top_k, top_p, eos_id):
    batch, plen = prompt.shape
    total = plen + max_new_tokens
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)
    cache = model.init_cache(batch, total)
    logits, cache = model.apply(params, prompt, cache=cache, cache_index=0)
    first = sample(logits[:, -1], jax.random.fold_in(rng, 0))  # [batch]
    out = jnp.zeros((batch, total), jnp.int32).at[:, :plen].set(prompt).at[:, plen].set(first)
    done = first == eos_id if eos_id is not None else jnp.zeros((batch,), bool)

    def cond(carry):
        i, _, _, done = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, out, cache, done = carry  # i tokens generated so far
        pos = plen + i - 1
        tok = jax.lax.dynamic_slice_in_dim(out, pos, 1, axis=1)  # [batch, 1]
        logits, cache = model.apply(params, tok, cache=cache, cache_index=pos)
        nxt = sample(logits[:, -1], jax.random.fold_in(rng, i))
        if eos_id is not None:
            nxt = jnp.where(done, eos_id, nxt)
            done = done | (nxt == eos_id)
        out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], pos + 1, axis=1)
        return i + 1, out, cache, done

    _, out, _, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), out, cache, done))
    if eos_id is not None:  # rows that stopped early are padded with eos
        after = jnp.cumsum(out[:, plen:] == eos_id, axis=1) > 0
        after = jnp.concatenate([jnp.zeros_like(after[:, :1]), after[:, :-1]], axis=1)
        out = out.at[:, plen:].set(jnp.where(after, eos_id, out[:, plen:]))
    return out


def generate(
    model: Any,
    params: Any,
    prompt: jax.Array,
    *,
    max_new_tokens: int,
    rng: jax.Array | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
) -> jax.Array:
    """``prompt [batch, prompt_len]`` -> ``[batch, prompt_len + max_new_tokens]`` tokens.

    Rows that emit ``eos_id`` are padded with it; the loop stops once every row has.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2:
        raise ValueError(f"prompt must be [batch, length], got shape {prompt.shape}")
    check_lengths(model, prompt.shape[1], max_new_tokens)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(
            f"need temperature >= 0, 0 < top_p <= 1 and top_k >= 0; got "
            f"{temperature}, {top_p}, {top_k}"
        )
    rng = jax.random.key(0) if rng is None else rng
    return _generate(
        model,
        params,
        prompt,
        rng,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        eos_id=eos_id,
    )
