"""CLIP on Fashion-MNIST image-caption pairs, then zero-shot classification of the test set.

Launch (results and what was tried: ``docs/results.md``, ``docs/tried/clip_fashion_mnist.md``):

    python -m experiments.clip_fashion_mnist --workdir workdirs/clip_fashion_mnist
    python -m experiments.clip_fashion_mnist --workdir /tmp/cf \
        --config=experiments/clip_fashion_mnist.py:smoke --config.train.steps=50

The captions are templates, not human captions (there are none offline): each training
image is paired with ``template.format(class name)`` for a template drawn at random from
``TRAIN_TEMPLATES`` (``common.data.classification.CaptionedImages``). Images are the real
Fashion-MNIST images (``common.data.fashion_mnist``: train less a fixed 5,000-image
validation split for training, the validation split for evaluation during training, the
test split once at the end). Captions are tokenised with a byte-level BPE trained on the
training captions (kept in the workdir), ``<|endoftext|>`` closing each caption and padding
it; the text feature is read at that token.

Zero-shot evaluation (Radford et al. 2021, section 3.1.4): class embeddings are the
normalised mean text embeddings of ``TEST_TEMPLATES`` filled with each class name -
templates never seen in training (checked) - and each test image gets the class of its most
similar embedding; ``results.json`` also holds the accuracy with the training templates, for
comparison. The trainer's AdamW is followed by ``clip.clamp_logit_scale``, which keeps the
temperature parameter in ``[0, log 100]`` after each step as CLIP does.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import config as config_lib
from common import evaluation, results, training
from common import sharding as sharding_lib
from common.data import fashion_mnist
from common.data.bpe import BPETokenizer, load_or_train_bpe
from common.data.classification import CaptionedImages
from common.flops import lowered_flops
from vision import clip

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
    c.optim = config_lib.optim(
        lr=2e-3,  # a tiny model tolerates a higher peak
        warmup_steps=50,  # a short run: a short warmup
        min_lr_ratio=0.05,  # decay further: the run ends at the schedule's end
        b2=0.98,  # the paper's beta2 for ViTs
        eps=1e-6,  # the paper's epsilon for ViTs
    )
    c.train = config_lib.train(
        steps=800,
        batch_size=128,  # contrastive batch: 128 x 128 pairs (accum_steps > 1 splits it)
        eval_every=200,  # a zero-shot evaluation encodes every prompt and validation image
        checkpoint_every=200,
    )
    c.eval = dict(batch_size=512)
    c.mesh = config_lib.mesh()
    if variant == "smoke":  # plumbing plus some learning
        c.model.update(vision_layers=1, vision_d_model=64, vision_d_ff=128, text_layers=1)
        c.model.update(text_d_model=32, text_d_ff=64, projection_dim=32)
        c.optim.update(lr=3e-3, warmup_steps=10)
        c.train.update(steps=120, batch_size=64, log_every=20, eval_every=120, checkpoint_every=120)
        c.data.update(val_examples=512, test_examples=2000)
        c.train.report_mfu = False  # skips measuring the matmul peak
    elif variant not in (None, ""):
        raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
    return c


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


def build_model(config, tok: BPETokenizer) -> clip.CLIP:
    m = dict(config.model)
    preset, dtype = m.pop("preset"), config_lib.dtype(m.pop("dtype"))
    h, _, c = fashion_mnist.IMAGE_SHAPE
    return clip.from_preset(
        preset,
        **m,
        image_size=h,
        num_channels=c,
        vocab_size=tok.vocab_size,
        context_length=config.data.context_length,
        eos_token_id=tok.eot_id,
        dtype=dtype,
    )


def make_zero_shot(model: clip.CLIP, tokenize, mesh, batch_size: int):
    """``metrics(params, images, labels, templates)``: ``classification_metrics`` of zero-shot
    top-1 over standardised images, batched by the shared ``evaluation.predictor``."""
    classify = lambda p, x, w: model.apply({"params": p}, x, w, method=clip.CLIP.classify)
    # The "params" of the predictor are (CLIP params, class weights [classes, projection]).
    predict = evaluation.predictor(
        lambda pw, b: classify(pw[0], b["images"], pw[1]), mesh, batch_size
    )

    def metrics(params, images: np.ndarray, labels: np.ndarray, templates) -> dict[str, float]:
        weights = model.zero_shot_weights({"params": params}, tokenize, CAPTION_NAMES, templates)
        logits = predict((params, weights), {"images": images})  # [n, classes]
        return evaluation.classification_metrics(logits.argmax(-1), labels, len(CAPTION_NAMES))

    return metrics


def main(config: ml_collections.ConfigDict, workdir: str) -> dict[str, object]:
    t0 = time.time()
    check_templates()
    dc, data_dir = config.data, config.data.data_dir or None
    train_x, train_y = fashion_mnist.load_arrays(fashion_mnist.TRAIN_MINUS_VALIDATION, data_dir)
    val_x, val_y = fashion_mnist.load_arrays(fashion_mnist.VALIDATION, data_dir)
    test_x, test_y = fashion_mnist.load_arrays("test", data_dir)
    val_x, val_y = val_x[: dc.val_examples or None], val_y[: dc.val_examples or None]
    test_x, test_y = test_x[: dc.test_examples or None], test_y[: dc.test_examples or None]
    captions_text = lambda: [t.format(n) for t in TRAIN_TEMPLATES for n in CAPTION_NAMES]
    tok = load_or_train_bpe(workdir, captions_text, dc.vocab_size)
    tokenize = make_tokenize(tok, dc.context_length)
    captions = np.stack([tokenize([t.format(n) for n in CAPTION_NAMES]) for t in TRAIN_TEMPLATES])
    print(
        f"data: {len(train_y):,} training images x {len(TRAIN_TEMPLATES)} caption templates, "
        f"{len(val_y):,} validation, {len(test_y):,} test images; BPE vocab {tok.vocab_size}",
        flush=True,
    )

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
        transform=fashion_mnist.normalize,
    )
    zero_shot = make_zero_shot(model, tokenize, mesh, config.eval.batch_size)
    val_x, test_x = fashion_mnist.normalize(val_x), fashion_mnist.normalize(test_x)

    def evaluate(params, step):  # zero-shot with the training templates: "accuracy", ...
        return zero_shot(params, val_x, val_y, TRAIN_TEMPLATES)

    def loss_fn(params, batch, rng):
        del rng  # CLIP has no dropout
        out = model.apply({"params": params}, batch["images"], batch["tokens"])
        return clip.contrastive_loss(out["logits_per_image"]), {"logit_scale": out["logit_scale"]}

    images_spec, tokens_spec = clip.example_inputs(model, bs)
    init_fn = lambda rng: model.init(
        rng, jnp.zeros(images_spec.shape), jnp.zeros(tokens_spec.shape, jnp.int32)
    )
    abstract = jax.eval_shape(init_fn, jax.random.key(0))
    # Training FLOPs ~ 3 x the forward pass (XLA's cost analysis of the lowered forward).
    forward = lowered_flops(jax.jit(model.apply).lower(abstract, images_spec, tokens_spec))
    result = training.train(
        config=config,
        workdir=workdir,
        init_fn=init_fn,
        loss_fn=loss_fn,
        train_data=train_data,
        evaluate=evaluate,
        meta={"model": config.model.to_dict(), "data": config.data.to_dict()},
        flops_per_step=3 * forward,
        images_per_step=bs,
        project=clip.clamp_logit_scale(model.logit_scale_max),
    )

    params = result.state.params
    test = zero_shot(params, test_x, test_y, TEST_TEMPLATES)
    with_train_templates = zero_shot(params, test_x, test_y, TRAIN_TEMPLATES)
    summary = {
        "zero_shot_accuracy": test["accuracy"],
        "zero_shot_balanced_accuracy": test["balanced_accuracy"],
        "zero_shot_accuracy_train_templates": with_train_templates["accuracy"],
        "val_zero_shot_accuracy": result.eval_metrics.get("accuracy"),
        "test_templates": list(TEST_TEMPLATES),
        "test_examples": len(test_y),
        "params": training.param_count(abstract["params"]),
        **result.summary(),
        "wall_s": time.time() - t0,
    }
    headline = ("zero_shot_accuracy", "zero_shot_accuracy_train_templates")
    results.write(workdir, summary, headline=headline)
    return summary


if __name__ == "__main__":
    from experiments import launch

    launch.run(__file__, main)
