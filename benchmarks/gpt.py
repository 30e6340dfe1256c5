"""GPT-2 benchmark: our train step and KV-cache generation against PyTorch / Hugging Face.

Run as ``python -m benchmarks.gpt [--quick]`` (see ``benchmarks/README.md``). Everything is
measured side by side in one process, alternating, on the same machine:

1. Train step of the GPT-2 architecture at L=6, d=384, 6 heads, T=256, batch 16, vocab 50257,
   float32, dropout 0: ours is the real ``common.training.make_train_step`` with
   ``common.optim.adamw`` (global-norm clip 1.0, masked weight decay), jitted with explicit
   shardings and the state donated on a 1-device mesh, exactly as ``common.training.train``
   does; theirs is ``transformers.GPT2LMHeadModel`` with ``torch.optim.AdamW`` (same betas,
   eps, weight-decay mask, the same clip), ``loss.backward(); clip; step(); zero_grad()``.
   Both start from the same weights (HF's init converted with ``nlp.gpt_convert``) and see the
   same batch, so their first losses must agree; rounds of N steps alternate (ours first on
   even rounds, torch first on odd ones) and the medians of the per-round step times are
   compared.
2. MFU: model FLOPs per step counted as in PaLM (Chowdhery et al. 2022, appendix B),
   ``6 * N * tokens + 12 * L * T * d * tokens`` with N the parameters without the position
   table (the tied output projection counted once, through the embedding), per second of
   step time, over the float32 matmul peak measured by ``common.flops.measured_matmul_peak``
   (best of square sizes 1024/2048/4096), re-measured right after every round. The headline
   MFU divides each round's step time by the peak measured after that round (same machine
   conditions; the median over rounds); also printed: against the best peak of the whole
   run (the stricter number, equal on an idle machine) and a CPU-time MFU (model FLOPs per
   CPU-second over matmul FLOPs per CPU-second), which other processes time-slicing the
   cores do not move.
3. Greedy KV-cache generation, batch 1, an 8-token prompt and 256 new tokens with a tiny
   GPT-2 (L=2, d=128, 4 heads, GPT-2's vocabulary): ``nlp.decoding.generate`` (one compiled
   ``while_loop``, timed after a warm-up call) against HF ``model.generate(do_sample=False,
   max_new_tokens=256, min_new_tokens=256, use_cache=True)``, both from the same weights (the
   generated tokens are compared).

The last line printed is
``RESULT train_ratio_vs_torch=<ours/torch step time> mfu=<ours> gen_speedup_vs_torch=<x>``.
"""

from __future__ import annotations

import os

from benchmarks.harness import reexec_with_malloc_env

if __name__ == "__main__":  # malloc settings for both sides: see benchmarks/harness.py
    reexec_with_malloc_env("benchmarks.gpt")

# XLA reads its flags once, when the backend starts: they must be in the environment before
# jax is imported. ``BENCH_XLA_FLAGS`` (empty: XLA's defaults) is appended to any XLA_FLAGS
# the caller set. See README.md for the flags that were measured on this machine.
BENCH_XLA_FLAGS = ""
if BENCH_XLA_FLAGS:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {BENCH_XLA_FLAGS}".strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from benchmarks.harness import alternate, cpu_seconds, warm_up  # noqa: E402
from common import flops, optim, sharding, training  # noqa: E402
from nlp import decoding, gpt  # noqa: E402
from nlp.gpt_convert import gpt2_params_from_torch, gpt_config_from_hf  # noqa: E402

THREADS = 2  # torch intra-op threads; XLA's CPU client uses one thread per core


@dataclasses.dataclass(frozen=True)
class Config:
    num_layers: int
    d_model: int
    num_heads: int
    vocab_size: int = 50257  # GPT-2's BPE vocabulary
    max_len: int = 1024  # GPT-2's context (the size of the position table)

    def hf(self) -> transformers.GPT2Config:
        return transformers.GPT2Config(
            vocab_size=self.vocab_size,
            n_positions=self.max_len,
            n_embd=self.d_model,
            n_layer=self.num_layers,
            n_head=self.num_heads,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )


TRAIN = Config(num_layers=6, d_model=384, num_heads=6)
SEQ_LEN, BATCH = 256, 16
GEN = Config(num_layers=2, d_model=128, num_heads=4)
PROMPT_LEN, NEW_TOKENS = 8, 256


@dataclasses.dataclass(frozen=True)
class Plan:
    rounds: int  # alternating train rounds
    steps: int  # train steps per side per round
    gen_rounds: int  # alternating generation rounds
    peak_sizes: tuple[int, ...]  # square matmul sizes tried for the peak


FULL = Plan(rounds=6, steps=2, gen_rounds=5, peak_sizes=(1024, 2048, 4096))
QUICK = Plan(rounds=2, steps=1, gen_rounds=2, peak_sizes=(1024, 2048))
WARM_UP_ROUNDS = 6  # at most; see benchmarks.harness.warm_up


def hf_model(cfg: Config, seed: int) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg.hf())


def ours_from_hf(
    hf: transformers.GPT2LMHeadModel, attention_impl: str | None, dtype: Any = jnp.float32
):
    """Our ``GPT`` with the HF model's config and (converted) weights; ``dtype``: compute."""
    model = gpt.GPT(
        **{**gpt_config_from_hf(hf.config), "attention_impl": attention_impl, "dtype": dtype}
    )
    # Copies: torch later updates its tensors in place, and jax may alias host numpy buffers.
    state_dict = {k: v.detach().cpu().numpy().copy() for k, v in hf.state_dict().items()}
    return model, gpt2_params_from_torch(state_dict, model)["params"]


def palm_flops_per_step(params, cfg: Config, seq_len: int, tokens: int) -> float:
    """``6 N D + 12 L T d D`` (PaLM appendix B); N excludes the position table."""
    n = sum(int(x.size) for x in jax.tree.leaves(params))
    n -= int(params["wpe"]["embedding"].size)
    return flops.palm_flops_per_token(n, cfg.num_layers, seq_len, cfg.d_model) * tokens


def matmul_peak(sizes: tuple[int, ...]) -> dict[int, float]:
    """A fresh ``common.flops.measured_matmul_peak`` per size (bypassing its cache)."""
    return {n: flops.measured_matmul_peak.__wrapped__(n=n, repeats=3) for n in sizes}


def matmul_flops_per_cpu_second(n: int, repeats: int = 3) -> float:
    """Best float32 ``n x n`` matmul FLOPs per CPU-second (all threads): a peak that
    time-slicing with other processes does not change."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = 0.0
    for _ in range(repeats):
        c = cpu_seconds()
        f(a, a).block_until_ready()
        best = max(best, 2 * n**3 / (cpu_seconds() - c))
    return best


def torch_matmul_peak(n: int, repeats: int = 3) -> float:
    a = torch.ones(n, n)
    a @ a
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


# ---------------------------------------------------------------------------- train step


def build_ours_train(
    hf: transformers.GPT2LMHeadModel,
    batch_np: dict[str, np.ndarray],
    attention_impl: str | None,
    cfg: Config = TRAIN,
    dtype: Any = jnp.float32,
):
    """(run(n) -> last loss, flops per step): the train step as ``common.training.train``.

    ``cfg`` must be the config ``hf`` was built from; ``dtype``: compute dtype (the
    parameters and the optimizer state stay float32)."""
    model, params = ours_from_hf(hf, attention_impl, dtype)
    batch_size, seq_len = batch_np["inputs"].shape
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    tx, schedule = optim.adamw(optim.default_config(total_steps=100_000))
    init_fn = lambda rng: model.init(rng, jnp.zeros((1, seq_len), jnp.int32))
    state, shardings = training.create_state(init_fn, tx, mesh, jax.random.key(0))
    params = jax.device_put(params, shardings.params)  # HF's weights in place of ours
    state = state.replace(params=params, opt_state=jax.jit(tx.init)(params))
    shardings = jax.tree.map(lambda x: x.sharding, state)
    # jit(tx.init) returns *uncommitted* arrays and the step returns committed ones, which
    # would make the step compile a second time on its second call; commit them up front.
    state = jax.device_put(state, shardings)
    replicated = sharding.replicated(mesh)
    step = jax.jit(
        training.make_train_step(gpt.lm_loss_fn(model), tx, schedule),
        in_shardings=(shardings, None, replicated),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    batch = sharding.put_batch(batch_np, mesh)
    rng = jax.device_put(jax.random.key(1), replicated)
    holder = {"state": state}
    flops_per_step = palm_flops_per_step(params, cfg, seq_len, batch_size * seq_len)

    def run(n: int) -> float:
        state = holder["state"]
        for _ in range(n):
            state, metrics = step(state, batch, rng)
        jax.block_until_ready((state, metrics))
        holder["state"] = state
        return float(metrics["loss"])

    # Must stay 1: no recompilation inside the timings (not counted where jax lacks the hook).
    run.compiles = getattr(step, "_cache_size", lambda: 1)
    run.lower = lambda: step.lower(holder["state"], batch, rng)  # for inspecting the HLO
    return run, flops_per_step


def build_torch_train(
    hf: transformers.GPT2LMHeadModel,
    batch_np: dict[str, np.ndarray],
    autocast: torch.dtype | None = None,
):
    """run(n) -> last loss: HF GPT-2 + torch AdamW with our optimizer's hyperparameters, on
    the device ``hf`` is on (fused AdamW there on CUDA); ``autocast``: mixed-precision
    compute dtype (float32 parameters), as ``torch.autocast``."""
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
    x = torch.from_numpy(batch_np["inputs"]).long().to(device)
    y = torch.from_numpy(batch_np["targets"]).long().to(device)
    vocab = hf.config.vocab_size

    def run(n: int) -> float:
        for _ in range(n):
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                logits = hf(input_ids=x).logits  # [batch, len, vocab]
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, vocab), y.view(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), c.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return run


# ---------------------------------------------------------------------------- generation


def bench_generation(plan: Plan):
    hf = hf_model(GEN, seed=1).eval()
    model, params = ours_from_hf(hf, None)
    variables = {"params": params}
    prompt = np.random.default_rng(1).integers(0, GEN.vocab_size, (1, PROMPT_LEN))
    prompt_jax = jnp.asarray(prompt, jnp.int32)
    prompt_pt = torch.from_numpy(prompt).long()
    eos = hf.config.eos_token_id
    out = {}

    def ours(_n: int) -> float:
        toks = decoding.generate(
            model, variables, prompt_jax, max_new_tokens=NEW_TOKENS, temperature=0.0
        )
        out["ours"] = np.asarray(jax.block_until_ready(toks))
        return 0.0

    def theirs(_n: int) -> float:
        with torch.inference_mode():
            toks = hf.generate(
                prompt_pt,
                attention_mask=torch.ones_like(prompt_pt),
                do_sample=False,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                use_cache=True,
                pad_token_id=eos,
            )
        out["torch"] = toks.numpy()
        return 0.0

    t = time.perf_counter()
    ours(1)
    compile_s = time.perf_counter() - t
    theirs(1)
    times, _ = alternate({"ours": ours, "torch": theirs}, plan.gen_rounds, 1, label="gen round")
    a, b = out["ours"][0, PROMPT_LEN:], out["torch"][0, PROMPT_LEN:]
    assert a.shape == b.shape == (NEW_TOKENS,), (a.shape, b.shape)
    same = int(np.argmin(a == b)) if not np.array_equal(a, b) else NEW_TOKENS
    return times, compile_s, same


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (~1 minute)")
    parser.add_argument(
        "--attention-impl",
        default=None,
        choices=["xla", "einsum"],
        help="GPT.attention_impl for ours (default: the model's default)",
    )
    parser.add_argument("--rounds", type=int, help="override the number of train rounds")
    parser.add_argument("--steps", type=int, help="override train steps per side per round")
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="keep glibc's default malloc settings (see MALLOC_ENV)",
    )
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    plan = dataclasses.replace(
        plan, rounds=args.rounds or plan.rounds, steps=args.steps or plan.steps
    )
    t_start = time.perf_counter()
    torch.set_num_threads(THREADS)
    print(
        f"jax {jax.__version__} ({jax.devices()[0].platform}, {os.cpu_count()} cpus), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
        f"{transformers.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        flush=True,
    )

    # Matmul peak: every size, measured again after each train round (under the same
    # conditions as that round); also as FLOPs per CPU-second.
    peaks: list[dict[int, float]] = []
    cpu_peaks: list[float] = []

    def measure_peak() -> None:
        peaks.append(matmul_peak(plan.peak_sizes))
        cpu_peaks.append(matmul_flops_per_cpu_second(2048))

    measure_peak()
    torch_peaks = {n: torch_matmul_peak(n) for n in plan.peak_sizes}

    # Train step.
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, TRAIN.vocab_size, (BATCH, SEQ_LEN + 1))
    batch_np = {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
    }
    hf = hf_model(TRAIN, seed=0)
    ours, flops_per_step = build_ours_train(hf, batch_np, args.attention_impl)
    theirs = build_torch_train(hf, batch_np)
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
    # Untimed steps until the shared heap settles: the steps after the compile still
    # page-fault their ~3 GB of buffers in (~780k faults, ~4 s of kernel time).
    warm = warm_up({"ours": ours, "torch": theirs}, WARM_UP_ROUNDS, plan.steps)
    times, cpu = alternate(
        {"ours": ours, "torch": theirs}, plan.rounds, plan.steps, between=measure_peak
    )
    last_ours, last_torch = ours(1), theirs(1)
    assert ours.compiles() == 1, f"our train step compiled {ours.compiles()} times"

    # Generation.
    gen_times, gen_compile_s, same = bench_generation(plan)

    # Summary.
    tok = BATCH * SEQ_LEN
    step_ours, step_torch = statistics.median(times["ours"]), statistics.median(times["torch"])
    cpu_ours, cpu_torch = statistics.median(cpu["ours"]), statistics.median(cpu["torch"])
    round_peaks = [max(p.values()) for p in peaks[1:]]  # peaks[r + 1]: right after round r
    best_peak, cpu_peak = max(max(p.values()) for p in peaks), max(cpu_peaks)

    def mfus(step_times: list[float], step_cpu: float) -> tuple[float, float, float]:
        """(wall vs same-round peak, wall vs best peak of the run, CPU-time)."""
        same_round = statistics.median(
            flops_per_step / t / p for t, p in zip(step_times, round_peaks, strict=True)
        )
        return (
            same_round,
            flops_per_step / statistics.median(step_times) / best_peak,
            flops_per_step / step_cpu / cpu_peak,
        )

    mfu_ours, mfu_torch = mfus(times["ours"], cpu_ours), mfus(times["torch"], cpu_torch)
    gen_ours = NEW_TOKENS / statistics.median(gen_times["ours"])
    gen_torch = NEW_TOKENS / statistics.median(gen_times["torch"])
    ratio, speedup = step_ours / step_torch, gen_ours / gen_torch

    def gflops(values) -> str:
        return ", ".join(f"{v / 1e9:.0f}" for v in values)

    best_by_size = {n: max(p[n] for p in peaks) for n in plan.peak_sizes}
    print()
    print(
        f"Machine: {os.cpu_count()} CPU cores, no accelerator (jax {jax.default_backend()}); "
        f"{plan.rounds} rounds x {plan.steps} steps per side; load average "
        f"{os.getloadavg()[0]:.1f}; malloc env "
        f"{'set' if os.environ.get('MALLOC_MMAP_MAX_') == '0' else 'default'}."
    )
    print(
        "Matmul peak GFLOP/s, best per size n="
        + "/".join(map(str, plan.peak_sizes))
        + f": jax {gflops(best_by_size.values())}; torch {gflops(torch_peaks.values())}. "
        f"Best per round: {gflops(round_peaks)}; best overall {best_peak / 1e9:.0f}; per "
        f"CPU-second {cpu_peak / 1e9:.0f}."
    )
    print(
        f"Train loss after {2 + (warm + plan.rounds) * plan.steps} steps on the same batch: "
        f"ours {last_ours:.4f}, torch {last_torch:.4f}"
    )
    print(
        f"Greedy tokens identical for the first {same}/{NEW_TOKENS} positions; ours "
        f"compile+first call {gen_compile_s:.1f}s"
    )
    rows = [
        (
            "train step, median wall s (L=6 d=384 T=256 B=16 V=50257 fp32)",
            f"{step_ours:.3f}",
            f"{step_torch:.3f}",
            f"{ratio:.3f}",
        ),
        (
            "train step, median CPU-s (user+sys, all threads)",
            f"{cpu_ours:.2f}",
            f"{cpu_torch:.2f}",
            f"{cpu_ours / cpu_torch:.3f}",
        ),
        (
            "train tokens/s",
            f"{tok / step_ours:.0f}",
            f"{tok / step_torch:.0f}",
            f"{step_torch / step_ours:.3f}",
        ),
        (
            f"model GFLOP/s (PaLM count, {flops_per_step / 1e12:.3f} TFLOP/step)",
            f"{flops_per_step / step_ours / 1e9:.1f}",
            f"{flops_per_step / step_torch / 1e9:.1f}",
            f"{step_torch / step_ours:.3f}",
        ),
        (
            "MFU, wall clock vs the matmul peak measured after the same round",
            f"{mfu_ours[0]:.3f}",
            f"{mfu_torch[0]:.3f}",
            f"{mfu_ours[0] / mfu_torch[0]:.3f}",
        ),
        (
            f"MFU, wall clock vs the best peak of the run ({best_peak / 1e9:.0f} GFLOP/s)",
            f"{mfu_ours[1]:.3f}",
            f"{mfu_torch[1]:.3f}",
            f"{mfu_ours[1] / mfu_torch[1]:.3f}",
        ),
        (
            f"MFU, CPU time (vs {cpu_peak / 1e9:.0f} matmul GFLOP per CPU-s)",
            f"{mfu_ours[2]:.3f}",
            f"{mfu_torch[2]:.3f}",
            f"{mfu_ours[2] / mfu_torch[2]:.3f}",
        ),
        (
            f"greedy generation tokens/s (L=2 d=128, B=1, {NEW_TOKENS} new)",
            f"{gen_ours:.0f}",
            f"{gen_torch:.0f}",
            f"{speedup:.2f}",
        ),
    ]
    print()
    print("| measurement | ours (JAX/Flax) | PyTorch / HF | ours / torch |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f}s")
    print(
        f"RESULT train_ratio_vs_torch={ratio:.3f} mfu={mfu_ours[0]:.3f} "
        f"gen_speedup_vs_torch={speedup:.2f}"
    )


if __name__ == "__main__":
    main()
