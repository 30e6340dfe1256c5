"""The genre task's shared pieces: a warm start takes exactly the pre-trained params it is
given (boxed or plain) and keeps the fresh head; a phase's config is what training reads,
its schedule spanning the phase's own steps."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from common import config as config_lib
from nlp import genre


class Body(nn.Module):
    @nn.compact
    def __call__(self, x):
        kernel = nn.with_partitioning(nn.initializers.normal(), ("embed", "mlp"))
        x = nn.Dense(4, kernel_init=kernel, name="body")(x)  # boxed kernel, plain bias
        return nn.Dense(3, name="head")(x)


def test_init_from_takes_pretrained_params_and_keeps_the_fresh_head():
    model, x = Body(), jnp.ones((1, 2))
    fresh = nn.unbox(model.init(jax.random.key(0), x)["params"])
    pretrained = {"body/kernel": np.full((2, 4), 7.0), "body/bias": np.full((4,), -1.0)}
    variables = genre.init_from(lambda rng: model.init(rng, x), pretrained)(jax.random.key(0))
    assert isinstance(variables["params"]["body"]["kernel"], nn.Partitioned)  # box kept
    got = traverse_util.flatten_dict(nn.unbox(variables["params"]), sep="/")
    for k, v in pretrained.items():
        np.testing.assert_array_equal(got[k], v)
    want = traverse_util.flatten_dict(fresh, sep="/")
    for k in ("head/kernel", "head/bias"):
        np.testing.assert_array_equal(got[k], want[k])


def test_phase_config_is_the_phase_with_its_own_schedule_length():
    c = ml_collections.ConfigDict()
    c.seed, c.mesh = 3, config_lib.mesh()
    genre.phases(c, b2=0.999, weight_decay=0.01, min_lr_ratio=0.0)
    pre, ft = genre.phase_config(c, "pretrain"), genre.phase_config(c, "finetune")
    assert pre.seed == 3 and pre.mesh.to_dict() == c.mesh.to_dict()
    assert (pre.train.steps, pre.train.batch_size, pre.train.eval_every) == (1000, 32, 250)
    assert (pre.optim.lr, pre.optim.b2, pre.optim.weight_decay) == (1e-3, 0.999, 0.01)
    assert config_lib.resolve_optim(pre).total_steps == 1000
    assert config_lib.resolve_optim(ft).total_steps == 300 and ft.optim.lr == 2e-4
    assert ft.train.checkpoint_every == 300
