"""The training platform: train state, the pure jitted train step, the loop.

* ``TrainState`` holds only arrays (step, params, optimizer state), so it checkpoints as is.
* ``make_train_step`` returns the pure function ``(state, batch, rng) -> (state, metrics)``
  with gradient accumulation (a ``lax.scan`` over micro-batches averaging their mean losses
  and gradients: the big-batch step when every micro-batch's loss is a mean over equally
  many terms; a loss weighted per row, like BERT's MLM over masked positions, weighs the
  micro-batches equally instead) and the rng folded with the step, so a resumed run draws
  the same dropout masks as an uninterrupted one.
* ``train`` is the loop every experiment uses: mesh, sharded init, auto-resume, jit with
  explicit shardings and donated state, logging, evaluation, checkpoints, and a clean stop on
  a non-finite loss or non-finite parameters that leaves the last good checkpoint in place.
  It returns a ``TrainResult``: the final state, the last evaluation and logged train
  metrics, median throughput, and the training time and resume count of the whole run
  (kept in each checkpoint), so no caller reads its own ``metrics.jsonl`` back.

An experiment's main, after building data and model (see ``experiments/gpt_shakespeare.py``)::

    result = training.train(config=config, workdir=workdir, init_fn=init_fn,
                            loss_fn=loss_fn, train_data=train_data, evaluate=evaluate,
                            meta={"model": ..., "data": ...}, tokens_per_step=bs * seq_len)
    summary = {**my_test_metrics(result.state.params), **result.summary()}
    results.write(workdir, summary, headline=(...))
"""

from __future__ import annotations

import dataclasses
import logging
import math
import statistics
import time
from collections.abc import Callable
from typing import Any, Protocol

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from common import sharding as sharding_lib
from common.checkpoint import Checkpointer
from common.config import resolve_optim
from common.flops import measured_matmul_peak
from common.metrics import MetricWriter
from common.optim import adamw, ema_params

log = logging.getLogger(__name__)
Batch = dict[str, Any]
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss, or NaN or infinite parameters."""


class DataIterator(Protocol):
    """Host-side input pipeline whose position can be saved and restored."""

    def __next__(self) -> Batch: ...
    def get_state(self) -> dict[str, Any]: ...
    def set_state(self, state: dict[str, Any]) -> None: ...


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def make_train_step(
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule | None = None,
    accum_steps: int = 1,
):
    """Pure train step. ``loss_fn(params, batch, rng) -> (mean loss, aux metrics)``."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: Batch, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        if accum_steps == 1:
            (loss, aux), grads = grad_fn(state.params, batch, rng)
        else:

            def split(x):  # [batch, ...] -> [accum, batch / accum, ...]; rows i::accum
                x = x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
                return jnp.swapaxes(x, 0, 1)

            micro = jax.tree.map(split, batch)

            def body(carry, xs):
                i, mb = xs
                (loss, aux), grads = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
                carry = jax.tree.map(jnp.add, carry, (loss, aux, grads))
                return carry, None

            zero_aux = jax.eval_shape(
                lambda: grad_fn(state.params, jax.tree.map(lambda x: x[0], micro), rng)[0][1]
            )
            init = (
                jnp.zeros((), jnp.float32),
                jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero_aux),
                jax.tree.map(jnp.zeros_like, state.params),
            )
            (loss, aux, grads), _ = jax.lax.scan(body, init, (jnp.arange(accum_steps), micro))
            loss, aux, grads = jax.tree.map(lambda x: x / accum_steps, (loss, aux, grads))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            **aux,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            "update_norm": optax.tree.norm(updates),
        }
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return step


def create_state(
    init_fn: Callable[[jax.Array], Any],
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
    rng: jax.Array,
    rules=sharding_lib.DEFAULT_RULES,
) -> tuple[TrainState, Any]:
    """Initialise a sharded ``TrainState`` directly on the mesh; returns (state, shardings).

    ``init_fn(rng)`` returns the model's variables with logically partitioned params.
    """
    boxed = jax.eval_shape(init_fn, rng)["params"]
    param_shardings = sharding_lib.logical_shardings(boxed, mesh, rules)
    params = jax.jit(lambda r: nn.unbox(init_fn(r)["params"]), out_shardings=param_shardings)(rng)
    opt_state = jax.jit(tx.init)(params)  # moments inherit the params' shardings...
    opt_state = jax.tree.map(  # ...while scalars (step counts) are replicated explicitly
        lambda x: (
            x
            if len(x.sharding.device_set) == mesh.size
            else jax.device_put(x, sharding_lib.replicated(mesh))
        ),
        opt_state,
    )
    state = TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), sharding_lib.replicated(mesh)),
        params=params,
        opt_state=opt_state,
    )
    shardings = jax.tree.map(lambda x: x.sharding, state)
    # Commit every leaf to its sharding, as the step's outputs are: otherwise the second
    # step misses the jit cache and compiles again.
    return jax.device_put(state, shardings), shardings


def eval_params(state: TrainState) -> Any:
    """The parameters to evaluate: their moving average when the optimizer tracks one
    (``optim.ema_decay > 0``), else the trained params themselves."""
    ema = ema_params(state.opt_state)
    return state.params if ema is None else ema


def param_count(params: Any) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))


@dataclasses.dataclass
class TrainResult:
    """What a caller of ``train`` needs; ``summary()`` is the part that goes in results.json.

    Throughput is the median over this process's logged intervals (compilation and
    evaluation excluded); ``train_s`` and ``resumes`` cover every process of a resumed run
    (``train_s`` counts each process up to its last checkpoint, so steps redone after a
    kill are counted once).
    """

    state: TrainState
    eval_metrics: dict[str, float]  # the last evaluation's (empty when none ran)
    resumed_from: int | None  # the checkpoint step this process started from
    train_metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # last logged
    step_time_s: float | None = None  # median seconds per step; None if no interval logged
    tokens_per_s: float | None = None  # tokens_per_step / step_time_s
    images_per_s: float | None = None  # images_per_step / step_time_s
    train_s: float = 0.0  # wall time inside ``train`` over all processes of the run
    resumes: int = 0  # how many times the run was resumed from a checkpoint

    def summary(self) -> dict[str, Any]:
        """``steps``, ``train_s``, ``resumes``, ``resumed_from``, ``step_time_s``,
        ``tokens_per_s``, ``images_per_s`` (None where not measured), for results.json."""
        keys = ("train_s", "resumes", "resumed_from", "step_time_s", "tokens_per_s")
        return {
            "steps": int(self.state.step),
            **{k: getattr(self, k) for k in (*keys, "images_per_s")},
        }


# The checkpoint's data item holds the iterator's state and the loop's own running totals.
_ITERATOR, _LOOP = "iterator", "loop"


def _split_data_state(saved: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(iterator state, loop totals) of a checkpoint's data item (older checkpoints hold
    the iterator's state alone)."""
    if set(saved) == {_ITERATOR, _LOOP}:
        return saved[_ITERATOR], saved[_LOOP]
    return saved, {}


def train(
    *,
    config: Any,
    workdir: str,
    init_fn: Callable[[jax.Array], Any],
    loss_fn: LossFn,
    train_data: DataIterator,
    evaluate: Callable[[Any, int], dict[str, float]] | None = None,
    meta: dict[str, Any] | None = None,
    flops_per_step: float | None = None,
    tokens_per_step: int | None = None,
    images_per_step: int | None = None,
    project: optax.GradientTransformation | None = None,
) -> TrainResult:
    """Train for ``config.train.steps`` steps in ``workdir``, resuming if it holds a run.

    Reads ``config.seed``, ``config.optim`` (see ``common.optim``), ``config.mesh`` (``data``,
    ``fsdp``) and ``config.train`` (``steps``, ``accum_steps``, ``log_every``,
    ``eval_every``, ``checkpoint_every``, ``keep_checkpoints``, ``async_checkpoint``).
    ``evaluate(params, step)`` gets ``eval_params(state)``: the parameter EMA when
    ``optim.ema_decay > 0``.
    Derived config fields are resolved here (``common.config.resolve_optim``), without
    changing ``config``. Throughput is logged as ``tokens_per_s`` and/or ``images_per_s``
    when the tokens or images of one step are given; the returned ``TrainResult`` carries
    their medians, the last logged metrics and the run's total training time.
    ``project``: see ``common.optim.adamw``.
    """
    t_begin = time.perf_counter()
    tc = config.train
    mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    tx, schedule = adamw(resolve_optim(config), project)
    rng = jax.random.key(config.seed)
    init_rng, train_rng = jax.random.split(rng)
    state, shardings = create_state(init_fn, tx, mesh, init_rng, rules)
    n_params = param_count(state.params)

    ckpt = Checkpointer(
        f"{workdir}/checkpoints",
        meta=meta or {},
        max_to_keep=tc.keep_checkpoints,
        async_save=tc.async_checkpoint,
    )
    restored = ckpt.restore_latest(state)
    resumed_from, loop = None, {}
    if restored is not None:
        resumed_from, state, data_state = restored
        data_state, loop = _split_data_state(data_state)
        train_data.set_state(data_state)
        log.info("resumed from step %d in %s", resumed_from, workdir)
        print(f"resumed from checkpoint step {resumed_from}", flush=True)
    start = int(state.step)

    step_fn = jax.jit(
        make_train_step(loss_fn, tx, schedule, tc.accum_steps),
        in_shardings=(shardings, None, sharding_lib.replicated(mesh)),
        out_shardings=(shardings, sharding_lib.replicated(mesh)),
        donate_argnums=0,
    )
    peak = None
    if flops_per_step and tc.get("report_mfu", True):
        peak = measured_matmul_peak() * jax.process_count()  # flops_per_step is global
    writer = MetricWriter(workdir, tc.steps, start_step=start)
    print(
        f"params={n_params:,} devices={jax.device_count()} mesh={dict(mesh.shape)} "
        f"steps {start}->{tc.steps}",
        flush=True,
    )

    prior_s = float(loop.get("train_s", 0.0))
    resumes = int(loop.get("resumes", 0)) + (restored is not None)
    last_good, eval_metrics, train_metrics, step_times = resumed_from, {}, {}, []
    t_last, steps_since = time.perf_counter(), 0
    try:
        for step in range(start, tc.steps):
            batch = sharding_lib.put_batch(next(train_data), mesh)
            state, metrics = step_fn(state, batch, train_rng)
            steps_since += 1
            done = step + 1
            if step == start:  # keep compilation out of the throughput figures
                jax.block_until_ready(state)
                t_last, steps_since = time.perf_counter(), 0
            is_log = done % tc.log_every == 0 or done == tc.steps
            is_ckpt = done % tc.checkpoint_every == 0 or done == tc.steps
            if is_log or is_ckpt:
                metrics = jax.device_get(metrics)
                # The loss is computed before the update: a finite loss with non-finite
                # gradients still leaves non-finite parameters, which must not be saved.
                loss, param_norm = float(metrics["loss"]), float(metrics["param_norm"])
                if not (math.isfinite(loss) and math.isfinite(param_norm)):
                    kept = (
                        f"The last good checkpoint (step {last_good}) in {ckpt.directory} is kept."
                        if last_good is not None
                        else "No checkpoint was saved."
                    )
                    raise NonFiniteLossError(
                        f"loss is {loss} and the parameters' norm {param_norm} at step {done}; "
                        f"stopping. {kept}"
                    )
            if is_log:
                if steps_since:
                    dt = (time.perf_counter() - t_last) / steps_since
                    t_last, steps_since = time.perf_counter(), 0
                    metrics["step_time_s"] = dt
                    step_times.append(dt)
                    if tokens_per_step:
                        metrics["tokens_per_s"] = tokens_per_step / dt
                    if images_per_step:
                        metrics["images_per_s"] = images_per_step / dt
                    if peak:
                        metrics["mfu"] = flops_per_step / dt / peak
                train_metrics = {k: float(v) for k, v in metrics.items()}
                writer.write(done, train_metrics)
            if evaluate is not None and (done % tc.eval_every == 0 or done == tc.steps):
                eval_metrics = evaluate(eval_params(state), done)
                writer.write(done, eval_metrics, split="eval")
                t_last, steps_since = time.perf_counter(), 0  # eval time is not step time
            if is_ckpt:
                totals = {"train_s": prior_s + time.perf_counter() - t_begin, "resumes": resumes}
                ckpt.save(done, state, {_ITERATOR: train_data.get_state(), _LOOP: totals})
                last_good = done
    finally:
        ckpt.close()
        writer.close()
    step_time = statistics.median(step_times) if step_times else None
    return TrainResult(
        state=state,
        eval_metrics=eval_metrics,
        resumed_from=resumed_from,
        train_metrics=train_metrics,
        step_time_s=step_time,
        tokens_per_s=tokens_per_step / step_time if step_time and tokens_per_step else None,
        images_per_s=images_per_step / step_time if step_time and images_per_step else None,
        train_s=prior_s + time.perf_counter() - t_begin,
        resumes=resumes,
    )
