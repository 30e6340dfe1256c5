"""What makes a workdir another run's: a location (``data.data_dir``) does not, a changed
``train.steps`` on resume is accepted but warned about when it reshapes the schedule."""

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from common import config as config_lib
from common import sharding, training
from common.checkpoint import Checkpointer, ConfigMismatchError
from common.data.packing import PackedWindows
from nlp import gpt


def save_one(directory, meta):
    ckpt = Checkpointer(str(directory), meta=meta, async_save=False)
    state = {"w": jax.device_put(jnp.ones((8,)), sharding.replicated(sharding.make_mesh()))}
    ckpt.save(1, state, {"step": 1})
    ckpt.close()
    return state


@pytest.mark.parametrize("data_dir", ["/data/tfds/", "/elsewhere/tfds", ""])
def test_data_dir_is_not_part_of_the_identity(tmp_path, data_dir):
    state = save_one(tmp_path, {"data": {"data_dir": "/data/tfds", "vocab_size": 512}})
    ckpt = Checkpointer(str(tmp_path), meta={"data": {"data_dir": data_dir, "vocab_size": 512}})
    assert ckpt.restore_latest(state)[0] == 1
    ckpt.close()


def test_what_the_data_is_still_is(tmp_path):
    state = save_one(tmp_path, {"data": {"data_dir": "/data/tfds", "vocab_size": 512}})
    ckpt = Checkpointer(str(tmp_path), meta={"data": {"data_dir": "/b", "vocab_size": 1024}})
    with pytest.raises(
        ConfigMismatchError, match=r"differing keys: data\.vocab_size: 512 -> 1024\. "
    ):
        ckpt.restore_latest(state)
    ckpt.close()


def run(workdir, steps, total_steps=-1, schedule="cosine"):
    model = gpt.from_preset("gpt-tiny")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.optim = config_lib.optim(lr=1e-2, schedule=schedule, total_steps=total_steps)
    c.train = config_lib.train(
        steps=steps, batch_size=8, log_every=2, checkpoint_every=2, report_mfu=False
    )
    c.train.async_checkpoint = False
    c.mesh = config_lib.mesh()
    tokens = np.random.default_rng(0).integers(0, 128, 4000)
    return training.train(
        config=c,
        workdir=str(workdir),
        init_fn=lambda r: model.init(r, jnp.zeros((1, 16), jnp.int32)),
        loss_fn=gpt.lm_loss_fn(model),
        train_data=PackedWindows(tokens, 16, 8, seed=0),
        meta={"model": "gpt-tiny"},
    )


def test_raising_steps_on_resume_warns_that_the_schedule_changes(tmp_path, caplog):
    run(tmp_path / "a", steps=4)
    with caplog.at_level(logging.WARNING, logger="common.training"):
        result = run(tmp_path / "a", steps=6)
    assert result.resumed_from == 4 and int(result.state.step) == 6
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.startswith(
        "train.steps changed from 4 to 6 on resume from step 4: the cosine learning-rate "
        "schedule now spans 6 steps instead of 4"
    )
    assert "optim.total_steps=4" in warning


@pytest.mark.parametrize(
    "loop, steps, total, schedule",
    [
        ({"steps": 4, "schedule_steps": 10}, 6, 10, "cosine"),  # an explicit schedule length
        ({"steps": 4, "schedule_steps": 4}, 6, 6, "constant"),  # no decay to reshape
        ({"steps": 6, "schedule_steps": 6}, 6, 6, "cosine"),  # nothing changed
        ({}, 6, 6, "cosine"),  # a checkpoint from before steps were recorded
    ],
)
def test_no_warning_when_the_schedule_stays(caplog, loop, steps, total, schedule):
    optim_config = config_lib.optim(total_steps=total, schedule=schedule)
    with caplog.at_level(logging.WARNING, logger="common.training"):
        training._warn_if_schedule_changed(loop, steps, optim_config, 4)
    assert not caplog.records
