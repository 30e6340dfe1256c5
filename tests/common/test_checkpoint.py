"""Checkpoints: round trip, restore onto another device count, fallback from a corrupted
latest step (which is then moved aside, so the step can be saved again), refusal of a
workdir written under another config or with another state structure."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import sharding
from common import sharding as sh
from common.checkpoint import Checkpointer, ConfigMismatchError


def make_state(mesh):
    x = jnp.arange(64, dtype=jnp.float32).reshape(8, 8)
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sh.DATA, None))
    return {
        "w": jax.device_put(x, spec),
        "step": jax.device_put(jnp.int32(3), sharding.replicated(mesh)),
    }


def test_round_trip_and_restore_on_other_device_count(tmp_path):
    mesh8 = sharding.make_mesh(8, 1)
    ckpt = Checkpointer(str(tmp_path), meta={"model": {"d": 8}}, async_save=True)
    ckpt.save(1, make_state(mesh8), {"step": 1})
    ckpt.close()

    mesh1 = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    target = make_state(mesh1)
    target = jax.tree.map(jnp.zeros_like, target)
    ckpt = Checkpointer(str(tmp_path), meta={"model": {"d": 8}})
    step, state, data = ckpt.restore_latest(target)
    assert step == 1 and data == {"step": 1}
    np.testing.assert_array_equal(state["w"], np.arange(64).reshape(8, 8))
    assert len(state["w"].sharding.device_set) == 1
    ckpt.close()


def test_corrupted_latest_falls_back_to_previous(tmp_path, caplog):
    mesh = sharding.make_mesh()
    ckpt = Checkpointer(str(tmp_path), meta={}, async_save=False)
    state = make_state(mesh)
    ckpt.save(1, state, {"step": 1})
    ckpt.save(2, jax.tree.map(lambda x: x + 1, state), {"step": 2})
    ckpt.close()
    # Corrupt every data file of step 2's state.
    n = 0
    for root, _, files in os.walk(tmp_path / "2" / "state"):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "r+b") as fh:
                size = os.path.getsize(path)
                fh.write(b"\xff" * max(size, 1))
            n += 1
    assert n > 0
    ckpt = Checkpointer(str(tmp_path), meta={})
    with caplog.at_level(logging.WARNING):
        step, restored, data = ckpt.restore_latest(state)
    assert step == 1 and data == {"step": 1}
    np.testing.assert_array_equal(restored["w"], np.arange(64).reshape(8, 8))
    assert "step 2" in caplog.text and "unreadable" in caplog.text
    # The bad step is kept for inspection but out of the way: step 2 can be written again.
    assert (tmp_path / "2.unreadable").is_dir() and ckpt.latest_step() == 1
    ckpt.save(2, jax.tree.map(lambda x: x + 7, restored), {"step": 2})
    ckpt.close()
    step, restored, _ = Checkpointer(str(tmp_path), meta={}).restore_latest(state)
    assert step == 2
    np.testing.assert_array_equal(restored["w"], np.arange(64).reshape(8, 8) + 7)


def test_corrupted_meta_falls_back_and_nothing_readable_names_the_error(tmp_path):
    mesh = sharding.make_mesh()
    ckpt = Checkpointer(str(tmp_path), meta={"a": [1, (2, 3)]}, async_save=False)
    state = make_state(mesh)
    ckpt.save(1, state, {"step": 1})
    ckpt.save(2, state, {"step": 2})
    ckpt.close()
    (tmp_path / "2" / "meta" / "metadata").write_text("{not json")
    ckpt = Checkpointer(str(tmp_path), meta={"a": [1, (2, 3)]})  # nested tuples read back
    assert ckpt.restore_latest(state)[0] == 1
    ckpt.close()
    (tmp_path / "1" / "meta" / "metadata").write_text("{not json")
    with pytest.raises(RuntimeError, match=r"no checkpoint .* is readable .*step 1: .*Error"):
        Checkpointer(str(tmp_path), meta={"a": [1, (2, 3)]}).restore_latest(state)


def test_other_state_structure_is_a_config_mismatch(tmp_path):
    mesh = sharding.make_mesh()
    ckpt = Checkpointer(str(tmp_path), meta={}, async_save=False)
    ckpt.save(1, make_state(mesh), {"step": 1})
    ckpt.close()
    target = {**make_state(mesh), "ema": jnp.zeros((8, 8))}
    with pytest.raises(
        ConfigMismatchError, match=r"another structure .*only in this run: \[\('ema',\)\]"
    ):
        Checkpointer(str(tmp_path), meta={}).restore_latest(target)
    assert (tmp_path / "1").is_dir()  # a mismatch moves nothing aside


def test_other_config_is_refused(tmp_path):
    mesh = sharding.make_mesh()
    ckpt = Checkpointer(
        str(tmp_path), meta={"model": {"d_model": 32, "layers": 2}}, async_save=False
    )
    ckpt.save(1, make_state(mesh), {"step": 1})
    ckpt.close()
    ckpt = Checkpointer(str(tmp_path), meta={"model": {"d_model": 64, "layers": 2}})
    with pytest.raises(ConfigMismatchError, match=r"model\.d_model: 32 -> 64"):
        ckpt.restore_latest(make_state(mesh))


def test_empty_directory_restores_nothing(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "none"), meta={})
    assert ckpt.restore_latest(make_state(sharding.make_mesh())) is None
