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
* ``image_grid``: rows of images as one uint8 array for PNG files and TensorBoard.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
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


def to_uint8(x: Any) -> np.ndarray:
    """``[-1, 1]`` floats -> uint8, clipped."""
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
    cache_dir: str,
    data_dir: str | None = None,
    config: dict[str, Any] | None = None,
    *,
    log=print,
) -> PinnedClassifier:
    """The classifier of ``config`` (default ``CLASSIFIER_CONFIG``), trained on first use
    and read back from ``cache_dir/fashion_mnist_classifier-<hash>/`` afterwards."""
    from common.data import fashion_mnist

    config = dict(CLASSIFIER_CONFIG if config is None else config)
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


def image_grid(rows: Sequence[np.ndarray], pad: int = 2) -> np.ndarray:
    """uint8 ``[H, W, c]`` grid of ``rows``, each ``[n, h, w, c]`` uint8 (same ``h, w, c``)."""
    n = max(len(r) for r in rows)
    h, w, c = rows[0].shape[1:]
    grid = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, c), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y : y + h, x : x + w] = img
    return grid


def save_png(path: str, grid: np.ndarray, scale: int = 2) -> None:
    from PIL import Image

    img = grid[..., 0] if grid.shape[-1] == 1 else grid
    Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST).save(
        path
    )
