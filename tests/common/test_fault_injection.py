"""Fault injection: a run killed (SIGKILL) again and again, at random steps and inside
asynchronous checkpoint saves, and restarted each time, ends with the same parameters and
optimizer state, bit for bit, as a run never interrupted, and with the same metrics.jsonl:
one record per step and split, the same values. (Plumbing: ``fault_worker.py`` trains
gpt-tiny on synthetic tokens through ``common.training.train``.)"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

HERE = pathlib.Path(__file__).parent
STEPS = 24  # fault_worker.STEPS; checkpoints every 4 steps, train records every 2
TIMING_KEYS = {"time", "step_time_s"}


def worker_env(cache_dir):
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = f"{HERE.parents[1]}{os.pathsep}{env.get('PYTHONPATH', '')}"
    # Every process of the test compiles the same programs: share them through the cache.
    env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return env


def start(workdir, env):
    return subprocess.Popen(
        [sys.executable, str(HERE / "fault_worker.py"), str(workdir)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def last_record_step(workdir):
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return -1
    steps = [-1]
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass
    return max(steps)


def saving(workdir, step):
    """Whether the checkpoint of ``step`` is being written (its temporary directory exists)."""
    ckpts = workdir / "checkpoints"
    return ckpts.is_dir() and any(
        p.name.startswith(f"{step}.orbax-checkpoint-tmp") for p in ckpts.iterdir()
    )


def kill_when(proc, ready, delay, deadline=600):
    """SIGKILLs ``proc`` ``delay`` seconds after ``ready()``; False if it finished first."""
    end = time.time() + deadline
    while proc.poll() is None and time.time() < end:
        if ready():
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            return proc.wait() == -signal.SIGKILL
        time.sleep(0.005)
    assert proc.poll() is not None, "the worker hung"
    return False


def full_state(workdir, step):
    state = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
    leaves = ocp.tree.to_flat_dict(state, sep="/")
    return {k: np.asarray(v) for k, v in leaves.items()}


def records(workdir):
    out = []
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.append({k: v for k, v in record.items() if k not in TIMING_KEYS})
    return out


@pytest.mark.slow
def test_killed_again_and_again_ends_like_an_uninterrupted_run(tmp_path):
    env = worker_env(tmp_path / "jax_cache")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = start(straight, env)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]

    rng = np.random.default_rng(42)
    # Kill moments, in order: a random step before the first checkpoint, inside the save
    # of step 8, a random step, inside the save of step 16, a random step, inside the last
    # save (step 24: the run must redo steps 21-24). Each a few milliseconds late, at random.
    moments = [
        ("step", int(rng.integers(1, 4))),
        ("save", 8),
        ("step", int(rng.integers(10, 15))),
        ("save", 16),
        ("step", int(rng.integers(18, 23))),
        ("save", STEPS),
    ]
    for kind, at in moments:
        proc = start(killed, env)
        if kind == "step":
            ready = lambda at=at: last_record_step(killed) >= at  # noqa: E731
        else:
            ready = lambda at=at: saving(killed, at)  # noqa: E731
        assert kill_when(proc, ready, delay=rng.uniform(0, 0.05)), (
            f"the run ended before the kill at {kind} {at}"
        )
    proc = start(killed, env)
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]

    a, b = full_state(straight, STEPS), full_state(killed, STEPS)
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert records(killed) == records(straight)
    steps = [(r["step"], r["split"]) for r in records(killed)]
    assert len(steps) == len(set(steps)) == STEPS // 2 + STEPS // 8
    # No kill damaged a finished step: nothing was set aside as unreadable.
    assert not list((killed / "checkpoints").glob("*.unreadable*"))
