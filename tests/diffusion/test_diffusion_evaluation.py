"""The Frechet distance against its closed form, and the helpers around it."""

import jax
import numpy as np
import pytest

from diffusion import evaluation


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    # Commuting (diagonal) covariances: tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (s1 - s2)^2.
    s1, s2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)
    got = evaluation.frechet_distance(mu1, np.diag(s1**2), mu2, np.diag(s2**2))
    assert got == pytest.approx(want, rel=1e-9)
    # A Gaussian against itself (full covariance) is 0; a rotation leaves the distance alone.
    a = rng.standard_normal((d, d))
    cov = a @ a.T + np.eye(d)
    assert evaluation.frechet_distance(mu1, cov, mu1, cov) == pytest.approx(0, abs=1e-8)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    b = rng.standard_normal((d, d))
    cov2 = b @ b.T + np.eye(d)
    fd = evaluation.frechet_distance(mu1, cov, mu2, cov2)
    fd_rot = evaluation.frechet_distance(q @ mu1, q @ cov @ q.T, q @ mu2, q @ cov2 @ q.T)
    assert fd_rot == pytest.approx(fd, rel=1e-8)


def test_feature_stats_and_sample_bias():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4000, 3)) * [1.0, 2.0, 0.5] + [1.0, 0.0, -1.0]
    mu, cov = evaluation.feature_stats(x)
    np.testing.assert_allclose(mu, [1, 0, -1], atol=0.1)
    np.testing.assert_allclose(np.diag(cov), [1, 4, 0.25], rtol=0.1)
    with pytest.raises(ValueError, match="need features"):
        evaluation.feature_stats(np.zeros(5))


def test_unit_range_round_trip_and_grid():
    img = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    x = evaluation.to_unit_range(img)
    assert x.min() == -1 and x.max() == 1
    np.testing.assert_array_equal(evaluation.from_unit_range(x), img)
    np.testing.assert_array_equal(evaluation.from_unit_range([-2.0, 2.0]), [0, 255])  # clipped
    grid = np.asarray(evaluation.rows_grid([np.repeat(x, 3, 0), x], scale=1))  # RGB
    assert grid.shape == (2 * 16, 3 * 16, 3)
    np.testing.assert_array_equal(grid[:16, 16:32, 0], img[0, ..., 0])
    np.testing.assert_array_equal(grid[16:, :16, 1], img[0, ..., 0])
    np.testing.assert_array_equal(grid[16:, 16:], 255)  # the second row has one image


def test_balanced_labels_and_draw_in_padded_chunks():
    np.testing.assert_array_equal(evaluation.balanced_labels(7, 3), [0, 1, 2, 0, 1, 2, 0])
    calls = []

    def sampler(params, x_T, labels, rng, guidance_scale):  # "denoises" to x_T + label
        calls.append((len(labels), guidance_scale))
        return x_T + params * labels[:, None, None, None]

    labels, rng, shape = evaluation.balanced_labels(5, 3), jax.random.key(7), (2, 2, 1)
    got = evaluation.draw(sampler, 10.0, labels, rng, 2, shape, guidance_scale=3.0)
    assert calls == [(2, 3.0)] * 3  # 2 + 2 + 1 (padded) samples
    for i in range(0, 5, 2):  # chunk i's noise: fold_in(fold_in(rng, i), 0)
        x_T = jax.random.normal(jax.random.fold_in(jax.random.fold_in(rng, i), 0), (2, *shape))
        want = (
            np.asarray(x_T)[: len(labels[i : i + 2])] + 10.0 * labels[i : i + 2, None, None, None]
        )
        np.testing.assert_allclose(got[i : i + 2], want, rtol=1e-6)
