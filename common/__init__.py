"""Shared building blocks: attention, layers, sharding, training, checkpoints, data."""

import os

# TensorFlow (pulled in by tfds and orbax) prints C++ INFO lines on import; keep warnings.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
