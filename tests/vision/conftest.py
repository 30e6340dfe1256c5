"""Scaffolding the vision parity tests share: the PyTorch references, their randomised
weights, and test images in both layouts."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture(scope="session")
def hf():
    """``(torch, transformers)``; the test is skipped where either is missing."""
    return pytest.importorskip("torch"), pytest.importorskip("transformers")


def _is_norm_scale(name: str) -> bool:
    # HF's LayerNorm scales: ``layernorm*``, Swin's ``norm``, CLIP's ``pre_layrnorm``
    return ("norm" in name or "layrnorm" in name) and name.endswith(".weight")


@pytest.fixture(scope="session")
def randomize_torch(hf):
    """``randomize_torch(model, seed, scale, special=None)``: every parameter of a torch
    model drawn with a larger spread than its init, so that a wrong mapping shows in the
    outputs: LayerNorm scales ``1 + 0.2 N(0, 1)``, others ``scale * N(0, 1)``;
    ``special`` maps a name fragment to its own spread (a float) or to a constant fill
    (``("fill", value)``). One draw per parameter in ``named_parameters`` order. Returns the
    model in eval mode."""
    torch, _ = hf

    def randomize(model, seed: int, scale: float, special: dict | None = None):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                noise = torch.randn(p.shape, generator=gen)
                rule = next((v for k, v in (special or {}).items() if k in name), None)
                if isinstance(rule, tuple):
                    p.fill_(rule[1])
                elif rule is not None:
                    p.copy_(rule * noise)
                elif _is_norm_scale(name):
                    p.copy_(1.0 + 0.2 * noise)
                else:
                    p.copy_(scale * noise)
        return model.eval()

    return randomize


@pytest.fixture(scope="session")
def nchw_images():
    """``nchw_images(shape, seed=0)``: standard-normal float32 images, torch's NCHW layout."""
    return lambda shape, seed=0: np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.fixture(scope="session")
def to_nhwc():
    """NCHW numpy images -> our channels-last ``[batch, height, width, channels]``."""
    return lambda x: jnp.asarray(x.transpose(0, 2, 3, 1))
