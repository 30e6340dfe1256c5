"""Fashion-MNIST classification with Swin (default) or ViT, trained on the shared trainer.

Launch (results and what was tried: ``docs/results.md``, ``docs/tried/fashion_mnist.md``):

    python -m experiments.fashion_mnist --workdir workdirs/fashion_mnist_swin
    python -m experiments.fashion_mnist --workdir workdirs/fashion_mnist_vit \
        --config=experiments/fashion_mnist.py:vit
    python -m experiments.fashion_mnist --workdir /tmp/fm \
        --config=experiments/fashion_mnist.py:smoke --config.model.swin.embed_dim=32

Data (``common.data.fashion_mnist``): training reads ``train`` less a fixed validation set of
5,000 images, which the periodic evaluation scores; ``test`` is scored once, at the end.
Augmentation (``vision.augment``: random crop after padding with black, flips, optional
random erasing) runs on the device inside the loss, drawn from the step's rng, so a resumed
run sees the same batches. Predictions average the class probabilities of each image and its
mirror image (``eval.flip_tta``) and, in the final scores, its copies shifted by up to
``eval.shift_tta`` pixels; ``results.json`` holds the test accuracy at each rung of that
ladder (``test_accuracy_by_tta``). With ``optim.ema_decay > 0`` the parameter average is
scored, and the raw parameters' accuracies are recorded beside it.

Models for 28 x 28 x 1 inputs:

* Swin (Liu et al. 2021): 4 x 4 patches -> a 7 x 7 token map, embedded by a convolutional
  stem (Xiao et al. 2021) instead of the paper's linear patch embedding; window 4, so the
  block zero-pads the map to 8 x 8 (as the reference does): stage 0 has 2 x 2 windows and
  its odd blocks shifted windows (shift 2, the mask of section 3.2); stages 1 and 2 are one
  window each, as the reference does for maps no larger than the window.
* ViT (Dosovitskiy et al. 2021): 4 x 4 patches -> 49 tokens of global attention, mean pooled
  (the class token learns more slowly on a short budget).

Pictures in the workdir: ``predictions.png``; for Swin ``swin_shift_mask.png`` (stage 0).
"""

from __future__ import annotations

import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import config as config_lib
from common import evaluation, plots, results, training
from common import sharding as sharding_lib
from common.data import fashion_mnist
from common.data.classification import ShuffledBatches
from common.flops import compiled_flops
from common.losses import cross_entropy
from vision import augment, swin, vit

FAMILIES = ("swin", "vit")
NUM_CLASSES = len(fashion_mnist.CLASS_NAMES)
BLACK = augment.background(fashion_mnist.PIXEL_MEAN, fashion_mnist.PIXEL_STD)


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    """``variant``: ``""``, ``"smoke"``, ``"vit"`` or ``"smoke,vit"`` (comma-separated)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # One-thread CPU devices, data parallel (common.sharding.use_cpu_devices): -1 = one per
    # core, 0 = XLA's one device using every core. Read by the launcher before jax starts.
    c.cpu_devices = -1
    c.data = dict(
        data_dir="",  # tfds data dir; "" = tfds's default (TFDS_DATA_DIR or ~/tensorflow_datasets)
        train_split=fashion_mnist.TRAIN_MINUS_VALIDATION,  # the first 55,000 of `train`
        eval_split=fashion_mnist.VALIDATION,  # the last 5,000: scored during training
        test_split="test",  # scored once at the end
        crop_pad=1,  # random crop after padding each side by this many pixels; 0: off
        flip=True,  # random horizontal flips
        erase_prob=0.0,  # random erasing (Zhong et al. 2020): chance per image; 0: off
    )
    c.model = dict(
        family="swin",  # "swin" | "vit"
        dtype="float32",
        # Fields of vision.swin.Swin for 28 x 28 images (its presets are ImageNet-sized): the
        # paper's 4 x 4 patches, stages at 7x7, 4x4 and 2x2 tokens, heads of width 32.
        swin=dict(
            patch_size=4,
            stem_channels=(16, 32),  # conv stem (Xiao et al. 2021); () = linear patch embedding
            embed_dim=64,  # C
            depths=(2, 2, 2),
            num_heads=(2, 4, 8),
            window_size=4,  # M: 2 x 2 windows on the 7x7 map padded to 8x8, shift 2
            mlp_ratio=2.0,
            drop_path_rate=0.05,
            attention_impl="einsum",  # faster on CPU than XLA's fused path (docs/tried)
        ),
        # Fields of vision.vit.ViT: 49 tokens of 4 x 4 patches.
        vit=dict(
            patch_size=4, num_layers=6, num_heads=4, d_model=128, d_ff=256, pool="mean", dropout=0.0
        ),
    )
    c.optim = config_lib.optim(
        lr=1e-3,  # the best of a sweep on short runs (docs/tried/fashion_mnist.md)
        warmup_steps=200,  # attention layers trained from scratch need a warmup
        min_lr_ratio=0.01,  # decay nearly to zero: the run ends at the schedule's end
        b2=0.999,  # the Swin/ViT papers' AdamW
        weight_decay=0.05,  # the Swin paper's
    )
    c.train = config_lib.train(
        steps=7350,  # 17 epochs of the 55,000 training images: the CPU time budget
        batch_size=128,
        log_every=50,  # short steps: fewer log lines
        eval_every=1000,  # an evaluation is 10,000 forward passes with flip_tta
        checkpoint_every=500,  # short steps: save less often
        keep_checkpoints=2,  # enough to resume from
    )
    c.train.label_smoothing = 0.1  # the Swin paper's regularisation
    c.eval = dict(
        batch_size=512,
        flip_tta=True,  # average each image with its mirror image (the training flips)
        # > 0: the final scores also average the views shifted by up to this many pixels each
        # way (for models trained with crops); validation during training keeps to the flips.
        shift_tta=1,
        grid_rows=6,  # predictions.png
        grid_cols=8,
    )
    c.mesh = config_lib.mesh()

    parts = {p.strip() for p in (variant or "").split(",") if p.strip()}
    if parts - {"smoke", "vit", "swin"} or {"vit", "swin"} <= parts:
        raise ValueError(f"unknown variant {variant!r}; combine 'smoke' with 'vit' or 'swin'")
    if "vit" in parts:  # the same training time as Swin's
        c.model.family = "vit"
        c.train.steps = 3700
    if "smoke" in parts:  # plumbing and a first sign of learning
        c.model.swin.update(embed_dim=16, depths=(1, 1), num_heads=(1, 2), drop_path_rate=0.0)
        c.model.vit.update(num_layers=2, num_heads=2, d_model=32, d_ff=64)
        c.optim.update(lr=3e-3, warmup_steps=10)
        c.train.update(steps=150, batch_size=64, log_every=25, eval_every=150)
        c.train.update(checkpoint_every=75, report_mfu=False)
        # The first 1,000 of the validation set and the first 2,000 test images.
        c.data.update(eval_split="train[55000:56000]", test_split="test[:2000]")
    return c


def build_model(config) -> swin.Swin | vit.ViT:
    """The classifier for 28 x 28 x 1 images and 10 classes from ``config.model``."""
    family = config.model.family
    if family not in FAMILIES:
        raise ValueError(f"model.family={family!r} is not one of {FAMILIES}")
    fields = dict(config.model[family])
    h, _, channels = fashion_mnist.IMAGE_SHAPE
    shared = dict(num_classes=NUM_CLASSES, image_size=h, num_channels=channels)
    shared["dtype"] = config_lib.dtype(config.model.dtype)
    if family == "swin":
        for key in ("depths", "num_heads", "stem_channels"):
            fields[key] = tuple(fields[key])
        return swin.Swin(**shared, **fields)
    return vit.ViT(**shared, **fields)


def make_loss_fn(model, config):
    """``loss_fn(params, batch, rng) -> (mean loss, {"accuracy"})`` on augmented images."""
    dc, smoothing = config.data, config.train.label_smoothing
    stats = dict(mean=fashion_mnist.PIXEL_MEAN, std=fashion_mnist.PIXEL_STD)

    def loss_fn(params, batch, rng):
        aug_rng, dropout_rng = jax.random.split(rng)
        x = fashion_mnist.normalize(batch["images"])  # [b, 28, 28, 1] float32
        x = augment.augment(
            x, aug_rng, crop_pad=dc.crop_pad, flip=dc.flip, erase_prob=dc.erase_prob, **stats
        )
        logits = model.apply(
            {"params": params}, x, deterministic=False, rngs={"dropout": dropout_rng}
        )  # [b, 10] float32
        total, count = cross_entropy(logits, batch["labels"], label_smoothing=smoothing)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["labels"])
        return total / count, {"accuracy": accuracy}

    return loss_fn


def make_predictor(model, mesh, batch_size: int, flip_tta: bool = False, shift_tta: int = 0):
    """``predict(params, images uint8 [N, 28, 28, 1]) -> logits [N, 10]`` through the shared
    ``evaluation.predictor``; with test-time augmentation (``vision.augment.tta_logits``) the
    log of the mean class probabilities over the mirrored and shifted views."""
    views = augment.tta_views(flip_tta, shift_tta)

    def apply(params, batch):
        classify = lambda x: model.apply({"params": params}, x)  # [b, 10]
        return augment.tta_logits(classify, fashion_mnist.normalize(batch["images"]), views, BLACK)

    predict = evaluation.predictor(apply, mesh, batch_size)
    return lambda params, images: predict(params, {"images": images})


def scores(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``classification_metrics`` of the argmax (``recall_<label id>``: names with spaces and
    slashes are not TensorBoard tags), and ``loss``: the mean NLL of the labels."""
    logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), -1))
    nll = -np.take_along_axis(logp, labels[:, None], 1).mean()
    metrics = evaluation.classification_metrics(logits.argmax(-1), labels, NUM_CLASSES)
    return {**metrics, "loss": float(nll)}


def main(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    t0 = time.time()
    dc, ec = config.data, config.eval
    splits = {s: dc[f"{s}_split"] for s in ("train", "eval", "test")}
    data = {k: fashion_mnist.load_arrays(s, dc.data_dir or None) for k, s in splits.items()}
    print("data: " + ", ".join(f"{k} {len(data[k][1]):,} ({s})" for k, s in splits.items()))
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = data.values()

    model = build_model(config)
    mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    bs = config.train.batch_size
    rows = sharding_lib.process_batch_slice(bs)
    train_data = ShuffledBatches(train_x, train_y, bs, seed=config.seed, process_rows=rows)
    # Final scores at each test-time augmentation up to the configured one; the last counts.
    ladder = {"none": make_predictor(model, mesh, ec.batch_size)}
    if ec.flip_tta:
        ladder["flip"] = make_predictor(model, mesh, ec.batch_size, True)
    if ec.shift_tta:
        name = f"{'flip+' if ec.flip_tta else ''}shift{ec.shift_tta}"
        ladder[name] = make_predictor(model, mesh, ec.batch_size, ec.flip_tta, ec.shift_tta)
    predict, predict_final = ladder["flip" if ec.flip_tta else "none"], list(ladder.values())[-1]

    init_fn = lambda rng: model.init(rng, jnp.zeros((1, *fashion_mnist.IMAGE_SHAPE)))
    abstract = jax.eval_shape(init_fn, jax.random.key(0))["params"]
    flops = None
    if config.train.report_mfu:  # forward FLOPs from XLA's cost analysis; training = 3x
        images = jax.ShapeDtypeStruct((bs, *fashion_mnist.IMAGE_SHAPE), jnp.float32)
        forward = lambda p, im: model.apply({"params": p}, im)
        flops = 3 * compiled_flops(forward, nn.unbox(abstract), images)
    family = config.model.family  # the meta holds the active family's table only
    model_meta = {"family": family, "dtype": config.model.dtype, **config.model[family].to_dict()}
    result = training.train(
        config=config,
        workdir=workdir,
        init_fn=init_fn,
        loss_fn=make_loss_fn(model, config),
        train_data=train_data,
        evaluate=lambda params, step: scores(predict(params, val_x), val_y),
        meta={"model": model_meta, "data": config.data.to_dict()},
        flops_per_step=flops,
        images_per_step=bs,
    )

    params = training.eval_params(result.state)  # the EMA when optim.ema_decay > 0
    by_tta = {name: p(params, test_x) for name, p in ladder.items()}
    test_logits = by_tta[list(ladder)[-1]]
    test = scores(test_logits, test_y)
    # The last evaluation ran at the final step, with the flips only: shifted views (or a
    # run that had nothing left to do) need validation scored again.
    val = result.eval_metrics
    if not val or ec.shift_tta:
        val = scores(predict_final(params, val_x), val_y)
    raw = {}
    if params is not result.state.params:  # the EMA was scored: the raw params too
        raw_params = result.state.params
        raw = {
            "raw_test_accuracy": scores(predict_final(raw_params, test_x), test_y)["accuracy"],
            "raw_val_accuracy": scores(predict_final(raw_params, val_x), val_y)["accuracy"],
        }
    recall = {n: test.get(f"recall_{i}") for i, n in enumerate(fashion_mnist.CLASS_NAMES)}
    summary = {
        "family": family,
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "test_accuracy_by_tta": {k: scores(v, test_y)["accuracy"] for k, v in by_tta.items()},
        "test_balanced_accuracy": test["balanced_accuracy"],
        "test_recall": recall,
        "val_accuracy": val["accuracy"],
        **raw,
        "params": training.param_count(abstract),
        "epochs": config.train.steps * bs / len(train_y),
        **result.summary(),
        "wall_s": time.time() - t0,
    }
    if jax.process_index() == 0:
        write_pictures(workdir, model, test_x, test_y, test_logits.argmax(-1), ec)
        ladder_text = ", ".join(f"{k} {v:.4f}" for k, v in summary["test_accuracy_by_tta"].items())
        print(f"test accuracy by test-time augmentation: {ladder_text}", flush=True)
    results.write(workdir, summary, headline=("test_accuracy", "val_accuracy"))
    return summary


def write_pictures(workdir, model, images, labels, preds, ec) -> None:
    """``predictions.png`` (test images captioned with the predicted label) and, for Swin,
    ``swin_shift_mask.png``."""
    names, rows, cols = fashion_mnist.CLASS_NAMES, ec.grid_rows, ec.grid_cols
    grid = plots.prediction_grid(images, labels, preds, names, rows, cols)
    plots.save(grid, os.path.join(workdir, "predictions.png"))
    if isinstance(model, swin.Swin):
        (h, w), *_ = model.stage_resolutions(*fashion_mnist.IMAGE_SHAPE[:2])
        window, shift = swin.stage_windows(h, w, model.window_size)
        if shift:
            picture = plots.shifted_window_picture(h, w, window, shift, swin.shifted_window_mask)
            plots.save(picture, os.path.join(workdir, "swin_shift_mask.png"))


if __name__ == "__main__":
    from experiments import launch

    launch.run(__file__, main)
