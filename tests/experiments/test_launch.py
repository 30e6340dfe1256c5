"""The launcher stops a bad config before ``main`` runs: one line per bad field (the shared
sections, the experiment's own ``validate_config`` hook, the workdir), all together, exit
status 2 and no traceback; an unknown ``--config`` field prints only its "did you mean";
``--debug`` / ``LANDMARKS_DEBUG=1`` bring the traceback back. A stand-in experiment that
loads nothing keeps each run to the launcher's own imports."""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

EXPERIMENT = textwrap.dedent(
    """
    import os

    import ml_collections

    from common import config as config_lib


    def get_config(variant=None):
        c = ml_collections.ConfigDict()
        c.seed = 0
        c.data = dict(data_dir="", seq_len=16)
        c.model = dict(dtype="float32")
        c.optim = config_lib.optim(warmup_steps=2)
        c.train = config_lib.train(steps=10, batch_size=8)
        c.eval = dict(stride=0)
        c.mesh = config_lib.mesh()
        c.extra = dict(answer=42, late="")
        return c


    def validate_config(config):
        a = config.extra.answer
        return [] if a == 42 else [f"extra.answer={a} must be 42"]


    def main(config, workdir):
        if config.extra.late == "config":
            raise config_lib.ConfigError(["extra.late: found once the data is known"])
        if config.extra.late == "bug":
            raise RuntimeError("a bug in the experiment")
        os.makedirs(workdir, exist_ok=True)
        open(os.path.join(workdir, "main_ran"), "w").close()


    if __name__ == "__main__":
        from experiments import launch

        launch.run(__file__, main)
    """
)


@pytest.fixture(scope="module")
def experiment_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("experiment")
    (d / "stand_in_experiment.py").write_text(EXPERIMENT)
    return d


def launch(experiment_dir, workdir, *flags, env=None):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([ROOT, str(experiment_dir)]),
        "LANDMARKS_SYSTEM_MALLOC": "1",  # no re-exec: half the start-up
        "LANDMARKS_DEBUG": "",
        **(env or {}),
    }
    args = [sys.executable, "-m", "stand_in_experiment", f"--workdir={workdir}", *flags]
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_a_valid_config_runs_main(experiment_dir, tmp_path):
    out = launch(experiment_dir, tmp_path / "run")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "run" / "main_ran").exists()


def test_bad_fields_are_all_named_before_main_without_traceback(experiment_dir, tmp_path):
    out = launch(
        experiment_dir,
        tmp_path / "run",
        "--config.train.log_every=0",
        "--config.train.batch_size=12",
        "--config.eval.stride=17",
        "--config.extra.answer=41",
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    for line in (
        "  train.log_every=0 must be a positive integer",
        "  train.batch_size=12 must be a multiple of 8",
        "  eval.stride=17 must be at most the context, data.seq_len=16",
        "  extra.answer=41 must be 42",  # the experiment's own hook
    ):
        assert line in out.stderr, out.stderr
    assert "stand_in_experiment: 4 problems; stopped before training:" in out.stderr
    assert not (tmp_path / "run").exists()  # main never ran, nothing was created


def test_unknown_field_prints_only_the_suggestion(experiment_dir, tmp_path):
    out = launch(
        experiment_dir, tmp_path, "--config.train.log_evry=3", "--config.modle.dtype=float32"
    )
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    expected = (
        "--config.train.log_evry: unknown field train.log_evry (did you mean train.log_every?)"
    )
    assert expected in out.stderr
    assert "unknown field modle (did you mean model?)" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 4, out.stderr  # head, 2 problems, hint


def test_ill_typed_value_is_one_line(experiment_dir, tmp_path):
    out = launch(experiment_dir, tmp_path, "--config.train.steps=ten")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "--config.train.steps=ten" in out.stderr


def test_unwritable_workdir_is_named(experiment_dir, tmp_path):
    (tmp_path / "file").write_text("")
    out = launch(experiment_dir, tmp_path / "file" / "run")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"--workdir={tmp_path / 'file' / 'run'} cannot be created" in out.stderr


def test_a_config_error_found_by_main_is_reported_the_same_way(experiment_dir, tmp_path):
    out = launch(experiment_dir, tmp_path, "--config.extra.late=config")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "  extra.late: found once the data is known" in out.stderr
    bug = launch(experiment_dir, tmp_path, "--config.extra.late=bug")  # not the user's mistake
    assert bug.returncode == 1 and "Traceback" in bug.stderr


def test_debug_brings_the_traceback_back(experiment_dir, tmp_path):
    out = launch(experiment_dir, tmp_path, "--config.train.log_every=0", "--debug")
    assert out.returncode == 1 and "Traceback" in out.stderr
    assert "ConfigError: train.log_every=0 must be a positive integer" in out.stderr
    env = {"LANDMARKS_DEBUG": "1"}
    unknown = launch(experiment_dir, tmp_path, "--config.train.log_evry=3", env=env)
    assert unknown.returncode == 1 and "Traceback" in unknown.stderr
