"""English -> Spanish Bible translation with a decoder-only Transformer (Liu et al. 2018,
section 4.2): T-D (dense layers) against T-DMCA (local + memory-compressed layers).

Each verse pair is one sequence ``english <delim> spanish <eos>`` and the loss is taken on
the Spanish part only (``nlp.long_lm.make_batch``); translation feeds ``english <delim>`` and
decodes greedily. The corpus and its split are those of the encoder-decoder experiment
(``experiments/translate_bible.py``, ``common.data.bible``): World English Bible -> Reina-
Valera 1909, whole books held out (test: Ruth, Lamentations, Jonah, John, Philippians;
validation: Esther, Joel, Colossians, I Peter), the same shared 4096-token byte-level BPE
trained on the training pairs, sacreBLEU on detokenized output (default 13a tokenization)
printed with its signature. Launch:

    python -m experiments.bible_decoder_only --workdir workdirs/bible_tdmca \
        --config.model.layer_pattern=LMLML
    python -m experiments.bible_decoder_only --workdir workdirs/bible_td \
        --config.model.layer_pattern=DDDDD

    python -m experiments.bible_decoder_only --workdir /tmp/bd \
        --config=experiments/bible_decoder_only.py:smoke

Scaled down for a 2-core CPU: a verse pair is ~100 tokens, so local blocks are
``model.local_block = 32`` tokens (the paper: 256 of inputs up to 11,000) and memory
compression keeps the paper's kernel 3 / stride 3; a small model (5 layers, d_model 128);
greedy decoding without a KV cache (one forward pass per new token), so BLEU is computed on
the first ``eval.max_test_examples`` test verses (0 = all 1,269). The delimiter is an extra
token id (``vocab_size`` of the BPE); ``<|endoftext|>`` (id 0) is eos and padding.

Training batches hold pairs of similar length: each pair goes to the smallest bucket
(``data.buckets``) that holds ``english <delim> spanish <eos>``, batch ``s`` draws a bucket
(in proportion to its pairs) and ``data.batch_tokens // bucket`` of its pairs from
``(seed, s)`` alone, so the pipeline's state is the step number. Pairs longer than the last
bucket are cut (source first). Writes ``metrics.jsonl``, checkpoints (resume by starting
again), ``translations_test.txt``, ``results.json``; the last lines printed are
``bleu=<test BLEU>`` and ``sacrebleu_signature=<signature>``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from sacrebleu.metrics import BLEU

from common import sharding as sharding_lib
from common import training
from common.data import bible
from common.data.bpe import BPETokenizer
from common.losses import cross_entropy
from nlp import long_lm
from nlp.sparse_transformer import lm_loss_fn

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
EOS = PAD = 0  # `<|endoftext|>`; the delimiter is the id after the BPE vocabulary


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(
        data_dir="",  # tfds data dir; "" = tfds's default
        vocab_size=4096,  # shared English + Spanish byte-level BPE (as translate_bible)
        buckets=[64, 96, 128, 192],  # sequence lengths (one compile each); longer pairs cut
        batch_tokens=2048,  # token slots per batch (rows = batch_tokens // bucket)
    )
    c.model = dict(
        preset="t-dmca",  # architecture; the fields below override its sizes
        layer_pattern="LMLML",  # T-DMCA; "DDDDD" = T-D
        num_heads=4,
        d_model=128,
        d_ff=512,
        local_block=32,  # scaled to verse pairs of ~100 tokens (the paper: 256)
        compress_kernel=3,
        compress_stride=3,
        dropout=0.1,
        dtype="float32",
    )
    c.optim = dict(
        lr=2e-3,
        schedule="cosine",
        warmup_steps=50,
        total_steps=-1,
        min_lr_ratio=0.05,
        b1=0.9,
        b2=0.98,
        eps=1e-9,
        weight_decay=0.01,
        grad_clip=1.0,
    )
    c.train = dict(
        steps=500,
        accum_steps=1,
        log_every=25,
        eval_every=250,
        checkpoint_every=250,
        keep_checkpoints=2,
        async_checkpoint=True,
        report_mfu=False,
    )
    c.eval = dict(
        max_val_pairs=256,  # validation pairs scored (teacher-forced NLL) during training
        max_test_examples=64,  # test verses translated for BLEU (the first: Ruth 1-3); 0 = all
        batch_size=64,  # verses per greedy-decoding batch
        extra_tokens=20,  # decode at most 1.5 x source length + this many tokens
    )
    c.mesh = dict(data=-1, fsdp=1, rules=[list(r) for r in sharding_lib.DEFAULT_RULES])
    if variant == "smoke":
        c.data.update(vocab_size=512, buckets=[64, 128], batch_tokens=512)
        c.model.update(num_heads=2, d_model=32, d_ff=64, local_block=16)
        c.optim.warmup_steps = 5
        c.train.update(steps=20, log_every=5, eval_every=10, checkpoint_every=10)
        c.eval.update(max_val_pairs=32, max_test_examples=8, batch_size=8, extra_tokens=5)
    elif variant not in (None, ""):
        raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
    return c


def build_model(config, vocab_size: int) -> long_lm.LongLM:
    """``vocab_size`` = BPE vocabulary + 1 (the delimiter)."""
    m = dict(config.model)
    preset, dtype = m.pop("preset"), m.pop("dtype")
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    buckets = list(config.data.buckets)
    if not buckets or buckets != sorted(set(buckets)) or buckets[0] < 4:
        raise ValueError(f"data.buckets={buckets} must be increasing lengths >= 4")
    return long_lm.from_preset(
        preset, **m, vocab_size=vocab_size, max_len=buckets[-1], dtype=DTYPES[dtype]
    )


def load_tokenizer(config, workdir: str, train: list[tuple[str, str]]) -> BPETokenizer:
    """The shared BPE vocabulary, trained on both sides of the training pairs and kept."""
    path = os.path.join(workdir, "tokenizer.json")
    if os.path.exists(path):
        return BPETokenizer.load(path)
    tok = BPETokenizer.train([e for e, _ in train] + [s for _, s in train], config.data.vocab_size)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tok.save(path)
    return tok


class PairBatches:
    """Length-bucketed ``long_lm.make_batch`` batches; batch ``s`` depends on ``(seed, s)``."""

    def __init__(self, pairs, buckets, batch_tokens, delim_id, *, seed=0, multiple=1):
        self.pairs, self.buckets, self.delim_id, self.seed = pairs, list(buckets), delim_id, seed
        need = [
            len(s) + len(t) + 1 for s, t in pairs
        ]  # inputs: src <delim> tgt (eos is last target)
        which = np.searchsorted(self.buckets, need)  # smallest bucket >= need
        which = np.minimum(which, len(self.buckets) - 1)
        self.members = [np.flatnonzero(which == b) for b in range(len(self.buckets))]
        self.weights = np.asarray([len(m) for m in self.members], np.float64)
        self.weights /= self.weights.sum()
        self.rows = [max(multiple, batch_tokens // b // multiple * multiple) for b in self.buckets]
        self.step = 0

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        b = int(rng.choice(len(self.buckets), p=self.weights))
        pick = rng.choice(
            self.members[b], self.rows[b], replace=len(self.members[b]) < self.rows[b]
        )
        return long_lm.make_batch(
            [self.pairs[i] for i in pick],
            delim_id=self.delim_id,
            eos_id=EOS,
            pad_id=PAD,
            seq_len=self.buckets[b],
        )

    def __next__(self):
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.seed}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("seed") != self.seed:
            raise ValueError(f"saved data state has seed={state.get('seed')}, this has {self.seed}")
        self.step = int(state["step"])


def make_nll_evaluator(model, mesh, delim_id: int, seq_len: int, rows: int = 64):
    """Teacher-forced NLL per Spanish token (with eos) over pairs: ``(nats, tokens)``."""

    @jax.jit
    def step(params, batch):
        logits = model.apply({"params": params}, batch["inputs"])
        return cross_entropy(logits, batch["targets"], batch["weights"])

    def evaluate(params, pairs):
        nats, count = 0.0, 0.0
        for i in range(0, len(pairs), rows):
            chunk = list(pairs[i : i + rows])
            chunk += [([], [])] * (rows - len(chunk))  # filler rows to a fixed shape
            batch = long_lm.make_batch(
                chunk, delim_id=delim_id, eos_id=EOS, pad_id=PAD, seq_len=seq_len
            )
            batch["weights"][len(pairs[i : i + rows]) :] = 0.0  # filler rows score nothing
            s, c = step(params, sharding_lib.put_batch(batch, mesh))
            nats, count = nats + float(s), count + float(c)
        return nats, count

    return evaluate


def translate(model, params, tok, sources, delim_id, config) -> list[str]:
    """Greedy translations of ``sources`` (token lists), in their order; batches of similar
    length share one decoding buffer (a bucket of ``data.buckets``)."""
    ec = config.eval
    buckets = list(config.data.buckets)
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    out = [""] * len(sources)
    for start in range(0, len(order), ec.batch_size):
        idx = order[start : start + ec.batch_size]
        longest = max(len(sources[i]) for i in idx)
        max_new = int(1.5 * longest) + ec.extra_tokens
        seq_len = next((b for b in buckets if b >= longest + 1 + max_new), buckets[-1])
        room = seq_len - 1 - max_new  # prompt tokens kept (the source's beginning)
        prompts = [list(sources[i])[: max(room, 1)] + [delim_id] for i in idx]
        prompts += [[delim_id]] * (ec.batch_size - len(idx))  # fixed rows: one compile
        new = long_lm.greedy_decode(
            model,
            {"params": params},
            prompts,
            eos_id=EOS,
            pad_id=PAD,
            max_new_tokens=max_new,
            seq_len=seq_len,
        )
        for row, i in enumerate(idx):
            out[i] = tok.decode([t for t in new[row] if t < tok.vocab_size]).strip()
    return out


def main(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    t0 = time.time()
    data_dir = config.data.data_dir or None
    train_pairs = bible.load_pairs("train", data_dir)
    val_pairs = bible.load_pairs("validation", data_dir)[: config.eval.max_val_pairs or None]
    test_examples = bible.load_examples("test", data_dir)
    if config.eval.max_test_examples:
        test_examples = test_examples[: config.eval.max_test_examples]
    tok = load_tokenizer(config, workdir, train_pairs)
    delim_id = tok.vocab_size
    model = build_model(config, tok.vocab_size + 1)

    def encode(pairs):
        en, es = tok.encode_batch([e for e, _ in pairs]), tok.encode_batch([s for _, s in pairs])
        return list(zip(en, es, strict=True))

    train_ids, val_ids = encode(train_pairs), encode(val_pairs)
    print(
        f"data: train {len(train_ids):,} pairs, validation {len(val_ids)} scored, test "
        f"{len(test_examples)} verses ({', '.join(bible.TEST_BOOKS)}); vocab {tok.vocab_size} "
        f"+ delimiter; layer_pattern={model.layer_pattern} local_block={model.local_block}",
        flush=True,
    )
    with config.unlocked():
        if config.optim.total_steps <= 0:
            config.optim.total_steps = config.train.steps
    mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    multiple = mesh.shape["data"] * mesh.shape["fsdp"]
    train_data = PairBatches(
        train_ids,
        config.data.buckets,
        config.data.batch_tokens,
        delim_id,
        seed=config.seed,
        multiple=multiple,
    )
    rows = max(multiple, 64 // multiple * multiple)
    nll = make_nll_evaluator(model, mesh, delim_id, config.data.buckets[-1], rows)

    def evaluate(params, step):
        nats, n = nll(params, val_ids)
        return {"loss": nats / n, "nll_per_token": nats / n}

    example = jnp.zeros((1, 8), jnp.int32)
    init_fn = lambda rng: model.init(rng, example)
    n_params = training.param_count(jax.eval_shape(init_fn, jax.random.key(0))["params"])
    meta = {"model": config.model.to_dict(), "data": config.data.to_dict()}
    t_train = time.time()
    result = training.train(
        config=config,
        workdir=workdir,
        init_fn=init_fn,
        loss_fn=lm_loss_fn(model),
        train_data=train_data,
        evaluate=evaluate,
        meta=meta,
    )
    train_s = time.time() - t_train
    params = result.state.params

    t_dec = time.time()
    sources = tok.encode_batch([e["en"] for e in test_examples])
    hyps = translate(model, params, tok, sources, delim_id, config)
    decode_s = time.time() - t_dec
    bleu = BLEU()
    score = bleu.corpus_score(hyps, [[e["es"] for e in test_examples]])
    signature = str(bleu.get_signature())
    test_nats, test_n = nll(params, encode([(e["en"], e["es"]) for e in test_examples]))
    val_nats, val_n = nll(params, val_ids)  # also when a resumed run trained no step
    summary = {
        "bleu": score.score,
        "sacrebleu_signature": signature,
        "bleu_detail": str(score),
        "layer_pattern": model.layer_pattern,
        "test_verses": len(test_examples),
        "test_nll_per_token": test_nats / test_n,
        "val_nll_per_token": val_nats / val_n,
        "params": n_params,
        "steps": int(result.state.step),
        "train_s": train_s,
        "decode_s": decode_s,
        "wall_s": time.time() - t0,
    }
    if jax.process_index() == 0:
        refs = [e["ref"] for e in test_examples]
        with open(os.path.join(workdir, "translations_test.txt"), "w") as f:
            f.write("".join(f"{r}\t{h}\n" for r, h in zip(refs, hyps, strict=True)))
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(summary, f, indent=1)
        for e, h in list(zip(test_examples, hyps, strict=True))[:3]:
            print(f"{e['ref']}\n  en:  {e['en']}\n  es:  {e['es']}\n  out: {h}", flush=True)
        print(
            f"{model.layer_pattern}: {len(test_examples)} test verses decoded greedily in "
            f"{decode_s:.0f}s; test NLL/token {test_nats / test_n:.3f}; {score}",
            flush=True,
        )
        print(f"bleu={score.score:.2f}", flush=True)
        print(f"sacrebleu_signature={signature}", flush=True)
    return summary


if __name__ == "__main__":
    from experiments import launch

    launch.run(__file__, main)
