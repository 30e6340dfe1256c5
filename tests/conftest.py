"""Test session setup: 8 simulated CPU devices, so every test runs the sharded code paths.

The flags must be set before JAX initialises its backend, hence here at import time.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
    """A tfds data dir for this test session (never the user's ~/tensorflow_datasets)."""
    return str(tmp_path_factory.mktemp("tfds"))
