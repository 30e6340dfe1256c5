"""Schedules and the forward process against closed forms and diffusers' schedulers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion import schedules
from diffusion.schedules import Schedule

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")


@pytest.mark.parametrize(
    "name, theirs",
    [("linear", "linear"), ("scaled_linear", "scaled_linear"), ("cosine", "squaredcos_cap_v2")],
)
def test_betas_and_cumulative_alphas_match_diffusers(name, theirs):
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=theirs)
    if name == "scaled_linear":
        ref = diffusers.DDPMScheduler(beta_schedule=theirs, beta_start=0.00085, beta_end=0.012)
    s = Schedule.create(name, 1000)
    np.testing.assert_allclose(np.asarray(s.betas), ref.betas.numpy(), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(
        np.asarray(s.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=2e-5, atol=1e-9
    )


def test_closed_forms():
    betas = schedules.beta_schedule("linear", 1000)
    np.testing.assert_allclose(betas[[0, -1]], [1e-4, 0.02])
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999)
    # Cosine (Nichol & Dhariwal eq. 17): abar_t = f(t) / f(0), f(u) = cos((u/T + s)/(1 + s) pi/2)^2,
    # exact wherever the 0.999 cap on beta does not bite (all but the last steps).
    T, s = 1000, 0.008
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2
    abar = np.cumprod(1 - schedules.beta_schedule("cosine", T))
    want = np.array([f(t + 1) / f(0) for t in range(T)])
    np.testing.assert_allclose(abar[:990], want[:990], rtol=1e-9)
    assert schedules.beta_schedule("cosine", T).max() == pytest.approx(0.999)
    with pytest.raises(ValueError, match="unknown beta schedule 'sigmoid'"):
        schedules.beta_schedule("sigmoid")


def test_posterior_mean_and_variance_are_bayes_rule():
    """q(x_{t-1} | x_t, x0) from the product of q(x_{t-1} | x0) and q(x_t | x_{t-1})."""
    s = Schedule.create("linear", 1000)
    betas = np.asarray(s.betas, np.float64)
    abar = np.cumprod(1 - betas)
    t = np.array([1, 10, 500, 999])
    x0 = np.array([0.3, -0.7, 1.0, 0.1])
    xt = np.array([1.2, 0.4, -0.5, 2.0])
    prec = 1 / (1 - abar[t - 1]) + (1 - betas[t]) / betas[t]
    var = 1 / prec
    mean = var * (
        np.sqrt(abar[t - 1]) * x0 / (1 - abar[t - 1]) + np.sqrt(1 - betas[t]) * xt / betas[t]
    )
    np.testing.assert_allclose(s.posterior_variance(jnp.asarray(t)), var, rtol=1e-4)
    np.testing.assert_allclose(
        s.posterior_mean(
            jnp.asarray(x0, jnp.float32), jnp.asarray(xt, jnp.float32), jnp.asarray(t)
        ),
        mean,
        rtol=1e-4,
        atol=1e-6,
    )
    np.testing.assert_allclose(s.posterior_variance(jnp.asarray(t), "large"), betas[t], rtol=1e-6)
    assert float(s.posterior_variance(jnp.asarray(0))) == 0.0
    np.testing.assert_allclose(s.posterior_mean(jnp.ones(1), jnp.zeros(1), jnp.zeros(1, int)), 1.0)


@pytest.mark.parametrize("prediction", schedules.PREDICTIONS)
def test_parameterisations_round_trip(prediction):
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(k1, (4, 5))
    eps = jax.random.normal(k2, (4, 5))
    abar = jnp.array([0.999, 0.5, 0.1, 4e-5])[:, None]
    xt = jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * eps
    out = schedules.prediction_target(x0, eps, abar, prediction)
    x0_hat, eps_hat = schedules.split_prediction(out, xt, abar, prediction)
    np.testing.assert_allclose(x0_hat, x0, atol=2e-3 if prediction == "epsilon" else 1e-4)
    np.testing.assert_allclose(eps_hat, eps, atol=1e-4 if prediction != "x0" else 2e-3)


def test_q_sample_statistics():
    s = Schedule.create("linear", 1000)
    n = 20000
    x0 = jnp.full((n, 1), 0.8)
    for t in (0, 250, 999):
        xt = s.q_sample(x0, jnp.full((n,), t), jax.random.normal(jax.random.key(t), (n, 1)))
        abar = float(s.alphas_cumprod[t])
        assert float(xt.mean()) == pytest.approx(math.sqrt(abar) * 0.8, abs=4 / math.sqrt(n))
        assert float(xt.std()) == pytest.approx(math.sqrt(1 - abar), rel=0.03)


@pytest.mark.parametrize("prediction", schedules.PREDICTIONS)
def test_min_snr_loss_is_the_capped_x0_loss(prediction):
    """min-SNR-gamma weights the x0-space error by min(snr, gamma), whatever the target."""
    s = Schedule.create("cosine", 1000)
    x0 = jax.random.uniform(jax.random.key(1), (16, 4, 4, 1), minval=-1, maxval=1)
    seen = {}

    def apply_fn(xt, t):
        seen["xt"], seen["t"] = xt, t
        return 0.3 * xt + 0.1  # any deterministic function of the input

    loss, aux = schedules.diffusion_loss(
        apply_fn, s, x0, jax.random.key(2), prediction=prediction, min_snr_gamma=5.0
    )
    xt, t = seen["xt"], seen["t"]
    abar = s.alphas_cumprod[t][:, None, None, None]
    x0_hat, _ = schedules.split_prediction(apply_fn(xt, t), xt, abar, prediction)
    snr = s.snr(t)
    x0_err = jnp.mean(jnp.square(x0_hat - x0).reshape(16, -1), 1)
    np.testing.assert_allclose(loss, jnp.mean(jnp.minimum(snr, 5.0) * x0_err), rtol=2e-3)
    noise = (xt - jnp.sqrt(abar) * x0) / jnp.sqrt(1 - abar)
    target = schedules.prediction_target(x0, noise, abar, prediction)
    np.testing.assert_allclose(
        aux["mse"], jnp.mean(jnp.square(apply_fn(xt, t) - target)), rtol=2e-3
    )
