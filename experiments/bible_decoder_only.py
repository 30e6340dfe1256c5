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
bucket are cut (source first). Starting again resumes. Results: docs/results.md; tried:
docs/tried/bible_decoder_only.md. The last lines printed are ``bleu=<test BLEU>`` and
``sacrebleu_signature=<signature>``.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import config as config_lib
from common import evaluation, presets, results, training
from common import sharding as sharding_lib
from common.data import bible
from common.data.bpe import load_or_train_bpe
from common.data.translation import both_sides, encode_pairs, length_sorted
from common.losses import cross_entropy
from nlp import long_lm
from nlp.sparse_transformer import lm_loss_fn
from nlp.translation import report

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
    c.optim = config_lib.optim(
        lr=2e-3,  # a small model tolerates a higher peak than the default
        warmup_steps=50,  # a short run: a short warmup
        min_lr_ratio=0.05,  # decay further: the run ends at the schedule's end
        b2=0.98,  # Transformer's Adam (Vaswani et al. 2017, section 5.3), as translate_bible
        eps=1e-9,  # as translate_bible
        weight_decay=0.01,  # light decay: a short run does not over-fit
    )
    c.train = config_lib.train(steps=500)  # a CPU budget per layer pattern
    del c.train["batch_size"]  # batches are made of tokens: data.batch_tokens
    c.eval = dict(
        max_val_pairs=256,  # validation pairs scored (teacher-forced NLL) during training
        max_test_examples=64,  # test verses translated for BLEU (the first: Ruth 1-3); 0 = all
        batch_size=64,  # verses per greedy-decoding batch
        extra_tokens=20,  # decode at most 1.5 x source length + this many tokens
    )
    c.mesh = config_lib.mesh()
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
    buckets = list(config.data.buckets)
    if not buckets or buckets != sorted(set(buckets)) or buckets[0] < 4:
        raise ValueError(f"data.buckets={buckets} must be increasing lengths >= 4")
    fields = dict(vocab_size=vocab_size, max_len=buckets[-1])
    return presets.from_config(long_lm.from_preset, config.model, **fields)


class PairBatches:
    """Length-bucketed ``long_lm.make_batch`` batches; batch ``s`` depends on ``(seed, s)``."""

    def __init__(self, pairs, buckets, batch_tokens, delim_id, *, seed=0, multiple=1):
        self.pairs, self.buckets, self.delim_id, self.seed = pairs, list(buckets), delim_id, seed
        need = [len(s) + len(t) + 1 for s, t in pairs]  # src <delim> tgt (eos: last target)
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


def nll_evaluator(model, mesh, delim_id: int, seq_len: int, rows: int):
    """``evaluate(params, pairs) -> (nats, tokens)``: teacher-forced NLL of the Spanish
    tokens (with eos) of ``pairs``, in batches of ``rows``."""

    def step(params, batch):
        logits = model.apply({"params": params}, batch["inputs"])
        return cross_entropy(logits, batch["targets"], batch["weights"])

    sums = evaluation.batch_sums(step, mesh, rows)

    def batches(pairs):
        for i in range(0, len(pairs), rows):
            chunk = list(pairs[i : i + rows])
            n = len(chunk)
            chunk += [([], [])] * (rows - n)  # filler rows to a fixed shape
            batch = long_lm.make_batch(
                chunk, delim_id=delim_id, eos_id=EOS, pad_id=PAD, seq_len=seq_len
            )
            batch["weights"][n:] = 0.0  # filler rows score nothing
            yield batch

    return lambda params, pairs: sums(params, batches(pairs))


def translate(model, params, tok, sources, delim_id, config) -> list[str]:
    """Greedy translations of ``sources`` (token lists), in their order; batches of similar
    length share one decoding buffer (a bucket of ``data.buckets``)."""
    ec = config.eval
    buckets = list(config.data.buckets)
    out = [""] * len(sources)
    for idx in length_sorted([len(s) for s in sources], ec.batch_size):
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
    tok = load_or_train_bpe(workdir, lambda: both_sides(train_pairs), config.data.vocab_size)
    delim_id = tok.vocab_size
    model = build_model(config, tok.vocab_size + 1)

    def encode(pairs):
        return list(zip(*encode_pairs(tok, pairs), strict=True))

    train_ids, val_ids = encode(train_pairs), encode(val_pairs)
    print(
        f"data: train {len(train_ids):,} pairs, validation {len(val_ids)} scored, test "
        f"{len(test_examples)} verses ({', '.join(bible.TEST_BOOKS)}); vocab {tok.vocab_size} "
        f"+ delimiter; layer_pattern={model.layer_pattern} local_block={model.local_block}",
        flush=True,
    )
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
    nll = nll_evaluator(model, mesh, delim_id, config.data.buckets[-1], rows)

    def evaluate(params, step):
        nats, n = nll(params, val_ids)
        return {"loss": nats / n, "nll_per_token": nats / n}

    example = jnp.zeros((1, 8), jnp.int32)
    init_fn = lambda rng: model.init(rng, example)
    result = training.train(
        config=config,
        workdir=workdir,
        init_fn=init_fn,
        loss_fn=lm_loss_fn(model),
        train_data=train_data,
        evaluate=evaluate,
        meta={"model": config.model.to_dict(), "data": config.data.to_dict()},
    )
    params = result.state.params

    # Test verses: greedy decoding, sacreBLEU, teacher-forced NLL.
    t_dec = time.time()
    sources = tok.encode_batch([e["en"] for e in test_examples])
    hyps = translate(model, params, tok, sources, delim_id, config)
    decode_s = time.time() - t_dec
    bleu = evaluation.corpus_bleu(hyps, [e["es"] for e in test_examples])
    test_nats, test_n = nll(params, encode([(e["en"], e["es"]) for e in test_examples]))
    val_nats, val_n = nll(params, val_ids)  # also when a resumed run trained no step
    summary = {
        **bleu,
        "layer_pattern": model.layer_pattern,
        "test_verses": len(test_examples),
        "test_nll_per_token": test_nats / test_n,
        "val_nll_per_token": val_nats / val_n,
        "params": training.param_count(jax.eval_shape(init_fn, jax.random.key(0))["params"]),
        **result.summary(),
        "decode_s": decode_s,
        "wall_s": time.time() - t0,
    }
    results.write(workdir, summary, headline=("bleu", "test_nll_per_token"))
    how = f"{model.layer_pattern}, {len(hyps)} test verses decoded greedily"
    report(workdir, test_examples, hyps, bleu, num_samples=3, how=how)
    return summary


if __name__ == "__main__":
    from experiments import launch

    launch.run(__file__, main)
