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
   table (the tied output projection counted once, through the embedding), divided by the
   step time and by the machine's measured float32 matmul peak
   (``common.flops.measured_matmul_peak``: the best of several square sizes, re-measured
   every round, the best value kept).
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
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

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


FULL = Plan(rounds=5, steps=2, gen_rounds=5, peak_sizes=(1024, 2048, 4096))
QUICK = Plan(rounds=2, steps=1, gen_rounds=2, peak_sizes=(1024, 2048))


def hf_model(cfg: Config, seed: int) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg.hf())


def ours_from_hf(hf: transformers.GPT2LMHeadModel, attention_impl: str | None):
    """Our ``GPT`` with the HF model's config and (converted) weights."""
    model = gpt.GPT(**{**gpt_config_from_hf(hf.config), "attention_impl": attention_impl})
    # Copies: torch later updates its tensors in place, and jax may alias host numpy buffers.
    state_dict = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    return model, gpt2_params_from_torch(state_dict, model)["params"]


def palm_flops_per_step(params, cfg: Config, seq_len: int, tokens: int) -> float:
    """``6 N D + 12 L T d D`` (PaLM appendix B); N excludes the position table."""
    n = sum(int(x.size) for x in jax.tree.leaves(params))
    n -= int(params["wpe"]["embedding"].size)
    return 6.0 * n * tokens + 12.0 * cfg.num_layers * seq_len * cfg.d_model * tokens


def matmul_peak(sizes: tuple[int, ...]) -> dict[int, float]:
    """A fresh ``common.flops.measured_matmul_peak`` per size (bypassing its cache)."""
    return {n: flops.measured_matmul_peak.__wrapped__(n=n, repeats=3) for n in sizes}


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


def build_ours_train(hf: transformers.GPT2LMHeadModel, batch_np: dict[str, np.ndarray],
                     attention_impl: str | None):
    """(run(n) -> last loss, flops per step): the train step as ``common.training.train``."""
    model, params = ours_from_hf(hf, attention_impl)
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    tx, schedule = optim.adamw(optim.default_config(total_steps=100_000))
    init_fn = lambda rng: model.init(rng, jnp.zeros((1, SEQ_LEN), jnp.int32))
    state, shardings = training.create_state(init_fn, tx, mesh, jax.random.key(0))
    params = jax.device_put(params, shardings.params)  # HF's weights in place of ours
    state = state.replace(params=params, opt_state=jax.jit(tx.init)(params))
    shardings = jax.tree.map(lambda x: x.sharding, state)
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
    flops_per_step = palm_flops_per_step(params, TRAIN, SEQ_LEN, BATCH * SEQ_LEN)

    def run(n: int) -> float:
        state = holder["state"]
        for _ in range(n):
            state, metrics = step(state, batch, rng)
        jax.block_until_ready((state, metrics))
        holder["state"] = state
        return float(metrics["loss"])

    return run, flops_per_step


def build_torch_train(hf: transformers.GPT2LMHeadModel, batch_np: dict[str, np.ndarray]):
    """run(n) -> last loss: HF GPT-2 + torch AdamW with our optimizer's hyperparameters."""
    hf.train()
    c = optim.default_config()
    decay = [p for p in hf.parameters() if p.ndim >= 2]  # our decay mask: matrices only
    no_decay = [p for p in hf.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": c.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=c.lr, betas=(c.b1, c.b2), eps=c.eps,
    )
    x = torch.from_numpy(batch_np["inputs"]).long()
    y = torch.from_numpy(batch_np["targets"]).long()
    vocab = hf.config.vocab_size

    def run(n: int) -> float:
        for _ in range(n):
            logits = hf(input_ids=x).logits  # float32 [batch, len, vocab]
            loss = torch.nn.functional.cross_entropy(logits.view(-1, vocab), y.view(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), c.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss)

    return run


def alternate(sides: dict[str, Callable[[int], float]], rounds: int, steps: int,
              between: Callable[[], None] | None = None, label: str = "round"):
    """Rounds of ``steps`` calls per side, sides alternating who goes first; seconds/step."""
    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            t = time.perf_counter()
            sides[name](steps)
            times[name].append((time.perf_counter() - t) / steps)
        if between is not None:
            between()
        print(f"  {label} {r}: " + "  ".join(f"{n} {times[n][-1]:.3f}s" for n in names),
              flush=True)
    return times


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
        toks = decoding.generate(model, variables, prompt_jax, max_new_tokens=NEW_TOKENS,
                                 temperature=0.0)
        out["ours"] = np.asarray(jax.block_until_ready(toks))
        return 0.0

    def theirs(_n: int) -> float:
        with torch.inference_mode():
            toks = hf.generate(prompt_pt, attention_mask=torch.ones_like(prompt_pt),
                               do_sample=False, max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, use_cache=True, pad_token_id=eos)
        out["torch"] = toks.numpy()
        return 0.0

    t = time.perf_counter()
    ours(1)
    compile_s = time.perf_counter() - t
    theirs(1)
    times = alternate({"ours": ours, "torch": theirs}, plan.gen_rounds, 1, label="gen round")
    a, b = out["ours"][0, PROMPT_LEN:], out["torch"][0, PROMPT_LEN:]
    assert a.shape == b.shape == (NEW_TOKENS,), (a.shape, b.shape)
    same = int(np.argmin(a == b)) if not np.array_equal(a, b) else NEW_TOKENS
    return times, compile_s, same


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (~1 minute)")
    parser.add_argument("--attention-impl", default=None, choices=["xla", "einsum"],
                        help="GPT.attention_impl for ours (default: the model's default)")
    parser.add_argument("--rounds", type=int, help="override the number of train rounds")
    parser.add_argument("--steps", type=int, help="override train steps per side per round")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    plan = dataclasses.replace(plan, rounds=args.rounds or plan.rounds,
                               steps=args.steps or plan.steps)
    t_start = time.perf_counter()
    torch.set_num_threads(THREADS)
    print(f"jax {jax.__version__} ({jax.devices()[0].platform}, {os.cpu_count()} cpus), "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers "
          f"{transformers.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
          flush=True)

    # Matmul peak: every size, fresh each round; the best value seen is the peak.
    peaks: dict[int, list[float]] = {n: [] for n in plan.peak_sizes}

    def measure_peak() -> None:
        for n, p in matmul_peak(plan.peak_sizes).items():
            peaks[n].append(p)

    measure_peak()
    torch_peaks = {n: torch_matmul_peak(n) for n in plan.peak_sizes}

    # Train step.
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, TRAIN.vocab_size, (BATCH, SEQ_LEN + 1))
    batch_np = {"inputs": tokens[:, :-1].astype(np.int32),
                "targets": tokens[:, 1:].astype(np.int32)}
    hf = hf_model(TRAIN, seed=0)
    ours, flops_per_step = build_ours_train(hf, batch_np, args.attention_impl)
    theirs = build_torch_train(hf, batch_np)
    t = time.perf_counter()
    loss_ours = ours(1)  # compile + first step
    compile_s = time.perf_counter() - t
    loss_torch = theirs(1)
    print(f"first-step loss: ours {loss_ours:.5f}  torch {loss_torch:.5f} (same weights, same "
          f"batch); ours compile+step {compile_s:.1f}s", flush=True)
    assert abs(loss_ours - loss_torch) < 1e-3 * abs(loss_torch), (loss_ours, loss_torch)
    times = alternate({"ours": ours, "torch": theirs}, plan.rounds, plan.steps,
                      between=measure_peak)
    last_ours, last_torch = ours(1), theirs(1)

    # Generation.
    gen_times, gen_compile_s, same = bench_generation(plan)

    # Summary.
    step_ours, step_torch = statistics.median(times["ours"]), statistics.median(times["torch"])
    peak = max(max(v) for v in peaks.values())
    mfu_ours = flops_per_step / step_ours / peak
    mfu_torch = flops_per_step / step_torch / peak
    gen_ours = NEW_TOKENS / statistics.median(gen_times["ours"])
    gen_torch = NEW_TOKENS / statistics.median(gen_times["torch"])
    ratio, speedup = step_ours / step_torch, gen_ours / gen_torch
    tok = BATCH * SEQ_LEN

    def fmt_peaks(d):
        return ", ".join(f"{n}: {v / 1e9:.0f}" for n, v in d.items())

    print()
    print(f"Machine: {os.cpu_count()} CPU cores, {jax.devices()[0].device_kind}; "
          f"{plan.rounds} rounds x {plan.steps} steps per side.")
    print(f"Matmul peak GFLOP/s (best per size) jax: "
          f"{fmt_peaks({n: max(v) for n, v in peaks.items()})}; torch: "
          f"{fmt_peaks(torch_peaks)} -> peak {peak / 1e9:.0f} GFLOP/s")
    print(f"Train loss after {1 + plan.rounds * plan.steps + 1} steps on the same batch: "
          f"ours {last_ours:.4f}, torch {last_torch:.4f}")
    print(f"Greedy tokens identical for the first {same}/{NEW_TOKENS} positions; ours "
          f"compile+first call {gen_compile_s:.1f}s")
    print()
    print("| measurement | ours (JAX/Flax) | PyTorch / HF | ours / torch |")
    print("|---|---|---|---|")
    print(f"| train step, median s (L=6 d=384 T=256 B=16 V=50257 fp32) | {step_ours:.3f} | "
          f"{step_torch:.3f} | {ratio:.3f} |")
    print(f"| train tokens/s | {tok / step_ours:.0f} | {tok / step_torch:.0f} | "
          f"{step_torch / step_ours:.3f} |")
    print(f"| model GFLOP/s (PaLM count, {flops_per_step / 1e12:.3f} TFLOP/step) | "
          f"{flops_per_step / step_ours / 1e9:.1f} | {flops_per_step / step_torch / 1e9:.1f} | "
          f"{step_torch / step_ours:.3f} |")
    print(f"| MFU (vs measured matmul peak {peak / 1e9:.0f} GFLOP/s) | {mfu_ours:.3f} | "
          f"{mfu_torch:.3f} | {mfu_ours / mfu_torch:.3f} |")
    print(f"| greedy generation tokens/s (L=2 d=128, B=1, {NEW_TOKENS} new) | {gen_ours:.0f} | "
          f"{gen_torch:.0f} | {speedup:.2f} |")
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f}s")
    print(f"RESULT train_ratio_vs_torch={ratio:.3f} mfu={mfu_ours:.3f} "
          f"gen_speedup_vs_torch={speedup:.2f}")


if __name__ == "__main__":
    main()
