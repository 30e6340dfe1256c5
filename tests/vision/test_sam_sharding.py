"""SAM's image embeddings computed over 8 simulated devices (batch over a 4-way ``data`` axis,
the encoder's ``embed``-partitioned weights over a 2-way ``fsdp`` axis, as
``common.sharding`` places them) equal the embeddings computed on one device.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from common import sharding
from vision.sam import model as sam_model


@pytest.mark.slow
def test_sharded_embedding_equals_one_device():
    if len(jax.devices()) < 8:
        import pytest

        pytest.skip("needs 8 devices (tests/conftest.py simulates them on CPU)")
    model = sam_model.from_preset("sam-tiny")
    boxed = jax.jit(lambda r: sam_model.init(model, r))(jax.random.key(0))
    variables = nn.meta.unbox(boxed)
    images = np.random.default_rng(0).normal(size=(8, 64, 64, 3)).astype(np.float32)
    embed = lambda v, x: model.apply(v, x, method="embed_images")

    one = jax.jit(embed)(jax.device_put(variables, jax.devices()[0]), images)

    mesh = sharding.make_mesh(data=4, fsdp=2)
    param_shardings = sharding.logical_shardings(boxed["params"], mesh)
    assert any(s.spec != PartitionSpec() for s in jax.tree.leaves(param_shardings))
    placed = {
        "params": jax.device_put(variables["params"], param_shardings),
        "buffers": jax.device_put(variables["buffers"], NamedSharding(mesh, PartitionSpec())),
    }
    batch = sharding.put_batch(images, mesh)
    many = jax.jit(embed)(placed, batch)
    assert len(many.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(many), np.asarray(one), atol=1e-5, rtol=1e-5)
