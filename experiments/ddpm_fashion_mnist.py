"""A class-conditional pixel-space DDPM on Fashion-MNIST, sampled with DDPM and DDIM.

Launch (the default config trains on the 2-core CPU; see ``get_config`` for its sizes):

    python -m experiments.ddpm_fashion_mnist --workdir workdirs/ddpm_fashion_mnist

Variants and overrides:

    python -m experiments.ddpm_fashion_mnist --workdir /tmp/ddpm \
        --config=experiments/ddpm_fashion_mnist.py:smoke --config.train.steps=50

Training (Ho et al. 2020, algorithm 1): the real Fashion-MNIST training images minus a fixed
5,000-image validation split (``common.data.fashion_mnist``), scaled to ``[-1, 1]``; the
UNet of ``diffusion.unet`` predicts the noise at uniformly drawn timesteps of the linear
schedule. Labels are replaced by the null label with probability ``diffusion.p_uncond``
so that one network is both the conditional and the unconditional model of classifier-free
guidance (Ho and Salimans 2021). The run evaluates the parameters' moving average
(``optim.ema_decay``), as Ho et al. do, and logs a validation loss at fixed noise every
``train.eval_every`` steps (``diffusion.training``). ``validate_config`` checks this
experiment's own fields before anything loads.

Evaluation, after training (``diffusion.evaluation.evaluate_samples``, where each metric is
defined): ``class_acc``, the share of guided DDIM samples (``eval.ddim_steps``, eta 0,
``eval.guidance_scale``) that the pinned Fashion-MNIST classifier assigns to their class;
Frechet distances on that classifier's penultimate features (NOT Inception FID) against the
test set for DDIM and ancestral sampling at ``eval.ddim_steps`` steps and ancestral sampling
over all ``T`` steps (the better fixed variance, as Song et al. 2021, table 1 compares), each
beside ``fd_floor``, real training images scored the same way; with ``eval.inception_path``
(a local TorchScript Inception file; nothing is downloaded) also ``fid_*``. PNG grids in the
workdir, also TensorBoard images: ``samples_ddim<S>.png`` (a row per class),
``trajectory.png``, ``guidance_sweep.png`` (a row per scale; its class accuracies are in
results.json). The run ends with ``RESULT class_acc=.. fd_ddim<S>=.. fd_ancestral<S>=..
fd_ancestral<T>=.. fd_floor=..``, the same values as results.json.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from common import config as config_lib
from common import plots, results, training
from common import sharding as sharding_lib
from common.data import fashion_mnist
from common.data.classification import LabelledBatches
from diffusion import evaluation, sampling, unet
from diffusion import training as diffusion_training
from diffusion.schedules import Schedule


def get_config(variant: str | None = None) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # XLA's one CPU device using every core (common.sharding.use_cpu_devices): on the shared
    # 2-core machine two one-thread devices cost this model's step more CPU time than one
    # device (their gradient all-reduce waits). Accelerators are unaffected.
    c.cpu_devices = 0
    c.data = dict(
        data_dir="",  # tfds data dir; "" = tfds's default (TFDS_DATA_DIR or ~/tensorflow_datasets)
        val_examples=500,  # validation images of the fixed-noise validation loss
    )
    c.diffusion = dict(
        schedule="linear",  # Ho et al.'s betas, 1e-4 .. 0.02
        num_timesteps=1000,
        prediction="epsilon",
        min_snr_gamma=0.0,  # 0: Ho et al.'s unweighted loss
        p_uncond=0.1,  # labels dropped to the null label (classifier-free guidance)
    )
    c.model = dict(
        preset="ddpm-cifar10",  # architecture; the fields below shrink it for 28 x 28 on a CPU
        block_channels=(16, 32, 64),  # 28 -> 14 -> 7; 136 MFLOP per image forward
        layers_per_block=1,
        down_attention=(False, False, True),  # self-attention at 7 x 7 (and in the middle)
        up_attention=(True, False, False),
        groups=8,
        dropout=0.0,  # under two epochs of data: dropout only slows learning
        dtype="float32",
    )
    c.optim = config_lib.optim(
        lr=2e-3,  # a small UNet tolerates a higher peak than DDPM's 2e-4
        warmup_steps=100,
        min_lr_ratio=0.1,
        b2=0.99,  # few steps: a shorter second-moment memory adapts faster
        weight_decay=0.0,  # Ho et al. use none
        ema_decay=0.995,  # Ho et al.'s 0.9999 averages over more steps than this run has
    )
    c.train = config_lib.train(
        steps=1600,  # 1.9 epochs; sized to the 30-minute CPU budget
        batch_size=64,
        log_every=50,
        eval_every=400,
        checkpoint_every=400,
        report_mfu=False,
    )
    c.eval = dict(
        enabled=True,  # False: train (or resume) only, no sampling and no RESULT line
        ddim_steps=50,
        guidance_scale=3.0,  # class_acc's DDIM samples
        class_acc_samples=500,
        fd_samples=200,  # per sampler (the 1000-step ones dominate the cost); as many real
        # images for the floor
        ancestral_variances=("small", "large"),  # the full-T ancestral samplers scored
        sample_batch=100,  # images per compiled sampling call (a multiple of the devices)
        guidance_sweep=(1.0, 2.0, 3.0, 5.0),  # class accuracy over sample_batch samples each
        trajectory_frames=10,
        classifier_cache="",  # "" = <tfds data dir>/landmarks_pinned
        classifier_steps=1200,  # the pinned classifier's training steps (part of its hash)
        inception_path="",  # a local TorchScript Inception file: also report fid_* on it
    )
    c.mesh = config_lib.mesh()
    if variant == "smoke":  # seconds: plumbing and a falling loss
        c.diffusion.num_timesteps = 100
        c.model.update(block_channels=(16, 32), down_attention=(False, True))
        c.model.update(up_attention=(True, False), groups=8, dropout=0.0)
        c.optim.update(warmup_steps=5, ema_decay=0.0)
        c.train.update(steps=30, batch_size=16, log_every=5, eval_every=30, checkpoint_every=15)
        c.data.val_examples = 32
        c.eval.update(ddim_steps=5, class_acc_samples=16, fd_samples=16, sample_batch=16)
        c.eval.update(guidance_sweep=(1.0, 3.0), trajectory_frames=3, classifier_steps=40)
        c.eval.ancestral_variances = ("small",)
    elif variant not in (None, ""):
        raise ValueError(f"unknown variant {variant!r}; choose '' or 'smoke'")
    return c


def validate_config(config: ml_collections.ConfigDict) -> list[str]:
    """This experiment's own fields, one message per bad one (``experiments.launch`` calls it
    with ``common.config.validate``, which checks the shared sections, before anything
    loads)."""
    p = []
    if not 0.0 <= config.diffusion.p_uncond < 1.0:
        p.append(f"diffusion.p_uncond={config.diffusion.p_uncond} must be in [0, 1)")
    n = jax.device_count()  # the mesh covers every device
    if config.eval.sample_batch < 1 or config.eval.sample_batch % n:
        p.append(
            f"eval.sample_batch={config.eval.sample_batch} must be a positive multiple of the "
            f"{n} devices (each sampling call is split over the whole mesh)"
        )
    return p


def build_model(config) -> unet.UNet:
    m = dict(config.model)
    preset, dtype = m.pop("preset"), config_lib.dtype(m.pop("dtype"))
    for k in ("block_channels", "down_attention", "up_attention"):
        m[k] = tuple(m[k])
    h, w, c = fashion_mnist.IMAGE_SHAPE
    model = unet.from_preset(
        preset,
        **m,
        out_channels=c,
        num_classes=len(fashion_mnist.CLASS_NAMES),
        null_label=True,
        dtype=dtype,
    )
    model.check_config()
    model.check_image_size(h, w)
    return model


def main(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    t0 = time.time()
    data_dir = config.data.data_dir or None
    train_x, train_y = fashion_mnist.load_arrays(fashion_mnist.TRAIN_MINUS_VALIDATION, data_dir)
    val_x, val_y = fashion_mnist.load_arrays(fashion_mnist.VALIDATION, data_dir)
    test_x, _ = fashion_mnist.load_arrays("test", data_dir)
    print(
        f"data: {len(train_y):,} training, {len(val_y):,} validation, {len(test_x):,} test images",
        flush=True,
    )
    bs = config.train.batch_size
    train_data = LabelledBatches(
        {"images": train_x, "labels": train_y},
        bs,
        seed=config.seed,
        balanced=False,  # every image equally often, as Ho et al. sample the data
        process_rows=sharding_lib.process_batch_slice(bs),
        transforms={"images": evaluation.to_unit_range},
    )

    dc, ec = config.diffusion, config.eval
    schedule = Schedule.create(dc.schedule, dc.num_timesteps)
    model = build_model(config)
    mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    val_n = config.data.val_examples
    val_images = evaluation.to_unit_range(val_x[:val_n])
    val_loss = diffusion_training.validation_loss(
        model, schedule, val_images, val_y[:val_n], mesh, prediction=dc.prediction
    )
    zeros = jnp.zeros((1, *fashion_mnist.IMAGE_SHAPE)), jnp.zeros((1,), jnp.int32)
    init_fn = lambda rng: model.init(rng, zeros[0], zeros[1], zeros[1])
    n_params = training.param_count(jax.eval_shape(init_fn, jax.random.key(0))["params"])

    result = training.train(
        config=config,
        workdir=workdir,
        init_fn=init_fn,
        loss_fn=diffusion_training.label_dropout_loss_fn(  # labels dropped for guidance
            model,
            schedule,
            p_uncond=dc.p_uncond,
            prediction=dc.prediction,
            min_snr_gamma=dc.min_snr_gamma or None,
        ),
        train_data=train_data,
        evaluate=lambda params, step: {"loss": val_loss(params)},  # [eval] loss: validation
        meta={k: config[k].to_dict() for k in ("model", "data", "diffusion")},
        images_per_step=bs,
    )
    params = training.eval_params(result.state)
    summary = {}
    if ec.enabled:
        clf_config = dict(evaluation.CLASSIFIER_CONFIG, steps=ec.classifier_steps)
        classifier = evaluation.pinned_classifier(ec.classifier_cache, data_dir, clf_config)
        make_sampler = functools.partial(
            sampling.make_unet_sampler, model, schedule, mesh=mesh, prediction=dc.prediction
        )
        summary, grids = evaluation.evaluate_samples(
            make_sampler,
            params,
            classifier,
            reference=test_x,
            real=train_x,
            options=ec,
            num_timesteps=dc.num_timesteps,
            num_classes=model.num_classes,
            seed=config.seed,
        )
        plots.save_images(workdir, grids, step=config.train.steps)
    summary.update(
        params=n_params, val_loss=val_loss(params), **result.summary(), wall_s=time.time() - t0
    )
    S, T = ec.ddim_steps, dc.num_timesteps
    headline = ("class_acc", f"fd_ddim{S}", f"fd_ancestral{S}", f"fd_ancestral{T}", "fd_floor")
    return results.write(workdir, summary, headline=headline if ec.enabled else ())


if __name__ == "__main__":
    from experiments import launch

    launch.run(__file__, main)
