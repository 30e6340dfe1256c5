"""GPU checks in one run: matmul peak, attention kernels, sparse attention, MFU against torch.

    python -m benchmarks.gpu [--quick] [--sections peak attention sparse gpt swin diffusion]

For a lent GPU (these machines have none; ``benchmarks/README.md`` has the latest run).
Every section is independent: one that fails prints its traceback and the run goes on. All
compute is bfloat16 with float32 parameters and softmax.

* ``peak``: the bf16 ``8192^3`` matmul rate on random data (best of 10 after warm-up), the
  denominator of every MFU below.
* ``attention``: ``common.attention.dot_product_attention`` forward+backward, causal, 12
  heads x 64 (GPT-2), 32k tokens per call, for every ``implementation`` (``None``: our
  ``auto_implementation`` picks; ``cudnn``; ``xla``; ``einsum``: ours written out). For each:
  whether the compiled program calls cuDNN's fused attention, time, model TFLOP/s (causal:
  half the score matrix), and the largest error of the output and of ``dq, dk, dv`` against
  a float32 einsum on the same inputs. Then the same with a key-padding mask (what the
  encoder-decoder and BERT pass), and that padding given to JAX as ``key_value_seq_lengths``
  (``xla+lengths``, ``cudnn+lengths``: the form cuDNN takes padding in).
* ``sparse``: ``common.sparse_attention``'s ``local``, ``strided``, ``fixed`` and
  ``compressed`` (the configs of ``benchmarks.sparse_attention``) against dense causal
  attention (cuDNN) at n = 16k and 64k, batch 1, 8 heads x 64: forward+backward time; and
  GPT-3's causal band of 256 tokens, blockwise (``banded_attention``) and as
  ``common.attention`` runs it by default (cuDNN's sliding window when it picks cuDNN).
* ``gpt``: the GPT-2 small train step (124M, T=1024, batch 16, AdamW, clip 1.0), ours
  (``common.training.make_train_step``, bf16 compute) against Hugging Face
  ``GPT2LMHeadModel`` with ``torch.autocast(bfloat16)``, SDPA attention and fused AdamW, eager,
  from the same weights and batch, in alternating rounds (the builders of ``benchmarks.gpt``).
  MFU: PaLM's model FLOPs (``benchmarks.gpt.palm_flops_per_step``) over the measured peak.
* ``swin``: the Swin-T train step at 224, batch 64, ours (bf16) against HF
  ``SwinForImageClassification`` under autocast (the builders of ``benchmarks.swin``).

* ``diffusion``: the DDPM CIFAR-10 UNet (35.7M, ``ddpm-cifar10``'s layout) train step at
  32 x 32, batch 128, and 50-step DDIM sampling of 256 images, ours (bf16 compute, the
  whole sampling loop one compiled scan) against diffusers' ``UNet2DModel`` under
  ``torch.autocast(bfloat16)`` with ``DDIMScheduler`` in a Python loop, from the same
  weights and noise (the builders of ``benchmarks.diffusion``).

The last line is ``RESULT gpu=<name> bf16_peak_tflops=... attention_fused=<0|1>
gpt2_mfu=... gpt2_ratio_vs_torch=... swin_ratio_vs_torch=... fixed_speedup_64k=...
unet_step_ratio_vs_torch=... ddim_ratio_vs_torch=...``
(keys of sections that did not run are left out).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# JAX and torch share the GPU: JAX must not preallocate its default 75% of the memory.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import argparse  # noqa: E402
import copy  # noqa: E402
import functools  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from common import attention as attn  # noqa: E402
from common import sparse_attention  # noqa: E402

SECTIONS = ("peak", "gpt", "attention", "sparse", "swin", "diffusion")
ATTN_HEADS, ATTN_DIM, ATTN_TOKENS = 12, 64, 32768  # per call: batch = tokens / length
ATTN_LENGTHS = (1024, 4096, 16384)
MATERIALISED_UP_TO = 4096  # "xla" and "einsum" hold [b, h, n, n] scores: not beyond this
SPARSE_LENGTHS = (16384, 65536)
BAND = 256  # GPT-3's banded layers: nlp.gpt's default local_window


def timed(fn, *args, repeats: int = 10) -> float:
    """Median seconds of ``fn(*args)`` after one warm-up call (compile included there)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def uses_cudnn_attention(program) -> bool:
    """Whether a lowered or compiled program calls cuDNN's fused attention
    (``__cudnn$fmha*``, chosen when JAX traces ``jax.nn.dot_product_attention``)."""
    return "cudnn$fmha" in program.as_text()


def forward_backward(fn):
    """``(q, k, v, cotangent) -> (out, dq, dk, dv)``."""

    def step(q, k, v, g):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(g))

    return jax.jit(step)


# ---------------------------------------------------------------------------- sections


def section_peak(quick: bool) -> dict:
    n = 4096 if quick else 8192
    a, b = (
        jax.random.normal(jax.random.key(i), (n, n), jnp.bfloat16) for i in range(2)
    )  # random data: zeros or ones read faster on some GPUs
    t = timed(jax.jit(lambda x, y: x @ y), a, b, repeats=10)
    peak = 2 * n**3 / t
    print(f"bf16 {n}^3 matmul: {t * 1e3:.2f} ms = {peak / 1e12:.0f} TFLOP/s", flush=True)
    return {"bf16_peak_tflops": peak / 1e12}


def _attention_case(n, batch, impl, mask, reference, args, peak, lengths=None):
    """One row; ``impl`` ``"<xla|cudnn>+lengths"``: JAX's own call with the padding given as
    ``key_value_seq_lengths=lengths`` instead of a mask (what cuDNN takes for padding)."""
    if impl.endswith("+lengths"):
        fn = lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, key_value_seq_lengths=lengths, implementation=impl.split("+")[0]
        )
    else:
        fn = lambda q, k, v: attn.dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            is_causal=mask is None,
            implementation=None if impl == "auto" else impl,
        )
    step = forward_backward(fn).lower(*args).compile()
    fused = uses_cudnn_attention(step)
    t = timed(step, *args)
    errors = [
        float(jnp.max(jnp.abs(o.astype(jnp.float32) - r)))
        for o, r in zip(step(*args), reference, strict=True)
    ]
    scale = [float(jnp.max(jnp.abs(r))) for r in reference]
    # Model FLOPs of attention: QK^T and PV, 2 n^2 d each per head, x3 for the backward
    # (two matmuls per product); causal halves them.
    flops = 3 * 4 * batch * ATTN_HEADS * n * n * ATTN_DIM * (0.5 if mask is None else 1.0)
    name = "None (auto)" if impl == "auto" else impl
    rel = " ".join(f"{e / s:.1e}" for e, s in zip(errors, scale, strict=True))
    tflops = flops / t / 1e12
    mfu = f"{tflops * 1e12 / peak:.2f}" if peak else "-"
    print(
        f"| {n} | {batch} | {'causal' if mask is None else 'padding'} | {name} | "
        f"{'yes' if fused else 'no'} | {t * 1e3:.2f} | {tflops:.0f} | {mfu} | {rel} |",
        flush=True,
    )
    return fused, t, max(e / s for e, s in zip(errors, scale, strict=True))


def section_attention(quick: bool, peak: float | None) -> dict:
    lengths = ATTN_LENGTHS[:1] if quick else ATTN_LENGTHS
    tokens = 2048 if quick else ATTN_TOKENS
    print(
        "| n | batch | mask | implementation | cuDNN fused | fwd+bwd ms | TFLOP/s | MFU "
        "| max error / max value: out dq dk dv (vs float32 einsum) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    out = {}
    for n in lengths:
        batch = max(1, tokens // n)
        shape = (batch, n, ATTN_HEADS, ATTN_DIM)
        args = [jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(4)]
        masks = {"causal": None}
        if n == lengths[0]:  # key padding: row b keeps its first n - b * n / (2 batch) keys
            keep = n - (jnp.arange(batch) * n) // (2 * batch)
            masks["padding"] = (jnp.arange(n)[None, :] < keep[:, None])[:, None, None, :]
        for kind, mask in masks.items():
            ref_fn = lambda q, k, v, mask=mask: attn.dot_product_attention(
                q, k, v, mask=mask, is_causal=mask is None, implementation="einsum"
            )
            if n <= MATERIALISED_UP_TO:
                reference = forward_backward(ref_fn)(*(a.astype(jnp.float32) for a in args))
            else:  # a float32 reference would not fit: compare against cuDNN's own call
                reference = None
            impls = ["auto", "cudnn", "xla", "einsum"]
            if kind == "padding":
                impls += ["xla+lengths", "cudnn+lengths"]
            for impl in impls:
                if impl in ("xla", "einsum") and n > MATERIALISED_UP_TO:
                    continue
                try:
                    if reference is None:  # once per length, where it is needed
                        step = forward_backward(
                            lambda q, k, v, mask=mask: attn.dot_product_attention(
                                q, k, v, mask=mask, is_causal=mask is None, implementation="cudnn"
                            )
                        )
                        reference = [r.astype(jnp.float32) for r in step(*args)]
                    fused, t, err = _attention_case(
                        n, batch, impl, mask, reference, args, peak, lengths=keep
                    )
                    out[(n, kind, impl)] = dict(fused=fused, time=t, err=err)
                except Exception as e:  # noqa: BLE001 - report and go on (e.g. no cuDNN)
                    print(
                        f"| {n} | {batch} | {kind} | {impl} | error: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:150]} |",
                        flush=True,
                    )
    default = out.get((lengths[0], "causal", "auto"))
    return {"attention_fused": int(bool(default and default["fused"]))}


def section_sparse(quick: bool) -> dict:
    from benchmarks import sparse_attention as bsa

    lengths = (4096,) if quick else SPARSE_LENGTHS
    rng = np.random.default_rng(0)
    feat = bsa.HEADS * bsa.HEAD_DIM
    weights = {
        k: jnp.asarray(
            rng.standard_normal((bsa.COMPRESS_KERNEL, feat, feat)) / math.sqrt(feat), jnp.bfloat16
        )
        for k in ("k", "v")
    }
    print("| n | variant | fwd+bwd ms | speedup over dense | XLA temp MiB |")
    print("|---|---|---|---|---|")
    out = {}
    for n in lengths:
        shape = (bsa.BATCH, n, bsa.HEADS, bsa.HEAD_DIM)
        args = [jax.random.normal(jax.random.key(i), shape, jnp.bfloat16) for i in range(4)]
        dense_t = None
        fns = {k: f for k, f in bsa.variants(n, weights).items() if not k.startswith("masked")}
        # GPT-3's band (nlp.gpt's default width): blockwise, and as common.attention runs it
        # by default (cuDNN's sliding window where auto_implementation picks cuDNN).
        fns[f"band {BAND} blockwise"] = functools.partial(
            sparse_attention.banded_attention, window=BAND
        )
        fns[f"band {BAND} auto"] = functools.partial(attn.dot_product_attention, local_window=BAND)
        for name, fn in fns.items():
            try:
                step = forward_backward(fn).lower(*args).compile()
                temp = step.memory_analysis().temp_size_in_bytes
                t = timed(step, *args, repeats=5)
                dense_t = t if name == "dense" else dense_t
                speed = f"{dense_t / t:.2f}x" if dense_t else "-"
                if name.endswith("auto"):
                    name += " (cuDNN)" if uses_cudnn_attention(step) else " (no cuDNN)"
                print(
                    f"| {n} | {name} | {t * 1e3:.2f} | {speed} | {temp / 2**20:.0f} |", flush=True
                )
                if dense_t and name != "dense":
                    out[f"{name}_speedup_{n // 1024}k"] = dense_t / t
            except Exception as e:  # noqa: BLE001
                print(
                    f"| {n} | {name} | error: {type(e).__name__}: {str(e).splitlines()[0][:150]} |",
                    flush=True,
                )
    return {k: v for k, v in out.items() if k.startswith("fixed")}


def _race(ours, theirs, quick: bool) -> tuple[float, float]:
    """Median step seconds ``(ours, torch)``: one first step each (ours compiles there), then
    ``benchmarks.harness.alternate`` rounds with the CUDA queue drained before every side
    (each side's ``run`` ends by reading its loss, which waits for its own device work)."""
    import torch

    from benchmarks.harness import alternate

    t = time.perf_counter()
    loss_ours = ours(1)
    compile_s = time.perf_counter() - t
    loss_torch = theirs(1)
    print(
        f"first-step loss (same weights, same batch): ours {loss_ours:.4f}, torch "
        f"{loss_torch:.4f}; ours compile+step {compile_s:.1f}s",
        flush=True,
    )
    # Same model, weights and batch in bf16 on both sides: the first losses must agree.
    assert abs(loss_ours - loss_torch) < 1e-2 * abs(loss_torch), (loss_ours, loss_torch)

    def drained(run):
        def go(n):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return run(n)

        return go

    sides = {"ours": drained(ours), "torch": drained(theirs)}
    times = alternate(sides, 2 if quick else 5, 2 if quick else 10)[0]
    assert ours.compiles() == 1, f"our train step compiled {ours.compiles()} times"
    return statistics.median(times["ours"]), statistics.median(times["torch"])


def section_gpt(quick: bool, peak: float | None) -> dict:
    import torch

    from benchmarks import gpt as bgpt

    cfg = bgpt.Config(num_layers=12, d_model=768, num_heads=12)  # GPT-2 small
    if quick:
        cfg = bgpt.Config(num_layers=2, d_model=128, num_heads=4)
    seq_len, batch = (128, 2) if quick else (1024, 16)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (batch, seq_len + 1))
    batch_np = {
        "inputs": tokens[:, :-1].astype(np.int32),
        "targets": tokens[:, 1:].astype(np.int32),
    }
    hf = bgpt.hf_model(cfg, seed=0)
    ours, flops_per_step = bgpt.build_ours_train(hf, batch_np, None, cfg, jnp.bfloat16)
    hf = hf.to("cuda" if torch.cuda.is_available() else "cpu")
    theirs = bgpt.build_torch_train(hf, batch_np, autocast=torch.bfloat16)
    print(
        f"GPT-2 L={cfg.num_layers} d={cfg.d_model} T={seq_len} B={batch}: our step calls "
        f"cuDNN fused attention: {uses_cudnn_attention(ours.lower())}",
        flush=True,
    )
    step_ours, step_torch = _race(ours, theirs, quick)
    # The process's peak so far: this section runs right after ``peak`` (three 128 MiB arrays).
    mem = jax.devices()[0].memory_stats() or {}
    jax_peak_mem = mem.get("peak_bytes_in_use", 0)
    torch_peak_mem = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    tok = batch * seq_len
    rows = [
        ("median step ms", step_ours * 1e3, step_torch * 1e3, f"{step_ours / step_torch:.3f}"),
        ("tokens/s", tok / step_ours, tok / step_torch, f"{step_torch / step_ours:.3f}"),
        (
            f"model TFLOP/s ({flops_per_step / 1e12:.2f} TFLOP/step)",
            flops_per_step / step_ours / 1e12,
            flops_per_step / step_torch / 1e12,
            "",
        ),
        ("peak device memory GiB", jax_peak_mem / 2**30, torch_peak_mem / 2**30, ""),
    ]
    if peak:
        rows.append(
            ("MFU", flops_per_step / step_ours / peak, flops_per_step / step_torch / peak, "")
        )
    print("| GPT-2 train step (bf16) | ours | torch | ours / torch |\n|---|---|---|---|")
    for label, a, b, r in rows:
        print(f"| {label} | {a:.3f} | {b:.3f} | {r} |", flush=True)
    out = {"gpt2_ratio_vs_torch": step_ours / step_torch}
    if peak:
        out["gpt2_mfu"] = flops_per_step / step_ours / peak
    return out


def section_swin(quick: bool) -> dict:
    import torch

    from benchmarks import swin as bswin

    batch = 2 if quick else 64
    rng = np.random.default_rng(0)
    res = bswin.RESOLUTION
    images = rng.normal(size=(batch, res, res, 3)).astype(np.float32)
    labels = rng.integers(0, bswin.NUM_CLASSES, batch).astype(np.int32)
    hf = bswin.hf_swin_t()
    ours = bswin.build_ours_train(hf, images, labels, None, jnp.bfloat16)
    hf = hf.to("cuda" if torch.cuda.is_available() else "cpu")
    theirs = bswin.build_torch_train(hf, images, labels, autocast=torch.bfloat16)
    print(f"Swin-T {res}px batch {batch}", flush=True)
    step_ours, step_torch = _race(ours, theirs, quick)
    print(
        f"| Swin-T train step (bf16) | ours | torch | ours / torch |\n|---|---|---|---|\n"
        f"| median step ms | {step_ours * 1e3:.1f} | {step_torch * 1e3:.1f} | "
        f"{step_ours / step_torch:.3f} |\n"
        f"| images/s | {batch / step_ours:.0f} | {batch / step_torch:.0f} | "
        f"{step_torch / step_ours:.3f} |",
        flush=True,
    )
    return {"swin_ratio_vs_torch": step_ours / step_torch}


def section_diffusion(quick: bool) -> dict:
    import torch

    from benchmarks import diffusion as bdiff
    from benchmarks.harness import alternate

    channels = (32, 64) if quick else (128, 256, 256, 256)  # ddpm-cifar10
    batch, sample_batch = (2, 2) if quick else (128, 256)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tm = bdiff.torch_unet(channels)
    inputs = bdiff.train_inputs(batch)
    res, c = bdiff.RESOLUTION, bdiff.CHANNELS_IN
    x_T = np.random.default_rng(1).standard_normal((sample_batch, res, res, c)).astype(np.float32)
    ddim_ours = bdiff.build_ours_ddim(tm, x_T, jnp.bfloat16)
    ddim_torch = bdiff.build_torch_ddim(copy.deepcopy(tm).to(device), x_T, autocast=torch.bfloat16)
    ours = bdiff.build_ours_train(tm, inputs, jnp.bfloat16)
    theirs = bdiff.build_torch_train(tm.to(device), inputs, autocast=torch.bfloat16)
    print(f"DDPM UNet {channels} {res}px, train batch {batch}, DDIM batch {sample_batch}")
    step_ours, step_torch = _race(ours, theirs, quick)
    t = time.perf_counter()
    s_ours = ddim_ours(1)
    compile_s = time.perf_counter() - t
    err = float(np.abs(s_ours - ddim_torch(1)).max())
    print(
        f"DDIM-{bdiff.DDIM_STEPS}: max |ours - torch| {err:.3f} (bf16, random weights); "
        f"ours compile {compile_s:.1f}s"
    )

    def drained(run):
        def go(n):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return run(n)

        return go

    times = alternate(
        {"ours": drained(ddim_ours), "torch": drained(ddim_torch)}, 2 if quick else 4, 1
    )[0]
    d_ours, d_torch = statistics.median(times["ours"]), statistics.median(times["torch"])
    print(
        f"| DDPM UNet (bf16) | ours | torch | ours / torch |\n|---|---|---|---|\n"
        f"| train step ms | {step_ours * 1e3:.1f} | {step_torch * 1e3:.1f} | "
        f"{step_ours / step_torch:.3f} |\n"
        f"| DDIM-{bdiff.DDIM_STEPS} of {sample_batch}, ms | {d_ours * 1e3:.0f} | "
        f"{d_torch * 1e3:.0f} | {d_ours / d_torch:.3f} |\n"
        f"| sampled images/s | {sample_batch / d_ours:.0f} | {sample_batch / d_torch:.0f} | |",
        flush=True,
    )
    return {
        "unet_step_ratio_vs_torch": step_ours / step_torch,
        "ddim_ratio_vs_torch": d_ours / d_torch,
    }


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a CPU dry run)")
    parser.add_argument("--sections", nargs="*", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument(
        "--budget", type=float, default=420.0, help="start no section after this many seconds"
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    dev = jax.devices()[0]
    print(
        f"jax {jax.__version__} on {dev.platform} ({getattr(dev, 'device_kind', '?')}), "
        f"{jax.device_count()} device(s)",
        flush=True,
    )
    result = {}
    peak = None
    for name in args.sections:
        elapsed = time.perf_counter() - start
        print(f"\n## {name}  (t={elapsed:.0f}s)", flush=True)
        if elapsed > args.budget:
            print(f"skipped: past the {args.budget:.0f}s budget", flush=True)
            continue
        try:
            if name == "peak":
                result.update(section_peak(args.quick))
                peak = result["bf16_peak_tflops"] * 1e12
            elif name == "attention":
                result.update(section_attention(args.quick, peak))
            elif name == "sparse":
                result.update(section_sparse(args.quick))
            elif name == "gpt":
                result.update(section_gpt(args.quick, peak))
            elif name == "swin":
                result.update(section_swin(args.quick))
            elif name == "diffusion":
                result.update(section_diffusion(args.quick))
        except Exception:  # noqa: BLE001 - one failing section must not hide the others
            traceback.print_exc()
    print(f"\ntotal wall time {time.perf_counter() - start:.0f}s")
    kind = getattr(dev, "device_kind", dev.platform).replace(" ", "_")
    print(
        f"RESULT gpu={kind} "
        + " ".join(
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items()
        )
    )


if __name__ == "__main__":
    main()
