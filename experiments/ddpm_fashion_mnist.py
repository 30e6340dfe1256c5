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
(``optim.ema_decay``), as Ho et al. do. Training goes through ``common.training.train``
(checkpoints, resume from the workdir, metrics.jsonl and TensorBoard); a validation loss at
fixed noise is logged every ``train.eval_every`` steps.

Evaluation, after training (``diffusion.evaluation``):

* ``class_acc``: the share of guided DDIM samples (``eval.ddim_steps`` steps, eta 0,
  ``eval.guidance_scale``) that the pinned classifier assigns to the class they were asked
  for, over ``eval.class_acc_samples`` samples, every class equally often.
* Frechet distances on the penultimate features of the pinned Fashion-MNIST classifier
  (NOT Inception FID; see ``diffusion/evaluation.py``) between ``eval.fd_samples``
  conditional samples (labels cycling through the classes, no guidance) and the whole test
  set: DDIM (eta 0) and ancestral sampling at ``eval.ddim_steps`` steps, and ancestral
  sampling over all ``T`` steps with both fixed variances (``fd_ancestral<T>`` is the better
  one, as Song et al. 2021, table 1 compares). ``fd_floor`` is the same distance for as many
  real training images: what a perfect sampler would score at this sample count.
* With ``eval.inception_path`` (a local TorchScript Inception file), the same distances on
  Inception features as well (``fid_*``); nothing is downloaded.

PNG grids in the workdir (also as TensorBoard images, written with tensorboardX beside the
scalars): ``samples_ddim<S>.png`` (one row per class), ``trajectory.png`` (one guided DDIM
trajectory per class, left to right from the first step), ``guidance_sweep.png`` (one row per
guidance scale, same noise; its class accuracy per scale is in results.json). The run ends
with ``RESULT class_acc=.. fd_ddim<S>=.. fd_ancestral<S>=.. fd_ancestral<T>=.. fd_floor=..``
and writes the same values to results.json.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common import config as config_lib
from common import results, training
from common import sharding as sharding_lib
from common.data import fashion_mnist
from common.data.step_batches import StepBatches
from diffusion import evaluation, sampling, unet
from diffusion.schedules import Schedule, diffusion_loss


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


# --------------------------------------------------------------------------- data


class LabelledImages(StepBatches):
    """Training batches ``{"images" [b, 28, 28, 1] in [-1, 1], "labels" [b]}``: random
    examples, batch ``s`` a pure function of ``(seed, s)`` (the state is one step counter)."""

    def __init__(self, images, labels, batch_size, *, seed=0, process_rows=None):
        if len(images) != len(labels) or len(labels) == 0:
            raise ValueError(f"{len(images)} images for {len(labels)} labels")
        self.images, self.labels = images, labels
        self.batch_size, self.seed = batch_size, seed
        self.rows = process_rows if process_rows is not None else slice(0, batch_size)
        self.step = 0

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        idx = np.random.default_rng([self.seed, step]).integers(
            len(self.labels), size=self.batch_size
        )
        idx = idx[self.rows]
        return {"images": evaluation.to_unit_range(self.images[idx]), "labels": self.labels[idx]}


# --------------------------------------------------------------------------- model


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


def make_loss_fn(model: unet.UNet, schedule: Schedule, dc):
    """``loss_fn(params, batch, rng)``: the diffusion loss with labels dropped to null."""
    if not 0.0 <= dc.p_uncond < 1.0:
        raise ValueError(f"diffusion.p_uncond={dc.p_uncond} must be in [0, 1)")

    def loss_fn(params, batch, rng):
        drop_rng, loss_rng, dropout_rng = jax.random.split(rng, 3)
        labels = batch["labels"]
        dropped = jax.random.bernoulli(drop_rng, dc.p_uncond, labels.shape)
        labels = jnp.where(dropped, model.num_classes, labels)  # [b]; num_classes = null

        def apply(x_t, t):
            return model.apply(
                {"params": params},
                x_t,
                t,
                labels,
                deterministic=False,
                rngs={"dropout": dropout_rng},
            )

        return diffusion_loss(
            apply,
            schedule,
            batch["images"],
            loss_rng,
            prediction=dc.prediction,
            min_snr_gamma=dc.min_snr_gamma or None,
        )

    return loss_fn


def make_val_loss(model, schedule, dc, images, labels, mesh):
    """The loss on fixed validation images at fixed timesteps and noise (no label dropout)."""
    n = len(labels) - len(labels) % mesh.size
    batch = sharding_lib.put_batch(
        {"images": evaluation.to_unit_range(images[:n]), "labels": labels[:n]}, mesh
    )

    @jax.jit
    def val_loss(params, batch):
        apply = lambda x_t, t: model.apply({"params": params}, x_t, t, batch["labels"])
        return diffusion_loss(
            apply, schedule, batch["images"], jax.random.key(1234), prediction=dc.prediction
        )[1]["mse"]

    return lambda params: float(val_loss(params, batch))


# --------------------------------------------------------------------------- sampling


def draw(sampler, params, labels, rng, batch: int, guidance_scale: float = 1.0):
    """Samples for ``labels`` in compiled calls of ``batch`` images (the last one padded)."""
    h, w, c = fashion_mnist.IMAGE_SHAPE
    outs, trajs = [], []
    for i in range(0, len(labels), batch):
        chunk = np.asarray(labels[i : i + batch])
        n = len(chunk)
        chunk = np.concatenate([chunk, np.zeros(batch - n, chunk.dtype)])
        key = jax.random.fold_in(rng, i)
        x_T = jax.random.normal(jax.random.fold_in(key, 0), (batch, h, w, c))
        out = sampler(params, x_T, chunk, jax.random.fold_in(key, 1), guidance_scale)
        if isinstance(out, tuple):
            out, traj = out
            trajs.append(np.asarray(traj)[:, :n])
        outs.append(np.asarray(out)[:n])
    samples = np.concatenate(outs)
    return (samples, np.concatenate(trajs, axis=1)) if trajs else samples


def balanced_labels(n: int, num_classes: int) -> np.ndarray:
    return (np.arange(n) % num_classes).astype(np.int32)


def main(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    t0 = time.time()
    data_dir = config.data.data_dir or None
    train_x, train_y = fashion_mnist.load_arrays(fashion_mnist.TRAIN_MINUS_VALIDATION, data_dir)
    val_x, val_y = fashion_mnist.load_arrays(fashion_mnist.VALIDATION, data_dir)
    test_x, _ = fashion_mnist.load_arrays("test", data_dir)
    num_classes = len(fashion_mnist.CLASS_NAMES)
    print(
        f"data: {len(train_y):,} training, {len(val_y):,} validation, {len(test_x):,} test images",
        flush=True,
    )

    dc, ec = config.diffusion, config.eval
    schedule = Schedule.create(dc.schedule, dc.num_timesteps)
    model = build_model(config)
    mesh = sharding_lib.make_mesh(config.mesh.data, config.mesh.fsdp)
    for key in ("sample_batch",):
        if ec[key] % mesh.size:
            raise ValueError(f"eval.{key}={ec[key]} is not divisible by the {mesh.size} devices")
    bs = config.train.batch_size
    train_data = LabelledImages(
        train_x, train_y, bs, seed=config.seed, process_rows=sharding_lib.process_batch_slice(bs)
    )
    val_n = config.data.val_examples
    val_loss = make_val_loss(model, schedule, dc, val_x[:val_n], val_y[:val_n], mesh)
    h, w, c = fashion_mnist.IMAGE_SHAPE
    zeros = jnp.zeros((1, h, w, c)), jnp.zeros((1,), jnp.int32)
    init_fn = lambda rng: model.init(rng, zeros[0], zeros[1], zeros[1])
    n_params = training.param_count(jax.eval_shape(init_fn, jax.random.key(0))["params"])

    result = training.train(
        config=config,
        workdir=workdir,
        init_fn=init_fn,
        loss_fn=make_loss_fn(model, schedule, dc),
        train_data=train_data,
        evaluate=lambda params, step: {"loss": val_loss(params)},  # [eval] loss: validation
        meta={
            "model": config.model.to_dict(),
            "data": config.data.to_dict(),
            "diffusion": config.diffusion.to_dict(),
        },
        images_per_step=bs,
    )
    params = training.eval_params(result.state)
    summary = {}
    if ec.enabled:
        summary = evaluate_samples(model, params, schedule, config, workdir, mesh, num_classes)
    summary.update(
        params=n_params, val_loss=val_loss(params), **result.summary(), wall_s=time.time() - t0
    )
    S, T = ec.ddim_steps, dc.num_timesteps
    headline = ("class_acc", f"fd_ddim{S}", f"fd_ancestral{S}", f"fd_ancestral{T}", "fd_floor")
    return results.write(workdir, summary, headline=headline if ec.enabled else ())


def evaluate_samples(model, params, schedule, config, workdir, mesh, num_classes) -> dict[str, Any]:
    """Class accuracy, Frechet distances and the PNG grids (see the module docstring)."""
    ec, dc, seed = config.eval, config.diffusion, config.seed
    data_dir = config.data.data_dir or None
    S, T, B = ec.ddim_steps, dc.num_timesteps, ec.sample_batch
    cache = ec.classifier_cache or os.path.join(
        data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets"),
        "landmarks_pinned",
    )
    clf_config = dict(evaluation.CLASSIFIER_CONFIG, steps=ec.classifier_steps)
    clf = evaluation.pinned_classifier(cache, data_dir, clf_config)
    test_x, _ = fashion_mnist.load_arrays("test", data_dir)
    train_x, _ = fashion_mnist.load_arrays(fashion_mnist.TRAIN_MINUS_VALIDATION, data_dir)
    ref = evaluation.feature_stats(clf.features(evaluation.to_unit_range(test_x)))
    out: dict[str, Any] = {
        "classifier_test_accuracy": clf.test_accuracy,
        "classifier": os.path.basename(clf.path),
        "fd_features": f"penultimate layer ({clf.model.features}) of the pinned Fashion-MNIST "
        "classifier; not Inception FID",
        "fd_samples": ec.fd_samples,
        "class_acc_samples": ec.class_acc_samples,
        "guidance_scale": ec.guidance_scale,
    }
    rng = np.random.default_rng(seed)
    real = train_x[rng.choice(len(train_x), ec.fd_samples, replace=False)]
    fd = lambda x: evaluation.frechet_distance(*evaluation.feature_stats(clf.features(x)), *ref)
    out["fd_floor"] = fd(evaluation.to_unit_range(real))
    print(
        f"FD floor (real train vs test, {ec.fd_samples} images): {out['fd_floor']:.4f}", flush=True
    )
    inception = None
    if ec.inception_path:
        inc = lambda x: evaluation.feature_stats(
            evaluation.inception_features(ec.inception_path, x)
        )
        inc_ref = inc(test_x)
        inception = lambda x: evaluation.frechet_distance(*inc(x), *inc_ref)
        out["fid_floor"] = inception(real)

    key = jax.random.key(seed + 1)
    kw = dict(mesh=mesh, prediction=dc.prediction)
    tb_images = {}

    # Guided DDIM (one compiled sampler at batch B, keeping its trajectory): class accuracy,
    # the per-class grid, one trajectory per class, the guidance sweep.
    ddim_guided = sampling.make_unet_sampler(
        model, schedule, method="ddim", steps=S, guided=True, trajectory=True, **kw
    )
    labels = balanced_labels(ec.class_acc_samples, num_classes)
    t = time.time()
    samples, traj = draw(
        ddim_guided, params, labels, jax.random.fold_in(key, 0), B, ec.guidance_scale
    )
    out[f"sample_s_ddim{S}_guided"] = time.time() - t
    pred = clf.logits(samples).argmax(-1)
    out["class_acc"] = float(np.mean(pred == labels))
    print(
        f"class_acc={out['class_acc']:.4f} (guided DDIM-{S}, scale {ec.guidance_scale}, "
        f"{len(labels)} samples)",
        flush=True,
    )
    rows = [evaluation.to_uint8(samples[labels == k][:10]) for k in range(num_classes)]
    tb_images[f"samples_ddim{S}"] = evaluation.image_grid(rows)
    first = [int(np.flatnonzero(labels == k)[0]) for k in range(num_classes)]
    frames = np.linspace(0, S - 1, ec.trajectory_frames).round().astype(int)
    tb_images["trajectory"] = evaluation.image_grid(
        [evaluation.to_uint8(traj[frames, i]) for i in first]
    )
    del traj

    sweep_labels = balanced_labels(B, num_classes)
    sweep_rows, sweep_acc = [], {}
    for scale in ec.guidance_sweep:  # the same noise at every scale
        x, _ = draw(ddim_guided, params, sweep_labels, jax.random.fold_in(key, 2), B, scale)
        sweep_acc[str(scale)] = float(np.mean(clf.logits(x).argmax(-1) == sweep_labels))
        sweep_rows.append(evaluation.to_uint8(x[:num_classes]))
    tb_images["guidance_sweep"] = evaluation.image_grid(sweep_rows)
    out["guidance_sweep_class_acc"] = sweep_acc
    out["guidance_sweep_samples"] = len(sweep_labels)

    # Frechet distances: conditional samples without guidance, labels cycling the classes.
    fd_labels = balanced_labels(ec.fd_samples, num_classes)
    runs = [(f"ddim{S}", "ddim", S, "small"), (f"ancestral{S}", "ddpm", S, "small")]
    runs += [(f"ancestral{T}_{v}", "ddpm", T, v) for v in ec.ancestral_variances]
    for name, method, steps, variance in runs:
        sampler = sampling.make_unet_sampler(
            model, schedule, method=method, steps=steps, variance=variance, **kw
        )
        t = time.time()
        x = draw(sampler, params, fd_labels, jax.random.fold_in(key, 3), B)
        out[f"sample_s_{name}"] = time.time() - t
        out[f"fd_{name}"] = fd(x)
        if inception is not None:
            out[f"fid_{name}"] = inception(evaluation.to_uint8(x))
        print(
            f"FD {name} (pinned-classifier features, not FID; {len(x)} samples): "
            f"{out[f'fd_{name}']:.4f}  floor {out['fd_floor']:.4f}  "
            f"[{out[f'sample_s_{name}']:.0f} s]",
            flush=True,
        )
    full = [out[f"fd_ancestral{T}_{v}"] for v in ec.ancestral_variances]
    out[f"fd_ancestral{T}"] = min(full)

    if jax.process_index() == 0:
        from tensorboardX import SummaryWriter

        tb = SummaryWriter(os.path.join(workdir, "tb"))
        for name, grid in tb_images.items():
            evaluation.save_png(os.path.join(workdir, f"{name}.png"), grid)
            tb.add_image(name, grid, config.train.steps, dataformats="HWC")
        tb.close()
    return out


if __name__ == "__main__":
    from experiments import launch

    launch.run(__file__, main)
