"""Samplers: DDPM ancestral sampling and DDIM, as one compiled program sharded over the batch.

Both walk down an increasing subset ``tau_1 < ... < tau_S`` of the training timesteps (all
``T`` of them for the original DDPM sampler), from ``x_{tau_S} ~ N(0, I)`` to a clean image:

* ``ddpm_step``: the ancestral step of Ho et al. 2020 (algorithm 2) from ``tau_i`` to
  ``tau_{i-1}``, treating the jump as one forward step with ``alpha = abar_{tau_i} /
  abar_{tau_{i-1}}``: the mean of the posterior ``q(x_prev | x_t, x0_hat)`` plus noise with
  the fixed ``small`` (posterior) or ``large`` (``1 - alpha``) variance. This is diffusers'
  ``DDPMScheduler.step``.
* ``ddim_step``: Song et al. 2021, eq. 12: ``x_prev = sqrt(abar_prev) x0_hat +
  sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z`` with ``sigma = eta * sqrt((1 - abar_prev)
  / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)`` (eq. 16); ``eta = 0`` is the deterministic
  DDIM, ``eta = 1`` the ancestral sampler with the ``small`` variance. This is diffusers'
  ``DDIMScheduler.step``, whose direction term uses the model's own ``eps_hat`` even when
  ``x0_hat`` is clipped.

After the last step ``abar_prev = 1`` (diffusers' ``set_alpha_to_one``) and no noise is added.
``clip_x0`` clips ``x0_hat`` to ``[-clip_x0, clip_x0]`` (diffusers' ``clip_sample``).

``timesteps(num_steps, T, spacing)`` gives the subsets of Song et al. section 5 / appendix
D.2: ``uniform`` (every ``T // S``-th step from 0, diffusers' "leading" spacing) and
``quadratic`` (``tau_i`` proportional to ``i^2`` up to ``0.8 T``).

Classifier-free guidance (Ho and Salimans 2021): the model runs on the batch twice in one
call, with its condition and with the null condition, and the output is ``out_null + w *
(out_cond - out_null)`` (``w = 1`` is plain conditional sampling).

``make_sampler`` compiles the whole loop as one ``lax.scan`` (no Python per step). The batch
axis of the noise, the condition and every intermediate is sharded over all devices of the
mesh; the per-step noise is drawn inside the program from ``fold_in(rng, step)``, so the
samples do not depend on the device count.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from common import sharding as sharding_lib
from diffusion.schedules import PREDICTIONS, VARIANCES, Schedule, split_prediction

Array = jax.Array
METHODS = ("ddpm", "ddim")
SPACINGS = ("uniform", "quadratic")
# denoise(params, x_t [b, ...], t [b] int32, cond) -> model output shaped like x_t
Denoise = Callable[[Any, Array, Array, Any], Array]


def timesteps(num_steps: int, num_timesteps: int = 1000, spacing: str = "uniform") -> np.ndarray:
    """An increasing subset of ``num_steps`` timesteps out of ``range(num_timesteps)``.

    ``uniform``: ``0, k, 2k, ...`` with ``k = num_timesteps // num_steps``. ``quadratic``:
    ``floor((i * sqrt(0.8 T) / (S - 1))^2)``, each pushed up to one past its predecessor
    where the floor would repeat a timestep (at the start of the sequence).
    """
    if num_steps < 1 or num_steps > num_timesteps:
        raise ValueError(f"num_steps={num_steps} must be in 1..{num_timesteps} (the schedule's T)")
    if spacing == "uniform":
        ts = np.arange(num_steps) * (num_timesteps // num_steps)
    elif spacing == "quadratic":
        ts = np.floor(np.linspace(0, np.sqrt(num_timesteps * 0.8), num_steps) ** 2).astype(int)
        for i in range(1, len(ts)):
            ts[i] = max(ts[i], ts[i - 1] + 1)
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
    return check_timesteps(ts, num_timesteps)


def check_timesteps(ts: Any, num_timesteps: int) -> np.ndarray:
    """``ts`` as an int64 array after checking it is a non-empty, strictly increasing subset
    of ``range(num_timesteps)``; raises ``ValueError`` naming the problem otherwise."""
    arr = np.asarray(ts)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"the timestep subset must be a non-empty 1-D sequence, got {ts!r}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"timesteps must be integers, got {arr[:8]}")
        arr = arr.astype(np.int64)
    if np.any(np.diff(arr) <= 0):
        raise ValueError(f"the timestep subset must be strictly increasing, got {arr[:8]}...")
    if arr[0] < 0 or arr[-1] >= num_timesteps:
        raise ValueError(
            f"timesteps {arr[0]}..{arr[-1]} fall outside the schedule's 0..{num_timesteps - 1}"
        )
    return arr.astype(np.int64)


def _clip(x0: Array, clip_x0: float | None) -> Array:
    return x0 if clip_x0 is None else jnp.clip(x0, -clip_x0, clip_x0)


def ddpm_step(
    out: Array,
    x_t: Array,
    abar_t: Array,
    abar_prev: Array,
    noise: Array,
    *,
    prediction: str = "epsilon",
    clip_x0: float | None = 1.0,
    variance: str = "small",
    last: Array | bool = False,
) -> tuple[Array, Array]:
    """One ancestral step ``x_t -> x_prev``; returns ``(x_prev, x0_hat)``. ``last``: no noise."""
    x0, _ = split_prediction(out, x_t, abar_t, prediction)
    x0 = _clip(x0, clip_x0)
    alpha = abar_t / abar_prev
    beta = 1.0 - alpha
    mean = (jnp.sqrt(abar_prev) * beta / (1.0 - abar_t)) * x0 + (
        jnp.sqrt(alpha) * (1.0 - abar_prev) / (1.0 - abar_t)
    ) * x_t
    if variance == "small":
        var = jnp.maximum((1.0 - abar_prev) / (1.0 - abar_t) * beta, 1e-20)
    elif variance == "large":
        var = beta
    else:
        raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")
    sigma = jnp.where(last, 0.0, jnp.sqrt(var))
    return mean + sigma * noise, x0


def ddim_step(
    out: Array,
    x_t: Array,
    abar_t: Array,
    abar_prev: Array,
    noise: Array,
    *,
    eta: float | Array = 0.0,
    prediction: str = "epsilon",
    clip_x0: float | None = 1.0,
) -> tuple[Array, Array]:
    """One DDIM step ``x_t -> x_prev`` (Song et al. eq. 12); returns ``(x_prev, x0_hat)``."""
    x0, eps = split_prediction(out, x_t, abar_t, prediction)
    x0 = _clip(x0, clip_x0)
    sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev))
    direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0)) * eps
    return jnp.sqrt(abar_prev) * x0 + direction + sigma * noise, x0


def step_tables(schedule: Schedule, ts: np.ndarray) -> dict[str, np.ndarray]:
    """Per-step inputs of the loop in sampling order (descending ``t``): the timestep, ``abar``
    at it and at the next smaller timestep of the subset (1 after the last), float64 math
    cast to float32."""
    abar = schedule.alphas_cumprod_f64()
    desc = ts[::-1]
    prev = np.concatenate([desc[1:], [-1]])
    return {
        "t": desc.astype(np.int32),
        "abar_t": abar[desc].astype(np.float32),
        "abar_prev": np.where(prev >= 0, abar[np.maximum(prev, 0)], 1.0).astype(np.float32),
        "last": prev < 0,
    }


def make_sampler(
    denoise: Denoise,
    schedule: Schedule,
    *,
    method: str = "ddim",
    steps: int | Any = 50,
    spacing: str = "uniform",
    eta: float = 0.0,
    variance: str = "small",
    prediction: str = "epsilon",
    clip_x0: float | None = 1.0,
    null_cond: Any = None,
    guided: bool = False,
    trajectory: bool = False,
    mesh: Mesh | None = None,
) -> Callable[..., Any]:
    """A jitted ``sample(params, x_T, cond, rng, guidance_scale=1.0)``.

    ``x_T [b, ...]`` is the initial noise (its batch is sharded over ``mesh``'s devices),
    ``cond`` a tree of ``[b, ...]`` conditions passed to ``denoise`` (or None), ``rng`` the key
    of the per-step noise. ``steps``: a count (spaced by ``spacing``) or an explicit
    increasing subset of timesteps. With ``guided``, ``null_cond`` (a tree of one example's
    null condition, e.g. the null label) runs beside ``cond`` and ``guidance_scale`` (a
    traced scalar: changing it does not recompile) mixes the two outputs. Returns the samples
    ``[b, ...]``, or ``(samples, trajectory [steps, b, ...])`` with ``trajectory``: ``x`` after
    each step.
    """
    if method not in METHODS:
        raise ValueError(f"unknown sampler {method!r}; choose one of {METHODS}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")
    if guided and null_cond is None:
        raise ValueError(
            "classifier-free guidance needs a null condition: the model must have been "
            "trained with one (for the UNet: null_label=True)"
        )
    T = schedule.num_timesteps
    ts = (
        timesteps(steps, T, spacing)
        if isinstance(steps, int | np.integer)
        else check_timesteps(steps, T)
    )
    tables = {k: jnp.asarray(v) for k, v in step_tables(schedule, ts).items()}
    mesh = mesh or sharding_lib.make_mesh()
    batch_spec = PartitionSpec(sharding_lib.MESH_AXES)
    stochastic = method == "ddpm" or eta > 0

    def constrain(x):
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, batch_spec))

    def model_out(params, x, t, cond, scale):
        tb = jnp.full((x.shape[0],), t, jnp.int32)
        if not guided:
            return denoise(params, x, tb, cond)
        b = x.shape[0]
        null = jax.tree.map(
            lambda n, c: jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape), null_cond, cond
        )
        both = jax.tree.map(lambda c, n: jnp.concatenate([c, n]), cond, null)
        out = denoise(params, jnp.concatenate([x, x]), jnp.concatenate([tb, tb]), both)
        out_c, out_u = out[:b], out[b:]
        return out_u + scale * (out_c - out_u)

    def run(params, x_T, cond, rng, guidance_scale):
        x = constrain(x_T.astype(jnp.float32))
        cond = jax.tree.map(constrain, cond)
        scale = jnp.asarray(guidance_scale, jnp.float32)

        def body(x, xs):
            i, row = xs
            out = model_out(params, x, row["t"], cond, scale).astype(jnp.float32)  # [b, ...]
            if stochastic:
                noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape, jnp.float32)
                noise = constrain(noise)
            else:  # deterministic DDIM: no noise to draw
                noise = jnp.zeros((), jnp.float32)
            if method == "ddpm":
                x, _ = ddpm_step(
                    out,
                    x,
                    row["abar_t"],
                    row["abar_prev"],
                    noise,
                    prediction=prediction,
                    clip_x0=clip_x0,
                    variance=variance,
                    last=row["last"],
                )
            else:
                x, _ = ddim_step(
                    out,
                    x,
                    row["abar_t"],
                    row["abar_prev"],
                    noise,
                    eta=eta,
                    prediction=prediction,
                    clip_x0=clip_x0,
                )
            x = constrain(x)
            return x, (x if trajectory else None)

        x, traj = jax.lax.scan(body, x, (jnp.arange(len(ts)), tables))
        return (x, traj) if trajectory else x

    jitted = jax.jit(run)
    n_dev = mesh.size

    def sample(params, x_T, cond=None, rng=None, guidance_scale=1.0):
        if x_T.shape[0] % n_dev:
            raise ValueError(
                f"a batch of {x_T.shape[0]} cannot be split over the mesh's {n_dev} devices"
            )
        if rng is None:
            if stochastic:
                raise ValueError("a stochastic sampler needs an rng")
            rng = jax.random.key(0)
        put = lambda a: jax.device_put(
            a,
            NamedSharding(
                mesh, PartitionSpec(sharding_lib.MESH_AXES, *([None] * (np.ndim(a) - 1)))
            ),
        )
        return jitted(params, put(x_T), jax.tree.map(put, cond), rng, guidance_scale)

    sample.timesteps = ts  # the subset it walks, increasing
    return sample


def make_unet_sampler(model: Any, schedule: Schedule, *, guided: bool = False, **kw: Any):
    """``make_sampler`` for ``diffusion.unet.UNet`` with class labels as the condition.

    Checks up front (before anything compiles): guidance needs a model with a null label;
    the returned ``sample(params, x_T, labels=None, rng=None, guidance_scale=1.0)`` refuses
    labels outside the classes, images the UNet cannot take and a guidance scale other than
    1 on an unguided sampler.
    """
    if guided and not model.null_label:
        raise ValueError(
            "a guidance scale needs a UNet trained with a null label (null_label=True); "
            "this one has none"
        )
    if guided and model.num_classes <= 0:
        raise ValueError("guidance needs a class-conditional UNet (num_classes > 0)")
    null = jnp.int32(model.num_classes) if guided else None

    def denoise(params, x, t, labels):
        return model.apply({"params": params}, x, t, labels)

    inner = make_sampler(denoise, schedule, null_cond=null, guided=guided, **kw)

    def sample(params, x_T, labels=None, rng=None, guidance_scale=1.0):
        model.check_image_size(x_T.shape[1], x_T.shape[2])
        if labels is not None:
            model.check_labels(labels)
            labels = np.asarray(labels, np.int32)
            if labels.shape != (x_T.shape[0],):
                raise ValueError(f"labels of shape {labels.shape} for a batch of {x_T.shape[0]}")
        elif model.num_classes > 0:
            raise ValueError("this UNet is class-conditional: pass labels")
        if not guided and guidance_scale != 1.0:
            raise ValueError(
                f"guidance_scale={guidance_scale} on a sampler built without guided=True"
            )
        return inner(params, x_T, labels, rng, guidance_scale)

    sample.timesteps = inner.timesteps
    return sample
