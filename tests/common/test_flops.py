"""XLA's cost analysis read once (``common.flops``): a matmul's FLOPs are 2 m k n whether
read from the lowered or the compiled program."""

import jax
import jax.numpy as jnp
import pytest

from common.flops import compiled_flops, lowered_flops


def test_matmul_flops_are_two_m_k_n_lowered_and_compiled():
    a, b = jnp.ones((8, 16)), jnp.ones((16, 4))
    matmul = lambda x, y: x @ y
    assert lowered_flops(jax.jit(matmul).lower(a, b)) == 2 * 8 * 16 * 4
    assert compiled_flops(matmul, a, b) == 2 * 8 * 16 * 4


def test_a_program_without_flops_is_an_error():
    class NoAnalysis:  # a lowered program whose backend analyses nothing
        cost_analysis = staticmethod(lambda: None)
        compile = staticmethod(lambda: NoAnalysis)

    with pytest.raises(RuntimeError, match="gave no FLOPs"):
        lowered_flops(NoAnalysis)
