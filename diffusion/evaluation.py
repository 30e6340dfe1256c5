"""Sample quality without Inception weights: a Frechet distance on the features of a
Fashion-MNIST classifier that the project trains once and pins. It is NOT the FID.

FID (Heusel et al. 2017) is the Frechet distance between Gaussians fitted to Inception-v3
pool features of real and generated images. Inception weights cannot be downloaded here, so
``FeatureClassifier`` (a small CNN) is trained on the Fashion-MNIST training split with a
fixed seed and its penultimate activations stand in for Inception's. Its numbers are only
comparable with numbers from the same pinned classifier (same ``CLASSIFIER_CONFIG``, whose
hash names the cache), never with published FIDs; always read them beside the real-vs-real
floor (``frechet_distance`` of real training images against the real test statistics at the
same sample count, since the estimate is biased upward at small counts).

* ``pinned_classifier(cache_dir, data_dir)`` trains the classifier once (deterministic seed,
  one device) and caches params and test accuracy under ``cache_dir/<config hash>/``.
* ``feature_stats`` / ``frechet_distance``: mean and covariance of features;
  ``||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrt(S1 S2))`` with ``scipy.linalg.sqrtm``.
* ``inception_features``: for a user who has Inception weights as a local TorchScript file
  (e.g. the ``pt_inception-2015-12-05`` feature extractor that clean-fid / torch-fidelity
  use); nothing is ever downloaded.
* ``evaluate_samples``: what a class-conditional image diffusion experiment reports of its
  samples: the class accuracy of guided samples, the Frechet distances of several samplers
  beside the floor, a guidance-scale sweep, and the picture grids (per-class samples, one
  trajectory per class, the sweep) as ``PIL`` images for ``common.plots.save_images``;
  built on ``draw`` (a sampler in fixed-size compiled calls), ``balanced_labels`` and
  ``rows_grid``. ``to_unit_range`` / ``from_unit_range``: uint8 pixels <-> ``[-1, 1]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

# The pinned classifier: changing any field trains (and caches) a new one.
CLASSIFIER_CONFIG: dict[str, Any] = dict(
    channels=(16, 32),
    features=128,
    dropout=0.3,
    steps=1200,
    batch_size=128,
    lr=2e-3,
    seed=0,
    split="train",  # all 60,000 training images; the test split only scores it
)


class FeatureClassifier(nn.Module):
    """Two conv-conv-pool stages, a ``features``-wide hidden layer (the FD features), logits."""

    channels: tuple[int, ...] = (16, 32)
    features: int = 128
    num_classes: int = 10
    dropout: float = 0.3
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True, features: bool = False):
        # x: [batch, 28, 28, 1] in [-1, 1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i, c in enumerate(self.channels):
            x = nn.relu(nn.Conv(c, (3, 3), name=f"conv{i}a", **kw)(x))
            x = nn.relu(nn.Conv(c, (3, 3), name=f"conv{i}b", **kw)(x))
            x = nn.max_pool(x, (2, 2), (2, 2))  # [batch, h / 2, w / 2, c]
        x = x.reshape(x.shape[0], -1)
        h = nn.relu(nn.Dense(self.features, name="hidden", **kw)(x))  # [batch, features]
        if features:
            return h.astype(jnp.float32)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return nn.Dense(self.num_classes, name="logits", **kw)(h).astype(jnp.float32)


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """uint8 ``[n, h, w, c]`` -> float32 in ``[-1, 1]`` (the diffusion model's data space)."""
    return images.astype(np.float32) / 127.5 - 1.0


def from_unit_range(x: Any) -> np.ndarray:
    """``[-1, 1]`` floats (any shape) -> uint8 pixels, clipped: the inverse of
    ``to_unit_range``."""
    return np.clip(np.round((np.asarray(x, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


class PinnedClassifier:
    """The trained classifier: ``logits(x)`` / ``features(x)`` on ``[-1, 1]`` images, in
    batches (jitted once), and the test accuracy it was pinned with."""

    def __init__(self, model: FeatureClassifier, params: Any, test_accuracy: float, path: str):
        self.model, self.params = model, params
        self.test_accuracy, self.path = test_accuracy, path
        self._logits = jax.jit(lambda p, x: model.apply({"params": p}, x))
        self._features = jax.jit(lambda p, x: model.apply({"params": p}, x, features=True))

    def _batched(self, fn, x: np.ndarray, batch: int = 500) -> np.ndarray:
        outs = []
        for i in range(0, len(x), batch):
            chunk = np.asarray(x[i : i + batch], np.float32)
            n = len(chunk)
            if n < batch:  # one compiled shape: pad the last chunk
                chunk = np.concatenate([chunk, np.zeros((batch - n, *chunk.shape[1:]), np.float32)])
            outs.append(np.asarray(fn(self.params, chunk))[:n])
        return np.concatenate(outs)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self._batched(self._logits, x)

    def features(self, x: np.ndarray) -> np.ndarray:
        return self._batched(self._features, x)


def train_classifier(
    train_x: np.ndarray, train_y: np.ndarray, config: dict[str, Any]
) -> tuple[FeatureClassifier, Any]:
    """Adam on cross-entropy, random batches drawn from a seeded numpy generator, one device."""
    model = FeatureClassifier(
        channels=tuple(config["channels"]), features=config["features"], dropout=config["dropout"]
    )
    key = jax.random.key(config["seed"])
    params = jax.jit(model.init)(key, jnp.zeros((1, *train_x.shape[1:])))["params"]
    tx = optax.adam(optax.cosine_decay_schedule(config["lr"], config["steps"]))
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, x, y, rng):
        def loss_fn(p):
            logits = model.apply({"params": p}, x, deterministic=False, rngs={"dropout": rng})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    rng = np.random.default_rng(config["seed"])
    for i in range(config["steps"]):
        idx = rng.integers(len(train_y), size=config["batch_size"])
        x = to_unit_range(train_x[idx])
        params, opt, _ = step(params, opt, x, train_y[idx], jax.random.fold_in(key, i))
    return model, params


def pinned_classifier(
    cache_dir: str | None,
    data_dir: str | None = None,
    config: dict[str, Any] | None = None,
    *,
    log=print,
) -> PinnedClassifier:
    """The classifier of ``config`` (default ``CLASSIFIER_CONFIG``), trained on first use
    and read back from ``cache_dir/fashion_mnist_classifier-<hash>/`` afterwards.
    ``cache_dir`` None or "": ``landmarks_pinned`` in the tfds data dir (``data_dir``, else
    ``TFDS_DATA_DIR``, else ``~/tensorflow_datasets``), beside the images it was trained on."""
    from common.data import fashion_mnist

    config = dict(CLASSIFIER_CONFIG if config is None else config)
    if not cache_dir:
        tfds_dir = data_dir or os.environ.get("TFDS_DATA_DIR")
        cache_dir = os.path.join(
            tfds_dir or os.path.expanduser("~/tensorflow_datasets"), "landmarks_pinned"
        )
    path = os.path.join(cache_dir, f"fashion_mnist_classifier-{config_hash(config)}")
    model = FeatureClassifier(
        channels=tuple(config["channels"]), features=config["features"], dropout=config["dropout"]
    )
    params_file, info_file = os.path.join(path, "params.msgpack"), os.path.join(path, "info.json")
    if os.path.exists(params_file) and os.path.exists(info_file):
        with open(info_file) as f:
            info = json.load(f)
        if info.get("config") != json.loads(json.dumps(config)):
            raise ValueError(f"{info_file} was written for another classifier config")
        target = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
        with open(params_file, "rb") as f:
            params = flax.serialization.from_bytes(target, f.read())
        return PinnedClassifier(model, params, info["test_accuracy"], path)

    log(f"training the pinned Fashion-MNIST feature classifier once ({path})")
    train_x, train_y = fashion_mnist.load_arrays(config["split"], data_dir)
    model, params = train_classifier(train_x, train_y, config)
    test_x, test_y = fashion_mnist.load_arrays("test", data_dir)
    clf = PinnedClassifier(model, params, 0.0, path)
    acc = float(np.mean(clf.logits(to_unit_range(test_x)).argmax(-1) == test_y))
    clf.test_accuracy = acc
    if jax.process_index() == 0:
        os.makedirs(path, exist_ok=True)
        tmp = params_file + ".tmp"
        with open(tmp, "wb") as f:
            f.write(flax.serialization.to_bytes(jax.device_get(params)))
        os.replace(tmp, params_file)
        with open(info_file, "w") as f:
            json.dump({"config": config, "test_accuracy": acc}, f, indent=1)
    log(f"pinned classifier test accuracy {acc:.4f}")
    return clf


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[d]`` and unbiased covariance ``[d, d]`` of ``features [n, d]`` (float64)."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need features [n >= 2, d], got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``:
    ``||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``."""
    import scipy.linalg

    covmean, _ = scipy.linalg.sqrtm(sigma1 @ sigma2, disp=False)
    if not np.isfinite(covmean).all():  # singular product: regularise as pytorch-fid does
        eps = 1e-6 * np.eye(len(mu1))
        covmean = scipy.linalg.sqrtm((sigma1 + eps) @ (sigma2 + eps))
    covmean = np.real(covmean)  # numerical noise can leave tiny imaginary parts
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_features(path: str, images: np.ndarray, batch: int = 100) -> np.ndarray:
    """Features of uint8 ``[n, h, w, 1 or 3]`` images from a local TorchScript Inception
    feature extractor called as ``model(uint8 [n, 3, h, w], return_features=True)`` (the
    interface of the ``pt_inception-2015-12-05`` file that clean-fid and torch-fidelity
    load; it resizes to 299 itself). Needs torch; never downloads."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no Inception weights at {path} (nothing is downloaded)")
    import torch

    model = torch.jit.load(path, map_location="cpu").eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch):
            x = np.asarray(images[i : i + batch])
            if x.shape[-1] == 1:
                x = np.repeat(x, 3, axis=-1)
            x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
            out.append(model(x, return_features=True).numpy())
    return np.concatenate(out).astype(np.float64)


# --------------------------------------------------------------------------- samples


def balanced_labels(n: int, num_classes: int) -> np.ndarray:
    """int32 ``[n]`` cycling through the classes: every class equally often (to within one)."""
    return (np.arange(n) % num_classes).astype(np.int32)


def draw(
    sampler: Callable[..., Any],
    params: Any,
    labels: np.ndarray,
    rng: jax.Array,
    batch: int,
    image_shape: Sequence[int],
    guidance_scale: float = 1.0,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Samples ``[n, h, w, c]`` for ``labels [n]`` from ``sampler(params, x_T, labels, rng,
    guidance_scale)`` (``diffusion.sampling.make_unet_sampler``) in compiled calls of ``batch``
    images, the last one padded with label 0; chunk ``i`` draws its noise from
    ``fold_in(rng, i)``. With a sampler that returns its trajectory, also the trajectory
    ``[steps, n, h, w, c]``."""
    outs, trajs = [], []
    for i in range(0, len(labels), batch):
        chunk = np.asarray(labels[i : i + batch])
        n = len(chunk)
        chunk = np.concatenate([chunk, np.zeros(batch - n, chunk.dtype)])
        key = jax.random.fold_in(rng, i)
        x_T = jax.random.normal(jax.random.fold_in(key, 0), (batch, *image_shape))
        out = sampler(params, x_T, chunk, jax.random.fold_in(key, 1), guidance_scale)
        if isinstance(out, tuple):
            out, traj = out
            trajs.append(np.asarray(traj)[:, :n])
        outs.append(np.asarray(out)[:n])
    samples = np.concatenate(outs)
    return (samples, np.concatenate(trajs, axis=1)) if trajs else samples


def rows_grid(rows: Sequence[np.ndarray], scale: int = 2):
    """``common.plots.image_grid`` of ``rows`` (each ``[k, h, w, c]`` in ``[-1, 1]``), one
    grid row each; shorter rows end in white cells."""
    from common import plots

    cols = max(len(r) for r in rows)
    white = np.full(rows[0].shape[1:], 255, np.uint8)
    tiles = [t for r in rows for t in [*from_unit_range(r), *[white] * (cols - len(r))]]
    return plots.image_grid(tiles, len(rows), cols, scale=scale)


def evaluate_samples(
    make_sampler: Callable[..., Callable[..., Any]],
    params: Any,
    classifier: PinnedClassifier,
    reference: np.ndarray,
    real: np.ndarray,
    options: Any,
    *,
    num_timesteps: int,
    num_classes: int,
    seed: int,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Scores a class-conditional sampler; returns ``(summary, grids)``.

    ``make_sampler(method=, steps=, variance=, guided=, trajectory=)`` builds a sampler for
    ``draw`` (e.g. ``functools.partial(sampling.make_unet_sampler, model, schedule, mesh=..)``);
    ``reference``: uint8 real images whose ``classifier`` features are the FD reference (the
    test set); ``real``: uint8 real images of which ``options.fd_samples`` (drawn with
    ``seed``) give the real-vs-real floor ``fd_floor``. ``options`` (an experiment's ``eval``
    section) has ``ddim_steps`` (S), ``guidance_scale``, ``class_acc_samples``,
    ``fd_samples``, ``sample_batch``, ``guidance_sweep``, ``trajectory_frames``,
    ``ancestral_variances`` and ``inception_path`` ("" for none).

    * ``class_acc``: the share of guided DDIM-S samples (eta 0, ``guidance_scale``, every class
      equally often) that ``classifier`` assigns to their class.
    * ``fd_ddim<S>``, ``fd_ancestral<S>``, ``fd_ancestral<T>_<variance>`` and the better of
      the last, ``fd_ancestral<T>``: Frechet distances of unguided conditional samples; with
      ``inception_path`` also ``fid_*``; ``sample_s_*``: the seconds each sampler took.
    * ``guidance_sweep_class_acc``: class accuracy per scale over ``sample_batch`` samples,
      the same noise at every scale.
    * grids: ``samples_ddim<S>`` (a row per class), ``trajectory`` (one guided trajectory per
      class, ``trajectory_frames`` frames from the first step), ``guidance_sweep`` (a row per
      scale).
    """
    o, S, T, B = options, options.ddim_steps, num_timesteps, options.sample_batch
    image_shape = reference.shape[1:]
    ref = feature_stats(classifier.features(to_unit_range(reference)))
    out: dict[str, Any] = {
        "classifier_test_accuracy": classifier.test_accuracy,
        "classifier": os.path.basename(classifier.path),
        "fd_features": f"penultimate layer ({classifier.model.features}) of the pinned "
        "Fashion-MNIST classifier; not Inception FID",
        "fd_samples": o.fd_samples,
        "class_acc_samples": o.class_acc_samples,
        "guidance_scale": o.guidance_scale,
    }
    real = real[np.random.default_rng(seed).choice(len(real), o.fd_samples, replace=False)]
    fd = lambda x: frechet_distance(*feature_stats(classifier.features(x)), *ref)
    out["fd_floor"] = fd(to_unit_range(real))
    log(f"FD floor (real train vs test, {o.fd_samples} images): {out['fd_floor']:.4f}")
    inception = None
    if o.inception_path:
        inc = lambda x: feature_stats(inception_features(o.inception_path, x))
        inc_ref = inc(reference)
        inception = lambda x: frechet_distance(*inc(x), *inc_ref)
        out["fid_floor"] = inception(real)

    key = jax.random.key(seed + 1)
    grids = {}
    # Guided DDIM (one compiled sampler at batch B, keeping its trajectory): class accuracy,
    # the per-class grid, one trajectory per class, the guidance sweep.
    ddim_guided = make_sampler(method="ddim", steps=S, guided=True, trajectory=True)
    labels = balanced_labels(o.class_acc_samples, num_classes)
    t = time.time()
    samples, traj = draw(
        ddim_guided, params, labels, jax.random.fold_in(key, 0), B, image_shape, o.guidance_scale
    )
    out[f"sample_s_ddim{S}_guided"] = time.time() - t
    out["class_acc"] = float(np.mean(classifier.logits(samples).argmax(-1) == labels))
    log(
        f"class_acc={out['class_acc']:.4f} (guided DDIM-{S}, scale {o.guidance_scale}, "
        f"{len(labels)} samples)"
    )
    grids[f"samples_ddim{S}"] = rows_grid([samples[labels == k][:10] for k in range(num_classes)])
    first = [int(np.flatnonzero(labels == k)[0]) for k in range(num_classes)]
    frames = np.linspace(0, S - 1, o.trajectory_frames).round().astype(int)
    grids["trajectory"] = rows_grid([traj[frames, i] for i in first])
    del traj

    sweep_labels = balanced_labels(B, num_classes)
    sweep_rows, sweep_acc = [], {}
    for scale in o.guidance_sweep:  # the same noise at every scale
        x, _ = draw(
            ddim_guided, params, sweep_labels, jax.random.fold_in(key, 2), B, image_shape, scale
        )
        sweep_acc[str(scale)] = float(np.mean(classifier.logits(x).argmax(-1) == sweep_labels))
        sweep_rows.append(x[:num_classes])
    grids["guidance_sweep"] = rows_grid(sweep_rows)
    out["guidance_sweep_class_acc"] = sweep_acc
    out["guidance_sweep_samples"] = len(sweep_labels)

    # Frechet distances: conditional samples without guidance, labels cycling the classes.
    fd_labels = balanced_labels(o.fd_samples, num_classes)
    runs = [(f"ddim{S}", "ddim", S, "small"), (f"ancestral{S}", "ddpm", S, "small")]
    runs += [(f"ancestral{T}_{v}", "ddpm", T, v) for v in o.ancestral_variances]
    for name, method, steps, variance in runs:
        sampler = make_sampler(method=method, steps=steps, variance=variance)
        t = time.time()
        x = draw(sampler, params, fd_labels, jax.random.fold_in(key, 3), B, image_shape)
        out[f"sample_s_{name}"] = time.time() - t
        out[f"fd_{name}"] = fd(x)
        if inception is not None:
            out[f"fid_{name}"] = inception(from_unit_range(x))
        log(
            f"FD {name} (pinned-classifier features, not FID; {len(x)} samples): "
            f"{out[f'fd_{name}']:.4f}  floor {out['fd_floor']:.4f}  "
            f"[{out[f'sample_s_{name}']:.0f} s]"
        )
    out[f"fd_ancestral{T}"] = min(out[f"fd_ancestral{T}_{v}"] for v in o.ancestral_variances)
    return out, grids
