"""Config validation before any compute: each bad value of a shared section is reported as one
message naming its field, all of them together; a workdir that cannot hold the run is
named too. (The launcher's handling, in a subprocess: tests/experiments/test_launch.py.)"""

import os

import ml_collections
import pytest

from common import config as config_lib

DEVICES = 8  # tests/conftest.py


def base_config(**sections) -> ml_collections.ConfigDict:
    """The shared sections as an experiment builds them, valid on 8 devices."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = dict(data_dir="", seq_len=32)
    c.model = dict(d_model=32, dtype="float32")
    c.optim = config_lib.optim(warmup_steps=5)
    c.train = config_lib.train(steps=20, batch_size=16, log_every=5)
    c.eval = dict(batch_size=32, stride=0)
    c.mesh = config_lib.mesh()
    for name, value in sections.items():
        c[name] = value
    return c


def problems_with(**overrides) -> list[str]:
    c = base_config()
    for key, value in overrides.items():
        section, field = key.split("__")
        c[section][field] = value
    return config_lib.validate(c)


def test_a_valid_config_has_no_problems():
    assert config_lib.validate(base_config()) == []


@pytest.mark.parametrize(
    "overrides, message",
    [
        # today: ZeroDivisionError after the first step
        ({"train__log_every": 0}, "train.log_every=0 must be a positive integer"),
        ({"train__eval_every": -1}, "train.eval_every=-1 must be a positive integer"),
        ({"train__checkpoint_every": 0}, "train.checkpoint_every=0 must be a positive"),
        # today: "loss is nan"
        ({"train__batch_size": 0}, "train.batch_size=0 must be a positive integer"),
        # today: names optim.total_steps after the tokenizer is trained
        ({"train__steps": 0}, "train.steps=0 must be a positive integer"),
        ({"train__accum_steps": 0}, "train.accum_steps=0 must be a positive integer"),
        # today: a raw JAX IndivisibleError
        ({"train__batch_size": 12}, "train.batch_size=12 must be a multiple of 8: 8 data-par"),
        # today: a reshape TypeError inside the jitted step
        (
            {"train__batch_size": 24, "train__accum_steps": 2},
            "train.batch_size=24 must be a multiple of 16: 8 data-parallel devices "
            "(mesh.data x mesh.fsdp) x train.accum_steps=2 (e.g. 16 or 32)",
        ),
        # today: fails at the first evaluation
        ({"eval__stride": 33}, "eval.stride=33 must be at most the context, data.seq_len=32"),
        ({"eval__stride": -1}, "eval.stride=-1 must be an integer >= 0"),
        ({"eval__batch_size": 12}, "eval.batch_size=12 must be a multiple of the 8 devices"),
        ({"optim__schedule": "cosin"}, "optim.schedule='cosin' is not one of"),
        ({"optim__warmup_steps": 21}, "optim.warmup_steps=21 is longer than the schedule's 20"),
        ({"optim__b2": 1.0}, "optim.b2=1.0 must be in [0, 1)"),
        ({"optim__lr": -1.0}, "optim.lr=-1.0 must be >= 0"),
        ({"optim__ema_decay": 1.5}, "optim.ema_decay=1.5 must be in [0, 1)"),
        ({"optim__min_lr_ratio": 2.0}, "optim.min_lr_ratio=2.0 must be in [0, 1]"),
        ({"mesh__fsdp": 3}, "mesh.data=-1 x mesh.fsdp=3 does not cover the 8 devices"),
        ({"mesh__data": 4}, "mesh.data=4 x mesh.fsdp=1 does not cover the 8 devices"),
        ({"mesh__fsdp": -1}, "mesh.data=-1 and mesh.fsdp=-1: at most one"),
        ({"mesh__fsdp": 0}, "mesh.fsdp=0 must be -1"),
        ({"mesh__rules": [["embed", "model"]]}, "mesh.rules[0]=['embed', 'model'] must be"),
        ({"model__dtype": "fp16"}, "model.dtype='fp16' is not one of ['bfloat16', 'float32']"),
    ],
)
def test_each_bad_field_is_named(overrides, message):
    problems = problems_with(**overrides)
    assert len(problems) == 1 and problems[0].startswith(message), problems


def test_valid_edge_values_pass():
    assert problems_with(eval__stride=32, optim__warmup_steps=20) == []
    assert problems_with(mesh__fsdp=2, train__batch_size=16, train__accum_steps=2) == []
    assert problems_with(mesh__data=2, mesh__fsdp=4) == []
    # an explicit schedule length is what warmup must fit in, not train.steps
    assert problems_with(optim__total_steps=100, optim__warmup_steps=50) == []


def test_every_problem_is_reported_at_once():
    problems = problems_with(
        train__log_every=0, train__batch_size=0, eval__stride=-3, model__dtype="half"
    )
    fields = sorted(p.split("=")[0] for p in problems)
    assert fields == ["eval.stride", "model.dtype", "train.batch_size", "train.log_every"]


def test_phases_are_checked_with_their_own_names():
    """Two-phase experiments (pre-training, fine-tuning) keep train/optim per phase."""
    c = base_config()
    del c["train"], c["optim"]
    c.pretrain = dict(optim=config_lib.optim(warmup_steps=50), train=config_lib.train(steps=20))
    c.finetune = dict(optim=config_lib.optim(), train=config_lib.train(steps=10, log_every=0))
    assert sorted(config_lib.validate(c)) == [
        "finetune.train.log_every=0 must be a positive integer",
        "pretrain.optim.warmup_steps=50 is longer than the schedule's 20 steps "
        "(pretrain.train.steps)",
    ]


def test_device_count_is_the_mesh_size():
    c = base_config()
    c.train.batch_size = 12
    assert config_lib.validate(c, devices=4) == []
    assert config_lib.validate(c, devices=8)[0].startswith("train.batch_size=12")


def test_cpu_devices_below_minus_one_is_named():
    c = base_config(cpu_devices=-2)
    assert config_lib.validate(c) == ["cpu_devices=-2 must be an integer >= -1"]


def test_workdir_problems(tmp_path):
    assert config_lib.workdir_problems(str(tmp_path)) == []
    assert config_lib.workdir_problems(str(tmp_path / "new" / "deeper")) == []
    assert not (tmp_path / "new").exists()  # checking creates nothing
    assert list(tmp_path.iterdir()) == []  # the write probe is removed
    file = tmp_path / "file"
    file.write_text("x")
    assert config_lib.workdir_problems(str(file)) == [
        f"--workdir={file} is a file, not a directory"
    ]
    assert config_lib.workdir_problems(str(file / "run")) == [
        f"--workdir={file / 'run'} cannot be created: {file} is a file"
    ]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_workdir_is_named(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert config_lib.workdir_problems(str(ro))[0].startswith(f"--workdir={ro} is not writable")
        assert "is not writable" in config_lib.workdir_problems(str(ro / "run"))[0]
    finally:
        ro.chmod(0o700)


def test_read_only_filesystem_is_named():
    """As root (permissions do not stop root) a read-only mount is what stops a write."""
    path = "/proc/sys/landmarks_run"
    if os.access("/proc/sys", os.W_OK):
        pytest.skip("/proc/sys is writable here")
    assert config_lib.workdir_problems(path) == [
        f"--workdir={path} cannot be created: /proc/sys is not writable"
    ]


def test_config_error_keeps_each_problem():
    e = config_lib.ConfigError(["a.b=1 bad", "c.d=2 bad"])
    assert e.problems == ["a.b=1 bad", "c.d=2 bad"] and str(e) == "a.b=1 bad; c.d=2 bad"
    assert config_lib.ConfigError("x.y=0 bad").problems == ["x.y=0 bad"]
