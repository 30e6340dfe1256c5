"""One run of the fault-injection test (not collected by pytest).

usage: python fault_worker.py WORKDIR

Trains gpt-tiny on a fixed pseudo-random token stream through ``common.training.train``
(24 steps, async checkpoints every 4, train records every 2, an evaluation every 8), resuming
from WORKDIR if it holds a run: the same loop, checkpointer and metrics writer the
experiments use, small enough to be killed and restarted many times in a test.
"""

import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import optim, sharding, training
from common.data.packing import PackedWindows
from nlp import gpt

STEPS = 24


def config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            seed=0,
            optim=optim.default_config(lr=1e-2, total_steps=STEPS),
            mesh=dict(data=-1, fsdp=1, rules=[list(r) for r in sharding.DEFAULT_RULES]),
            train=dict(
                steps=STEPS,
                accum_steps=1,
                log_every=2,
                eval_every=8,
                checkpoint_every=4,
                keep_checkpoints=3,
                async_checkpoint=True,
                report_mfu=False,
            ),
        )
    )


def main(workdir: str) -> None:
    model = gpt.from_preset("gpt-tiny", dropout=0.1)
    loss_fn = gpt.lm_loss_fn(model)
    tokens = np.random.default_rng(0).integers(0, model.vocab_size, 4000)
    held_out = PackedWindows(np.random.default_rng(1).integers(0, model.vocab_size, 400), 16, 8)
    eval_batch = {k: jnp.asarray(v) for k, v in next(held_out).items()}

    @jax.jit
    def eval_loss(params):
        logits = model.apply({"params": params}, eval_batch["inputs"], deterministic=True)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))  # [batch, len, vocab]
        return -jnp.take_along_axis(logp, eval_batch["targets"][..., None], -1).mean()

    def evaluate(params, step):
        return {"loss": float(eval_loss(params))}

    training.train(
        config=config(),
        workdir=workdir,
        init_fn=lambda r: model.init(r, jnp.zeros((1, 16), jnp.int32)),
        loss_fn=loss_fn,
        train_data=PackedWindows(tokens, 16, 8, seed=0),
        evaluate=evaluate,
        meta={"model": "gpt-tiny", "worker": "fault_injection"},
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
