"""Two local processes joined by ``jax.distributed`` (CPU collectives) train the same steps
as one process over the same number of devices, and the shared evaluators (each process
feeding its rows of every batch) give the same metrics as one process."""

import os
import socket
import subprocess
import sys

import numpy as np

WORKER = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    # The workers import this checkout's code, not whichever one the venv was installed from.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one(tmp_path):
    single = tmp_path / "single.npz"
    subprocess.run([sys.executable, WORKER, str(single)], env=_env(4), check=True, timeout=300)
    multi = tmp_path / "multi.npz"
    coord = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(multi), coord, "2", str(i)],
            env=_env(2),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(outs)

    a, b = np.load(single), np.load(multi)
    assert int(a["devices"]) == int(b["devices"]) == 4
    assert set(a.files) == set(b.files)
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-5)
    assert int(a["eval_count"]) == int(b["eval_count"]) == 1499
    np.testing.assert_allclose(a["eval_nats"], b["eval_nats"], rtol=1e-5)
    assert (
        a["predict_logits"].shape == b["predict_logits"].shape == (21, a["predict_logits"].shape[1])
    )
    np.testing.assert_allclose(a["predict_logits"], b["predict_logits"], rtol=1e-4, atol=1e-5)
    for k in ("eval_accuracy", "eval_balanced_accuracy"):
        assert float(a[k]) == float(b[k]), k
    for k in a.files:
        x, y = a[k], b[k]
        if k.endswith("['qkv']['bias']"):
            # The key bias shifts every score of a query equally, so softmax cancels it and its
            # true gradient is 0: what it gets is rounding noise, which Adam scales up to
            # lr-sized steps. Compare the query and value biases only.
            x, y = x[[0, 2]], y[[0, 2]]
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-5, err_msg=k)
