"""Small shared layers: the transformer MLP, logically partitioned Dense / Embed / LayerNorm."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from common import sharding as sh

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf GELU
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # GPT-2's "gelu_new"
    "relu": jax.nn.relu,
    # CLIP's ``x * sigmoid(1.702 x)`` (OpenAI's released CLIP models, HF "quick_gelu")
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


# ``remat_policy``, the recomputation knob of every model family: None = no recomputation,
# else the name of a ``jax.checkpoint_policies`` policy ("nothing_saveable" recomputes the
# whole block in the backward pass; "dots_with_no_batch_dims_saveable" keeps the weight
# matmuls and recomputes attention, the Sparse Transformer's section 5.4 choice).
REMAT_POLICIES = (
    None,
    "nothing_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "everything_saveable",
)


def remat(block: type[nn.Module], policy: str | None) -> type[nn.Module]:
    """``block``, or ``nn.remat(block)`` under the ``jax.checkpoint_policies`` named ``policy``.

    Models check ``policy in REMAT_POLICIES`` in ``__post_init__``; this raises for a name
    that slipped past them, naming the field."""
    if policy is None:
        return block
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat_policy={policy!r} is not one of {REMAT_POLICIES}")
    return nn.remat(block, policy=getattr(jax.checkpoint_policies, policy), prevent_cse=True)


def activation(name: str) -> Callable[[Array], Array]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def flat_dot_general(
    lhs: Array,
    rhs: Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
) -> Array:
    """``jax.lax.dot_general`` for projections, with the leading axes of ``lhs`` flattened.

    A projection ``x [..., *in] . kernel [*in, *out]`` (the last axes of ``x`` against the
    first of the kernel, no batch axes) is computed as one 2-D matmul ``[n, in] . [in, out]``
    and reshaped back; any other contraction goes to ``dot_general`` unchanged. Same values.
    Why: the kernel's gradient contracts over every leading axis; kept apart (``[batch, len,
    in]``), XLA CPU lowers that contraction to a transposed copy of the output gradient and
    a slow dot with both operands transposed; flattened, it is one plain matmul. Not always
    faster: on one-thread data-parallel devices the weight gradients of Swin's attention
    projections become single-thread Eigen dots, so those keep ``jax.lax.dot_general``
    (measurements: ``benchmarks/LOG.md``). Pass it as
    ``dot_general=`` to ``nn.Dense`` / ``nn.DenseGeneral`` (the default of ``dense``, ``MLP``
    and ``StackedDense``). Projections that narrow (``in > out``) take their kernel gradient
    in the faster orientation (``_narrowing_matmul``).
    """
    (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
    n = len(lhs_c)
    lead = lhs.shape[: lhs.ndim - n]
    kw = dict(precision=precision, preferred_element_type=preferred_element_type)
    if (
        lhs_b
        or rhs_b
        or tuple(lhs_c) != tuple(range(lhs.ndim - n, lhs.ndim))
        or tuple(rhs_c) != tuple(range(n))
        or len(lead) <= 1
    ):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, **kw)
    k = math.prod(rhs.shape[:n])
    lhs2, rhs2 = lhs.reshape(-1, k), rhs.reshape(k, -1)
    if (
        k > rhs2.shape[1]
        and lhs.dtype == rhs.dtype
        and precision is None
        and preferred_element_type is None
    ):
        y = _narrowing_matmul(lhs2, rhs2)
    else:
        y = jax.lax.dot_general(lhs2, rhs2, (((1,), (0,)), ((), ())), **kw)
    return y.reshape(*lead, *rhs.shape[n:])  # y: [prod(lead), prod(out)]


@jax.custom_vjp
def _narrowing_matmul(x: Array, kernel: Array) -> Array:
    """``x [n, in] @ kernel [in, out]`` for ``in > out``, whose kernel gradient is computed as
    ``(g^T x)^T``: the ``[out, in]`` product, with the longer axis last, then a transpose of
    that small result (behind an optimisation barrier, or XLA folds it back into the dot).
    XLA CPU runs the row contraction faster when its output's last axis is the longer one;
    for ``in <= out`` the plain ``x^T g`` is already that form (timings:
    ``benchmarks/LOG.md``). Values and gradients equal ``dot_general``'s
    (``tests/common/test_flat_dot_general.py``)."""
    return x @ kernel


def _narrowing_matmul_fwd(x, kernel):
    return x @ kernel, (x, kernel)


def _narrowing_matmul_bwd(res, g):  # g: [n, out]
    x, kernel = res
    dx = jax.lax.dot_general(g, kernel, (((1,), (1,)), ((), ())))  # [n, in]
    dk_t = jax.lax.dot_general(g, x, (((0,), (0,)), ((), ())))  # [out, in]
    # The second barrier materialises the transposed kernel gradient once: without it XLA
    # fuses the transpose into each consumer (the gradient clip, AdamW's two moments, the
    # norms), each then reading the [out, in] product with a stride.
    dk = jax.lax.optimization_barrier(jax.lax.optimization_barrier(dk_t).T)
    return dx.astype(x.dtype), dk.astype(kernel.dtype)


_narrowing_matmul.defvjp(_narrowing_matmul_fwd, _narrowing_matmul_bwd)


def dense(
    features: int,
    axes: tuple[str | None, str | None],
    *,
    name: str,
    dtype: Any,
    param_dtype: Any,
    kernel_init: Callable[..., Any] = nn.initializers.normal(0.02),
    use_bias: bool = True,
    dot_general: Callable[..., Array] = flat_dot_general,
) -> nn.Dense:
    """``nn.Dense`` whose kernel carries logical axis names ``axes`` (in, out)."""
    return nn.Dense(
        features,
        use_bias=use_bias,
        dot_general=dot_general,
        kernel_init=nn.with_logical_partitioning(kernel_init, axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, axes[1:]),
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def layer_norm(
    name: str, *, eps: float, dtype: Any, param_dtype: Any, use_bias: bool = True
) -> nn.LayerNorm:
    """LayerNorm with logically partitioned scale/bias; statistics are computed in float32."""
    return nn.LayerNorm(
        epsilon=eps,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (sh.NORM,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (sh.NORM,)),
        name=name,
    )


class MLP(nn.Module):
    """Position-wise feed-forward: ``Dense(d_ff) -> activation -> Dense(d_model) -> dropout``."""

    d_ff: int
    activation: str = "gelu"
    dropout: float = 0.0
    kernel_init: Callable[..., Any] = nn.initializers.normal(0.02)
    out_kernel_init: Callable[..., Any] = nn.initializers.normal(0.02)
    dot_general: Callable[..., Array] = flat_dot_general
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
        d_model = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, dot_general=self.dot_general)
        fc = dense(self.d_ff, (sh.EMBED, sh.MLP), name="fc", kernel_init=self.kernel_init, **kw)
        h = activation(self.activation)(fc(x))  # [batch, len, d_ff]
        out_init = self.out_kernel_init
        h = dense(d_model, (sh.MLP, sh.EMBED), name="proj", kernel_init=out_init, **kw)(h)
        return nn.Dropout(self.dropout)(h, deterministic=deterministic)


class StackedDense(nn.Module):
    """``n`` projections of the last axis (Q, K, V) stored as one stacked kernel, applied as
    ``n`` separate dots.

    The parameters are exactly ``nn.DenseGeneral((n, *features))``'s: ``kernel`` ``[in, n,
    *features]`` and ``bias`` ``[n, *features]``, initialised the same way (on the flat
    ``[in, n * prod(features)]`` shape), so converters and checkpoints see one fused
    projection. What differs is the computation: slicing q, k and v out of one fused output
    makes the backward pass zero-pad each of their gradients to the fused shape and add
    them, three full-size passes; separate dots give contiguous outputs whose input gradients
    accumulate in the matmuls, which is faster (``benchmarks/LOG.md``).

    Returns a tuple of ``n`` arrays ``[..., *features]``.
    """

    num: int
    features: tuple[int, ...]
    kernel_init: Callable[..., Any]  # may carry logical partitioning for the stacked shape
    bias_init: Callable[..., Any] = nn.initializers.zeros
    use_bias: bool = True
    dot_general: Callable[..., Array] = flat_dot_general
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> tuple[Array, ...]:
        shape = (x.shape[-1], self.num, *self.features)
        out_size = self.num * math.prod(self.features)

        def kernel_init(rng, shape, dtype):  # DenseGeneral's: init flat, then reshape
            kernel = self.kernel_init(rng, (shape[0], out_size), dtype)
            if isinstance(kernel, nn.meta.AxisMetadata):
                return nn.meta.replace_boxed(kernel, jnp.reshape(kernel.unbox(), shape))
            return jnp.reshape(kernel, shape)

        kernel = self.param("kernel", kernel_init, shape, self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, shape[1:], self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        outs = []
        for i in range(self.num):
            y = self.dot_general(x, kernel[:, i], (((x.ndim - 1,), (0,)), ((), ())))
            outs.append(y if bias is None else y + bias[i])
        return tuple(outs)
