"""``remat_policy``, the one recomputation knob of every family (``common.layers.remat``):
under a policy the gradient's program holds a checkpoint (and none without), the output and
gradients equal those without recomputation, and an unknown policy is refused by name."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.layers import REMAT_POLICIES, remat
from nlp import gpt
from vision import clip, swin, vit


def _gpt(policy):
    model = gpt.from_preset("gpt-tiny", dropout=0.0, attn_dropout=0.0, remat_policy=policy)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 16)), jnp.int32)
    return model, (tokens,)


def _images(module, policy, preset):
    model = module.from_preset(preset, remat_policy=policy)
    shape = module.example_images(model, batch=2).shape
    return model, (jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32),)


def _clip(policy):
    model = clip.from_preset("clip-tiny", remat_policy=policy)
    images, tokens = clip.example_inputs(model, batch=2)
    rng = np.random.default_rng(0)
    return model, (
        jnp.asarray(rng.normal(size=images.shape), jnp.float32),
        jnp.asarray(rng.integers(0, model.vocab_size, tokens.shape), jnp.int32),
    )


FAMILIES = {
    "gpt": _gpt,
    "vit": lambda p: _images(vit, p, "vit-toy"),
    "swin": lambda p: _images(swin, p, "swin-toy"),
    "clip": _clip,
}


def _scalar(out):
    """One number from any model output (logits, or CLIP's dict of embeddings)."""
    leaves = jax.tree.leaves(out)
    return sum(jnp.sum(jnp.sin(x.astype(jnp.float32))) for x in leaves)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_recomputes_its_blocks_under_a_policy(family):
    """The gradient's program holds a checkpoint under a policy and none without (traced
    only: the numbers are checked once, below, on GPT)."""
    plain, args = FAMILIES[family](None)
    params = nn.unbox(jax.eval_shape(plain.init, jax.random.key(0), *args))
    loss = lambda model: lambda p: _scalar(model.apply(p, *args))
    jaxpr = str(jax.make_jaxpr(jax.grad(loss(plain)))(params))
    assert "checkpoint" not in jaxpr and "remat" not in jaxpr
    model, _ = FAMILIES[family]("nothing_saveable")
    jaxpr = str(jax.make_jaxpr(jax.grad(loss(model)))(params))
    assert "checkpoint" in jaxpr or "remat" in jaxpr


@pytest.mark.slow
def test_recomputation_changes_no_number():
    plain, args = _gpt(None)
    params = nn.unbox(jax.jit(plain.init)(jax.random.key(0), *args))
    loss = lambda model: lambda p: _scalar(model.apply(p, *args))
    want, want_grads = jax.jit(jax.value_and_grad(loss(plain)))(params)
    for policy in ("nothing_saveable", "dots_with_no_batch_dims_saveable"):
        got, grads = jax.jit(jax.value_and_grad(loss(_gpt(policy)[0])))(params)
        np.testing.assert_allclose(got, want, rtol=1e-6)
        close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        jax.tree.map(close, grads, want_grads)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unknown_policy_names_the_field(family):
    with pytest.raises(ValueError, match=r"remat_policy='everything'.*is not one of"):
        FAMILIES[family]("everything")


def test_remat_wraps_only_under_a_policy():
    assert remat(nn.Dense, None) is nn.Dense
    assert remat(nn.Dense, "nothing_saveable") is not nn.Dense
    assert None in REMAT_POLICIES
    with pytest.raises(ValueError, match=r"remat_policy=True"):
        remat(nn.Dense, True)
