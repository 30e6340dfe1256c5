"""Swin benchmark: our Swin-T train step against PyTorch / Hugging Face, and how window
attention and global attention scale with the image side.

Run as ``python -m benchmarks.swin [--quick]`` (see ``benchmarks/README.md``). Everything is
measured side by side in one process, alternating, on the same machine:

1. Swin-T train step (Liu et al. 2021, table 1: C=96, depths 2-2-6-2, heads 3-6-12-24,
   window 7) at 224 x 224, batch 8, 1000 classes, float32, stochastic depth and dropout 0.
   Ours is the real ``common.training.make_train_step`` with ``common.optim.adamw``
   (global-norm clip 1.0, masked weight decay), jitted with explicit shardings and the
   state donated on a 1-device mesh, exactly as ``common.training.train`` does. Theirs is
   Hugging Face's ``transformers.SwinForImageClassification`` (timm, the reference the issue
   names, needs torchvision, which does not load here) with ``torch.optim.AdamW`` (same
   betas, eps, weight-decay mask and clip): ``loss.backward(); clip; step(); zero_grad()``.
   Both start from the same weights (HF's init converted with ``vision.swin_convert``) and
   see the same batch, so their first losses must agree; rounds alternate who goes first
   and the medians of the per-round step times are compared (torch's: the faster of 2 and
   1 intra-op threads, see ``main``).
2. Cost against image side: forward + backward (``jax.grad`` of the summed output) of one
   attention-bearing block of each kind at Swin-T's stage-0 width (C=96, 3 heads, MLP 4C),
   on a token map of side ``s`` and ``2s`` (``s = 28``: a 112 x 112 image at patch 4, or
   784 tokens): a shifted Swin block (roll, 7 x 7 windows, mask, relative position bias)
   against a ViT encoder block (global attention over all ``s^2`` tokens). Window attention
   costs ``O(s^2 M^2 C)``, so its time grows about 4x per doubling of the side; global
   attention's ``O(s^4 C)`` term grows 16x, diluted here by the block's linear layers.
3. The batched matmuls of window attention at stage 0 of the train step (``batch x 64``
   windows x 3 heads, 49 tokens, head size 32), each form alone: ``S = Q K^T``,
   ``O = P V`` and ``dV = P^T dO`` (the backward's ``dP = dO V^T``, ``dQ = dS K`` and
   ``dK = dS^T Q`` repeat them), as XLA runs the einsum and as torch's ``bmm`` runs it. This is
   where Swin's step loses to torch (``benchmarks/LOG.md``).

The last line printed is
``RESULT swin_ratio_vs_torch=<ours/torch step time> swin_growth=<time(2s)/time(s)>
vit_growth=<time(2s)/time(s)>`` (one line).
"""

from __future__ import annotations

import os

from benchmarks.harness import reexec_with_malloc_env

if __name__ == "__main__":  # malloc settings for both sides: see benchmarks/harness.py
    reexec_with_malloc_env("benchmarks.swin")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks.harness import alternate, warm_up  # noqa: E402
from common import optim, sharding, training  # noqa: E402
from common.losses import cross_entropy  # noqa: E402
from vision import swin, vit  # noqa: E402
from vision.swin_convert import swin_config_from_hf, swin_params_from_torch  # noqa: E402

THREADS = 2  # torch intra-op threads; XLA's CPU client uses one thread per core
RESOLUTION, NUM_CLASSES = 224, 1000
# Scaling: Swin-T's stage-0 block width, token-map sides s and 2s.
WIDTH, HEADS, WINDOW, SIDE = 96, 3, 7, 28


@dataclasses.dataclass(frozen=True)
class Plan:
    batch: int  # Swin-T train batch
    rounds: int  # alternating train rounds
    steps: int  # train steps per side per round
    scale_rounds: int  # alternating rounds of the block timings
    scale_batch: int  # images per block call


FULL = Plan(batch=8, rounds=6, steps=2, scale_rounds=3, scale_batch=2)
WARM_UP_ROUNDS = 6  # at most; see benchmarks.harness.warm_up
QUICK = Plan(batch=2, rounds=2, steps=1, scale_rounds=2, scale_batch=1)


def hf_swin_t() -> transformers.SwinForImageClassification:
    """HF Swin-T (``SwinConfig``'s defaults are Swin-T at 224) without stochastic depth."""
    torch.manual_seed(0)
    cfg = transformers.SwinConfig(num_labels=NUM_CLASSES, drop_path_rate=0.0)
    return transformers.SwinForImageClassification(cfg)


def build_ours_train(
    hf,
    images_nhwc: np.ndarray,
    labels: np.ndarray,
    attention_impl: str | None = None,
    dtype: Any = jnp.float32,
):
    """``run(n) -> last loss``: our train step exactly as ``common.training.train`` runs it;
    ``dtype``: compute dtype (parameters and optimizer state stay float32)."""
    model = swin.Swin(**swin_config_from_hf(hf.config), attention_impl=attention_impl, dtype=dtype)
    assert model.drop_path_rate == 0.0 and model.window_size == 7 and model.embed_dim == 96
    # Copies: torch later updates its tensors in place, and jax may alias host numpy buffers.
    state_dict = {k: v.detach().cpu().numpy().copy() for k, v in hf.state_dict().items()}
    params = swin_params_from_torch(state_dict, model)["params"]
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    tx, schedule = optim.adamw(optim.default_config(total_steps=100_000))
    example = jnp.zeros((1, RESOLUTION, RESOLUTION, 3), jnp.float32)
    init_fn = lambda rng: model.init(rng, example)
    state, shardings = training.create_state(init_fn, tx, mesh, jax.random.key(0))
    params = jax.device_put(params, shardings.params)  # HF's weights in place of ours
    state = state.replace(params=params, opt_state=jax.jit(tx.init)(params))
    state = jax.device_put(state, shardings)  # committed, so the step compiles once

    def loss_fn(params, batch, rng):
        logits = model.apply(
            {"params": params}, batch["images"], deterministic=False, rngs={"dropout": rng}
        )
        total, count = cross_entropy(logits, batch["labels"])
        return total / count, {}

    replicated = sharding.replicated(mesh)
    step = jax.jit(
        training.make_train_step(loss_fn, tx, schedule),
        in_shardings=(shardings, None, replicated),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    batch = sharding.put_batch({"images": images_nhwc, "labels": labels}, mesh)
    rng = jax.device_put(jax.random.key(1), replicated)
    holder = {"state": state}

    def run(n: int) -> float:
        state = holder["state"]
        for _ in range(n):
            state, metrics = step(state, batch, rng)
        jax.block_until_ready((state, metrics))
        holder["state"] = state
        return float(metrics["loss"])

    # Must stay 1: no recompilation inside the timings (not counted where jax lacks the hook).
    run.compiles = getattr(step, "_cache_size", lambda: 1)
    return run


def build_torch_train(
    hf, images_nhwc: np.ndarray, labels: np.ndarray, autocast: torch.dtype | None = None
):
    """``run(n, threads=THREADS) -> last loss``: HF Swin-T + torch AdamW with our
    optimizer's settings, on ``threads`` intra-op threads, on the device ``hf`` is on (fused
    AdamW there on CUDA); ``autocast``: mixed-precision compute dtype, as ``torch.autocast``."""
    hf.train()
    device = next(hf.parameters()).device
    c = optim.default_config()
    decay = [p for p in hf.parameters() if p.ndim >= 2]  # our decay mask: matrices only
    no_decay = [p for p in hf.parameters() if p.ndim < 2]
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
    x = torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy()).to(device)  # NCHW
    y = torch.from_numpy(labels).long().to(device)

    def run(n: int, threads: int = THREADS) -> float:
        torch.set_num_threads(threads)
        for _ in range(n):
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                logits = hf(pixel_values=x).logits  # [batch, 1000]
            loss = torch.nn.functional.cross_entropy(logits.float(), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), c.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.set_num_threads(THREADS)
        return float(loss.detach())

    return run


# ---------------------------------------------------------------------------- scaling


def block_grad(kind: str, side: int, batch: int):
    """``run(n)``: forward + backward of one block on a ``side x side`` token map."""
    if kind == "swin":
        block = swin.SwinBlock(
            num_heads=HEADS,
            window=WINDOW,
            mlp_dim=4 * WIDTH,
            drop_path=0.0,
            dropout=0.0,
            attn_dropout=0.0,
            layer_norm_eps=1e-5,
            activation="gelu",
            shifted=True,
            deterministic=True,
        )
        x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, side, side, WIDTH)))
    else:
        block = vit.EncoderBlock(
            num_heads=HEADS,
            d_ff=4 * WIDTH,
            dropout=0.0,
            attn_dropout=0.0,
            layer_norm_eps=1e-6,
            activation="gelu",
            deterministic=True,
        )
        x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, side * side, WIDTH)))
    x = x.astype(jnp.float32)
    params = nn.unbox(block.init(jax.random.key(0), x))
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(block.apply(p, x)), argnums=(0, 1)))
    jax.block_until_ready(grad(params, x))  # compile

    def run(n: int) -> float:
        for _ in range(n):
            out = grad(params, x)
        jax.block_until_ready(out)
        return 0.0

    return run


# ---------------------------------------------------------------------------- window matmuls

# (einsum, the same product on torch tensors): the three forms of window attention's matmuls.
WINDOW_FORMS = {
    "S = Q K^T": ("bqd,bkd->bqk", lambda a, b: torch.bmm(a, b.transpose(1, 2))),
    "O = P V": ("bqk,bkd->bqd", torch.bmm),
    "dV = P^T dO": ("bqk,bqd->bkd", lambda a, b: torch.bmm(a.transpose(1, 2), b)),
}


def window_matmuls(windows: int) -> dict[str, Any]:
    """``{f"{side} {form}": run(n)}``: each form of ``WINDOW_FORMS`` over ``windows x HEADS``
    matrices of ``WINDOW^2`` tokens and head size ``WIDTH / HEADS``, jitted in XLA and as
    torch's ``bmm`` (checked equal first)."""
    n, d, rng = WINDOW * WINDOW, WIDTH // HEADS, np.random.default_rng(0)
    qk = rng.normal(size=(windows * HEADS, n, d)).astype(np.float32)  # Q, K, V, dO
    pn = rng.normal(size=(windows * HEADS, n, n)).astype(np.float32)  # P, dS
    runs = {}
    for form, (spec, torch_fn) in WINDOW_FORMS.items():
        a = pn if spec.startswith("bqk") else qk
        jax_fn = jax.jit(functools.partial(jnp.einsum, spec))
        ja, jb = jnp.asarray(a), jnp.asarray(qk)
        ta, tb = torch.from_numpy(a), torch.from_numpy(qk)
        want = torch_fn(ta, tb).numpy()
        np.testing.assert_allclose(np.asarray(jax_fn(ja, jb)), want, rtol=1e-4, atol=1e-3)

        def run_jax(steps: int, f=jax_fn, x=ja, y=jb) -> float:
            for _ in range(steps):
                out = f(x, y)
            jax.block_until_ready(out)
            return 0.0

        def run_torch(steps: int, f=torch_fn, x=ta, y=tb) -> float:
            for _ in range(steps):
                f(x, y)
            return 0.0

        runs[f"xla {form}"], runs[f"torch {form}"] = run_jax, run_torch
    return runs


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 2, few repetitions")
    parser.add_argument("--batch", type=int, help="override the Swin-T train batch")
    parser.add_argument("--rounds", type=int, help="override the number of train rounds")
    parser.add_argument(
        "--attention-impl",
        default=None,
        choices=["xla", "einsum"],
        help="Swin.attention_impl for ours (default: the model's default)",
    )
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="keep glibc's default malloc settings (see MALLOC_ENV)",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    plan = dataclasses.replace(
        plan, batch=args.batch or plan.batch, rounds=args.rounds or plan.rounds
    )
    t_start = time.perf_counter()
    torch.set_num_threads(THREADS)
    hf = hf_swin_t()
    print(
        f"jax {jax.__version__} ({jax.devices()[0].platform}, {os.cpu_count()} cpus), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__} (attention {hf.config._attn_implementation!r}); ours: "
        f"attention_impl={args.attention_impl!r}; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    # 1. Swin-T train step, same weights and batch on both sides.
    rng = np.random.default_rng(0)
    images = rng.normal(size=(plan.batch, RESOLUTION, RESOLUTION, 3)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, plan.batch).astype(np.int32)
    ours = build_ours_train(hf, images, labels, args.attention_impl)
    theirs = build_torch_train(hf, images, labels)
    t = time.perf_counter()
    loss_ours = ours(1)  # compile + first step
    compile_s = time.perf_counter() - t
    loss_torch = theirs(1)
    print(
        f"first-step loss: ours {loss_ours:.5f}  torch {loss_torch:.5f} (same weights, same "
        f"batch); ours compile+step {compile_s:.1f}s",
        flush=True,
    )
    assert abs(loss_ours - loss_torch) < 1e-3 * abs(loss_torch), (loss_ours, loss_torch)
    # torch is timed with 2 and with 1 intra-op threads: on a machine shared with other jobs
    # its OpenMP threads spin waiting for each other, so one thread can be faster; the ratio
    # is taken against the faster of the two.
    sides = {"ours": ours, "torch": theirs, "torch-1t": functools.partial(theirs, threads=1)}
    warm = warm_up(sides, WARM_UP_ROUNDS, plan.steps)
    times, cpu = alternate(sides, plan.rounds, plan.steps)
    ours_steps = 2 + (warm + plan.rounds) * plan.steps  # compile, warm-up, timed, last
    last_ours, last_torch = ours(1), theirs(1)
    assert ours.compiles() == 1, f"our train step compiled {ours.compiles()} times"
    del ours, theirs, sides, hf

    # 2. Block cost against the token-map side.
    sides = (SIDE, 2 * SIDE)
    runs = {
        f"{kind}@{s}": block_grad(kind, s, plan.scale_batch)
        for kind in ("swin", "vit")
        for s in sides
    }
    block_times, block_cpu = alternate(runs, plan.scale_rounds, 1, label="block round")
    med = {k: statistics.median(v) for k, v in block_times.items()}
    med_cpu = {k: statistics.median(v) for k, v in block_cpu.items()}
    swin_growth = med[f"swin@{sides[1]}"] / med[f"swin@{sides[0]}"]
    vit_growth = med[f"vit@{sides[1]}"] / med[f"vit@{sides[0]}"]

    # 3. Window attention's batched matmuls at stage 0 of the train step (patch 4: a 56 x 56
    # token map, 8 x 8 windows per image).
    windows = plan.batch * (RESOLUTION // 4 // WINDOW) ** 2
    mm_times, _ = alternate(
        window_matmuls(windows), plan.scale_rounds, 10, label="window matmul round"
    )
    mm = {k: statistics.median(v) for k, v in mm_times.items()}

    # Summary.
    med_times = {k: statistics.median(v) for k, v in times.items()}
    torch_side = min(("torch", "torch-1t"), key=med_times.get)
    step_ours, step_torch = med_times["ours"], med_times[torch_side]
    cpu_ours, cpu_torch = statistics.median(cpu["ours"]), statistics.median(cpu[torch_side])
    ratio = step_ours / step_torch
    print()
    print(
        f"Machine: {os.cpu_count()} CPU cores, no accelerator (jax {jax.default_backend()}); "
        f"{plan.rounds} rounds x {plan.steps} steps per side; load average "
        f"{os.getloadavg()[0]:.1f}. torch median step: {med_times['torch']:.3f}s with "
        f"{THREADS} threads, {med_times['torch-1t']:.3f}s with 1; compared: {torch_side}."
    )
    print(
        f"Train loss on the same batch after {ours_steps} steps: ours "
        f"{last_ours:.4f}; after {2 * ours_steps - 2} (both torch sides update "
        f"one model): torch {last_torch:.4f}"
    )
    b = plan.batch
    rows = [
        (
            f"Swin-T train step, median wall s ({RESOLUTION}px, batch {b}, fp32, AdamW)",
            f"{step_ours:.3f}",
            f"{step_torch:.3f}",
            f"{ratio:.3f}",
        ),
        (
            "Swin-T train step, median CPU-s (user+sys, all threads)",
            f"{cpu_ours:.2f}",
            f"{cpu_torch:.2f}",
            f"{cpu_ours / cpu_torch:.3f}",
        ),
        (
            "Swin-T train images/s",
            f"{b / step_ours:.2f}",
            f"{b / step_torch:.2f}",
            f"{step_torch / step_ours:.3f}",
        ),
    ]
    print()
    print("| measurement | ours (JAX/Flax) | PyTorch / HF | ours / torch |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    n0, n1 = sides[0] ** 2, sides[1] ** 2
    print(
        f"| block fwd+bwd (C={WIDTH}, {HEADS} heads, batch {plan.scale_batch}), median s "
        f"| side {sides[0]} ({n0} tokens) | side {sides[1]} ({n1} tokens) | growth |"
    )
    print("|---|---|---|---|")
    for kind, growth, what in (
        ("swin", swin_growth, f"Swin shifted block, {WINDOW}x{WINDOW} windows"),
        ("vit", vit_growth, "ViT block, global attention"),
    ):
        print(
            f"| {what} | {med[f'{kind}@{sides[0]}']:.4f} | {med[f'{kind}@{sides[1]}']:.4f} "
            f"| {growth:.2f} |"
        )
    cpu_growth = {
        k: med_cpu[f"{k}@{sides[1]}"] / max(med_cpu[f"{k}@{sides[0]}"], 1e-9)
        for k in ("swin", "vit")
    }
    print(
        f"Growth in CPU-s (unaffected by other jobs time-slicing the cores): Swin "
        f"{cpu_growth['swin']:.2f}, ViT {cpu_growth['vit']:.2f}"
    )
    print()
    flop = 2 * windows * HEADS * (WINDOW * WINDOW) ** 2 * (WIDTH // HEADS)
    print(
        f"| window attention matmul ({windows} windows x {HEADS} heads, {WINDOW * WINDOW} "
        f"tokens, head size {WIDTH // HEADS}), median ms | XLA | torch bmm | XLA / torch |"
    )
    print("|---|---|---|---|")
    for form in WINDOW_FORMS:
        x, t = mm[f"xla {form}"], mm[f"torch {form}"]
        print(
            f"| `{form}` | {1e3 * x:.2f} ({flop / x / 1e9:.0f} GFLOP/s) | {1e3 * t:.2f} "
            f"({flop / t / 1e9:.0f} GFLOP/s) | {x / t:.2f} |"
        )
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f}s")
    print(
        f"RESULT swin_ratio_vs_torch={ratio:.3f} swin_growth={swin_growth:.2f} "
        f"vit_growth={vit_growth:.2f}"
    )


if __name__ == "__main__":
    main()
