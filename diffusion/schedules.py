"""Noise schedules and the forward process of a diffusion model (Ho et al. 2020, section 2).

The forward process adds Gaussian noise in ``T`` steps with variances ``beta_1 .. beta_T``;
with ``alpha_t = 1 - beta_t`` and ``abar_t = prod_{s <= t} alpha_s`` it has the closed form
``q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)`` (Ho et al. eq. 4), so a training
example is one draw of ``x_t`` at a uniformly drawn ``t``. Timesteps are 0-based here, as
in diffusers: index ``t`` is the paper's ``t + 1``.

* ``beta_schedule``: ``linear`` (Ho et al. section 4, 1e-4 .. 0.02 over 1000 steps),
  ``cosine`` (Nichol and Dhariwal 2021, eq. 17, ``s = 0.008``, betas capped at 0.999) and
  ``scaled_linear`` (Stable Diffusion: linear in ``sqrt(beta)``, 0.00085 .. 0.012).
* ``Schedule``: ``q_sample``, the posterior ``q(x_{t-1} | x_t, x_0)`` mean and its two fixed
  reverse-process variances (``small``: the posterior variance ``beta~_t``; ``large``:
  ``beta_t``; Ho et al. section 3.2), the signal-to-noise ratio.
* Parameterisations (``PREDICTIONS``): the network predicts the noise ``epsilon`` (Ho et
  al. eq. 11), the clean image ``x0``, or the velocity ``v = sqrt(abar) eps - sqrt(1 - abar)
  x0`` (Salimans and Ho 2022, section 4); ``split_prediction`` turns any of them into
  ``(x0, eps)`` and ``prediction_target`` gives the training target.
* ``diffusion_loss``: the simple loss of Ho et al. (eq. 14: mean squared error on the
  parameterisation's target at uniform timesteps), optionally weighted by min-SNR-gamma
  (Hang et al. 2023), which caps the weight of low-noise timesteps.

Schedule tables are computed in float64 on the host and stored as float32 arrays; samplers
(``diffusion/sampling.py``) build their per-step coefficients in float64 from ``abar``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
BETA_SCHEDULES = ("linear", "cosine", "scaled_linear")
PREDICTIONS = ("epsilon", "x0", "v")
VARIANCES = ("small", "large")


def beta_schedule(
    name: str,
    num_timesteps: int = 1000,
    beta_start: float | None = None,
    beta_end: float | None = None,
    *,
    cosine_s: float = 0.008,
    max_beta: float = 0.999,
) -> np.ndarray:
    """``[num_timesteps]`` float64 betas of the named schedule.

    ``beta_start`` / ``beta_end`` default to 1e-4 / 0.02 (linear) and 0.00085 / 0.012
    (scaled_linear); the cosine schedule ignores them.
    """
    if num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
    if name == "linear":
        lo, hi = beta_start or 1e-4, beta_end or 0.02
        return np.linspace(lo, hi, num_timesteps, dtype=np.float64)
    if name == "scaled_linear":
        lo, hi = beta_start or 0.00085, beta_end or 0.012
        return np.linspace(lo**0.5, hi**0.5, num_timesteps, dtype=np.float64) ** 2
    if name == "cosine":
        f = lambda u: math.cos((u + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
        abar = np.array([f(u) for u in steps])
        return np.minimum(1.0 - abar[1:] / abar[:-1], max_beta)
    raise ValueError(f"unknown beta schedule {name!r}; choose one of {BETA_SCHEDULES}")


def _bcast(a: Array, x: Array) -> Array:
    """``a [batch]`` reshaped to broadcast against ``x [batch, ...]``."""
    return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def split_prediction(out: Array, x_t: Array, abar: Array, prediction: str) -> tuple[Array, Array]:
    """``(x0, eps)`` implied by the model output under a parameterisation.

    ``abar`` broadcasts against ``x_t`` (a scalar, or shaped like ``x_t``'s batch then ones).
    """
    a, s = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
    if prediction == "epsilon":
        return (x_t - s * out) / a, out
    if prediction == "x0":
        return out, (x_t - a * out) / s
    if prediction == "v":
        return a * x_t - s * out, s * x_t + a * out
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def prediction_target(x0: Array, eps: Array, abar: Array, prediction: str) -> Array:
    """What the network should output for ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``."""
    if prediction == "epsilon":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return jnp.sqrt(abar) * eps - jnp.sqrt(1.0 - abar) * x0
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


class Schedule(flax.struct.PyTreeNode):
    """The tables of one noise schedule, computed in float64 and stored as float32 ``[T]``.

    ``alphas_cumprod`` is ``abar``; the posterior tables avoid the float32 cancellation of
    ``1 - abar`` near ``t = 0``.
    """

    betas: Array
    alphas_cumprod: Array
    posterior_var: Array  # beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t (0 at t = 0)
    posterior_coef_x0: Array  # sqrt(abar_{t-1}) beta_t / (1 - abar_t)
    posterior_coef_xt: Array  # sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t)

    @classmethod
    def create(cls, name: str = "linear", num_timesteps: int = 1000, **kw: Any) -> Schedule:
        return cls.from_betas(beta_schedule(name, num_timesteps, **kw))

    @classmethod
    def from_betas(cls, betas: Any) -> Schedule:
        betas = np.asarray(betas, np.float64)
        if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
            raise ValueError("betas must be a 1-D array with every entry in (0, 1)")
        abar = np.cumprod(1.0 - betas)
        abar_prev = np.concatenate([[1.0], abar[:-1]])
        f32 = lambda a: jnp.asarray(a, jnp.float32)
        return cls(
            betas=f32(betas),
            alphas_cumprod=f32(abar),
            posterior_var=f32((1.0 - abar_prev) / (1.0 - abar) * betas),
            posterior_coef_x0=f32(np.sqrt(abar_prev) * betas / (1.0 - abar)),
            posterior_coef_xt=f32(np.sqrt(1.0 - betas) * (1.0 - abar_prev) / (1.0 - abar)),
        )

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def alphas_cumprod_f64(self) -> np.ndarray:
        """``abar`` recomputed in float64 from the betas (host), for sampler coefficients."""
        return np.cumprod(1.0 - np.asarray(self.betas, np.float64))

    def snr(self, t: Array) -> Array:
        """Signal-to-noise ratio ``abar_t / (1 - abar_t)`` at integer timesteps."""
        abar = self.alphas_cumprod[t]
        return abar / (1.0 - abar)

    def q_sample(self, x0: Array, t: Array, noise: Array) -> Array:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``; ``t [batch]`` int."""
        abar = _bcast(self.alphas_cumprod[t], x0).astype(x0.dtype)
        return jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise

    def posterior_mean(self, x0: Array, x_t: Array, t: Array) -> Array:
        """Mean of ``q(x_{t-1} | x_t, x0)`` (Ho et al. eq. 7); at ``t = 0`` it is ``x0``."""
        c0 = _bcast(self.posterior_coef_x0[t], x_t)
        ct = _bcast(self.posterior_coef_xt[t], x_t)
        return c0 * x0 + ct * x_t

    def posterior_variance(self, t: Array, kind: str = "small") -> Array:
        """Reverse-process variance at ``t``: ``small`` is ``beta~_t`` (0 at ``t = 0``),
        ``large`` is ``beta_t``."""
        if kind == "large":
            return self.betas[t]
        if kind != "small":
            raise ValueError(f"unknown variance {kind!r}; choose one of {VARIANCES}")
        return self.posterior_var[t]


def min_snr_weight(snr: Array, gamma: float, prediction: str) -> Array:
    """Min-SNR-gamma loss weight (Hang et al. 2023, eq. 8 and its epsilon / v forms):
    ``min(snr, gamma)`` on the x0 loss, expressed for the parameterisation's own target."""
    capped = jnp.minimum(snr, gamma)
    if prediction == "epsilon":
        return capped / snr
    if prediction == "x0":
        return capped
    if prediction == "v":
        return capped / (snr + 1.0)
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def diffusion_loss(
    apply_fn: Callable[[Array, Array], Array],
    schedule: Schedule,
    x0: Array,
    rng: Array,
    *,
    prediction: str = "epsilon",
    min_snr_gamma: float | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Ho et al.'s simple loss: ``mean || target - apply_fn(x_t, t) ||^2`` over uniform ``t``.

    ``apply_fn(x_t, t)`` is the network (conditioning closed over); ``x0 [batch, ...]``. The
    squared error is averaged over each example's elements, weighted per example by
    min-SNR-gamma when given, then averaged over the batch; computed in float32.
    """
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
    t_rng, n_rng = jax.random.split(rng)
    b = x0.shape[0]
    t = jax.random.randint(t_rng, (b,), 0, schedule.num_timesteps)  # [batch]
    noise = jax.random.normal(n_rng, x0.shape, jnp.float32)
    x0 = x0.astype(jnp.float32)
    x_t = schedule.q_sample(x0, t, noise)
    target = prediction_target(x0, noise, _bcast(schedule.alphas_cumprod[t], x0), prediction)
    out = apply_fn(x_t, t).astype(jnp.float32)
    per_example = jnp.mean(jnp.square(out - target).reshape(b, -1), axis=1)  # [batch]
    mse = jnp.mean(per_example)
    if min_snr_gamma is None:
        return mse, {"mse": mse}
    w = min_snr_weight(schedule.snr(t), min_snr_gamma, prediction)
    return jnp.mean(w * per_example), {"mse": mse}
