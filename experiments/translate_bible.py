"""English -> Spanish translation of the Bible with the encoder-decoder Transformer.

Vaswani et al. (2017) on a small real corpus: the World English Bible -> Reina-Valera 1909,
verse-aligned (``common.data.bible``), whole books held out (test: Ruth, Lamentations, Jonah,
John, Philippians; validation: Esther, Joel, Colossians, I Peter). Launch:

    python -m experiments.translate_bible --workdir workdirs/translate_bible
    python -m experiments.translate_bible --workdir /tmp/tb \
        --config=experiments/translate_bible.py:smoke

Following the paper (its section numbers): one byte-level BPE vocabulary shared by both
languages, trained on the training pairs and kept in the workdir; one embedding matrix for
source, target and the pre-softmax projection, scaled by sqrt(d_model) (3.4); label
smoothing 0.1 (5.4); Adam with beta2 0.98, eps 1e-9 and the warmup + inverse-square-root
learning rate, peaking at ``optim.lr`` at ``optim.warmup_steps`` (5.3); batches of pairs of
similar length (5.1, ``common.data.translation.BucketedBatches``); beam search with beam 4
and length penalty 0.6, at most source length + 50 tokens (6.1), on the held-out test
books, scored with sacreBLEU (``common.evaluation.corpus_bleu``) and its signature.

Scaled to a 2-core CPU: the paper's shape at d_model 256 with 3 + 3 layers, a 4096-token
vocabulary (the paper: 37000), token batches of ~2k (the paper: ~25k), global-norm clipping
at 1.0 (the paper: none). Results: docs/results.md; tried: docs/tried/translate_bible.md.

Training pairs longer than ``data.max_len`` tokens (with EOS / BOS) are dropped; a held-out
source longer than ``model.max_len`` is an error naming it. Starting again resumes. The last
lines printed are ``bleu=<test BLEU>`` and ``sacrebleu_signature=<signature>``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax.numpy as jnp
import ml_collections
import numpy as np

from common import config as config_lib
from common import evaluation, presets, results, training
from common import sharding as sharding_lib
from common.data import bible
from common.data.bpe import BPETokenizer, load_or_train_bpe
from common.data.translation import (
    SPECIAL,
    BucketedBatches,
    both_sides,
    encode_pairs,
    eval_batches,
    fitting,
)
from common.losses import cross_entropy
from nlp import transformer as tr
from nlp.translation import report

EVAL_BUCKETS = (32, 64, 128, 256, 512)  # padded lengths of evaluation batches


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
    c.optim = config_lib.optim(
        lr=1e-3,  # peak, reached at warmup_steps, then ~ 1 / sqrt(step) (section 5.3)
        schedule="inverse_sqrt",  # section 5.3
        warmup_steps=400,  # a short run: the paper's 4000 scaled down
        b2=0.98,  # section 5.3
        eps=1e-9,  # section 5.3
        weight_decay=0.0,  # the paper's Adam has none
    )
    c.train = config_lib.train(
        steps=3000,  # a CPU budget of a few epochs
        log_every=50,  # steps are short: fewer log lines
        eval_every=500,  # validation NLL six times per run
        checkpoint_every=500,  # a CPU run can be killed: lose at most 500 steps
    )
    del c.train["batch_size"]  # batches are made of tokens: data.batch_tokens
    c.train.label_smoothing = 0.1  # section 5.4
    c.eval = dict(
        batch_size=64,  # sources per beam-search batch
        beam_size=4,
        alpha=0.6,  # length penalty (section 6.1)
        max_test_examples=0,  # 0: every test verse; else the first n (plumbing runs)
        num_samples=5,
    )
    c.mesh = config_lib.mesh()
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


def build_model(config, vocab_size: int) -> tr.Transformer:
    return presets.from_config(tr.from_preset, config.model, vocab_size=vocab_size)


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


def eval_buckets(model: tr.Transformer) -> list[int]:
    return [b for b in EVAL_BUCKETS if b < model.max_len] + [model.max_len]


def loss_evaluator(model: tr.Transformer, mesh, rows: int):
    """``evaluate(params, src, tgt) -> (summed NLL nats, target tokens, pairs skipped)``,
    teacher-forced, in length-sorted batches of ``rows`` pairs. Pairs longer than
    ``model.max_len`` (with EOS / BOS) cannot be scored by the model and are skipped."""

    def step(params, batch):
        logits = model.apply({"params": params}, batch["src"], batch["tgt_in"], batch["src_mask"])
        return cross_entropy(logits, batch["tgt_out"], batch["tgt_weights"])

    sums = evaluation.batch_sums(step, mesh, rows)

    def evaluate(params, src, tgt):
        keep = fitting(src, tgt, model.max_len)
        src, tgt, skipped = [src[i] for i in keep], [tgt[i] for i in keep], len(src) - len(keep)
        batches = (b for _, b in eval_batches(src, tgt, eval_buckets(model), rows))
        nats, count = sums(params, batches)
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
    out: list[str] = [""] * len(src_ids)
    empty = [[] for _ in src_ids]
    for idx, batch in eval_batches(src_ids, empty, eval_buckets(model), ec.batch_size):
        tokens, _ = tr.beam_search(
            model,
            {"params": params},
            batch["src"],
            batch["src_mask"],
            bos_id=SPECIAL,
            eos_id=SPECIAL,
            pad_id=SPECIAL,
            beam_size=ec.beam_size,
            alpha=ec.alpha,
            max_new_tokens=min(batch["src"].shape[1] + 50, model.max_len),
        )
        best = np.asarray(tokens[:, 0])  # [rows, max_new_tokens]
        for row, i in enumerate(idx):
            ids = best[row].tolist()
            ids = ids[: ids.index(SPECIAL)] if SPECIAL in ids else ids
            out[i] = tok.decode(ids).strip()
    return out


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
    tok = load_or_train_bpe(workdir, lambda: both_sides(train_pairs), config.data.vocab_size)
    src, tgt = encode_pairs(tok, train_pairs)
    keep = fitting(src, tgt, config.data.max_len)
    dropped, src, tgt = len(src) - len(keep), [src[i] for i in keep], [tgt[i] for i in keep]
    val_src, val_tgt = encode_pairs(tok, val_pairs)
    print(
        f"data: {len(src):,} training pairs ({dropped} longer than data.max_len dropped), vocab "
        f"{tok.vocab_size}; validation {len(val_pairs)} pairs; test {len(test_examples)}",
        flush=True,
    )
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
    tokens_per_step = train_data.mean_target_tokens()  # real target tokens per batch
    print(f"batches: {train_data.batches_per_epoch()} per epoch", flush=True)
    loss_eval = loss_evaluator(model, mesh, rows=max(multiple, 64 // multiple * multiple))

    def evaluate(params, step):
        nats, n, _ = loss_eval(params, val_src, val_tgt)
        return {"nll_per_token": nats / n, "ppl": math.exp(nats / n)}

    example = jnp.zeros((1, 8), jnp.int32)
    result = training.train(
        config=config,
        workdir=workdir,
        init_fn=lambda rng: model.init(rng, example, example),
        loss_fn=tr.translation_loss_fn(model, config.train.label_smoothing),
        train_data=train_data,
        evaluate=evaluate,
        meta={
            "model": config.model.to_dict(),
            "data": config.data.to_dict(),
            "vocab_size": tok.vocab_size,
        },
        tokens_per_step=int(round(tokens_per_step)),
    )
    params = result.state.params
    val_metrics = result.eval_metrics or evaluate(params, int(result.state.step))  # resumed

    # Test books: beam search, sacreBLEU, teacher-forced NLL.
    t_dec = time.time()
    refs = [e["ref"] for e in test_examples]
    test_src = tok.encode_batch([e["en"] for e in test_examples])
    hyps = translate(model, params, tok, test_src, config, refs)
    decode_s = time.time() - t_dec
    bleu = evaluation.corpus_bleu(hyps, [e["es"] for e in test_examples])
    test_tgt = tok.encode_batch([e["es"] for e in test_examples])
    nats, n, skipped = loss_eval(params, test_src, test_tgt)
    summary = {
        **bleu,
        "test_pairs": len(test_examples),
        "test_nll_per_token": nats / n,
        "test_nll_pairs_skipped": skipped,  # longer than model.max_len
        "val_nll_per_token": val_metrics["nll_per_token"],
        "params": training.param_count(tr.abstract_params(model)),
        **result.summary(),
        "epochs": int(result.state.step) / train_data.batches_per_epoch(),
        "target_tokens_per_step": tokens_per_step,
        "decode_s": decode_s,
        "wall_s": time.time() - t0,
    }
    results.write(workdir, summary, headline=("bleu", "test_nll_per_token"))
    ec = config.eval
    how = f"{len(hyps)} test verses, beam {ec.beam_size} alpha {ec.alpha}"
    report(workdir, test_examples, hyps, bleu, num_samples=ec.num_samples, how=how)
    return summary


if __name__ == "__main__":
    from experiments import launch

    launch.run(__file__, main)
