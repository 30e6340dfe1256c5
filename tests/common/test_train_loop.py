"""The training loop: a non-finite loss (or non-finite parameters under a finite loss) stops
the run with a clear message and keeps the last good checkpoint; a second start on the same
workdir resumes, parameter EMA included, and evaluation sees the EMA. (Plumbing: synthetic
tokens.)"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from common import optim, sharding, training
from common.checkpoint import Checkpointer
from common.data.packing import PackedWindows
from nlp import gpt


class Poisoned(PackedWindows):
    """Token windows whose batch number ``poison_at`` makes the loss NaN."""

    poison_at = -1

    def __next__(self):
        batch = super().__next__()
        batch["poison"] = np.full((len(batch["inputs"]),), self.step - 1 == self.poison_at)
        return batch


def config(steps, ema_decay=0.0):
    return ml_collections.ConfigDict(
        dict(
            seed=0,
            optim=optim.default_config(lr=1e-2, total_steps=steps, ema_decay=ema_decay),
            mesh=dict(data=-1, fsdp=1, rules=[list(r) for r in sharding.DEFAULT_RULES]),
            train=dict(
                steps=steps,
                accum_steps=1,
                log_every=1,
                eval_every=1000,
                checkpoint_every=2,
                keep_checkpoints=5,
                async_checkpoint=False,
                report_mfu=False,
            ),
        )
    )


def run(workdir, steps, poison_at=-1, ema_decay=0.0, evaluate=None, poison_grads=False):
    """``poison_grads``: the poisoned batch keeps the loss finite but makes the gradients NaN."""
    model = gpt.from_preset("gpt-tiny")
    base = gpt.lm_loss_fn(model)

    def loss_fn(params, batch, rng):
        loss, aux = base(params, batch, rng)
        poison = batch["poison"].any()
        if not poison_grads:
            return jnp.where(poison, jnp.nan, loss), aux
        s = jax.tree.leaves(params)[0].sum()
        x = jnp.where(poison, jnp.abs(s - jax.lax.stop_gradient(s)), 1.0)  # 0 when poisoned
        return loss + jnp.where(poison, jnp.sqrt(x), 0.0), aux  # value + 0, gradient 0 * inf

    tokens = np.random.default_rng(0).integers(0, 128, 4000)
    data = Poisoned(tokens, 16, 8, seed=0)
    data.poison_at = poison_at
    return training.train(
        config=config(steps, ema_decay),
        workdir=str(workdir),
        init_fn=lambda r: model.init(r, jnp.zeros((1, 16), jnp.int32)),
        loss_fn=loss_fn,
        train_data=data,
        evaluate=evaluate,
        meta={"model": "gpt-tiny"},
    )


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(
        training.NonFiniteLossError,
        match=r"loss is nan and .* at step 6.*last good checkpoint \(step 4\)",
    ):
        run(tmp_path, steps=10, poison_at=5)
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), meta={"model": "gpt-tiny"})
    assert ckpt.latest_step() == 4
    ckpt.close()
    # Starting again resumes from step 4 (the poison is gone) and finishes.
    result = run(tmp_path, steps=10)
    assert result.resumed_from == 4
    assert int(result.state.step) == 10


def test_non_finite_parameters_under_a_finite_loss_are_never_saved(tmp_path):
    with pytest.raises(
        training.NonFiniteLossError,
        match=r"loss is [0-9.]+ and the parameters' norm nan at step 4.*checkpoint \(step 2\)",
    ):
        run(tmp_path, steps=10, poison_at=3, poison_grads=True)
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), meta={"model": "gpt-tiny"})
    assert ckpt.latest_step() == 2
    ckpt.close()


def test_parameter_ema_resumes_exactly_and_is_what_evaluation_sees(tmp_path):
    seen = {}

    def evaluate(params, step):
        seen[step] = params
        return {}

    whole = run(tmp_path / "whole", steps=10, ema_decay=0.8, evaluate=evaluate)
    ema = optim.ema_params(whole.state.opt_state)
    assert seen[10] is ema
    gap = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), ema, whole.state.params)
    assert max(jax.tree.leaves(gap)) > 1e-3  # the EMA is not the params themselves
    with pytest.raises(training.NonFiniteLossError):
        run(tmp_path / "killed", steps=10, poison_at=5, ema_decay=0.8)
    resumed = run(tmp_path / "killed", steps=10, ema_decay=0.8)
    assert resumed.resumed_from == 4
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        optim.ema_params(resumed.state.opt_state),
        ema,
    )


def test_result_carries_throughput_metrics_and_train_time_across_resumes(tmp_path):
    first = run(tmp_path, steps=4)
    assert (first.resumes, first.resumed_from) == (0, None)
    assert first.train_metrics.keys() >= {"loss", "grad_norm", "step_time_s"}
    assert first.step_time_s > 0 and first.train_s > first.step_time_s * 3
    assert first.tokens_per_s is None  # no tokens_per_step given
    second = run(tmp_path, steps=6)  # a resume: adds to the time of the first process
    third = run(tmp_path, steps=8)
    assert (second.resumes, third.resumes) == (1, 2)
    assert third.resumed_from == 6
    assert third.train_s > second.train_s > first.train_s
    summary = third.summary()
    assert summary["steps"] == 8 and summary["resumes"] == 2
    assert summary["train_s"] == third.train_s
