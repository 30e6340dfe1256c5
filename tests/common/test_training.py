"""The train step: sharded over 8 simulated devices equals one device; gradient accumulation
equals the big batch; schedules, the weight-decay mask and the parameter EMA follow their
definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import optim, sharding, training
from nlp import gpt


def optim_config(**kw):
    return optim.default_config(**{"lr": 1e-2, "warmup_steps": 2, "total_steps": 10, **kw})


def run_steps(mesh, model, batches, accum_steps=1, n_steps=3):
    tx, sched = optim.adamw(optim_config())
    init_fn = lambda r: model.init(r, jnp.zeros((1, 16), jnp.int32))
    state, shardings = training.create_state(init_fn, tx, mesh, jax.random.key(0))
    step = jax.jit(
        training.make_train_step(gpt.lm_loss_fn(model), tx, sched, accum_steps),
        in_shardings=(shardings, None, sharding.replicated(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    losses = []
    for i in range(n_steps):
        state, m = step(state, sharding.put_batch(batches[i], mesh), jax.random.key(1))
        losses.append(float(m["loss"]))
    return state, losses


def assert_same_params(p1, p2):
    """Equal up to reduction order. The key bias is skipped: it shifts every score of a query
    equally, so softmax cancels it and its true gradient is 0; it gets rounding noise, which
    Adam scales up to lr-sized steps."""
    flat1 = jax.tree_util.tree_flatten_with_path(p1)[0]
    flat2 = jax.tree_util.tree_flatten_with_path(p2)[0]
    for (path, a), (_, b) in zip(flat1, flat2, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if jax.tree_util.keystr(path).endswith("['qkv']['bias']"):
            a, b = a[[0, 2]], b[[0, 2]]
        np.testing.assert_allclose(a, b, atol=5e-6, rtol=1e-5, err_msg=jax.tree_util.keystr(path))


def random_batches(n, batch=8, length=16, vocab=128):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        w = rng.integers(0, vocab, (batch, length + 1)).astype(np.int32)
        out.append({"inputs": w[:, :-1], "targets": w[:, 1:]})
    return out


def test_eight_devices_are_simulated():
    assert jax.device_count() == 8


@pytest.mark.parametrize("data,fsdp", [(8, 1), (4, 2), (1, 8)])
def test_sharded_step_equals_single_device(data, fsdp):
    model = gpt.from_preset("gpt-tiny", dropout=0.1)  # dropout on: rng handling is compared
    batches = random_batches(3)
    one = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    many = sharding.make_mesh(data, fsdp)
    s1, l1 = run_steps(one, model, batches)
    s8, l8 = run_steps(many, model, batches)
    np.testing.assert_allclose(l1, l8, rtol=1e-5)
    assert_same_params(s1.params, s8.params)
    if fsdp > 1:  # params really are sharded along `embed`
        kernel = s8.params["h_0"]["mlp"]["fc"]["kernel"]
        assert kernel.sharding.spec[0] == sharding.FSDP
        assert kernel.addressable_shards[0].data.shape[0] == kernel.shape[0] // fsdp


def test_gradient_accumulation_equals_big_batch():
    model = gpt.from_preset("gpt-tiny", dropout=0.0, attn_dropout=0.0)
    batches = random_batches(2, batch=16)
    mesh = sharding.make_mesh()
    s1, l1 = run_steps(mesh, model, batches, accum_steps=1, n_steps=2)
    s4, l4 = run_steps(mesh, model, batches, accum_steps=2, n_steps=2)
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    assert_same_params(s1.params, s4.params)


def test_schedules_follow_their_definitions():
    cos = optim.schedule(optim_config(warmup_steps=10, total_steps=110))
    assert float(cos(0)) == 0.0
    assert float(cos(5)) == pytest.approx(5e-3)
    assert float(cos(10)) == pytest.approx(1e-2)
    assert float(cos(60)) == pytest.approx(1e-3 + 0.5 * 9e-3, rel=1e-4)  # half-way cosine
    assert float(cos(110)) == pytest.approx(1e-3, rel=1e-4)
    lin = optim.schedule(optim_config(schedule="linear", warmup_steps=0, total_steps=100))
    assert float(lin(50)) == pytest.approx(0.5 * (1e-2 + 1e-3), rel=1e-4)
    inv = optim.schedule(optim_config(schedule="inverse_sqrt", warmup_steps=100, total_steps=1000))
    assert float(inv(50)) == pytest.approx(5e-3)
    assert float(inv(400)) == pytest.approx(1e-2 * (100 / 400) ** 0.5)
    with pytest.raises(ValueError, match="optim.schedule='cubic'"):
        optim.schedule(optim_config(schedule="cubic"))
    with pytest.raises(ValueError, match="warmup_steps"):
        optim.schedule(optim_config(warmup_steps=20, total_steps=10))


def test_weight_decay_mask_skips_biases_and_norms():
    params = {
        "dense": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
        "ln": {"scale": jnp.ones(3)},
        "wte": {"embedding": jnp.ones((5, 3))},
    }
    mask = optim.decay_mask(params)
    assert mask == {
        "dense": {"kernel": True, "bias": False},
        "ln": {"scale": False},
        "wte": {"embedding": True},
    }


def test_param_ema_follows_its_definition_and_leaves_the_updates_alone():
    params = {"w": jnp.array([1.0, -2.0, 3.0]), "b": jnp.array(0.5)}
    plain, _ = optim.adamw(optim_config())
    tracked, _ = optim.adamw(optim_config(ema_decay=0.9))
    s_plain, s_tracked = plain.init(params), tracked.init(params)
    p_plain = p_tracked = params
    expected = params  # the EMA starts at the initial params
    for i in range(4):
        grads = {"w": jnp.array([0.3, -1.0, 2.0]) * (i + 1), "b": jnp.array(0.1 * i)}
        u_plain, s_plain = plain.update(grads, s_plain, p_plain)
        u_tracked, s_tracked = tracked.update(grads, s_tracked, p_tracked)
        jax.tree.map(np.testing.assert_array_equal, u_tracked, u_plain)
        p_plain = p_tracked = jax.tree.map(jnp.add, p_plain, u_plain)
        expected = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, expected, p_plain)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
            optim.ema_params(s_tracked),
            expected,
        )
    assert optim.ema_params(s_plain) is None
    state = training.TrainState(step=jnp.array(4), params=p_tracked, opt_state=s_tracked)
    assert training.eval_params(state) is optim.ema_params(s_tracked)
    state = training.TrainState(step=jnp.array(4), params=p_plain, opt_state=s_plain)
    assert training.eval_params(state) is p_plain
    with pytest.raises(ValueError, match="ema_decay=1.0 must be in"):
        optim.adamw(optim_config(ema_decay=1.0))


def test_mesh_must_cover_devices():
    with pytest.raises(ValueError, match="does not cover the 8 devices"):
        sharding.make_mesh(3, 1)
