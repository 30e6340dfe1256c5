"""Losses for training a class-conditional diffusion model with ``common.training.train``.

* ``label_dropout_loss_fn``: the diffusion loss (``diffusion.schedules.diffusion_loss``)
  with each label replaced by the null label with probability ``p_uncond``, so that one
  network is both the conditional and the unconditional model that classifier-free guidance
  mixes (Ho and Salimans 2021, algorithm 1).
* ``validation_loss``: the same loss, without label dropout, on fixed images at fixed
  timesteps and noise, so that successive evaluations differ only by the parameters.

The model is called as ``model.apply({"params": p}, x_t, t, labels, ...)`` (the UNet of
``diffusion.unet``) and its null label is ``model.num_classes``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from common import sharding as sharding_lib
from diffusion.schedules import Schedule, diffusion_loss


def label_dropout_loss_fn(
    model: Any,
    schedule: Schedule,
    *,
    p_uncond: float,
    prediction: str = "epsilon",
    min_snr_gamma: float | None = None,
) -> Callable[[Any, dict[str, jax.Array], jax.Array], Any]:
    """``loss_fn(params, batch, rng)`` on ``{"images" [b, h, w, c], "labels" int [b]}``:
    labels dropped to the null label with probability ``p_uncond``, then the diffusion loss
    (dropout active, ``min_snr_gamma`` weighting when given)."""
    if not 0.0 <= p_uncond < 1.0:
        raise ValueError(f"p_uncond={p_uncond} must be in [0, 1)")

    def loss_fn(params, batch, rng):
        drop_rng, loss_rng, dropout_rng = jax.random.split(rng, 3)
        labels = batch["labels"]
        dropped = jax.random.bernoulli(drop_rng, p_uncond, labels.shape)
        labels = jnp.where(dropped, model.num_classes, labels)  # [b]; num_classes = null

        def apply(x_t, t):
            return model.apply(
                {"params": params},
                x_t,
                t,
                labels,
                deterministic=False,
                rngs={"dropout": dropout_rng},
            )

        return diffusion_loss(
            apply,
            schedule,
            batch["images"],
            loss_rng,
            prediction=prediction,
            min_snr_gamma=min_snr_gamma,
        )

    return loss_fn


def validation_loss(
    model: Any,
    schedule: Schedule,
    images: np.ndarray,  # [n, h, w, c] in the model's data space
    labels: np.ndarray,  # int [n]
    mesh: Any,
    *,
    prediction: str = "epsilon",
    seed: int = 1234,
) -> Callable[[Any], float]:
    """``val_loss(params) -> float``: the mean squared error of the diffusion loss on the
    first ``n - n % mesh.size`` examples (sharded over the mesh), at timesteps and noise
    drawn once from ``seed``; no label dropout."""
    n = len(labels) - len(labels) % mesh.size
    if n == 0:
        raise ValueError(f"{len(labels)} validation examples for {mesh.size} devices: need more")
    batch = sharding_lib.put_batch({"images": images[:n], "labels": labels[:n]}, mesh)

    @jax.jit
    def val_loss(params, batch):
        apply = lambda x_t, t: model.apply({"params": params}, x_t, t, batch["labels"])
        return diffusion_loss(
            apply, schedule, batch["images"], jax.random.key(seed), prediction=prediction
        )[1]["mse"]

    return lambda params: float(val_loss(params, batch))
