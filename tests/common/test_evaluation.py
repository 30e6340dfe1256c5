"""The shared evaluators against direct computations: the sliding-window LM evaluator
against a naive per-token loop over the full stream, classification metrics against numpy
written out by hand, the sharded predict loop against one unsharded call."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import evaluation, sharding
from nlp import gpt


@pytest.fixture(scope="module")
def lm():
    model = gpt.from_preset(
        "gpt-tiny", num_layers=1, num_heads=2, d_model=16, d_ff=32, max_len=8, vocab_size=13
    )
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    return model, params


def naive_nats(model, params, tokens, stride):
    """Each target t (index into tokens) scored once, conditioned on the window that
    eval_windows assigns to it: the first window scores all, later ones their last
    `stride` targets, each window starting at a multiple of stride."""
    seq_len, total = model.max_len, 0.0
    for t in range(1, len(tokens)):
        # The window scoring target t: the first covers t <= seq_len, later ones start at
        # k * stride and score targets at positions >= seq_len - stride.
        if t <= seq_len:
            start = 0
        else:
            start = -(-(t - seq_len) // stride) * stride
        window = tokens[start : start + seq_len]
        logits = model.apply({"params": params}, jnp.asarray(window)[None])[0]
        logp = jax.nn.log_softmax(logits[t - 1 - start])
        total -= float(logp[tokens[t]])
    return total


@pytest.mark.parametrize("stride", [8, 4, 3])
def test_lm_evaluator_matches_naive_loop(lm, stride):
    model, params = lm
    tokens = np.random.default_rng(1).integers(0, 13, 41).astype(np.int32)
    mesh = sharding.make_mesh()
    evaluate = evaluation.lm_evaluator(model, mesh, batch_size=8, stride=stride)
    nats, n = evaluate(params, tokens)
    assert n == len(tokens) - 1
    np.testing.assert_allclose(nats, naive_nats(model, params, tokens, stride), rtol=1e-5)
    nats_cut, n_cut = evaluate(params, tokens, max_tokens=10)
    assert n_cut == 10
    np.testing.assert_allclose(nats_cut, naive_nats(model, params, tokens[:11], stride), rtol=1e-5)


def test_bits_per_unit_and_char():
    assert evaluation.bits_per_unit(2 * math.log(2), 4) == pytest.approx(0.5)
    decode = lambda ids: "ab" * len(ids)  # two characters per token
    assert evaluation.bits_per_char(6 * math.log(2), np.arange(10), 3, decode) == pytest.approx(1)
    with pytest.raises(ValueError, match="positive"):
        evaluation.bits_per_unit(1.0, 0)


def test_classification_metrics_against_numpy():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 200)
    labels[labels == 3] = 2  # class 3 absent: left out of the balanced accuracy
    preds = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 4, 200))
    m = evaluation.classification_metrics(preds, labels, 4, ["a", "b", "c", "d"])
    recalls = [np.sum((preds == c) & (labels == c)) / np.sum(labels == c) for c in range(3)]
    assert m["accuracy"] == pytest.approx(np.sum(preds == labels) / 200)
    assert m["balanced_accuracy"] == pytest.approx(sum(recalls) / 3)
    assert [m["recall_a"], m["recall_b"], m["recall_c"]] == pytest.approx(recalls)
    assert "recall_d" not in m
    with pytest.raises(ValueError, match="labels must be in"):
        evaluation.classification_metrics(preds, labels + 2, 4)
    with pytest.raises(ValueError, match="as many predictions"):
        evaluation.classification_metrics(preds[:5], labels, 4)


def test_predictor_pads_and_returns_every_example_in_order():
    mesh = sharding.make_mesh()
    w = jnp.arange(12.0).reshape(3, 4)
    predict = evaluation.predictor(lambda p, b: {"y": b["x"] @ p, "s": b["x"].sum(-1)}, mesh, 16)
    x = np.random.default_rng(0).normal(size=(37, 3)).astype(np.float32)
    out = predict(w, {"x": x})
    np.testing.assert_allclose(out["y"], x @ np.asarray(w), rtol=1e-6)
    np.testing.assert_allclose(out["s"], x.sum(-1), rtol=1e-6)
    with pytest.raises(ValueError, match="differ in length"):
        predict(w, {"x": x, "z": x[:3]})


def test_corpus_bleu_perfect_and_signature():
    refs = ["the cat sat on the mat today", "a dog ran in the park at noon"]
    out = evaluation.corpus_bleu(refs, refs)
    assert out["bleu"] == pytest.approx(100.0)
    assert out["sacrebleu_signature"].startswith("nrefs:1")
    assert evaluation.corpus_bleu(["x y z"] * 2, refs)["bleu"] < 5
