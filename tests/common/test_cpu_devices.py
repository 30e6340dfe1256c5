"""``common.sharding.use_cpu_devices``: one-thread CPU devices set up before jax starts.

Each case runs in a fresh interpreter: the test session's own backend (8 simulated devices,
see conftest) has started already, and the setting is only honoured before that.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(code: str, xla_flags: str = "") -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags, PYTHONPATH=ROOT)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    if out.returncode:
        raise AssertionError(out.stderr[-2000:])
    return out.stdout.strip()


def test_devices_and_peak_over_all_of_them():
    code = (
        "import jax, os\n"
        "from common import sharding, flops\n"
        "n = sharding.use_cpu_devices(3)\n"
        "assert 'xla_cpu_multi_thread_eigen=false' in os.environ['XLA_FLAGS']\n"
        "print(n, jax.device_count(), flops.measured_matmul_peak(n=96, repeats=1) > 0)"
    )
    assert _run(code) == "3 3 True"


def test_one_per_core_and_zero_keeps_xla_default():
    cores = len(os.sched_getaffinity(0))
    setup = "import jax\nfrom common import sharding\n"
    assert _run(setup + "print(sharding.use_cpu_devices(-1))") == str(cores)
    code = setup + "sharding.use_cpu_devices(0)\nprint(jax.device_count())"
    assert _run(code) == "1"


def test_flags_the_user_set_win():
    code = "import jax\nfrom common import sharding\n"
    code += "sharding.use_cpu_devices(3)\nprint(jax.device_count())"
    assert _run(code, "--xla_force_host_platform_device_count=2") == "2"


def test_too_late_or_negative_is_a_clear_error(monkeypatch):
    import jax

    from common import sharding

    jax.devices()  # this session's backend is up
    monkeypatch.setenv("XLA_FLAGS", "")
    with pytest.raises(RuntimeError, match="before jax's backends start"):
        sharding.use_cpu_devices(3)
    assert os.environ["XLA_FLAGS"] == ""
    with pytest.raises(ValueError, match="cpu_devices must be"):
        sharding.use_cpu_devices(-2)
