"""One process of the multi-process test (not collected by pytest).

usage: python distributed_worker.py OUT.npz [COORDINATOR NUM_PROCESSES PROCESS_ID]

Trains gpt-tiny for a few steps on a mesh over every device of every process, each process
feeding only its rows of the global batch, then evaluates it with the shared evaluators
(``common.evaluation``: sliding-window LM nats, a batched predict loop and the classification
metrics of its argmax), and writes the gathered params and the evaluations from process 0.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from common import evaluation, optim, sharding, training
from common.data.packing import PackedWindows
from nlp import gpt


def main(out: str, *dist: str) -> None:
    if dist:
        sharding.maybe_initialize_distributed(dist[0], int(dist[1]), int(dist[2]))
    mesh = sharding.make_mesh(-1, 1)
    model = gpt.from_preset("gpt-tiny", dropout=0.1)
    # Plumbing test: a fixed pseudo-random token stream stands in for a corpus.
    tokens = np.random.default_rng(0).integers(0, model.vocab_size, 5000)
    data = PackedWindows(tokens, 16, 8, seed=0, process_rows=sharding.process_batch_slice(8))
    tx, sched = optim.adamw(optim.default_config(lr=1e-2, total_steps=10))
    init_fn = lambda r: model.init(r, jnp.zeros((1, 16), jnp.int32))
    state, shardings = training.create_state(init_fn, tx, mesh, jax.random.key(0))
    step = jax.jit(
        training.make_train_step(gpt.lm_loss_fn(model), tx, sched),
        in_shardings=(shardings, None, sharding.replicated(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    losses = []
    for _ in range(4):
        state, m = step(state, sharding.put_batch(next(data), mesh), jax.random.key(1))
        losses.append(float(m["loss"]))
    params = multihost_utils.process_allgather(state.params, tiled=True)

    # Evaluation: 2 global windows per device, an uneven last batch in both evaluators.
    lm_eval = evaluation.lm_evaluator(model, mesh, batch_size=8, stride=model.max_len // 2)
    nats, count = lm_eval(state.params, tokens[:1500])
    predict = evaluation.predictor(
        lambda p, b: model.apply({"params": p}, b["inputs"])[:, -1], mesh, batch_size=8
    )
    inputs = tokens[: 21 * 16].reshape(21, 16)
    logits = predict(state.params, {"inputs": inputs})  # [21, vocab]
    labels = tokens[16 : 21 * 16 + 16 : 16] % 5  # arbitrary 5-class labels
    cls = evaluation.classification_metrics(logits.argmax(-1) % 5, labels, 5)
    if jax.process_index() == 0:
        flat = {
            jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_flatten_with_path(params)[0]
        }
        evals = {"eval_nats": nats, "eval_count": count, "predict_logits": logits}
        evals.update({f"eval_{k}": v for k, v in cls.items()})
        np.savez(out, losses=np.asarray(losses), devices=jax.device_count(), **evals, **flat)


if __name__ == "__main__":
    main(*sys.argv[1:])
