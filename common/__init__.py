"""Shared building blocks: attention, layers, sharding, training, checkpoints, data."""

import os

# TensorFlow is imported (by tfds and orbax) only for data files, never for compute: keep its
# C++ start-up chatter (INFO lines, the oneDNN notice) out of the run logs.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
