"""StackedDense has DenseGeneral((n, *features))'s parameters, initial values and outputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import sharding as sh
from common.layers import StackedDense


@pytest.mark.parametrize("init", [nn.initializers.xavier_uniform(), nn.initializers.normal(0.02)])
def test_stacked_dense_equals_dense_general(init):
    axes = (sh.EMBED, None, sh.HEADS, sh.KV)
    kernel_init = nn.with_logical_partitioning(init, axes)
    bias_init = nn.initializers.normal(1.0)
    fused = nn.DenseGeneral((3, 4, 8), kernel_init=kernel_init, bias_init=bias_init)
    stacked = StackedDense(3, (4, 8), kernel_init=kernel_init, bias_init=bias_init)
    x = jax.random.normal(jax.random.key(1), (2, 5, 32))
    p_fused, p_stacked = fused.init(jax.random.key(0), x), stacked.init(jax.random.key(0), x)
    # same tree, same logical axes, same values (fan-in/out computed on the flat shape)
    assert p_stacked["params"]["kernel"].names == axes
    for a, b in zip(
        jax.tree.leaves(nn.unbox(p_fused)), jax.tree.leaves(nn.unbox(p_stacked)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    y = fused.apply(p_fused, x)  # [2, 5, 3, 4, 8]
    outs = stacked.apply(p_stacked, x)
    assert len(outs) == 3
    for i, out in enumerate(outs):
        np.testing.assert_allclose(out, y[:, :, i], atol=1e-6)
    # gradients w.r.t. the input and the stacked kernel agree too
    loss_f = lambda p, x: jnp.sum(jnp.sin(fused.apply(p, x)))
    loss_s = lambda p, x: sum(jnp.sum(jnp.sin(o)) for o in stacked.apply(p, x))
    for a, b in zip(
        jax.tree.leaves(jax.grad(loss_f, (0, 1))(nn.unbox(p_fused), x)),
        jax.tree.leaves(jax.grad(loss_s, (0, 1))(nn.unbox(p_stacked), x)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)
