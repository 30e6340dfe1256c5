"""The class-conditional training losses: label dropout drops the asked-for share of labels
to the null label and nothing else; the validation loss is the diffusion loss at fixed noise."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import sharding as sharding_lib
from diffusion import training
from diffusion.schedules import Schedule, diffusion_loss


class NullMarker:
    """A stand-in network: predicts ``params`` where the label is the null label, else 0."""

    num_classes = 10

    def apply(self, variables, x_t, t, labels, deterministic=True, rngs=None):
        null = (labels == self.num_classes).astype(jnp.float32)[:, None, None, None]
        return jnp.zeros_like(x_t) + variables["params"] * null


def test_label_dropout_replaces_the_share_p_uncond_by_the_null_label():
    model, schedule = NullMarker(), Schedule.create("linear", 100)
    batch = {"images": jnp.zeros((4000, 1, 1, 1)), "labels": jnp.arange(4000) % 10}
    rng = jax.random.key(0)
    # Kept labels predict 0 (mse ~ E[eps^2] = 1), null ones 10 (mse ~ 100 + 1).
    loss, _ = training.label_dropout_loss_fn(model, schedule, p_uncond=0.25)(10.0, batch, rng)
    assert float(loss) == pytest.approx(1 + 100 * 0.25, abs=4 * 100 * np.sqrt(0.25 * 0.75 / 4000))
    # p_uncond = 0: exactly the diffusion loss with every label kept.
    loss0, _ = training.label_dropout_loss_fn(model, schedule, p_uncond=0.0)(10.0, batch, rng)
    _, loss_rng, _ = jax.random.split(rng, 3)
    want, _ = diffusion_loss(
        lambda x_t, t: jnp.zeros_like(x_t), schedule, batch["images"], loss_rng
    )
    assert float(loss0) == float(want)
    with pytest.raises(ValueError, match="p_uncond=1.0 must be in"):
        training.label_dropout_loss_fn(model, schedule, p_uncond=1.0)


def test_validation_loss_is_the_diffusion_loss_at_fixed_noise():
    model, schedule = NullMarker(), Schedule.create("linear", 100)
    mesh = sharding_lib.make_mesh(-1, 1)  # the 8 simulated devices
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (21, 4, 4, 1)).astype(np.float32)
    labels = np.array([10] * 11 + [0] * 10, np.int32)  # first 16 used: 11 null, 5 kept
    val_loss = training.validation_loss(model, schedule, images, labels, mesh, seed=5)
    apply = lambda x_t, t: model.apply({"params": 2.0}, x_t, t, jnp.asarray(labels[:16]))
    _, want = diffusion_loss(apply, schedule, jnp.asarray(images[:16]), jax.random.key(5))
    assert val_loss(2.0) == pytest.approx(float(want["mse"]), rel=1e-6)
    assert val_loss(2.0) == val_loss(2.0)  # the same noise every call
    with pytest.raises(ValueError, match="3 validation examples for 8 devices"):
        training.validation_loss(model, schedule, images[:3], labels[:3], mesh)
