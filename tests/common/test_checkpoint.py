"""Checkpoints: round trip, restore onto another device count, fallback from a corrupted
latest step (which is then moved aside, so the step can be saved again), refusal of a
workdir written under another config or with another state structure; damage that orbax
reads without error (a flipped bit, random bytes, another step's files) caught by the
checksums, one warning line per skipped step, and a full disk during a save."""

import errno
import json
import logging
import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from common import sharding
from common import sharding as sh
from common.checkpoint import (
    Checkpointer,
    CheckpointSaveError,
    ConfigMismatchError,
    state_checksums,
)


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


# --------------------------------------------------------------------------- damage


def random_state(mesh, seed):
    """Sharded and replicated arrays of random values; w's shards (8 KiB each) are stored
    outside the OCDBT index nodes (which carry their own checksums), as real parameters are."""
    rng = np.random.default_rng(seed)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    return {
        "w": jax.device_put(rng.standard_normal((256, 64)).astype(np.float32), rows),
        "b": jax.device_put(rng.standard_normal(32).astype(np.float32), sharding.replicated(mesh)),
        "h": jax.device_put(
            jnp.asarray(rng.standard_normal((16, 8)), jnp.bfloat16), sharding.replicated(mesh)
        ),
        "step": jax.device_put(jnp.int32(seed), sharding.replicated(mesh)),
    }


def save_two_steps(directory):
    mesh = sharding.make_mesh()
    ckpt = Checkpointer(str(directory), meta={"m": 1}, async_save=True)
    ckpt.save(1, random_state(mesh, 1), {"step": 1})
    ckpt.save(2, random_state(mesh, 2), {"step": 2})
    ckpt.close()
    return random_state(mesh, 0)


def largest_data_file(step_dir):
    """The step's largest OCDBT data file: the one holding w's chunks (the index nodes, in
    small files, carry their own checksums and are checked by TensorStore)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.parent.name == "d" and p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def restore_expecting_step_1(directory, target, caplog):
    """Restores, expecting the fallback to step 1 with one warning about step 2; returns it."""
    ckpt = Checkpointer(str(directory), meta={"m": 1})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        step, restored, data = ckpt.restore_latest(target)
    ckpt.close()
    assert step == 1 and data == {"step": 1}
    expected = random_state(sharding.make_mesh(), 1)
    for k in expected:
        np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(expected[k]), k)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    skipped = [w for w in warnings if "is unreadable" in w]
    assert len(skipped) == 1 and "step 2" in skipped[0], warnings
    assert "\n" not in skipped[0] and len(skipped[0]) < 1200, skipped[0]
    assert len(warnings) == 2, warnings  # the skip and the move aside, nothing from orbax
    assert (directory / "2.unreadable").is_dir()
    return skipped[0]


@pytest.mark.parametrize("damage", ["bit_flip", "random_bytes"])
def test_flipped_bit_or_random_bytes_in_a_data_file_fall_back(tmp_path, caplog, damage):
    target = save_two_steps(tmp_path)
    path = largest_data_file(tmp_path / "2")
    raw = bytearray(path.read_bytes())
    mid = len(raw) // 2
    if damage == "bit_flip":
        raw[mid] ^= 0x10
    else:
        raw[mid : mid + 64] = np.random.default_rng(0).integers(0, 256, 64, np.uint8).tobytes()
    path.write_bytes(bytes(raw))
    warning = restore_expecting_step_1(tmp_path, target, caplog)
    # Orbax reads these bytes without complaint: the checksums are what catch them.
    assert "checksum mismatch in w" in warning, warning


def test_well_formed_data_of_other_values_fails_its_checksums(tmp_path, caplog):
    """Step 1's (valid) state files under step 2's name: only the checksums can tell."""
    target = save_two_steps(tmp_path)
    shutil.rmtree(tmp_path / "2" / "state")
    shutil.copytree(tmp_path / "1" / "state", tmp_path / "2" / "state")
    warning = restore_expecting_step_1(tmp_path, target, caplog)
    assert "checksum mismatch in b, h, step and 1 more" in warning


def test_edited_data_position_fails_its_checksum(tmp_path, caplog):
    target = save_two_steps(tmp_path)
    (tmp_path / "2" / "data" / "metadata").write_text(json.dumps({"step": 7}))
    warning = restore_expecting_step_1(tmp_path, target, caplog)
    assert "data item does not match its checksum" in warning


def test_missing_metadata_falls_back(tmp_path, caplog):
    target = save_two_steps(tmp_path)
    (tmp_path / "2" / "state" / "_METADATA").unlink()
    warning = restore_expecting_step_1(tmp_path, target, caplog)
    assert "_METADATA" in warning and "missing" in warning


def test_truncated_file_is_one_warning_naming_the_array(tmp_path, caplog):
    target = save_two_steps(tmp_path)
    path = largest_data_file(tmp_path / "2")
    os.truncate(path, path.stat().st_size // 2)
    warning = restore_expecting_step_1(tmp_path, target, caplog)
    assert 'Error reading "w/' in warning and "OUT_OF_RANGE" in warning, warning


def test_unreadable_checksums_fall_back(tmp_path, caplog):
    target = save_two_steps(tmp_path)
    (tmp_path / "2" / "checksums" / "metadata").write_text("{not json")
    restore_expecting_step_1(tmp_path, target, caplog)


def test_step_without_checksums_is_restored_unverified(tmp_path, caplog):
    """Steps written before checksums existed still resume, with a warning saying so."""
    target = save_two_steps(tmp_path)
    shutil.rmtree(tmp_path / "2" / "checksums")
    with caplog.at_level(logging.WARNING):
        step, restored, _ = Checkpointer(str(tmp_path), meta={"m": 1}).restore_latest(target)
    assert step == 2
    np.testing.assert_array_equal(restored["w"], random_state(sharding.make_mesh(), 2)["w"])
    assert "step 2" in caplog.text and "no checksums" in caplog.text


def test_checksums_see_every_bit_and_not_the_sharding():
    """Definition: flipping any one bit of any word changes the checksum; the same values
    on one device or sharded over eight give the same checksum."""
    mesh = sharding.make_mesh()
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.standard_normal((8, 4)).astype(np.float32),
        "bf16": np.asarray(rng.standard_normal((8, 4)), jnp.bfloat16),
        "i8": rng.integers(-128, 128, (8, 4)).astype(np.int8),
        "bool": rng.integers(0, 2, (8, 4)).astype(bool),
    }
    base = state_checksums(arrays)
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    assert state_checksums({k: jax.device_put(v, rows) for k, v in arrays.items()}) == base
    for name, x in arrays.items():
        bits = 1 if x.dtype == bool else 8 * x.dtype.itemsize
        raw = x.view(np.uint8) if x.dtype != bool else x
        for index in [(0, 0), (5, 3), (7, 3)]:
            for bit in range(bits):
                y = raw.copy()
                if x.dtype == bool:
                    y[index] = ~y[index]
                else:
                    flat = y.reshape(8, -1)
                    byte = index[1] * x.dtype.itemsize + bit // 8
                    flat[index[0], byte] ^= np.uint8(1 << (bit % 8))
                    y = flat.view(x.dtype).reshape(x.shape)
                assert state_checksums({**arrays, name: y})[name] != base[name], (name, bit)


# --------------------------------------------------------------------------- failed saves


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 400 KiB tmpfs: room for one checkpoint of the state below, not two."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("async_save", [True, False])
def test_full_disk_keeps_the_last_checkpoint_and_says_so(small_tmpfs, async_save):
    mesh = sharding.make_mesh()
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))
    x = np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)  # 256 KiB
    state = {"w": jax.device_put(x, rows)}
    directory = small_tmpfs / "ckpt"
    ckpt = Checkpointer(str(directory), meta={}, max_to_keep=1, async_save=async_save)
    ckpt.save(1, state, {"step": 1})
    with pytest.raises(CheckpointSaveError) as failed:
        ckpt.save(2, jax.tree.map(lambda a: a + 1, state), {"step": 2})
        ckpt.close()  # an async save's failure is reported when it is waited for
    message = str(failed.value)
    assert "step 2" in message and "disk is full" in message, message
    assert "the last complete checkpoint, step 1, is intact" in message, message
    step, restored, data = Checkpointer(str(directory), meta={}).restore_latest(state)
    assert step == 1 and data == {"step": 1}
    np.testing.assert_array_equal(restored["w"], x)


def test_failed_save_names_the_step_and_keeps_the_previous(tmp_path, monkeypatch):
    """Without a tmpfs: the JSON item's write fails as on a full disk."""
    mesh = sharding.make_mesh()
    state = random_state(mesh, 1)
    ckpt = Checkpointer(str(tmp_path), meta={}, async_save=False)
    ckpt.save(1, state, {"step": 1})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "save", full)
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", full)
    with pytest.raises(CheckpointSaveError, match=r"step 2 .*disk is full.*step 1, is intact"):
        ckpt.save(2, random_state(mesh, 2), {"step": 2})
    ckpt.close()
    monkeypatch.undo()
    step, _, data = Checkpointer(str(tmp_path), meta={}).restore_latest(state)
    assert step == 1 and data == {"step": 1}
