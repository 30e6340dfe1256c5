"""The shared config sections: project defaults, overrides, loud failures on unknown keys and
dtype names, and derived fields resolved without touching the user's config."""

import jax.numpy as jnp
import ml_collections
import pytest

from common import config as config_lib
from common import optim, sharding


def test_optim_defaults_are_common_optim_with_total_steps_from_train():
    c = config_lib.optim()
    expected = {**optim.default_config().to_dict(), "total_steps": -1}
    assert c.to_dict() == expected


def test_overrides_replace_defaults_and_keep_the_rest():
    c = config_lib.train(steps=7, batch_size=4)
    assert (c.steps, c.batch_size, c.accum_steps, c.log_every) == (7, 4, 1, 25)
    m = config_lib.mesh(fsdp=2)
    assert (m.data, m.fsdp) == (-1, 2)
    assert m.rules == [list(r) for r in sharding.DEFAULT_RULES]


@pytest.mark.parametrize("builder", [config_lib.optim, config_lib.train, config_lib.mesh])
def test_unknown_override_fails_naming_it(builder):
    with pytest.raises(KeyError, match="no_such_field"):
        builder(no_such_field=1)


def test_typo_gets_a_suggestion():
    with pytest.raises(KeyError, match=r"optim\.warmup_step .*did you mean optim\.warmup_steps"):
        config_lib.optim(warmup_step=10)


def test_dtype_names_and_error():
    assert config_lib.dtype("bfloat16") is jnp.bfloat16
    assert config_lib.dtype("float32") is jnp.float32
    with pytest.raises(ValueError, match=r"vision\.dtype='fp8'"):
        config_lib.dtype("fp8", field="vision.dtype")


def test_resolve_optim_fills_total_steps_without_mutating():
    c = ml_collections.ConfigDict(dict(optim=config_lib.optim(), train=config_lib.train(steps=9)))
    c.lock()
    resolved = config_lib.resolve_optim(c)
    assert resolved.total_steps == 9
    assert c.optim.total_steps == -1  # the user's config is unchanged
    c2 = ml_collections.ConfigDict(
        dict(optim=config_lib.optim(total_steps=20), train=config_lib.train(steps=9))
    )
    assert config_lib.resolve_optim(c2).total_steps == 20  # an explicit schedule length wins
