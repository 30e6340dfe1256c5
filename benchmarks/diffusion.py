"""Diffusion benchmark: our DDPM UNet train step and our compiled DDIM-50 sampler against
diffusers + torch, from the same weights and the same noise, alternating in one run.

Run as ``python -m benchmarks.diffusion [--quick]`` (see ``benchmarks/README.md``).

1. UNet train step: a diffusers ``UNet2DModel`` (the DDPM layout: ``ddpm-cifar10``'s blocks
   at the widths of ``--channels``, 32 x 32 x 3, batch ``--batch``), randomly initialised by
   diffusers and converted with ``diffusion.convert``. Both sides take the same ``x0``,
   timesteps and noise, form ``x_t`` with the same linear schedule, and minimise the
   epsilon MSE with AdamW (our ``common.optim.adamw`` settings, global-norm clip 1.0; torch's
   ``AdamW`` with the same decay mask). Ours is ``common.training.make_train_step`` jitted
   with the state donated on a 1-device mesh, as ``common.training.train`` runs it. Their
   first losses must agree.
2. DDIM sampling: 50 steps (eta 0, uniform spacing, ``clip_sample``) of a batch from the
   same ``x_T``: ours is ``diffusion.sampling.make_sampler`` (the whole loop one compiled
   ``lax.scan``), theirs ``DDIMScheduler`` driving the torch UNet in a Python loop under
   ``torch.inference_mode``, as diffusers' ``DDIMPipeline`` does. Their samples are not
   compared: a random-weight UNet's DDIM map amplifies float32 rounding step after step.
3. With ``--conv-shapes``: each 3x3 convolution shape of the UNet's forward alone (XLA's
   ``conv_general_dilated`` against torch's ``conv2d``, NHWC against NCHW, forward only), to
   show where a missed target comes from a CPU kernel.

Rounds alternate who goes first; medians of the per-round times are compared; torch runs
with 2 and with 1 intra-op threads and the faster is taken (on a shared machine its OpenMP
threads can spin waiting for each other). The last line printed is
``RESULT unet_step_ratio_vs_torch=<ours/torch> ddim_ratio_vs_torch=<ours/torch>``.
"""

from __future__ import annotations

import os

from benchmarks.harness import reexec_with_malloc_env

if __name__ == "__main__":  # malloc settings for both sides: see benchmarks/harness.py
    reexec_with_malloc_env("benchmarks.diffusion")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import diffusers  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.harness import alternate, warm_up  # noqa: E402
from common import optim, sharding, training  # noqa: E402
from diffusion import convert, sampling  # noqa: E402
from diffusion.schedules import Schedule  # noqa: E402

THREADS = 2  # torch intra-op threads; XLA's CPU client uses one thread per core
RESOLUTION, CHANNELS_IN = 32, 3
NUM_TIMESTEPS, DDIM_STEPS = 1000, 50


@dataclasses.dataclass(frozen=True)
class Plan:
    batch: int  # train batch
    sample_batch: int  # images sampled per DDIM call
    rounds: int  # alternating train rounds
    steps: int  # train steps per side per round
    sample_rounds: int  # alternating sampling rounds (one 50-step call per side each)


FULL = Plan(batch=16, sample_batch=16, rounds=6, steps=2, sample_rounds=4)
QUICK = Plan(batch=4, sample_batch=4, rounds=2, steps=1, sample_rounds=2)
WARM_UP_ROUNDS = 4


def torch_unet(channels: tuple[int, ...], device: str = "cpu", seed: int = 0):
    """A randomly initialised diffusers UNet2DModel in the DDPM CIFAR-10 layout (attention
    at the second level, padding-0 downsampling) at the given widths."""
    n = len(channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if n > 1:
        down[1], up[n - 2] = "AttnDownBlock2D", "AttnUpBlock2D"
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=RESOLUTION,
        in_channels=CHANNELS_IN,
        out_channels=CHANNELS_IN,
        block_out_channels=list(channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=2,
        attention_head_dim=None,
        norm_num_groups=min(32, channels[0]),
        norm_eps=1e-6,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
    ).to(device)


def train_inputs(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shape = (batch, RESOLUTION, RESOLUTION, CHANNELS_IN)
    return {
        "x0": rng.uniform(-1, 1, shape).astype(np.float32),
        "noise": rng.standard_normal(shape).astype(np.float32),
        "t": rng.integers(0, NUM_TIMESTEPS, batch).astype(np.int32),
    }


def build_ours_train(tm, inputs: dict[str, np.ndarray], dtype: Any = jnp.float32):
    """``run(n) -> last loss``: our train step as ``common.training.train`` runs it."""
    model = convert.unet_from_config(dict(tm.config), dtype=dtype)
    params = convert.unet_params(
        {k: v.detach().cpu().numpy().copy() for k, v in tm.state_dict().items()}, model
    )
    schedule = Schedule.create("linear", NUM_TIMESTEPS)
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    tx, lr_schedule = optim.adamw(optim.default_config(total_steps=100_000))
    x = jnp.zeros((1, RESOLUTION, RESOLUTION, CHANNELS_IN))
    t0 = jnp.zeros((1,), jnp.int32)
    state, shardings = training.create_state(
        lambda r: model.init(r, x, t0), tx, mesh, jax.random.key(0)
    )
    params = jax.device_put(params, shardings.params)
    state = jax.device_put(
        state.replace(params=params, opt_state=jax.jit(tx.init)(params)), shardings
    )

    def loss_fn(params, batch, rng):
        del rng  # dropout 0; timesteps and noise come with the batch, as torch's
        x_t = schedule.q_sample(batch["x0"], batch["t"], batch["noise"])
        out = model.apply({"params": params}, x_t, batch["t"]).astype(jnp.float32)
        return jnp.mean(jnp.square(out - batch["noise"])), {}

    replicated = sharding.replicated(mesh)
    step = jax.jit(
        training.make_train_step(loss_fn, tx, lr_schedule),
        in_shardings=(shardings, None, replicated),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    batch = sharding.put_batch(inputs, mesh)
    rng = jax.device_put(jax.random.key(1), replicated)
    holder = {"state": state}

    def run(n: int) -> float:
        state = holder["state"]
        for _ in range(n):
            state, metrics = step(state, batch, rng)
        jax.block_until_ready((state, metrics))
        holder["state"] = state
        return float(metrics["loss"])

    run.compiles = getattr(step, "_cache_size", lambda: 1)
    return run


def build_torch_train(tm, inputs: dict[str, np.ndarray], autocast: torch.dtype | None = None):
    """``run(n, threads=THREADS) -> last loss``: the same step in torch + diffusers."""
    tm.train()
    device = next(tm.parameters()).device
    c = optim.default_config()
    decay = [p for p in tm.parameters() if p.ndim >= 2]  # our decay mask: matrices only
    no_decay = [p for p in tm.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": c.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=c.lr,
        betas=(c.b1, c.b2),
        eps=c.eps,
        fused=device.type == "cuda",
    )
    sched = diffusers.DDPMScheduler(num_train_timesteps=NUM_TIMESTEPS, beta_schedule="linear")
    nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy()).to(device)
    x0, noise = nchw(inputs["x0"]), nchw(inputs["noise"])
    t = torch.from_numpy(inputs["t"]).long().to(device)
    x_t = sched.add_noise(x0, noise, t)

    def run(n: int, threads: int = THREADS) -> float:
        torch.set_num_threads(threads)
        for _ in range(n):
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                out = tm(x_t, t).sample
            loss = torch.nn.functional.mse_loss(out.float(), noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tm.parameters(), c.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.set_num_threads(THREADS)
        return float(loss.detach())

    return run


def build_ours_ddim(tm, x_T: np.ndarray, dtype: Any = jnp.float32):
    """``run(n) -> samples``: our compiled DDIM-50 loop on one device."""
    model = convert.unet_from_config(dict(tm.config), dtype=dtype)
    params = convert.unet_params(
        {k: v.detach().cpu().numpy().copy() for k, v in tm.state_dict().items()}, model
    )
    params = jax.device_put(params, jax.devices()[0])
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    sample = sampling.make_sampler(
        lambda p, x, t, cond: model.apply({"params": p}, x, t),
        Schedule.create("linear", NUM_TIMESTEPS),
        method="ddim",
        steps=DDIM_STEPS,
        mesh=mesh,
    )
    x = jnp.asarray(x_T)

    def run(n: int):
        for _ in range(n):
            out = sample(params, x)
        return np.asarray(jax.block_until_ready(out))

    return run


def build_torch_ddim(tm, x_T: np.ndarray, autocast: torch.dtype | None = None):
    """``run(n, threads=THREADS) -> samples``: diffusers' DDIM loop (as ``DDIMPipeline``)."""
    tm.eval()
    device = next(tm.parameters()).device
    sched = diffusers.DDIMScheduler(num_train_timesteps=NUM_TIMESTEPS, beta_schedule="linear")
    x_init = torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy()).to(device)

    def run(n: int, threads: int = THREADS):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            for _ in range(n):
                sched.set_timesteps(DDIM_STEPS)
                x = x_init
                for t in sched.timesteps:
                    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                        out = tm(x, t).sample
                    x = sched.step(out.float(), t, x, eta=0.0).prev_sample
        torch.set_num_threads(THREADS)
        return x.float().cpu().numpy().transpose(0, 2, 3, 1)

    return run


def conv_shapes(channels: tuple[int, ...], batch: int) -> dict[str, Any]:
    """``{name: run(n)}``: each 3x3 conv shape of the UNet's forward, XLA and torch."""
    out = {}
    rng = np.random.default_rng(0)
    side = RESOLUTION
    for level, c in enumerate(channels):
        for c_in in sorted({c, 2 * c} if level else {c}):
            x = rng.standard_normal((batch, side, side, c_in)).astype(np.float32)
            w = (rng.standard_normal((3, 3, c_in, c)) / np.sqrt(9 * c_in)).astype(np.float32)
            f = jax.jit(
                lambda x, w: jax.lax.conv_general_dilated(
                    x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
                )
            )
            xj, wj = jnp.asarray(x), jnp.asarray(w)
            xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
            wt = torch.from_numpy(w.transpose(3, 2, 0, 1).copy())
            name = f"{side}x{side} {c_in}->{c}"

            def xla(n, f=f, xj=xj, wj=wj):
                for _ in range(n):
                    y = f(xj, wj)
                y.block_until_ready()

            def tconv(n, xt=xt, wt=wt, threads=THREADS):
                torch.set_num_threads(threads)
                with torch.inference_mode():
                    for _ in range(n):
                        torch.nn.functional.conv2d(xt, wt, padding=1)
                torch.set_num_threads(THREADS)

            out[f"xla {name}"], out[f"torch {name}"] = xla, tconv
            out[f"torch-1t {name}"] = functools.partial(tconv, threads=1)
        side //= 2
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 4, few repetitions")
    parser.add_argument("--channels", type=int, nargs="+", default=[64, 128, 128, 128])
    parser.add_argument("--conv-shapes", action="store_true", help="time each conv shape")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    channels = tuple(args.channels)
    t_start = time.perf_counter()
    torch.set_num_threads(THREADS)
    tm = torch_unet(channels)
    n_params = sum(p.numel() for p in tm.parameters())
    print(
        f"jax {jax.__version__} ({jax.devices()[0].platform}, {os.cpu_count()} cpus), torch "
        f"{torch.__version__} ({THREADS} threads), diffusers {diffusers.__version__}; UNet "
        f"channels {channels} ({n_params:,} params) at {RESOLUTION}px; load average "
        f"{os.getloadavg()[0]:.1f}",
        flush=True,
    )

    # 1. Train step, same weights, batch, timesteps and noise.
    inputs = train_inputs(plan.batch)
    x_T = (
        np.random.default_rng(1)
        .standard_normal((plan.sample_batch, RESOLUTION, RESOLUTION, CHANNELS_IN))
        .astype(np.float32)
    )
    # Sampling gets its own copy of the initial weights (torch's training updates tm in place).
    ddim_ours, ddim_torch = build_ours_ddim(tm, x_T), build_torch_ddim(copy.deepcopy(tm), x_T)
    ours, theirs = build_ours_train(tm, inputs), build_torch_train(tm, inputs)
    t = time.perf_counter()
    loss_ours = ours(1)
    compile_s = time.perf_counter() - t
    loss_torch = theirs(1)
    print(
        f"first-step loss: ours {loss_ours:.6f}  torch {loss_torch:.6f}; ours compile+step "
        f"{compile_s:.1f}s",
        flush=True,
    )
    assert abs(loss_ours - loss_torch) < 1e-4 * abs(loss_torch), (loss_ours, loss_torch)
    sides = {"ours": ours, "torch": theirs, "torch-1t": functools.partial(theirs, threads=1)}
    warm_up(sides, WARM_UP_ROUNDS, plan.steps)
    times, cpu = alternate(sides, plan.rounds, plan.steps)
    assert ours.compiles() == 1, f"our train step compiled {ours.compiles()} times"
    del ours, theirs, sides

    # 2. DDIM-50 sampling from the same x_T and the same (initial) weights.
    t = time.perf_counter()
    s_ours = ddim_ours(1)
    compile_s = time.perf_counter() - t
    s_torch = ddim_torch(1)
    err = float(np.abs(s_ours - s_torch).max())
    # Not asserted: with random weights the 50-step DDIM map amplifies float32 rounding
    # differences several-fold per step (1e-6 after one step, order 1 after twenty, in a
    # probe); one step's agreement with DDIMScheduler.step is tested in tests/diffusion.
    print(
        f"DDIM-{DDIM_STEPS} samples: max |ours - torch| = {err:.2e} (random weights: see the "
        f"comment); ours compile+run {compile_s:.1f}s"
    )
    assert np.isfinite(s_ours).all() and np.abs(s_ours).max() <= 1.0 + 1e-5
    sample_sides = {
        "ours": ddim_ours,
        "torch": ddim_torch,
        "torch-1t": functools.partial(ddim_torch, threads=1),
    }
    s_times, s_cpu = alternate(sample_sides, plan.sample_rounds, 1, label="DDIM round")

    # 3. Convolution shapes.
    conv = {}
    if args.conv_shapes:
        conv_times, _ = alternate(conv_shapes(channels, plan.batch), 3, 5, label="conv round")
        conv = {k: statistics.median(v) for k, v in conv_times.items()}

    med = {k: statistics.median(v) for k, v in times.items()}
    torch_side = min(("torch", "torch-1t"), key=med.get)
    step_ratio = med["ours"] / med[torch_side]
    s_med = {k: statistics.median(v) for k, v in s_times.items()}
    s_torch_side = min(("torch", "torch-1t"), key=s_med.get)
    ddim_ratio = s_med["ours"] / s_med[s_torch_side]
    print()
    print(
        f"Machine: {os.cpu_count()} CPU cores (jax {jax.default_backend()}); load average "
        f"{os.getloadavg()[0]:.1f}; torch compared: train {torch_side}, DDIM {s_torch_side}."
    )
    print("| measurement | ours (JAX/Flax) | diffusers + torch | ours / torch |")
    print("|---|---|---|---|")
    rows = [
        (
            f"UNet train step, median wall s (batch {plan.batch}, fp32, AdamW)",
            med["ours"],
            med[torch_side],
        ),
        (
            "UNet train step, median CPU-s",
            statistics.median(cpu["ours"]),
            statistics.median(cpu[torch_side]),
        ),
        (
            f"DDIM-{DDIM_STEPS} of {plan.sample_batch} images, median wall s",
            s_med["ours"],
            s_med[s_torch_side],
        ),
        (
            "DDIM, median CPU-s",
            statistics.median(s_cpu["ours"]),
            statistics.median(s_cpu[s_torch_side]),
        ),
    ]
    for name, a, b in rows:
        print(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.3f} |")
    if conv:
        print()
        print(
            f"| 3x3 conv forward, batch {plan.batch}, median ms | XLA | torch (faster of 2 and 1 "
            "threads) | XLA / torch |"
        )
        print("|---|---|---|---|")
        for k in conv:
            if k.startswith("xla "):
                name = k[4:]
                x, tt = conv[k], min(conv[f"torch {name}"], conv[f"torch-1t {name}"])
                print(f"| {name} | {1e3 * x:.2f} | {1e3 * tt:.2f} | {x / tt:.2f} |")
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f}s")
    print(f"RESULT unet_step_ratio_vs_torch={step_ratio:.3f} ddim_ratio_vs_torch={ddim_ratio:.3f}")


if __name__ == "__main__":
    main()
