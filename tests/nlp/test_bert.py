"""BERT: MLM and NSP logits equal Hugging Face ``BertForPreTraining``'s after converting its
weights (float32, CPU, with padding), preset sizes equal HF's exact counts, and the
model's own invariants (padding is invisible, dtype honoured, bad input named).

Every HF parameter is re-drawn with a larger spread than HF's init, so that a transposed
kernel, a swapped LayerNorm scale/bias or the wrong GELU shows up well above the tolerance.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from common import convert  # noqa: E402
from nlp import bert  # noqa: E402
from nlp.bert_convert import bert_config_from_hf, bert_params_from_torch  # noqa: E402

TOL = 1e-4
SMALL = dict(
    vocab_size=101,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=96,
    max_position_embeddings=48,
    type_vocab_size=2,
)


def _randomize(model, seed: int):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "LayerNorm" in name and name.endswith(".weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.25 * noise)
    return model.eval()


@pytest.fixture(scope="module")
def hf_bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(**SMALL)
    return _randomize(transformers.BertForPreTraining(cfg), seed=1)


@pytest.fixture(scope="module")
def converted(hf_bert):
    model = bert.Bert(**bert_config_from_hf(hf_bert.config))
    return model, bert_params_from_torch(hf_bert.state_dict(), model)


def _apply(model, params, *args, method=None):
    """Jitted apply: one compile instead of hundreds of eager op dispatches."""
    return jax.jit(lambda p, *a: model.apply(p, *a, method=method))(params, *args)


def _init(model):
    return jax.jit(model.init)(jax.random.key(0), *bert.example_inputs())


def _inputs(shape, vocab, seed):
    rng = np.random.default_rng(seed)
    b, t = shape
    tokens = rng.integers(0, vocab, size=shape)
    segments = (np.arange(t)[None] >= rng.integers(1, t, size=(b, 1))).astype(np.int64)
    lengths = rng.integers(t // 2, t + 1, size=b)
    lengths[0] = t  # one row without padding
    valid = (np.arange(t)[None] < lengths[:, None]).astype(np.int64)
    return tokens, segments, valid


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 9), (3, 40)])
def test_mlm_and_nsp_logits_match_hf(hf_bert, converted, shape):
    model, params = converted
    tokens, segments, valid = _inputs(shape, model.vocab_size, seed=shape[1])
    with torch.no_grad():
        ref = hf_bert(
            input_ids=torch.from_numpy(tokens),
            token_type_ids=torch.from_numpy(segments),
            attention_mask=torch.from_numpy(valid),
        )
    out = _apply(model, params, *(jnp.asarray(a, jnp.int32) for a in (tokens, segments, valid)))
    mlm_ref = ref.prediction_logits.numpy()
    nsp_ref = ref.seq_relationship_logits.numpy()
    assert out["mlm_logits"].shape == mlm_ref.shape and out["nsp_logits"].shape == nsp_ref.shape
    assert out["mlm_logits"].dtype == jnp.float32
    # Measured: MLM 6.8e-6 / 9.1e-6, NSP 1.1e-6 / 1.7e-6 (the two shapes).
    assert float(np.abs(np.asarray(out["mlm_logits"]) - mlm_ref).max()) <= TOL
    assert float(np.abs(np.asarray(out["nsp_logits"]) - nsp_ref).max()) <= TOL


def test_exact_gelu_matters(hf_bert):
    """HF's BERT "gelu" is the exact erf GELU; the tanh approximation is visibly off, which
    makes the parity test above sensitive to the activation."""
    cfg = bert_config_from_hf(hf_bert.config)
    assert cfg["activation"] == "gelu"
    model = bert.Bert(**{**cfg, "activation": "gelu_tanh"})
    params = bert_params_from_torch(hf_bert.state_dict(), model)
    tokens, segments, valid = _inputs((2, 16), model.vocab_size, seed=5)
    with torch.no_grad():
        ref = hf_bert(
            input_ids=torch.from_numpy(tokens),
            token_type_ids=torch.from_numpy(segments),
            attention_mask=torch.from_numpy(valid),
        ).prediction_logits.numpy()
    out = _apply(model, params, *(jnp.asarray(a, jnp.int32) for a in (tokens, segments, valid)))
    assert float(np.abs(np.asarray(out["mlm_logits"]) - ref).max()) > 10 * TOL


def test_pretrain_method_gathers_positions(converted):
    """``pretrain`` scores only the chosen positions: equal to the full logits there."""
    model, params = converted
    tokens, segments, valid = (jnp.asarray(a, jnp.int32) for a in _inputs((2, 20), 101, 7))
    full = _apply(model, params, tokens, segments, valid)
    positions = jnp.array([[1, 5, 19], [0, 2, 3]])
    mlm, nsp = _apply(model, params, tokens, segments, valid, positions, method=bert.Bert.pretrain)
    want = jnp.take_along_axis(full["mlm_logits"], positions[..., None], axis=1)
    np.testing.assert_allclose(mlm, want, atol=1e-5)
    np.testing.assert_allclose(nsp, full["nsp_logits"], atol=1e-6)


def test_padding_is_invisible(converted):
    """Real positions' outputs do not depend on what the padded positions hold."""
    model, params = converted
    tokens, segments, valid = _inputs((2, 24), 101, 11)
    valid[:, 15:] = 0
    other = tokens.copy()
    other[:, 15:] = (other[:, 15:] + 7) % 101
    a, b = (
        _apply(model, params, *(jnp.asarray(x, jnp.int32) for x in (t, segments, valid)))
        for t in (tokens, other)
    )
    np.testing.assert_allclose(a["mlm_logits"][:, :15], b["mlm_logits"][:, :15], atol=1e-5)
    np.testing.assert_allclose(a["nsp_logits"], b["nsp_logits"], atol=1e-5)


def _hf_count(**config) -> int:
    """Exact parameter count of HF ``BertForPreTraining`` (built on the meta device: shapes
    only, no memory; tied decoder weight and bias counted once, as ``parameters()`` does)."""
    with torch.device("meta"):
        model = transformers.BertForPreTraining(transformers.BertConfig(**config))
    return sum(p.numel() for p in model.parameters())


def _our_count(model: bert.Bert) -> int:
    shapes = jax.eval_shape(model.init, jax.random.key(0), *bert.example_inputs())
    return sum(int(x.size) for x in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize(
    "preset, hf_config, published",
    [
        ("bert-base", {}, 110e6),
        (
            "bert-large",
            dict(
                hidden_size=1024,
                num_hidden_layers=24,
                num_attention_heads=16,
                intermediate_size=4096,
            ),
            340e6,
        ),
    ],
)
def test_preset_counts_equal_hf(preset, hf_config, published):
    ours = _our_count(bert.from_preset(preset))
    assert ours == _hf_count(**hf_config)
    assert abs(ours - published) / published < 0.03  # the paper's rounded 110M / 340M


@pytest.mark.slow
def test_classifier_head_adds_only_its_params():
    base = bert.from_preset("bert-tiny")
    clf = bert.from_preset("bert-tiny", num_labels=3)
    assert _our_count(clf) - _our_count(base) == base.d_model * 3 + 3
    logits = _apply(clf, _init(clf), *bert.example_inputs(2, 8), method=bert.Bert.classify)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32


@pytest.mark.slow
def test_dtype_and_param_dtype_are_honoured():
    model = bert.from_preset("bert-tiny", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = _init(model)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    hidden, pooled = _apply(model, params, *bert.example_inputs(2, 8), method=bert.Bert.encode)
    assert hidden.dtype == jnp.bfloat16 and pooled.dtype == jnp.bfloat16
    out = _apply(model, params, *bert.example_inputs(2, 8))
    assert out["mlm_logits"].dtype == jnp.float32  # logits (and so the loss) in float32


def test_bad_config_and_input_are_named():
    with pytest.raises(ValueError, match="num_heads=3 does not divide d_model=32"):
        bert.from_preset("bert-tiny", num_heads=3)
    with pytest.raises(ValueError, match="unknown activation"):
        bert.from_preset("bert-tiny", activation="swish")
    with pytest.raises(ValueError, match="num_heads=0 must be a positive int"):  # not ZeroDivision
        bert.from_preset("bert-tiny", num_heads=0)
    model = bert.from_preset("bert-tiny")
    params = _init(model)
    with pytest.raises(ValueError, match="sequence length 65 exceeds the model's max_len=64"):
        _apply(model, params, *bert.example_inputs(1, 65))
    with pytest.raises(ValueError, match="num_labels > 0"):
        _apply(model, params, *bert.example_inputs(), method=bert.Bert.classify)


def test_converter_names_missing_unused_and_misshaped_keys(hf_bert):
    model = bert.Bert(**bert_config_from_hf(hf_bert.config))
    sd = dict(hf_bert.state_dict())
    bad = dict(sd)
    del bad["bert.encoder.layer.2.output.LayerNorm.bias"], bad["cls.predictions.bias"]
    with pytest.raises(ValueError, match=r"missing 2 key.*layer\.2\.output\.LayerNorm\.bias"):
        bert_params_from_torch(bad, model)
    bad = dict(sd)
    bad["bert.encoder.layer.1.intermediate.dense.weight"] = torch.zeros(95, 64)
    with pytest.raises(ValueError, match=r"intermediate\.dense\.weight has shape \(95, 64\)"):
        bert_params_from_torch(bad, model)
    bad = dict(sd)
    bad["bert.encoder.layer.3.output.dense.bias"] = torch.zeros(64)
    with pytest.raises(ValueError, match=r"does not use.*layer\.3\.output\.dense\.bias"):
        bert_params_from_torch(bad, model)
    bad = {k: v.clone() for k, v in sd.items()}
    bad["cls.predictions.decoder.weight"] += 1.0
    with pytest.raises(ValueError, match="decoder.weight"):
        bert_params_from_torch(bad, model)


def test_bert_model_state_dict_without_heads(hf_bert, converted):
    """A ``BertModel`` state dict (no ``bert.`` prefix, no heads) converts the encoder."""
    model, full = converted
    bare = {k.removeprefix("bert."): v for k, v in hf_bert.state_dict().items() if "cls." not in k}
    got = convert.flatten(bert_params_from_torch(bare, model, heads=False)["params"])
    want = convert.flatten(full["params"])
    assert set(got) < set(want) and "mlm_bias" not in got
    for k, v in got.items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)


def test_bert_for_pretraining_state_dict_without_heads(hf_bert, converted):
    """``heads=False`` on a ``BertForPreTraining`` dict keeps its keys as they are: the
    ``cls.*`` keys are named as unused (not as invented ``bert.cls.*``), and converting with
    them allowed gives the encoder."""
    model, full = converted
    sd = hf_bert.state_dict()
    with pytest.raises(ValueError, match=r"does not use.* cls\.predictions") as err:
        bert_params_from_torch(sd, model, heads=False)
    assert "bert.cls." not in str(err.value)
    got = convert.flatten(
        bert_params_from_torch(sd, model, heads=False, allow_unused=[r"^cls\."])["params"]
    )
    want = convert.flatten(full["params"])
    assert set(got) < set(want) and "mlm_bias" not in got
    for k, v in got.items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)


def test_legacy_layer_norm_gamma_beta_names(hf_bert, converted):
    """The original Google checkpoints name LayerNorm parameters gamma / beta; HF renames
    them to weight / bias on load, and so does the converter."""
    model, full = converted
    legacy = {
        k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): v
        for k, v in hf_bert.state_dict().items()
    }
    assert sum(k.endswith("LayerNorm.gamma") for k in legacy) == 2 * SMALL["num_hidden_layers"] + 2
    got = convert.flatten(bert_params_from_torch(legacy, model)["params"])
    want = convert.flatten(full["params"])
    assert set(got) == set(want)
    for k, v in got.items():
        np.testing.assert_array_equal(v, want[k], err_msg=k)
    bare = {k.removeprefix("bert."): v for k, v in legacy.items() if not k.startswith("cls.")}
    assert set(bert_params_from_torch(bare, model, heads=False)["params"]) < set(full["params"])


def test_config_mapping_and_rejections():
    cfg = bert_config_from_hf(transformers.BertConfig())
    assert cfg == {
        **bert.PRESETS["bert-base"],
        **{k: cfg[k] for k in cfg if k not in bert.PRESETS["bert-base"]},
    }
    assert (cfg["activation"], cfg["layer_norm_eps"]) == ("gelu", 1e-12)
    for bad, word in (
        (dict(hidden_act="silu"), "silu"),
        (dict(position_embedding_type="relative_key"), "relative_key"),
        (dict(is_decoder=True), "is_decoder"),
    ):
        with pytest.raises(ValueError, match=word):
            bert_config_from_hf(transformers.BertConfig(**bad))
    with pytest.raises(ValueError, match="model_type"):
        bert_config_from_hf(transformers.GPT2Config())


def _keyword_task(rng, n, length=24):
    """Random texts with one planted keyword (id 10, 11 or 12) anywhere: its id - 10 is the
    label. A classifier must attend across the sequence to find it."""
    labels = rng.integers(0, 3, n)
    tokens = rng.integers(13, 100, (n, length))
    tokens[np.arange(n), rng.integers(0, length, n)] = 10 + labels
    return tokens, labels


@pytest.mark.slow
def test_classifier_learns_a_planted_keyword():
    """Fine-tuning path end to end (classify, pooler, loss, gradients): from scratch, the
    [CLS] classifier learns which keyword a text holds (measured: accuracy 1.0 by step 150)."""
    optax = pytest.importorskip("optax")
    model = bert.from_preset("bert-tiny", num_labels=3, dropout=0.0, attn_dropout=0.0)
    params = nn.unbox(_init(model))["params"]
    loss_fn, tx = bert.classification_loss_fn(model), optax.adam(1e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, batch):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch, jax.random.key(0)
        )
        updates, opt = tx.update(grads, opt)
        return optax.apply_updates(params, updates), opt, aux["acc"]

    rng = np.random.default_rng(0)
    for _ in range(200):
        text, labels = _keyword_task(rng, 32)
        tokens = np.concatenate([np.full((32, 1), 2), text, np.full((32, 1), 3)], 1)
        batch = dict(
            tokens=tokens, segments=np.zeros_like(tokens), valid=np.ones_like(tokens), labels=labels
        )
        params, opt, acc = step(params, opt, batch)
    text, labels = _keyword_task(rng, 256)
    tokens = np.concatenate([np.full((256, 1), 2), text, np.full((256, 1), 3)], 1)
    logits = _apply(model, {"params": params}, tokens, method=bert.Bert.classify)
    assert float(np.mean(np.argmax(logits, -1) == labels)) > 0.95
