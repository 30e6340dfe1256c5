"""Samplers: one step equals diffusers' schedulers; the compiled loop equals a Python loop;
8 devices equal 1; bad input is refused before anything compiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import sharding as sharding_lib
from diffusion import sampling, unet
from diffusion.schedules import Schedule

diffusers = pytest.importorskip("diffusers")
torch = pytest.importorskip("torch")


def _torch(x):
    return torch.from_numpy(np.asarray(x, np.float32))


THEIRS = {"epsilon": "epsilon", "v": "v_prediction", "x0": "sample"}


def _their_abar(ref, tables, i):
    """diffusers' own float32 abar at the step's two timesteps: the step functions are compared
    on identical inputs; the tables' float64-derived abar (more accurate than a float32
    cumprod) are compared with diffusers' at 2e-5 in test_schedules."""
    abar = ref.alphas_cumprod.numpy()
    prev = int(tables["t"][i + 1]) if i + 1 < len(tables["t"]) else -1
    np.testing.assert_allclose(tables["abar_t"][i], abar[tables["t"][i]], rtol=2e-5)
    return abar[tables["t"][i]], (abar[prev] if prev >= 0 else np.float32(1.0))


def _close(got, want, tol=1e-6):
    """Equal to ``tol`` relative to the largest magnitude: without clipping, x0_hat at large
    t is ``x_t / sqrt(abar)`` (hundreds), where float32 rounding alone exceeds 1e-6."""
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(1.0, float(np.abs(want).max())))


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
@pytest.mark.parametrize("variance", ["small", "large"])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_ddpm_step_equals_diffusers(prediction, variance, clip):
    ref = diffusers.DDPMScheduler(
        beta_schedule="linear",
        prediction_type=THEIRS[prediction],
        variance_type=f"fixed_{variance}",
        clip_sample=clip is not None,
    )
    ref.set_timesteps(50)
    ours = Schedule.create("linear", 1000)
    tables = sampling.step_tables(ours, sampling.timesteps(50, 1000))
    np.testing.assert_array_equal(tables["t"], ref.timesteps.numpy())
    rng = np.random.default_rng(0)
    for i in (0, 1, 25, 48, 49):  # first steps, a middle one, the last two
        t = int(tables["t"][i])
        x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
        out = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
        want = ref.step(_torch(out), t, _torch(x), generator=torch.Generator().manual_seed(i))
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i)).numpy()
        abar_t, abar_prev = _their_abar(ref, tables, i)
        got, x0 = sampling.ddpm_step(
            jnp.asarray(out),
            jnp.asarray(x),
            abar_t,
            abar_prev,
            jnp.asarray(noise),
            prediction=prediction,
            clip_x0=clip,
            variance=variance,
            last=tables["last"][i],
        )
        _close(x0, want.pred_original_sample.numpy())
        _close(got, want.prev_sample.numpy())


@pytest.mark.parametrize("prediction", ["epsilon", "v", "x0"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_equals_diffusers(prediction, eta):
    ref = diffusers.DDIMScheduler(beta_schedule="linear", prediction_type=THEIRS[prediction])
    ref.set_timesteps(50)
    ours = Schedule.create("linear", 1000)
    tables = sampling.step_tables(ours, sampling.timesteps(50, 1000))
    np.testing.assert_array_equal(tables["t"], ref.timesteps.numpy())
    rng = np.random.default_rng(1)
    for i in (0, 10, 48, 49):
        t = int(tables["t"][i])
        x, out, noise = (rng.standard_normal((2, 3, 4, 4)).astype(np.float32) for _ in range(3))
        want = ref.step(_torch(out), t, _torch(x), eta=eta, variance_noise=_torch(noise))
        abar_t, abar_prev = _their_abar(ref, tables, i)
        got, x0 = sampling.ddim_step(
            jnp.asarray(out),
            jnp.asarray(x),
            abar_t,
            abar_prev,
            jnp.asarray(noise),
            eta=eta,
            prediction=prediction,
            clip_x0=1.0,
        )
        _close(x0, want.pred_original_sample.numpy())
        _close(got, want.prev_sample.numpy())


def test_timestep_subsets_and_their_errors():
    np.testing.assert_array_equal(sampling.timesteps(4, 20), [0, 5, 10, 15])
    q = sampling.timesteps(50, 1000, "quadratic")
    assert len(q) == 50 and q[0] == 0 and np.all(np.diff(q) > 0) and q[-1] == 800
    assert len(sampling.timesteps(1000, 1000, "quadratic")) == 1000
    with pytest.raises(ValueError, match="non-empty"):
        sampling.check_timesteps([], 1000)
    with pytest.raises(ValueError, match="strictly increasing"):
        sampling.check_timesteps([0, 20, 10], 1000)
    with pytest.raises(ValueError, match="outside the schedule's 0..999"):
        sampling.check_timesteps([0, 500, 1000], 1000)
    with pytest.raises(ValueError, match="num_steps=0"):
        sampling.timesteps(0, 1000)
    with pytest.raises(ValueError, match="unknown spacing"):
        sampling.timesteps(10, 1000, "cubic")


@pytest.fixture(scope="module")
def tiny(random_params):
    model = unet.from_preset("ddpm-tiny", num_classes=3, null_label=True, out_channels=1)
    params = random_params(model, 8, 1)
    return model, params, Schedule.create("linear", 100)


def _python_loop(model, params, schedule, x, labels, rng, ts, method, eta, scale):
    """The reference: the same steps, one Python iteration each, no scan, no guidance batching."""
    tables = sampling.step_tables(schedule, np.asarray(ts))
    apply = jax.jit(lambda x, t, y: model.apply({"params": params}, x, t, y))  # one model call
    for i in range(len(ts)):
        t = jnp.full((x.shape[0],), tables["t"][i])
        out_c = apply(x, t, labels)
        out_u = apply(x, t, jnp.full_like(labels, model.num_classes))
        out = out_u + scale * (out_c - out_u)
        noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape)
        if method == "ddpm":
            x, _ = sampling.ddpm_step(
                out, x, tables["abar_t"][i], tables["abar_prev"][i], noise, last=tables["last"][i]
            )
        else:
            x, _ = sampling.ddim_step(
                out, x, tables["abar_t"][i], tables["abar_prev"][i], noise, eta=eta
            )
    return x


@pytest.mark.parametrize("method, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 0.7)])
def test_compiled_sampler_equals_python_loop(tiny, method, eta):
    model, params, schedule = tiny
    ts = [0, 7, 30, 31, 90]  # any increasing subset
    sample = sampling.make_unet_sampler(
        model, schedule, method=method, steps=ts, eta=eta, guided=True, trajectory=True
    )
    x_T = jax.random.normal(jax.random.key(3), (8, 8, 8, 1))
    labels = np.arange(8) % 3
    rng = jax.random.key(4)
    got, traj = sample(params, x_T, labels, rng, guidance_scale=2.5)
    want = _python_loop(
        model, params, schedule, x_T, jnp.asarray(labels), rng, ts, method, eta, 2.5
    )
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert traj.shape == (5, 8, 8, 8, 1)
    np.testing.assert_array_equal(traj[-1], got)
    assert float(jnp.abs(got - x_T).mean()) > 0.1  # the loop did move the samples


def test_eight_devices_equal_one(tiny):
    model, params, schedule = tiny
    assert jax.device_count() == 8
    x_T = jax.random.normal(jax.random.key(5), (8, 8, 8, 1))
    labels = np.arange(8) % 3
    outs = []
    for devices in (jax.devices(), jax.devices()[:1]):
        mesh = sharding_lib.make_mesh(devices=devices)
        sample = sampling.make_unet_sampler(
            model, schedule, method="ddpm", steps=6, guided=True, mesh=mesh
        )
        p = jax.device_put(params, sharding_lib.replicated(mesh))
        out = sample(p, x_T, labels, jax.random.key(6), guidance_scale=1.5)
        assert len(out.sharding.device_set) == len(devices)
        outs.append(np.asarray(out))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


def test_bad_input_is_refused(tiny):
    model, params, schedule = tiny
    uncond = unet.from_preset("ddpm-tiny", num_classes=3, out_channels=1)  # no null label
    with pytest.raises(ValueError, match="needs a UNet trained with a null label"):
        sampling.make_unet_sampler(uncond, schedule, guided=True)
    sample = sampling.make_unet_sampler(model, schedule, steps=3, guided=True)
    x_T = jnp.zeros((8, 8, 8, 1))
    # 3 is the null label (unconditional samples); 7 and -1 are no class at all.
    with pytest.raises(
        ValueError, match=r"labels \[-1, 7\] are outside the classes 0..2, 3 = null"
    ):
        sample(params, x_T, np.array([0, 1, 2, 3, 7, -1, 1, 2]), None)
    with pytest.raises(
        ValueError, match="image size 9x9 is not divisible by the UNet's total downsampling 2"
    ):
        sample(params, jnp.zeros((8, 9, 9, 1)), np.zeros(8, int))
    with pytest.raises(ValueError, match="cannot be split over the mesh's 8 devices"):
        sample(params, jnp.zeros((4, 8, 8, 1)), np.zeros(4, int))
    with pytest.raises(ValueError, match="strictly increasing"):
        sampling.make_unet_sampler(model, schedule, steps=[5, 3])
    with pytest.raises(ValueError, match="outside the schedule's 0..99"):
        sampling.make_unet_sampler(model, schedule, steps=[5, 100])
    plain = sampling.make_unet_sampler(model, schedule, steps=3)
    with pytest.raises(
        ValueError, match="guidance_scale=2.0 on a sampler built without guided=True"
    ):
        plain(params, x_T, np.zeros(8, int), None, guidance_scale=2.0)
    with pytest.raises(ValueError, match="image size 9x9 is not divisible"):
        model.init(
            jax.random.key(0),
            jnp.zeros((1, 9, 9, 1)),
            jnp.zeros((1,), jnp.int32),
            jnp.zeros((1,), jnp.int32),
        )
