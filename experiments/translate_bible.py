"""English -> Spanish translation of the Bible with the encoder-decoder Transformer.

Vaswani et al. (2017) on a small real corpus: the World English Bible -> Reina-Valera 1909,
verse-aligned (``common.data.bible``), whole books held out (test: Ruth, Lamentations, Jonah,
John, Philippians; validation: Esther, Joel, Colossians, I Peter). Launch:

    python -m experiments.translate_bible --workdir workdirs/translate_bible

    python -m experiments.translate_bible --workdir /tmp/tb \
        --config=experiments/translate_bible.py:smoke

What follows the paper (section numbers of Vaswani et al.):

* one byte-level BPE vocabulary shared by both languages (``common.data.bpe``), trained on
  the training pairs and kept in the workdir; one embedding matrix for source, target and the
  pre-softmax projection, scaled by sqrt(d_model) (3.4);
* label smoothing 0.1 (5.4); Adam with beta2 0.98, eps 1e-9 and the warmup +
  inverse-square-root learning rate (5.3, ``common.optim`` ``schedule="inverse_sqrt"``, whose
  peak ``optim.lr`` is reached at ``optim.warmup_steps``);
* batches of pairs of similar length (5.1): each pair goes to the smallest length bucket
  (``data.buckets``) holding its source and target plus EOS / BOS, and a bucket's batch has
  ``data.batch_tokens // bucket`` rows, so every batch holds about the same number of token
  slots and every bucket compiles once;
* beam search with beam 4 and length penalty alpha 0.6, at most source length + 50 tokens
  (6.1), on the held-out test books, scored with sacreBLEU (detokenized output against the
  raw reference, its default 13a tokenization); the score is printed with its signature.

Measured: the default config (6.58M parameters, 3000 steps, 4.5 epochs) trains in 36.9
minutes on the idle 2-core CPU and decodes the 1,269 test verses in 2.2 minutes (39.6 minutes
in all), BLEU 16.16 on the test books; see the README for the command and the numbers.

Where it differs, for a 2-core CPU: a smaller model (``model`` below, the paper's shape at
d_model 256 with 3 + 3 layers), a 4096-token vocabulary (the paper: 37000), token batches of
~2k (the paper: ~25k), global-norm clipping at 1.0 (the paper: none).

Lengths: training pairs whose source or target (with EOS / BOS) exceed ``data.max_len``
tokens are dropped (the count is printed; 2 of 29,368 at the default); held-out pairs are
never dropped, and one whose source is longer than ``model.max_len`` is an error naming it.

Every run writes ``metrics.jsonl`` (train loss, lr, norms, target tokens/s; validation loss
and per-token NLL), checkpoints (resume by starting again on the same workdir),
``translations_test.txt`` (one hypothesis per test verse), ``samples.txt`` and
``results.json``; the last lines printed are ``bleu=<test BLEU>`` and
``sacrebleu_signature=<signature>``.
"""

from __future__ import annotations

import json
import math
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
from nlp import transformer as tr

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# `<|endoftext|>` (id 0 of the trained vocabulary) is BOS, EOS and padding; padding never
# reaches a loss (weights 0) or a real position (source mask, causal decoder).
SPECIAL = 0
SAMPLE_REFS = ("John 3:16", "Ruth 1:16", "Jonah 1:1", "Lamentations 3:22", "Philippians 4:13")


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(
        data_dir="",  # tfds data dir; "" = tfds's default (TFDS_DATA_DIR or ~/tensorflow_datasets)
        train_split="train",  # tfds split string of the training books, e.g. "train[:4000]"
        vocab_size=4096,  # shared English + Spanish byte-level BPE
        max_len=128,  # training pairs longer than this (tokens + EOS/BOS) are dropped
        buckets=[24, 32, 48, 64, 128],  # padded lengths (one compile each); last >= max_len
        batch_tokens=2048,  # token slots (rows x bucket length) per batch and side
    )
    c.model = dict(
        preset="transformer-base",  # architecture; the fields below override its sizes
        num_encoder_layers=3,
        num_decoder_layers=3,
        num_heads=4,
        d_model=256,
        d_ff=1024,
        dropout=0.1,
        max_len=256,  # longest source accepted and longest translation produced
        dtype="float32",
    )
    c.optim = dict(
        lr=1e-3,  # peak, reached at warmup_steps, then ~ 1 / sqrt(step) (section 5.3)
        schedule="inverse_sqrt",
        warmup_steps=400,
        total_steps=-1,  # -1: train.steps
        min_lr_ratio=0.0,
        b1=0.9,
        b2=0.98,
        eps=1e-9,
        weight_decay=0.0,
        grad_clip=1.0,
    )
    c.train = dict(
        steps=3000,  # 4.5 epochs of 666 batches (~1,590 real target tokens each)
        label_smoothing=0.1,
        accum_steps=1,
        log_every=50,
        eval_every=500,
        checkpoint_every=500,
        keep_checkpoints=2,
        async_checkpoint=True,
        report_mfu=False,
    )
    c.eval = dict(
        batch_size=64,  # sources per beam-search batch
        beam_size=4,
        alpha=0.6,  # length penalty (section 6.1)
        max_test_examples=0,  # 0: every test verse; else the first n (plumbing runs)
        num_samples=5,
    )
    c.mesh = dict(data=-1, fsdp=1, rules=[list(r) for r in sharding_lib.DEFAULT_RULES])
    if variant == "smoke":  # seconds: plumbing only
        c.data.update(vocab_size=512, max_len=64, buckets=[32, 64], batch_tokens=512)
        c.model.update(num_encoder_layers=1, num_decoder_layers=1, num_heads=2, d_model=32, d_ff=64)
        c.model.max_len = 128
        c.optim.warmup_steps = 5
        c.train.update(steps=20, log_every=5, eval_every=10, checkpoint_every=10)
        c.eval.update(batch_size=8, max_test_examples=8, num_samples=2)
    elif variant not in (None, ""):
        raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
    return c


# ----------------------------------------------------------------------------- model


def build_model(config, vocab_size: int) -> tr.Transformer:
    m = dict(config.model)
    preset, dtype = m.pop("preset"), m.pop("dtype")
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    return tr.from_preset(preset, **m, vocab_size=vocab_size, dtype=DTYPES[dtype])


def check_lengths(config) -> None:
    d = config.data
    buckets = list(d.buckets)
    if not buckets or buckets != sorted(set(buckets)) or buckets[0] < 2:
        raise ValueError(f"data.buckets={buckets} must be increasing lengths >= 2")
    if buckets[-1] < d.max_len:
        raise ValueError(f"the last of data.buckets={buckets} is shorter than data.max_len")
    if d.max_len > config.model.max_len:
        raise ValueError(
            f"data.max_len={d.max_len} exceeds model.max_len={config.model.max_len}: training "
            "pairs would be longer than the model allows"
        )
    if d.batch_tokens < buckets[-1]:
        raise ValueError(f"data.batch_tokens={d.batch_tokens} < the longest bucket {buckets[-1]}")


# ----------------------------------------------------------------------------- data


def load_tokenizer(config, workdir: str, train: list[tuple[str, str]]) -> BPETokenizer:
    """The shared BPE vocabulary: trained on both sides of the training pairs, kept."""
    path = os.path.join(workdir, "tokenizer.json")
    if os.path.exists(path):
        return BPETokenizer.load(path)
    tok = BPETokenizer.train([e for e, _ in train] + [s for _, s in train], config.data.vocab_size)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tok.save(path)
    return tok


def encode_pairs(tok: BPETokenizer, pairs: list[tuple[str, str]]):
    """``(source ids, target ids)`` lists, without specials."""
    return tok.encode_batch([e for e, _ in pairs]), tok.encode_batch([s for _, s in pairs])


def make_batch(src: list[list[int]], tgt: list[list[int]], length: int, rows: int):
    """Padded arrays for ``rows`` pairs (missing rows: empty pairs with zero weight).

    ``src`` = source + EOS, ``tgt_in`` = BOS + target, ``tgt_out`` = target + EOS, each
    ``[rows, length]``; ``src_mask`` marks real source tokens, ``tgt_weights`` real targets.
    """
    batch = {
        "src": np.full((rows, length), SPECIAL, np.int32),
        "src_mask": np.zeros((rows, length), bool),
        "tgt_in": np.full((rows, length), SPECIAL, np.int32),
        "tgt_out": np.full((rows, length), SPECIAL, np.int32),
        "tgt_weights": np.zeros((rows, length), np.float32),
    }
    batch["src_mask"][:, 0] = True  # empty rows attend to their EOS (no all-masked softmax)
    for i, (s, t) in enumerate(zip(src, tgt, strict=True)):
        s, t = list(s) + [SPECIAL], list(t)
        batch["src"][i, : len(s)] = s
        batch["src_mask"][i, : len(s)] = True
        batch["tgt_in"][i, 1 : len(t) + 1] = t
        batch["tgt_out"][i, : len(t) + 1] = t + [SPECIAL]
        batch["tgt_weights"][i, : len(t) + 1] = 1.0
    return batch


def bucket_of(n: int, buckets) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"length {n} is longer than the last bucket {buckets[-1]}")


class BucketedBatches:
    """Training batches of pairs of similar length, reshuffled every epoch.

    Epoch ``e`` shuffles the pairs with seed ``(seed, e)``, fills each bucket's batches of
    ``batch_tokens // bucket`` rows (rounded down to ``multiple``) in that order, drops each
    bucket's incomplete last batch and shuffles the batch order. The state is the count of
    batches served, so a resumed run reads exactly the batches of an uninterrupted one.
    """

    def __init__(self, src, tgt, buckets, batch_tokens, seed=0, multiple=1, process_rows=None):
        self.src, self.tgt = src, tgt
        self.buckets = list(buckets)
        self.seed = seed
        self.rows = {}
        for b in self.buckets:
            rows = (batch_tokens // b) // multiple * multiple
            if rows < multiple:
                raise ValueError(
                    f"data.batch_tokens={batch_tokens} gives bucket {b} fewer rows than the "
                    f"{multiple} devices"
                )
            self.rows[b] = rows
        self.process_rows = process_rows
        self.length = [
            bucket_of(max(len(s), len(t)) + 1, self.buckets) for s, t in zip(src, tgt, strict=True)
        ]
        self.count = 0
        self._epoch, self._plan = -1, []

    def _epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.src))
        plan = []
        for b in self.buckets:
            idx = order[np.asarray(self.length)[order] == b]
            n = len(idx) // self.rows[b]
            plan += [(b, idx[i * self.rows[b] : (i + 1) * self.rows[b]]) for i in range(n)]
        if not plan:
            raise ValueError("no bucket holds a full batch: lower data.batch_tokens")
        return [plan[i] for i in rng.permutation(len(plan))]

    def batches_per_epoch(self) -> int:
        return len(self._epoch_plan(0))

    def mean_target_tokens(self) -> float:
        """Real target tokens (with EOS) per batch, averaged over epoch 0."""
        plan = self._epoch_plan(0)
        return float(np.mean([sum(len(self.tgt[i]) + 1 for i in idx) for _, idx in plan]))

    def __next__(self):
        per = len(self._epoch_plan(0)) if self._epoch < 0 else len(self._plan)
        epoch, pos = divmod(self.count, per)
        if epoch != self._epoch:
            self._epoch, self._plan = epoch, self._epoch_plan(epoch)
        b, idx = self._plan[pos]
        self.count += 1
        if self.process_rows is not None:
            idx = idx[self.process_rows(len(idx))]
        return make_batch([self.src[i] for i in idx], [self.tgt[i] for i in idx], b, len(idx))

    def get_state(self) -> dict[str, Any]:
        return {"count": self.count}

    def set_state(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])


def eval_batches(src, tgt, buckets_or_len, rows: int):
    """Every pair once, sorted by length, in batches of ``rows`` (the last one padded).

    Yields ``(indices, batch)``; ``buckets_or_len`` is the bucket list (a batch is padded to
    the bucket of its longest pair) or a callable ``n -> padded length``.
    """
    pad_to = (
        buckets_or_len if callable(buckets_or_len) else (lambda n: bucket_of(n, buckets_or_len))
    )
    order = sorted(range(len(src)), key=lambda i: max(len(src[i]), len(tgt[i])))
    for start in range(0, len(order), rows):
        idx = order[start : start + rows]
        length = pad_to(max(max(len(src[i]), len(tgt[i])) for i in idx) + 1)
        yield idx, make_batch([src[i] for i in idx], [tgt[i] for i in idx], length, rows)


# ----------------------------------------------------------------------------- evaluation


EVAL_BUCKETS = (32, 64, 128, 256, 512)  # padded lengths of evaluation batches


def make_loss_evaluator(model: tr.Transformer, mesh, rows: int):
    """``evaluate(params, src, tgt) -> (summed NLL nats, target tokens, pairs skipped)``,
    teacher-forced; batches padded to ``EVAL_BUCKETS`` or ``model.max_len``. Pairs longer
    than ``model.max_len`` (with EOS / BOS) cannot be scored by the model and are skipped."""
    buckets = [b for b in EVAL_BUCKETS if b < model.max_len] + [model.max_len]

    @jax.jit
    def step(params, batch):
        logits = model.apply({"params": params}, batch["src"], batch["tgt_in"], batch["src_mask"])
        return cross_entropy(logits, batch["tgt_out"], batch["tgt_weights"])

    def evaluate(params, src, tgt):
        keep = [i for i in range(len(src)) if max(len(src[i]), len(tgt[i])) + 1 <= model.max_len]
        src, tgt, skipped = [src[i] for i in keep], [tgt[i] for i in keep], len(src) - len(keep)
        nats, count = 0.0, 0.0
        for _, batch in eval_batches(src, tgt, buckets, rows):
            s, c = step(params, sharding_lib.put_batch(batch, mesh))
            nats, count = nats + float(s), count + float(c)
        return nats, count, skipped

    return evaluate


def translate(model: tr.Transformer, params, tok: BPETokenizer, src_ids, config, refs=None):
    """Beam-search translations (section 6.1) of ``src_ids``, in their order.

    A batch is padded to the ``EVAL_BUCKETS`` length of its longest source (with EOS) and
    decoded for at most that length + 50 tokens, capped at ``model.max_len``.
    """
    ec = config.eval
    for i, s in enumerate(src_ids):
        if len(s) + 1 > model.max_len:
            what = f"verse {refs[i]}" if refs is not None else f"source {i}"
            raise ValueError(
                f"{what} has {len(s) + 1} source tokens (with EOS), more than "
                f"model.max_len={model.max_len} allows; raise model.max_len"
            )
    buckets = [b for b in EVAL_BUCKETS if b < model.max_len] + [model.max_len]
    out: list[str] = [""] * len(src_ids)
    variables = {"params": params}
    for idx, batch in eval_batches(src_ids, [[] for _ in src_ids], buckets, ec.batch_size):
        length = batch["src"].shape[1]
        tokens, _ = tr.beam_search(
            model,
            variables,
            batch["src"],
            batch["src_mask"],
            bos_id=SPECIAL,
            eos_id=SPECIAL,
            pad_id=SPECIAL,
            beam_size=ec.beam_size,
            alpha=ec.alpha,
            max_new_tokens=min(length + 50, model.max_len),
        )
        best = np.asarray(tokens[:, 0])  # [rows, max_new_tokens]
        for row, i in enumerate(idx):
            ids = best[row].tolist()
            ids = ids[: ids.index(SPECIAL)] if SPECIAL in ids else ids
            out[i] = tok.decode(ids).strip()
    return out


# ----------------------------------------------------------------------------- main


def main(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    t0 = time.time()
    check_lengths(config)
    data_dir = config.data.data_dir or None
    if not config.data.train_split.startswith("train"):
        raise ValueError(f"data.train_split={config.data.train_split!r} must be within 'train'")
    train_pairs = bible.load_pairs(config.data.train_split, data_dir)
    val_pairs = bible.load_pairs("validation", data_dir)
    test_examples = bible.load_examples("test", data_dir)
    if config.eval.max_test_examples:
        test_examples = test_examples[: config.eval.max_test_examples]
    print(f"corpus loaded in {time.time() - t0:.0f}s", flush=True)
    tok = load_tokenizer(config, workdir, train_pairs)
    src, tgt = encode_pairs(tok, train_pairs)
    keep = [i for i in range(len(src)) if max(len(src[i]), len(tgt[i])) + 1 <= config.data.max_len]
    dropped = len(src) - len(keep)
    src, tgt = [src[i] for i in keep], [tgt[i] for i in keep]
    val_src, val_tgt = encode_pairs(tok, val_pairs)
    print(
        f"data: {config.data.train_split} {len(train_pairs):,} pairs ({dropped} longer than "
        f"data.max_len={config.data.max_len} dropped), {sum(map(len, src)):,} + "
        f"{sum(map(len, tgt)):,} tokens (vocab {tok.vocab_size}); validation "
        f"{len(val_pairs)} pairs; test {len(test_examples)} pairs "
        f"({', '.join(bible.TEST_BOOKS)}); {time.time() - t0:.0f}s",
        flush=True,
    )

    with config.unlocked():
        if config.optim.total_steps <= 0:
            config.optim.total_steps = config.train.steps
    model = build_model(config, tok.vocab_size)
    mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    multiple = mesh.shape["data"] * mesh.shape["fsdp"]
    train_data = BucketedBatches(
        src,
        tgt,
        config.data.buckets,
        config.data.batch_tokens,
        seed=config.seed,
        multiple=multiple,
        process_rows=sharding_lib.process_batch_slice,
    )
    tokens_per_step = train_data.mean_target_tokens()
    print(
        f"batches: {train_data.batches_per_epoch()} per epoch, {tokens_per_step:.0f} real "
        f"target tokens per batch on average",
        flush=True,
    )
    val_rows = max(multiple, 64 // multiple * multiple)
    loss_eval = make_loss_evaluator(model, mesh, val_rows)

    def evaluate(params, step):
        nats, n, _ = loss_eval(params, val_src, val_tgt)
        return {"nll_per_token": nats / n, "ppl": math.exp(nats / n)}

    example = jnp.zeros((1, 8), jnp.int32)
    init_fn = lambda rng: model.init(rng, example, example)
    n_params = training.param_count(tr.abstract_params(model))
    meta = {
        "model": config.model.to_dict(),
        "data": config.data.to_dict(),
        "vocab_size": tok.vocab_size,
    }
    t_train = time.time()
    result = training.train(
        config=config,
        workdir=workdir,
        init_fn=init_fn,
        loss_fn=tr.translation_loss_fn(model, config.train.label_smoothing),
        train_data=train_data,
        evaluate=evaluate,
        meta=meta,
        tokens_per_step=int(round(tokens_per_step)),
    )
    train_s = time.time() - t_train
    params = result.state.params
    val_metrics = result.eval_metrics or evaluate(
        params, int(result.state.step)
    )  # resumed at the end

    t_dec = time.time()
    refs = [e["ref"] for e in test_examples]
    test_src = tok.encode_batch([e["en"] for e in test_examples])
    hyps = translate(model, params, tok, test_src, config, refs)
    decode_s = time.time() - t_dec
    bleu = BLEU()
    score = bleu.corpus_score(hyps, [[e["es"] for e in test_examples]])
    signature = str(bleu.get_signature())
    test_tgt = tok.encode_batch([e["es"] for e in test_examples])
    nats, n, skipped = loss_eval(params, test_src, test_tgt)

    by_ref = {e["ref"]: i for i, e in enumerate(test_examples)}
    picks = [by_ref[r] for r in SAMPLE_REFS if r in by_ref][: config.eval.num_samples]
    picks += [i for i in range(len(test_examples)) if i not in picks]
    samples = [
        f"{test_examples[i]['ref']}\n  en:  {test_examples[i]['en']}\n  es:  "
        f"{test_examples[i]['es']}\n  out: {hyps[i]}"
        for i in picks[: config.eval.num_samples]
    ]
    records = []
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics_path):
        records = [json.loads(line) for line in open(metrics_path)]
    tps = [r["tokens_per_s"] for r in records if r.get("split") == "train" and "tokens_per_s" in r]
    summary = {
        "bleu": score.score,
        "sacrebleu_signature": signature,
        "bleu_detail": str(score),
        "test_pairs": len(test_examples),
        "test_nll_per_token": nats / n,
        "test_nll_pairs_skipped": skipped,  # longer than model.max_len
        "val_nll_per_token": val_metrics["nll_per_token"],
        "params": n_params,
        "steps": int(result.state.step),
        "epochs": int(result.state.step) / train_data.batches_per_epoch(),
        "target_tokens_per_step": tokens_per_step,
        "median_target_tokens_per_s": float(np.median(tps)) if tps else None,
        "train_s": train_s,
        "decode_s": decode_s,
        "wall_s": time.time() - t0,
    }
    if jax.process_index() == 0:
        for s in samples:
            print(s, flush=True)
        with open(os.path.join(workdir, "samples.txt"), "w") as f:
            f.write("\n\n".join(samples) + "\n")
        with open(os.path.join(workdir, "translations_test.txt"), "w") as f:
            f.write("".join(f"{r}\t{h}\n" for r, h in zip(refs, hyps, strict=True)))
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(
            f"test books: {len(test_examples)} verses, beam {config.eval.beam_size} alpha "
            f"{config.eval.alpha}, decoded in {decode_s:.0f}s; {score}",
            flush=True,
        )
        print(f"bleu={score.score:.2f}", flush=True)
        print(f"sacrebleu_signature={signature}", flush=True)
    return summary


if __name__ == "__main__":
    from experiments import launch

    launch.run(__file__, main)
