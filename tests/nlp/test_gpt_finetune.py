"""GPT-1 fine-tuning (Radford et al. 2018, sections 3.2-3.3): input transformations, the
head reads the final state at <extract> (checked against the tied LM logits), the task
tokens extend a pre-trained model without changing it, and eq. 5's loss."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.losses import cross_entropy
from nlp import gpt
from nlp.gpt_finetune import (
    ExtractHead,
    GPTClassifier,
    TaskTokens,
    add_task_tokens,
    encode_single,
    finetune_loss_fn,
    pair_input,
    single_input,
)

TASK = TaskTokens.after(100)  # 100, 101, 102


def test_input_transformations():
    tokens, pos = single_input([5, 6, 7], 8, TASK)
    assert tokens.tolist() == [100, 5, 6, 7, 102, 0, 0, 0] and pos == 4
    tokens, pos = single_input(list(range(10, 30)), 8, TASK)  # truncated to fit
    assert tokens.tolist() == [100, 10, 11, 12, 13, 14, 15, 102] and pos == 7
    tokens, pos = pair_input([5, 6], [7], 8, TASK)
    assert tokens.tolist() == [100, 5, 6, 101, 7, 102, 0, 0] and pos == 5
    tokens, pos = pair_input(list(range(10, 20)), [7, 8], 9, TASK)  # longer text shortened
    assert tokens.tolist() == [100, 10, 11, 12, 13, 101, 7, 8, 102] and pos == 8
    batch = encode_single([[5], [6, 7]], [2, 0], 6, TASK)
    assert batch["extract"].tolist() == [2, 3] and batch["labels"].tolist() == [2, 0]
    with pytest.raises(ValueError, match="max_len=2"):
        single_input([1], 2, TASK)
    with pytest.raises(ValueError, match="max_len=4"):
        pair_input([1], [2], 4, TASK)


@pytest.fixture(scope="module", params=[False, True], ids=["gpt1-post-ln", "gpt2-pre-ln"])
def classifier(request):
    model = gpt.from_preset("gpt1-tiny" if not request.param else "gpt-tiny", vocab_size=103)
    clf = GPTClassifier(model, num_labels=3)
    tokens = jnp.zeros((2, 16), jnp.int32)
    params = jax.jit(clf.init)(jax.random.key(0), tokens)
    return clf, nn.unbox(params)["params"]


@pytest.mark.slow
def test_head_reads_the_final_state_at_extract(classifier):
    """With W_y = the first 3 rows of the (tied) output embedding and no bias, the class
    logits must equal the LM logits at <extract>: only the final state gives that."""
    clf, params = classifier
    wte = params["gpt"]["wte"]["embedding"]
    params = {**params, "head": {"out": {"kernel": wte[:3].T, "bias": jnp.zeros(3)}}}
    rng = np.random.default_rng(0)
    tokens = np.stack([single_input(rng.integers(0, 100, n), 16, TASK)[0] for n in (5, 14)])
    extract = jnp.array([6, 15])
    lm, cls = jax.jit(clf.apply)(params, jnp.asarray(tokens), extract)
    want = lm[jnp.arange(2), extract, :3]
    np.testing.assert_allclose(cls, want, atol=1e-5)
    assert lm.shape == (2, 16, 103) and cls.dtype == jnp.float32


def test_padding_after_extract_is_invisible(classifier):
    clf, params = classifier
    tokens, pos = single_input([5, 6, 7], 16, TASK)
    other = tokens.copy()
    other[pos + 1 :] = 42
    apply = jax.jit(clf.apply)
    a = apply(params, jnp.asarray(tokens[None]), jnp.array([pos]))[1]
    b = apply(params, jnp.asarray(other[None]), jnp.array([pos]))[1]
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.slow
def test_task_tokens_extend_a_pretrained_model_unchanged():
    model = gpt.from_preset("gpt1-tiny", vocab_size=100)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    params = nn.unbox(params)
    grown = add_task_tokens(params, jax.random.key(1))
    assert grown["wte"]["embedding"].shape == (103, 32)
    np.testing.assert_array_equal(grown["wte"]["embedding"][:100], params["wte"]["embedding"])
    assert 0 < float(jnp.std(grown["wte"]["embedding"][100:])) < 0.05
    bigger = gpt.from_preset("gpt1-tiny", vocab_size=103)
    tokens = jnp.array([[1, 2, 3, 4]])
    old = model.apply({"params": params}, tokens)
    new = bigger.apply({"params": grown}, tokens)
    np.testing.assert_allclose(new[..., :100], old, atol=1e-5)  # text tokens: same model


@pytest.mark.slow
def test_loss_is_task_plus_lambda_lm(classifier):
    clf, params = classifier
    rng = np.random.default_rng(1)
    batch = encode_single([rng.integers(0, 100, n) for n in (3, 9, 14, 6)], [0, 1, 2, 1], 16, TASK)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    clf_eval = GPTClassifier(  # no dropout anywhere: the training loss is deterministic
        gpt.GPT(**{**_fields(clf.gpt), "dropout": 0.0, "attn_dropout": 0.0}), 3, head_dropout=0.0
    )
    loss, aux = finetune_loss_fn(clf_eval, 0.5)(params, batch, jax.random.key(0))
    lm, cls = clf_eval.apply(params, batch["tokens"], batch["extract"])
    task = cross_entropy(cls, batch["labels"])[0] / 4
    nll, n = 0.0, 0
    for i in range(4):  # LM targets: tokens 1..extract of each row
        e = int(batch["extract"][i])
        s, c = cross_entropy(lm[i, :e], batch["tokens"][i, 1 : e + 1])
        nll, n = nll + s, n + c
    np.testing.assert_allclose(aux["task_loss"], task, rtol=1e-5)
    np.testing.assert_allclose(aux["lm_loss"], nll / n, rtol=1e-5)
    np.testing.assert_allclose(loss, task + 0.5 * nll / n, rtol=1e-5)
    only_task, _ = finetune_loss_fn(clf_eval, 0.0)(params, batch, jax.random.key(0))
    np.testing.assert_allclose(only_task, task, rtol=1e-5)


def _fields(model):
    return {
        f.name: getattr(model, f.name)
        for f in dataclasses.fields(model)
        if f.name not in ("parent", "name")
    }


def test_bad_head_is_named():
    with pytest.raises(ValueError, match="num_labels=0"):
        GPTClassifier(gpt.from_preset("gpt1-tiny"), 0)
    with pytest.raises(ValueError, match="head_dropout=1.0"):
        GPTClassifier(gpt.from_preset("gpt1-tiny"), 3, head_dropout=1.0)


def test_head_dropout_on_the_extracted_state():
    """Section 4.1: dropout 0.1 on the classifier. With W_y = identity the logits are the
    dropped-out state at <extract>: zeros at about the rate, the rest scaled by 1 / (1 - rate);
    no dropout when deterministic, and no parameters of its own."""
    d, rate = 256, 0.25
    head = ExtractHead(d, dropout=rate)
    hidden = jnp.asarray(np.random.default_rng(0).normal(size=(8, 5, d)), jnp.float32)
    extract = jnp.array([0, 1, 2, 3, 4, 4, 2, 0])
    params = nn.unbox(head.init(jax.random.key(0), hidden, extract))
    assert jax.tree.map(jnp.shape, params) == {"params": {"out": {"kernel": (d, d), "bias": (d,)}}}
    params = {"params": {"out": {"kernel": jnp.eye(d), "bias": jnp.zeros(d)}}}
    state = hidden[jnp.arange(8), extract]  # [batch, d]
    np.testing.assert_allclose(head.apply(params, hidden, extract), state, atol=1e-6)
    dropped = head.apply(
        params, hidden, extract, deterministic=False, rngs={"dropout": jax.random.key(1)}
    )
    zero = np.asarray(dropped) == 0
    assert abs(zero.mean() - rate) < 0.03
    np.testing.assert_allclose(
        np.asarray(dropped)[~zero], np.asarray(state / (1 - rate))[~zero], rtol=1e-5
    )
    assert (
        ExtractHead(3).dropout == 0.1
        and GPTClassifier(gpt.from_preset("gpt1-tiny"), 3).head.dropout == 0.1
    )


def test_classifier_applies_head_dropout_only_in_training(classifier):
    clf, params = classifier
    base = {**_fields(clf.gpt), "dropout": 0.0, "attn_dropout": 0.0}
    tokens, pos = single_input([5, 6, 7], 16, TASK)
    tokens, extract = jnp.asarray(np.stack([tokens] * 4)), jnp.full((4,), pos)
    rng = jax.random.key(3)
    for head_dropout in (0.0, 0.5):
        clf_d = GPTClassifier(gpt.GPT(**base), 3, head_dropout=head_dropout)
        lm_eval, cls_eval = clf_d.apply(params, tokens, extract)
        lm, cls = clf_d.apply(params, tokens, extract, deterministic=False, rng=rng)
        np.testing.assert_allclose(lm, lm_eval, atol=1e-6)  # the GPT has no dropout here
        differs = float(jnp.abs(cls - cls_eval).max()) > 1e-4
        assert differs == (head_dropout > 0), head_dropout
    with pytest.raises(ValueError, match="needs an rng"):
        clf_d.apply(params, tokens, extract, deterministic=False)


@pytest.mark.slow
def test_classifier_learns_a_planted_keyword():
    """Eq. 5 end to end from scratch: texts hold one keyword (10, 11 or 12) anywhere and the
    <extract> head must name it (measured: accuracy 1.0 by step 100)."""
    optax = pytest.importorskip("optax")
    clf = GPTClassifier(gpt.from_preset("gpt1-tiny", vocab_size=103, dropout=0.0), 3)
    params = nn.unbox(jax.jit(clf.init)(jax.random.key(0), jnp.zeros((1, 32), jnp.int32)))
    params = params["params"]
    loss_fn, tx = finetune_loss_fn(clf), optax.adam(1e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch):
        grads = jax.grad(lambda p: loss_fn(p, batch, jax.random.key(0))[0])(params)
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(params, updates), opt

    rng = np.random.default_rng(0)

    def keyword_batch(n):
        labels = rng.integers(0, 3, n)
        texts = rng.integers(13, 100, (n, 24))
        texts[np.arange(n), rng.integers(0, 24, n)] = 10 + labels
        return encode_single(list(texts), labels, 32, TASK)

    for _ in range(200):
        params, opt = step(params, opt, keyword_batch(32))
    batch = keyword_batch(256)
    _, logits = jax.jit(clf.apply)(params, batch["tokens"], batch["extract"])
    assert float(np.mean(np.argmax(logits, -1) == batch["labels"])) > 0.95
