"""The pixel DDPM on real Fashion-MNIST: a smoke run's loss falls, it resumes from its
checkpoint, and it writes the RESULT line, results.json and the PNG grids."""

import json
import os

import numpy as np
import pytest

from experiments import ddpm_fashion_mnist as exp


@pytest.mark.slow
def test_smoke_run_learns_resumes_and_reports(tfds_dir, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    config = exp.get_config("smoke")
    config.data.data_dir = tfds_dir
    config.eval.classifier_cache = str(tmp_path / "pinned")
    config.train.steps = 15  # the first run stops at the step-15 checkpoint, unevaluated
    config.eval.enabled = False
    first = exp.main(config, workdir)
    assert first["steps"] == 15 and "class_acc" not in first
    config.train.steps = 30
    config.eval.enabled = True
    summary = exp.main(config, workdir)
    out = capsys.readouterr().out
    assert "resumed from checkpoint step 15" in out
    assert summary["resumes"] == 1 and summary["steps"] == 30

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        losses = [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]
    assert len(losses) == 6
    assert np.mean(losses[-2:]) < 0.6 * losses[0]  # from ~0.9 (noise) to ~0.3

    S, T = config.eval.ddim_steps, config.diffusion.num_timesteps
    keys = ("class_acc", f"fd_ddim{S}", f"fd_ancestral{S}", f"fd_ancestral{T}", "fd_floor")
    result_line = [line for line in out.splitlines() if line.startswith("RESULT ")][-1]
    assert [kv.split("=")[0] for kv in result_line.split()[1:]] == list(keys)
    with open(os.path.join(workdir, "results.json")) as f:
        saved = json.load(f)
    for k in keys:
        assert saved[k] == summary[k] and np.isfinite(saved[k])
        assert f"{k}={saved[k]:.4f}" in result_line or f"{k}={saved[k]:.4g}" in result_line
    assert 0.0 <= saved["class_acc"] <= 1.0 and saved["fd_floor"] >= 0
    assert "not Inception FID" in saved["fd_features"]
    for name in (f"samples_ddim{S}", "trajectory", "guidance_sweep"):
        assert os.path.getsize(os.path.join(workdir, f"{name}.png")) > 0
    # The pinned classifier is cached by its config's hash and reused.
    (cached,) = os.listdir(tmp_path / "pinned")
    assert cached == saved["classifier"]


def test_bad_configs_are_refused():
    config = exp.get_config("smoke")
    config.model.block_channels = (16, 32, 32, 32)  # 28 -> 14 -> 7 -> 3.5
    config.model.down_attention = config.model.up_attention = (False,) * 4
    with pytest.raises(
        ValueError, match="image size 28x28 is not divisible by the UNet's total downsampling 8"
    ):
        exp.build_model(config)
    config = exp.get_config("smoke")
    config.model.dtype = "float16"
    with pytest.raises(ValueError, match="model.dtype='float16'"):
        exp.build_model(config)
    with pytest.raises(ValueError, match="unknown variant"):
        exp.get_config("huge")


def test_validate_config_names_the_bad_fields():
    config = exp.get_config("smoke")
    assert exp.validate_config(config) == []
    config.diffusion.p_uncond = 1.0
    config.eval.sample_batch = 0
    problems = exp.validate_config(config)
    assert len(problems) == 2
    assert problems[0].startswith("diffusion.p_uncond=1.0 must be in [0, 1)")
    assert problems[1].startswith("eval.sample_batch=0 must be a positive multiple")
    config = exp.get_config("smoke")
    config.eval.sample_batch = 8 * 2 + 1  # tests run on 8 simulated devices
    (problem,) = exp.validate_config(config)
    assert "eval.sample_batch=17" in problem and "8 devices" in problem
