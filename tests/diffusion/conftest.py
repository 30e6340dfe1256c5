"""Shared by the diffusion tests: random UNet params without compiling ``init``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util


def random_unet_params(model, image_size: int, in_channels: int, seed: int = 0):
    """Params of ``model`` drawn on the host: kernels ``N(0, 1 / fan_in)``, embeddings
    ``N(0, 1)``, norm scales ``1 + N(0, 0.1)``, biases ``N(0, 0.1)`` (every parameter moves the
    output, unlike flax's zero biases). ``jax.eval_shape`` gives the tree: nothing compiles."""
    x = jnp.zeros((1, image_size, image_size, in_channels))
    t = jnp.zeros((1,), jnp.int32)
    labels = t if model.num_classes > 0 else None
    shapes = jax.eval_shape(model.init, jax.random.key(0), x, t, labels)["params"]
    rng = np.random.default_rng(seed)
    flat = {}
    for path, s in traverse_util.flatten_dict(shapes).items():
        n = rng.standard_normal(s.shape).astype(np.float32)
        name = path[-1]
        if name == "kernel":
            flat[path] = n / np.sqrt(np.prod(s.shape[:-1]))
        elif name == "scale":
            flat[path] = 1.0 + 0.1 * n
        elif name == "bias":
            flat[path] = 0.1 * n
        else:
            flat[path] = n
    return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="session")
def random_params():
    return random_unet_params
