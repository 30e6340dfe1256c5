"""flat_dot_general equals lax.dot_general: projections are flattened, the rest passed through."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.layers import flat_dot_general

# (lhs shape, rhs shape, dimension numbers, flattened to one 2-D dot?)
CASES = [
    ((2, 5, 8), (8, 6), (((2,), (0,)), ((), ())), True),  # Dense on [batch, len, in]
    ((2, 3, 5, 8), (8, 4, 6), (((3,), (0,)), ((), ())), True),  # DenseGeneral to (heads, d)
    ((2, 5, 4, 6), (4, 6, 8), (((2, 3), (0, 1)), ((), ())), True),  # out projection of heads
    ((7, 8), (8, 6), (((1,), (0,)), ((), ())), False),  # already 2-D
    ((8,), (8, 6), (((0,), (0,)), ((), ())), False),  # a vector
    ((2, 5, 8), (2, 8, 6), (((2,), (1,)), ((0,), (0,))), False),  # batch axes
    ((2, 8, 5), (8, 6), (((1,), (0,)), ((), ())), False),  # contraction not on the last axis
]


def _eqns(jaxpr):
    """Every equation of ``jaxpr``, including those inside custom-VJP calls."""
    for e in jaxpr.eqns:
        yield e
        for p in e.params.values():
            inner = getattr(p, "jaxpr", p)  # a ClosedJaxpr holds its Jaxpr
            if isinstance(inner, jax.extend.core.Jaxpr):
                yield from _eqns(inner)


def dot_ranks(f, *args):
    return [
        tuple(v.aval.ndim for v in e.invars)
        for e in _eqns(jax.make_jaxpr(f)(*args).jaxpr)
        if e.primitive.name == "dot_general"
    ]


@pytest.mark.parametrize("lhs_shape, rhs_shape, dims, flattened", CASES)
def test_values_and_gradients_equal_dot_general(lhs_shape, rhs_shape, dims, flattened):
    k1, k2 = jax.random.split(jax.random.key(0))
    lhs, rhs = jax.random.normal(k1, lhs_shape), jax.random.normal(k2, rhs_shape)
    ours = lambda a, b: flat_dot_general(a, b, dims)
    ref = lambda a, b: jax.lax.dot_general(a, b, dims)
    np.testing.assert_allclose(ours(lhs, rhs), ref(lhs, rhs), rtol=1e-5, atol=1e-5)
    loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))
    for g_ours, g_ref in zip(
        jax.grad(loss(ours), (0, 1))(lhs, rhs), jax.grad(loss(ref), (0, 1))(lhs, rhs), strict=True
    ):
        np.testing.assert_allclose(g_ours, g_ref, rtol=1e-5, atol=1e-5)
    # the projections really run as one 2-D x 2-D dot; the rest as the dot they were given
    expected = [(2, 2)] if flattened else [(len(lhs_shape), len(rhs_shape))]
    assert dot_ranks(ours, lhs, rhs) == expected


def test_dense_with_flat_dot_general_is_nn_dense():
    x = jax.random.normal(jax.random.key(1), (2, 3, 5, 8))
    plain = nn.DenseGeneral((4, 6), bias_init=nn.initializers.normal(1.0))
    flat = nn.DenseGeneral(
        (4, 6), bias_init=nn.initializers.normal(1.0), dot_general=flat_dot_general
    )
    params = plain.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, flat.init(jax.random.key(0), x)) == jax.tree.map(
        jnp.shape, params
    )
    np.testing.assert_allclose(flat.apply(params, x), plain.apply(params, x), atol=1e-5)


@pytest.mark.parametrize("d_in, d_out", [(12, 5), (5, 12), (6, 6)])
def test_narrowing_projection_takes_the_kernel_gradient_as_out_by_in(d_in, d_out):
    """Where the projection narrows (``in > out``) the kernel gradient is the ``[out, in]``
    row contraction kept as it is (an optimisation barrier, so XLA does not fold the final
    transpose back into the dot's output layout), then transposed once behind a second
    barrier (so the transpose is not fused into every consumer); the values are
    ``dot_general``'s."""
    k1, k2 = jax.random.split(jax.random.key(2))
    x, kernel = jax.random.normal(k1, (3, 5, d_in)), jax.random.normal(k2, (d_in, d_out))
    dims = (((2,), (0,)), ((), ()))
    loss = lambda k: jnp.sum(jnp.sin(flat_dot_general(x, k, dims)))
    eqns = list(_eqns(jax.make_jaxpr(jax.grad(loss))(kernel).jaxpr))
    kept = [
        v.aval.shape for e in eqns if e.primitive.name == "optimization_barrier" for v in e.invars
    ]
    assert kept == ([(d_out, d_in), (d_in, d_out)] if d_in > d_out else [])
    ref = jax.grad(lambda k: jnp.sum(jnp.sin(jax.lax.dot_general(x, k, dims))))(kernel)
    np.testing.assert_allclose(jax.grad(loss)(kernel), ref, rtol=1e-5, atol=1e-5)
