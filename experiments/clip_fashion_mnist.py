"""CLIP on Fashion-MNIST image-caption pairs, then zero-shot classification of the test set.

Launch (default config: 800 steps of 128 pairs, 0.48M params; measured 16 min of training at
~130 images/s on this project's 2-core CPU while it was shared (load ~20), zero-shot test
accuracy 0.867 with the unseen templates):

    python -m experiments.clip_fashion_mnist --workdir workdirs/clip_fashion_mnist

Variants and overrides:

    python -m experiments.clip_fashion_mnist --workdir /tmp/cf \
        --config=experiments/clip_fashion_mnist.py:smoke --config.train.steps=50

The captions are templates, not human captions (there are none offline): each training
image is paired with ``template.format(class name)`` for a template drawn at random from
``TRAIN_TEMPLATES`` ("a photo of a {}.", "a grayscale photo of a {}." ...). Images are the
real Fashion-MNIST images (``common.data.fashion_mnist``: train minus a fixed 5,000-image
validation split for training, the validation split for evaluation during training, the
test split once at the end). Captions are tokenised with a byte-level BPE trained on the
training captions (``common.data.bpe``; kept in the workdir), ``<|endoftext|>`` closing
each caption and padding it, and the text feature is read at that token.

Zero-shot evaluation (Radford et al. 2021, section 3.1.4): class embeddings are the
normalised mean text embeddings of ``TEST_TEMPLATES`` filled with each class name -
templates never seen in training (checked) - and each test image gets the class of its most
similar embedding. The run prints ``zero_shot_accuracy=<test accuracy>`` and writes
``results.json`` (also the accuracy with the training templates, for comparison).
Chance is 10%. Training uses the platform's trainer (``common.training.train``):
checkpoints, resume from the workdir, metrics.jsonl and TensorBoard; its AdamW is followed
by ``clip.clamp_logit_scale``, which keeps the temperature parameter in ``[0, log 100]``
after each step as CLIP does.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from common import sharding as sharding_lib
from common import training
from common.data import fashion_mnist
from common.data.bpe import BPETokenizer
from common.data.step_batches import StepBatches
from common.flops import lowered_flops
from vision import clip

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Names used in captions and prompts, in label order (fashion_mnist.CLASS_NAMES).
CAPTION_NAMES: tuple[str, ...] = (
    "t-shirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
# Caption templates of the training pairs.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a {}.",
    "{}",
    "this is a {}.",
    "a photo of the {}.",
    "a grayscale photo of a {}.",
    "a small photo of a {}.",
    "a low resolution picture of the {}.",
    "a product shot of a {}.",
    "here is a {}.",
    "a {} on a dark background.",
    "my {}.",
    "a centered {}.",
    "one {}.",
)
# Zero-shot prompts for the test set: none of these appears in training.
TEST_TEMPLATES: tuple[str, ...] = (
    "a black and white image of the {}.",
    "a catalogue photo showing a {}.",
    "there is a {} in this picture.",
    "a tiny thumbnail of a {}.",
    "an example of a {}.",
)
# Fashion-MNIST pixel statistics (training set), for input normalisation.
MEAN, STD = 0.2860, 0.3530


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(
        data_dir="",  # tfds data dir; "" = tfds's default (TFDS_DATA_DIR or ~/tensorflow_datasets)
        vocab_size=512,  # byte-level BPE over the training captions (smaller if it saturates)
        context_length=24,  # longest caption in tokens, <|endoftext|> included
        val_examples=2000,  # validation images scored during training (0 = all 5,000)
        test_examples=0,  # test images of the final zero-shot score (0 = all 10,000)
    )
    c.model = dict(
        preset="clip-tiny",  # architecture; the fields below override its sizes
        patch_size=7,  # 28 x 28 -> 4 x 4 patches
        vision_layers=3,
        vision_heads=4,
        vision_d_model=96,
        vision_d_ff=384,
        text_layers=2,
        text_heads=4,
        text_d_model=64,
        text_d_ff=256,
        projection_dim=64,
        activation="quick_gelu",
        dtype="float32",
        remat_policy=ml_collections.config_dict.placeholder(str),  # None: no recomputation
    )
    c.optim = dict(
        lr=2e-3,
        schedule="cosine",
        warmup_steps=50,
        total_steps=-1,
        min_lr_ratio=0.05,
        b1=0.9,
        b2=0.98,  # the paper's beta2 for ViTs
        eps=1e-6,
        weight_decay=0.1,
        grad_clip=1.0,
    )
    c.train = dict(
        steps=800,
        batch_size=128,  # contrastive batch: 128 x 128 pairs
        accum_steps=1,  # >1 makes each micro-batch its own contrastive batch
        log_every=25,
        eval_every=200,
        checkpoint_every=200,
        keep_checkpoints=3,
        async_checkpoint=True,
        report_mfu=True,
    )
    c.eval = dict(batch_size=512)
    c.mesh = dict(data=-1, fsdp=1, rules=[list(r) for r in sharding_lib.DEFAULT_RULES])
    if variant == "smoke":  # well under a minute of training: plumbing plus some learning
        c.model.update(vision_layers=1, vision_d_model=64, vision_d_ff=128, text_layers=1)
        c.model.update(text_d_model=32, text_d_ff=64, projection_dim=32)
        c.optim.update(lr=3e-3, warmup_steps=10)
        c.train.update(steps=120, batch_size=64, log_every=20, eval_every=120, checkpoint_every=120)
        c.data.update(val_examples=512, test_examples=2000)
        c.train.report_mfu = False  # skips measuring the matmul peak
    elif variant not in (None, ""):
        raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
    return c


# --------------------------------------------------------------------------- text


def load_tokenizer(config, workdir: str) -> BPETokenizer:
    """BPE trained on the training captions once, then read back from the workdir."""
    path = os.path.join(workdir, "tokenizer.json")
    if os.path.exists(path):
        return BPETokenizer.load(path)
    captions = [t.format(n) for t in TRAIN_TEMPLATES for n in CAPTION_NAMES]
    tok = BPETokenizer.train(captions, config.data.vocab_size)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        tok.save(path)
    return tok


def make_tokenize(tok: BPETokenizer, context_length: int):
    """``list[str] -> int32 [n, context_length]``: ids, then ``<|endoftext|>`` to the end."""

    def tokenize(texts: list[str]) -> np.ndarray:
        out = np.full((len(texts), context_length), tok.eot_id, np.int32)
        for i, ids in enumerate(tok.encode_batch(texts)):
            if len(ids) + 1 > context_length:
                raise ValueError(
                    f"caption {texts[i]!r} is {len(ids) + 1} tokens with <|endoftext|>, "
                    f"longer than data.context_length={context_length}"
                )
            out[i, : len(ids)] = ids
        return out

    return tokenize


def check_templates() -> None:
    """Test prompts must be unseen in training; class names must match the label space."""
    seen = set(TRAIN_TEMPLATES) & set(TEST_TEMPLATES)
    if seen:
        raise ValueError(f"test templates also used in training: {sorted(seen)}")
    if len(CAPTION_NAMES) != len(fashion_mnist.CLASS_NAMES):
        raise ValueError(
            f"{len(CAPTION_NAMES)} caption class names for a label space of "
            f"{len(fashion_mnist.CLASS_NAMES)} classes ({fashion_mnist.CLASS_NAMES})"
        )


# --------------------------------------------------------------------------- data


def normalize(images: np.ndarray) -> np.ndarray:
    """uint8 ``[n, 28, 28, 1]`` -> float32, zero mean and unit variance over the dataset."""
    return (images.astype(np.float32) / 255.0 - MEAN) / STD


class CaptionedImages(StepBatches):
    """Training batches ``{"images" [b, 28, 28, 1], "tokens" [b, context]}``.

    Row ``r`` of batch ``s`` is a random image with a caption from a random template
    filled with its class name; batch ``s`` is a pure function of ``(seed, s)``, so the
    pipeline's state is one step counter (saved with each checkpoint).
    """

    def __init__(
        self,
        images: np.ndarray,  # uint8 [n, 28, 28, 1]
        labels: np.ndarray,  # int [n]
        captions: np.ndarray,  # int32 [templates, classes, context]: pre-tokenised captions
        batch_size: int,
        *,
        seed: int = 0,
        process_rows: slice | None = None,
    ):
        if len(images) != len(labels) or len(labels) == 0:
            raise ValueError(f"{len(images)} images for {len(labels)} labels")
        if labels.max() >= captions.shape[1]:
            raise ValueError(
                f"label {labels.max()} has no caption: {captions.shape[1]} class names"
            )
        self.images, self.labels, self.captions = images, labels, captions
        self.batch_size, self.seed = batch_size, seed
        self.rows = process_rows if process_rows is not None else slice(0, batch_size)
        self.step = 0

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        idx = rng.integers(len(self.labels), size=self.batch_size)[self.rows]
        tmpl = rng.integers(self.captions.shape[0], size=self.batch_size)[self.rows]
        return {
            "images": normalize(self.images[idx]),
            "tokens": self.captions[tmpl, self.labels[idx]],
        }


# --------------------------------------------------------------------------- model


def build_model(config, tok: BPETokenizer) -> clip.CLIP:
    m = dict(config.model)
    preset = m.pop("preset")
    dtype = m.pop("dtype")
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    h, w, c = fashion_mnist.IMAGE_SHAPE
    return clip.from_preset(
        preset,
        **m,
        image_size=h,
        num_channels=c,
        vocab_size=tok.vocab_size,
        context_length=config.data.context_length,
        eos_token_id=tok.eot_id,
        dtype=DTYPES[dtype],
    )


def make_zero_shot(model: clip.CLIP, tokenize, mesh, batch_size: int):
    """``accuracy(params, images, labels, templates)``: zero-shot top-1 over whole arrays,
    in batches of ``batch_size`` (the last one padded), each process feeding its rows."""
    if batch_size % jax.device_count():
        raise ValueError(
            f"eval.batch_size={batch_size} is not divisible by {jax.device_count()} devices"
        )
    classify = jax.jit(lambda p, x, w: model.apply({"params": p}, x, w, method=clip.CLIP.classify))
    rows = sharding_lib.process_batch_slice(batch_size)

    def accuracy(params, images: np.ndarray, labels: np.ndarray, templates) -> float:
        weights = model.zero_shot_weights({"params": params}, tokenize, CAPTION_NAMES, templates)
        correct = 0
        for start in range(0, len(labels), batch_size):
            x = normalize(images[start : start + batch_size])
            n = len(x)
            if n < batch_size:  # pad the last batch: one compiled shape
                x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
            logits = classify(params, sharding_lib.put_batch(x[rows], mesh), weights)
            logits = multihost_utils.process_allgather(logits, tiled=True)  # [batch, classes]
            pred = np.argmax(np.asarray(logits), -1)[:n]
            correct += int((pred == labels[start : start + n]).sum())
        return correct / len(labels)

    return accuracy


def main(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    t0 = time.time()
    check_templates()
    data_dir = config.data.data_dir or None
    train_x, train_y = fashion_mnist.load_arrays(fashion_mnist.TRAIN_MINUS_VALIDATION, data_dir)
    val_x, val_y = fashion_mnist.load_arrays(fashion_mnist.VALIDATION, data_dir)
    if config.data.val_examples > 0:
        val_x, val_y = val_x[: config.data.val_examples], val_y[: config.data.val_examples]
    test_x, test_y = fashion_mnist.load_arrays("test", data_dir)
    if config.data.test_examples > 0:
        test_x, test_y = test_x[: config.data.test_examples], test_y[: config.data.test_examples]
    tok = load_tokenizer(config, workdir)
    tokenize = make_tokenize(tok, config.data.context_length)
    captions = np.stack([tokenize([t.format(n) for n in CAPTION_NAMES]) for t in TRAIN_TEMPLATES])
    print(
        f"data: {len(train_y):,} training images x {len(TRAIN_TEMPLATES)} caption templates, "
        f"{len(val_y):,} validation, {len(test_y):,} test images; BPE vocab {tok.vocab_size}",
        flush=True,
    )

    with config.unlocked():
        if config.optim.total_steps <= 0:
            config.optim.total_steps = config.train.steps
    model = build_model(config, tok)
    mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    bs = config.train.batch_size
    train_data = CaptionedImages(
        train_x,
        train_y,
        captions,
        bs,
        seed=config.seed,
        process_rows=sharding_lib.process_batch_slice(bs),
    )
    zero_shot = make_zero_shot(model, tokenize, mesh, config.eval.batch_size)

    def evaluate(params, step):
        acc = zero_shot(params, val_x, val_y, TRAIN_TEMPLATES)
        print(f"[eval] step {step}: validation zero_shot_accuracy={acc:.4f}", flush=True)
        return {"zero_shot_accuracy": acc}

    def loss_fn(params, batch, rng):
        del rng  # CLIP has no dropout
        out = model.apply({"params": params}, batch["images"], batch["tokens"])
        return clip.contrastive_loss(out["logits_per_image"]), {"logit_scale": out["logit_scale"]}

    images_spec, tokens_spec = clip.example_inputs(model, bs)
    init_fn = lambda rng: model.init(
        rng, jnp.zeros(images_spec.shape), jnp.zeros(tokens_spec.shape, jnp.int32)
    )
    abstract = jax.eval_shape(init_fn, jax.random.key(0))
    n_params = training.param_count(abstract["params"])
    # Training FLOPs ~ 3 x the forward pass (XLA's cost analysis of the lowered forward).
    forward = lowered_flops(jax.jit(model.apply).lower(abstract, images_spec, tokens_spec))
    meta = {"model": config.model.to_dict(), "data": config.data.to_dict()}
    t_train = time.time()
    result = training.train(
        config=config,
        workdir=workdir,
        init_fn=init_fn,
        loss_fn=loss_fn,
        train_data=train_data,
        evaluate=evaluate,
        meta=meta,
        flops_per_step=3 * forward,
        images_per_step=bs,
        project=clip.clamp_logit_scale(model.logit_scale_max),
    )
    train_s = time.time() - t_train
    params = result.state.params

    acc = zero_shot(params, test_x, test_y, TEST_TEMPLATES)
    acc_train_templates = zero_shot(params, test_x, test_y, TRAIN_TEMPLATES)
    summary = {
        "zero_shot_accuracy": acc,
        "zero_shot_accuracy_train_templates": acc_train_templates,
        "val_zero_shot_accuracy": result.eval_metrics.get("zero_shot_accuracy"),
        "test_templates": list(TEST_TEMPLATES),
        "test_examples": len(test_y),
        "params": n_params,
        "steps": config.train.steps,
        "train_s": train_s,
        "wall_s": time.time() - t0,
    }
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(summary, f, indent=1)
        print(
            f"test: {len(test_y):,} images, {len(TEST_TEMPLATES)} unseen prompt templates; "
            f"with the training templates instead: {acc_train_templates:.4f}",
            flush=True,
        )
        print(f"zero_shot_accuracy={acc:.4f}", flush=True)
    return summary


if __name__ == "__main__":
    from experiments import launch

    launch.run(__file__, main)
