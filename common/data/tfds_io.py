"""What the tfds builders of ``common.data`` share: TensorFlow imported with its GPUs hidden,
and the decoding of tfds ``Text`` values.

Import ``tf`` and ``tfds`` from here: TensorFlow claims all accelerator memory when it first
sees a GPU, and JAX runs beside it.
"""

from __future__ import annotations

import tensorflow as tf
import tensorflow_datasets as tfds

try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF's devices were already initialised by an earlier import.
    pass

__all__ = ["as_bytes", "as_str", "tf", "tfds"]


def as_str(value: bytes | str) -> str:
    """A tfds ``Text`` value as ``str`` (random-access sources return bytes)."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def as_bytes(value: bytes | str) -> bytes:
    """A tfds ``Text`` value as UTF-8 ``bytes``."""
    return value if isinstance(value, bytes) else str(value).encode("utf-8")
