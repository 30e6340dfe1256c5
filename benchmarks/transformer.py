"""Encoder-decoder Transformer train step: ours against ``torch.nn.Transformer``.

Run as ``python -m benchmarks.transformer [--quick]`` (see ``benchmarks/README.md``). Both sides
are measured in one process, alternating, on the same machine, with the same weights and the
same batch:

* config of the paper's shape (Vaswani et al. 2017, post-LN, ReLU, sinusoidal positions),
  small enough for a 2-core CPU: d_model 256, 4 heads, d_ff 1024, 3 encoder + 3 decoder
  layers, a shared 4096-token vocabulary (one embedding for source, target and the output
  projection, scaled by sqrt(d_model)), batch 32 x 64 source and 32 x 64 target tokens
  (2048 per side; ~12% of the rows padded), float32, dropout 0 (torch's attention-weight
  dropout and ours differ in placement; with 0 both compute the same function);
* ours: ``nlp.transformer.Transformer`` with ``translation_loss_fn`` (label smoothing 0.1)
  inside the real ``common.training.make_train_step`` with ``common.optim.adamw`` (Adam
  beta2 0.98, eps 1e-9, no weight decay, no clipping, inverse-sqrt warmup), jitted with
  explicit shardings and the state donated on a 1-device mesh, as ``common.training.train``
  does;
* torch: ``nn.Transformer(batch_first=True, layer_norm_eps=1e-6)`` built from
  ``nn.TransformerEncoder/Decoder(norm=None)`` (the paper has no final LayerNorm; neither do
  we), an ``nn.Embedding`` scaled by sqrt(d) plus the same sinusoidal table, the tied output
  projection ``F.linear(x, embedding.weight)``, ``F.cross_entropy(label_smoothing=0.1)``
  over the real target tokens, ``torch.optim.Adam`` with the same betas / eps and a
  ``LambdaLR`` inverse-sqrt schedule; ``loss.backward(); step(); zero_grad()``; causal
  ``tgt_mask`` plus ``src_key_padding_mask`` / ``memory_key_padding_mask``.

Our weights are torch's, converted (``params_from_torch``), so the first losses must agree;
rounds of N steps alternate (ours first on even rounds, torch first on odd ones) and the
medians of the per-round step times are compared. torch runs twice, with 2 intra-op threads
and with 1 (see ``TORCH_THREADS``), each side with its own copy of the weights and optimizer;
the headline ratio is against the faster of the two. The last line printed is
``RESULT train_ratio_vs_torch=<ours / fastest torch median step time>``.
"""

from __future__ import annotations

import os

from benchmarks.harness import reexec_with_malloc_env

if __name__ == "__main__":  # malloc settings for both sides: see benchmarks/harness.py
    reexec_with_malloc_env("benchmarks.transformer")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.harness import alternate, warm_up  # noqa: E402
from common import optim, sharding, training  # noqa: E402
from common.positional import sinusoidal_table  # noqa: E402
from nlp import transformer as tr  # noqa: E402

THREADS = 2  # torch intra-op threads; XLA's CPU client uses one thread per core
# torch is also timed with one intra-op thread: on a loaded machine its OpenMP workers spin
# and wait at barriers for descheduled threads (benchmarks/LOG.md), so the headline ratio is
# against the faster of the two.
TORCH_THREADS = (2, 1)


@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int = 4096
    d_model: int = 256
    num_heads: int = 4
    d_ff: int = 1024
    num_layers: int = 3  # encoder and decoder each
    batch: int = 32
    src_len: int = 64
    tgt_len: int = 64
    max_len: int = 256  # position table
    label_smoothing: float = 0.1
    lr: float = 1e-3
    warmup: int = 400


CFG = Config()


@dataclasses.dataclass(frozen=True)
class Plan:
    rounds: int
    steps: int


FULL = Plan(rounds=6, steps=3)
QUICK = Plan(rounds=2, steps=2)
WARM_UP_ROUNDS = 6  # at most; see benchmarks.harness.warm_up


# ---------------------------------------------------------------------------- batch


def make_batch(cfg: Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens with right padding: source lengths in [src_len/2, src_len], targets
    likewise; ``tgt_in`` = BOS (0) + target, ``tgt_out`` = target + EOS (0)."""
    rng = np.random.default_rng(seed)
    b, s, t = cfg.batch, cfg.src_len, cfg.tgt_len
    src_len = rng.integers(s // 2, s + 1, b)
    tgt_len = rng.integers(t // 2, t, b)  # + EOS fits in t
    src_len[0], tgt_len[0] = s, t - 1  # one full row
    tokens = rng.integers(1, cfg.vocab_size, (b, max(s, t)))
    src_mask = np.arange(s)[None] < src_len[:, None]
    tgt_w = np.arange(t)[None] < (tgt_len + 1)[:, None]
    src = np.where(src_mask, tokens[:, :s], 0).astype(np.int32)
    tgt = np.where(np.arange(t)[None] < tgt_len[:, None], tokens[:, :t], 0)
    tgt_in = np.concatenate([np.zeros((b, 1)), tgt[:, :-1]], axis=1).astype(np.int32)
    return {
        "src": src,
        "src_mask": src_mask,
        "tgt_in": tgt_in,
        "tgt_out": tgt.astype(np.int32),  # EOS = 0 right after the target
        "tgt_weights": tgt_w.astype(np.float32),
    }


# ---------------------------------------------------------------------------- torch side


class TorchSeq2Seq(torch.nn.Module):
    """``nn.Transformer`` with shared scaled embeddings and the tied output projection."""

    def __init__(self, cfg: Config):
        super().__init__()
        d = cfg.d_model
        kw = dict(
            d_model=d,
            nhead=cfg.num_heads,
            dim_feedforward=cfg.d_ff,
            dropout=0.0,
            activation="relu",
            layer_norm_eps=1e-6,
            batch_first=True,
            norm_first=False,
        )
        enc = torch.nn.TransformerEncoder(
            torch.nn.TransformerEncoderLayer(**kw), cfg.num_layers, norm=None,
            enable_nested_tensor=False,
        )  # fmt: skip
        dec = torch.nn.TransformerDecoder(
            torch.nn.TransformerDecoderLayer(**kw), cfg.num_layers, norm=None
        )
        self.transformer = torch.nn.Transformer(
            **kw, custom_encoder=enc, custom_decoder=dec
        )  # custom parts: nn.Transformer adds no final norms
        self.embed = torch.nn.Embedding(cfg.vocab_size, d)
        torch.nn.init.normal_(self.embed.weight, std=d**-0.5)
        self.register_buffer("pe", torch.from_numpy(np.asarray(sinusoidal_table(cfg.max_len, d))))
        self.scale = math.sqrt(d)

    def forward(self, src, tgt_in, src_pad, tgt_causal):
        s, t = src.shape[1], tgt_in.shape[1]
        x = self.embed(src) * self.scale + self.pe[:s]
        y = self.embed(tgt_in) * self.scale + self.pe[:t]
        h = self.transformer(
            x,
            y,
            tgt_mask=tgt_causal,
            src_key_padding_mask=src_pad,
            memory_key_padding_mask=src_pad,
            tgt_is_causal=True,
        )
        return F.linear(h, self.embed.weight)  # [batch, tgt_len, vocab]


def build_torch_train(
    model: TorchSeq2Seq, cfg: Config, batch_np, threads: int
) -> Callable[[int], float]:
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-9)
    w = cfg.warmup
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(max(step, 1) / w, math.sqrt(w / max(step, 1)))
    )
    src = torch.from_numpy(batch_np["src"]).long()
    src_pad = torch.from_numpy(~batch_np["src_mask"])  # True = padding (torch's convention)
    tgt_in = torch.from_numpy(batch_np["tgt_in"]).long()
    tgt_out = torch.from_numpy(batch_np["tgt_out"]).long()
    weights = torch.from_numpy(batch_np["tgt_weights"])
    causal = torch.nn.Transformer.generate_square_subsequent_mask(cfg.tgt_len)
    labels = torch.where(weights > 0, tgt_out, torch.full_like(tgt_out, -100))

    def run(n: int) -> float:
        torch.set_num_threads(threads)
        for _ in range(n):
            logits = model(src, tgt_in, src_pad, causal)
            loss = F.cross_entropy(
                logits.reshape(-1, cfg.vocab_size),
                labels.reshape(-1),
                ignore_index=-100,
                label_smoothing=cfg.label_smoothing,
            )
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        return float(loss)

    return run


# ---------------------------------------------------------------------------- ours


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy().copy()  # torch updates its tensors in place later


def params_from_torch(model: TorchSeq2Seq, cfg: Config) -> dict:
    """Our ``Transformer`` params from ``TorchSeq2Seq``'s state dict."""
    sd = {k: _np(v) for k, v in model.state_dict().items()}
    d, h = cfg.d_model, cfg.num_heads

    def attention(prefix: str) -> dict:
        w, b = sd[f"{prefix}.in_proj_weight"], sd[f"{prefix}.in_proj_bias"]  # [3d, d], [3d]
        out = {}
        for i, name in enumerate(("query", "key", "value")):
            out[name] = {
                "kernel": w[i * d : (i + 1) * d].T.reshape(d, h, d // h),
                "bias": b[i * d : (i + 1) * d].reshape(h, d // h),
            }
        out["out"] = {
            "kernel": sd[f"{prefix}.out_proj.weight"].T.reshape(h, d // h, d),
            "bias": sd[f"{prefix}.out_proj.bias"],
        }
        return out

    def linear(prefix: str) -> dict:
        return {"kernel": sd[f"{prefix}.weight"].T, "bias": sd[f"{prefix}.bias"]}

    def norm(prefix: str) -> dict:
        return {"scale": sd[f"{prefix}.weight"], "bias": sd[f"{prefix}.bias"]}

    params = {"embed": {"embedding": sd["embed.weight"]}}
    for i in range(cfg.num_layers):
        p = f"transformer.encoder.layers.{i}"
        params[f"encoder_{i}"] = {
            "self_attn": attention(f"{p}.self_attn"),
            "ffn": {"fc": linear(f"{p}.linear1"), "proj": linear(f"{p}.linear2")},
            "ln_1": norm(f"{p}.norm1"),
            "ln_2": norm(f"{p}.norm2"),
        }
        p = f"transformer.decoder.layers.{i}"
        params[f"decoder_{i}"] = {
            "self_attn": attention(f"{p}.self_attn"),
            "cross_attn": attention(f"{p}.multihead_attn"),
            "ffn": {"fc": linear(f"{p}.linear1"), "proj": linear(f"{p}.linear2")},
            "ln_1": norm(f"{p}.norm1"),
            "ln_2": norm(f"{p}.norm2"),
            "ln_3": norm(f"{p}.norm3"),
        }
    return jax.tree.map(jnp.asarray, params)


def ours_model(cfg: Config, attention_impl: str | None) -> tr.Transformer:
    return tr.Transformer(
        vocab_size=cfg.vocab_size,
        max_len=cfg.max_len,
        num_encoder_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        d_model=cfg.d_model,
        d_ff=cfg.d_ff,
        dropout=0.0,
        attention_impl=attention_impl,
    )


def build_ours_train(torch_model: TorchSeq2Seq, cfg: Config, batch_np, attention_impl):
    """run(n) -> last loss: the train step exactly as ``common.training.train`` runs it."""
    model = ours_model(cfg, attention_impl)
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    oc = optim.default_config(
        lr=cfg.lr,
        schedule="inverse_sqrt",
        warmup_steps=cfg.warmup,
        total_steps=100_000,
        b1=0.9,
        b2=0.98,
        eps=1e-9,
        weight_decay=0.0,
        grad_clip=0.0,
    )
    tx, schedule = optim.adamw(oc)
    example = jnp.zeros((1, 8), jnp.int32)
    init_fn = lambda rng: model.init(rng, example, example)
    state, shardings = training.create_state(init_fn, tx, mesh, jax.random.key(0))
    params = params_from_torch(torch_model, cfg)
    if jax.tree.structure(params) != jax.tree.structure(state.params):
        raise ValueError("converted params do not match the model's parameter tree")
    params = jax.device_put(params, shardings.params)
    state = state.replace(params=params, opt_state=jax.jit(tx.init)(params))
    shardings = jax.tree.map(lambda x: x.sharding, state)
    state = jax.device_put(state, shardings)  # committed: the step compiles once
    replicated = sharding.replicated(mesh)
    loss_fn = tr.translation_loss_fn(model, cfg.label_smoothing)
    step = jax.jit(
        training.make_train_step(loss_fn, tx, schedule),
        in_shardings=(shardings, None, replicated),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    batch = sharding.put_batch(batch_np, mesh)
    rng = jax.device_put(jax.random.key(1), replicated)
    holder = {"state": state}

    def run(n: int) -> float:
        state = holder["state"]
        for _ in range(n):
            state, metrics = step(state, batch, rng)
        jax.block_until_ready((state, metrics))
        holder["state"] = state
        return float(metrics["loss"])

    run.compiles = step._cache_size
    run.step = step
    run.holder = holder
    run.batch = batch
    run.rng = rng
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="few repetitions (~1 minute)")
    parser.add_argument("--attention-impl", default=None, choices=["xla", "einsum"])
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--system-malloc", action="store_true", help="keep glibc's defaults")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    plan = dataclasses.replace(
        plan, rounds=args.rounds or plan.rounds, steps=args.steps or plan.steps
    )
    cfg = CFG
    print(
        f"jax {jax.__version__} ({jax.devices()[0].platform}, {os.cpu_count()} cpus), torch "
        f"{torch.__version__} (timed with {' and '.join(map(str, TORCH_THREADS))} threads); "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        flush=True,
    )
    batch_np = make_batch(cfg)
    sides: dict[str, Callable[[int], float]] = {}
    for i, threads in enumerate(TORCH_THREADS):
        torch.manual_seed(0)  # every torch side starts from the same weights
        torch_model = TorchSeq2Seq(cfg)
        if i == 0:
            sides["ours"] = ours = build_ours_train(torch_model, cfg, batch_np, args.attention_impl)
        sides[f"torch x{threads}"] = build_torch_train(torch_model, cfg, batch_np, threads)
    t = time.perf_counter()
    first = {"ours": ours(1)}  # compile + first step
    compile_s = time.perf_counter() - t
    first.update({name: run(1) for name, run in sides.items() if name != "ours"})
    print(
        "first-step loss (same weights, same batch): "
        + "  ".join(f"{n} {v:.5f}" for n, v in first.items())
        + f"; ours compile+step {compile_s:.1f}s",
        flush=True,
    )
    for value in first.values():
        assert abs(value - first["ours"]) < 1e-4 * abs(value), first
    warm = warm_up(sides, WARM_UP_ROUNDS, plan.steps)
    times, cpu = alternate(sides, plan.rounds, plan.steps)
    last = {name: run(1) for name, run in sides.items()}
    assert ours.compiles() == 1, f"our train step compiled {ours.compiles()} times"

    wall = {n: statistics.median(v) for n, v in times.items()}
    cpu_s = {n: statistics.median(v) for n, v in cpu.items()}
    best = min((n for n in sides if n != "ours"), key=lambda n: wall[n])
    real = float(batch_np["tgt_weights"].sum())
    ratio = wall["ours"] / wall[best]
    print()
    print(
        f"Machine: {os.cpu_count()} CPU cores, no accelerator; {plan.rounds} rounds x "
        f"{plan.steps} steps per side; load average {os.getloadavg()[0]:.1f}."
    )
    print(
        f"Train loss after {2 + (warm + plan.rounds) * plan.steps} steps on the same batch: "
        + ", ".join(f"{n} {v:.4f}" for n, v in last.items())
    )
    print(
        f"Config: d={cfg.d_model} h={cfg.num_heads} ff={cfg.d_ff} {cfg.num_layers}+"
        f"{cfg.num_layers} layers, B={cfg.batch} S=T={cfg.src_len} ({int(real)} real target "
        f"tokens), V={cfg.vocab_size} shared, fp32, label smoothing {cfg.label_smoothing}, Adam"
    )
    names = list(sides)
    rows = [
        ("train step, median wall s", [f"{wall[n]:.3f}" for n in names]),
        ("train step, median CPU s", [f"{cpu_s[n]:.2f}" for n in names]),
        ("real target tokens / s (wall)", [f"{real / wall[n]:.0f}" for n in names]),
        ("ours / this (wall)", [f"{wall['ours'] / wall[n]:.3f}" for n in names]),
        ("ours / this (CPU time)", [f"{cpu_s['ours'] / cpu_s[n]:.3f}" for n in names]),
    ]
    w = max(len(r[0]) for r in rows)
    cw = [max(len(n), *(len(r[1][i]) for r in rows)) for i, n in enumerate(names)]
    print(f"| {'':{w}} | " + " | ".join(f"{n:>{c}}" for n, c in zip(names, cw, strict=True)) + " |")
    print(f"|{'-' * (w + 2)}|" + "|".join("-" * (c + 2) for c in cw) + "|")
    for name, vals in rows:
        cells = [f"{v:>{c}}" for v, c in zip(vals, cw, strict=True)]
        print(f"| {name:{w}} | " + " | ".join(cells) + " |")
    print(f"headline: against the faster torch setting ({best})")
    print(f"RESULT train_ratio_vs_torch={ratio:.3f}")


if __name__ == "__main__":
    main()
