"""Every preset of every model family with its exact parameter count, and for the vision
presets the forward FLOPs at the preset's resolution.

    python -m tools.zoo            # one line per preset (format below)
    python -m tools.zoo swin       # only presets whose name contains "swin"
    python -m tools.zoo --no-flops # counts only (skips lowering the vision models)

Each line is ``<preset>\t<parameter count>``, and for presets whose FLOPs are known (ViT,
Swin, CLIP, SAM, the DDPM UNet) two more columns:
``\t<forward FLOPs>\t<forward multiply-adds>``, with multiply-adds = FLOPs / 2 (the unit
papers quote: Swin-T "4.5G FLOPs" are multiply-adds).
The FLOPs are XLA's cost analysis (``jax.jit(apply).lower(...).cost_analysis()``) of one
forward pass on a batch of one image at the preset's resolution (CLIP: one image and one
text of ``context_length`` tokens): every matmul and convolution at 2 FLOPs per
multiply-add, plus the elementwise work (softmax, norms, activations) that papers leave out,
so the figures sit a few percent above the published ones. Lowering needs no compilation.

Counts and FLOPs come from abstract shapes (``jax.eval_shape`` of each model's ``init``):
no parameter memory is allocated.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp

from common.flops import lowered_flops
from diffusion import unet as ddpm_unet
from nlp import bert, gpt, long_lm, sparse_transformer, transformer
from vision import clip, swin, vit
from vision.sam import model as sam

# A family yields (name, init) or (name, init, lower): ``init()`` builds the variables,
# ``lower(variables)`` lowers one forward pass for the cost analysis (FLOPs).
Init = Callable[[], object]
Lower = Callable[[object], jax.stages.Lowered]
Entry = tuple[str, Init] | tuple[str, Init, Lower]


def _lm(module) -> Iterator[tuple[str, Callable[[], object]]]:
    """Decoder-only LMs (GPT, the Sparse Transformer, T-D / T-DMCA): tokens in, logits out."""
    for name in module.PRESETS:
        model = module.from_preset(name)
        yield name, lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))


def _transformer() -> Iterator[tuple[str, Callable[[], object]]]:
    tokens = jnp.zeros((1, 1), jnp.int32)
    for name in transformer.PRESETS:
        model = transformer.from_preset(name)
        yield name, lambda m=model: m.init(jax.random.key(0), tokens, tokens)


def _bert() -> Iterator[tuple[str, Callable[[], object]]]:
    """BERT presets with the pre-training heads (the parameters of HF BertForPreTraining)."""
    for name in bert.PRESETS:
        model = bert.from_preset(name)
        yield name, lambda m=model: m.init(jax.random.key(0), *bert.example_inputs())


def _images(module) -> Iterator[Entry]:
    """ViT / Swin presets at their own resolution, with the 1000-class ImageNet head."""
    for name in module.PRESETS:
        model = module.from_preset(name)
        x = module.example_images(model)
        yield (
            name,
            lambda m=model, x=x: m.init(jax.random.key(0), jnp.zeros(x.shape, x.dtype)),
            lambda v, m=model, x=x: jax.jit(m.apply).lower(v, x),
        )


def _clip() -> Iterator[Entry]:
    """CLIP presets: both encoders, projections and temperature (HF CLIPModel's count)."""
    for name in clip.PRESETS:
        model = clip.from_preset(name)
        inputs = clip.example_inputs(model)
        yield (
            name,
            lambda m=model, a=inputs: m.init(
                jax.random.key(0), *(jnp.zeros(x.shape, x.dtype) for x in a)
            ),
            lambda v, m=model, a=inputs: jax.jit(m.apply).lower(v, *a),
        )


def _sam() -> Iterator[Entry]:
    """SAM presets (segment_anything's ``Sam`` count; the prompt encoder's random Fourier
    matrix is a buffer, not a parameter); FLOPs: one image at the preset's resolution plus
    one prompt (a point, a box and a mask)."""
    for name in sam.PRESETS:
        model = sam.from_preset(name)
        inputs = sam.init_inputs(model)
        yield (
            name,
            lambda m=model: sam.init(m, jax.random.key(0)),
            lambda v, m=model, a=inputs: jax.jit(lambda v: m.apply(v, **a)).lower(v),
        )


def _ddpm_unet() -> Iterator[Entry]:
    """DDPM UNet presets at 32 x 32 x 3, unconditional (diffusers UNet2DModel's count)."""
    for name in ddpm_unet.PRESETS:
        model = ddpm_unet.from_preset(name)
        x, t, _ = ddpm_unet.example_inputs(model, 32)
        yield (
            name,
            lambda m=model, x=x, t=t: m.init(
                jax.random.key(0), jnp.zeros(x.shape, x.dtype), jnp.zeros(t.shape, t.dtype)
            ),
            lambda v, m=model, x=x, t=t: jax.jit(m.apply).lower(v, x, t),
        )


# One entry per family; later families add theirs here.
FAMILIES: tuple[Callable[[], Iterator[Entry]], ...] = (
    lambda: _lm(gpt),
    lambda: _lm(sparse_transformer),
    lambda: _lm(long_lm),
    _transformer,
    _bert,
    lambda: _images(vit),
    lambda: _images(swin),
    _clip,
    _sam,
    _ddpm_unet,
)


def rows(pattern: str = "", flops: bool = True) -> Iterator[tuple[str, int, float | None]]:
    """``(preset, parameter count, forward FLOPs or None)`` for presets matching pattern."""
    for family in FAMILIES:
        for entry in family():
            name, init = entry[0], entry[1]
            if pattern not in name:
                continue
            variables = jax.eval_shape(init)
            count = sum(int(x.size) for x in jax.tree.leaves(variables["params"]))
            fl = lowered_flops(entry[2](variables)) if flops and len(entry) > 2 else None
            yield name, count, fl


def presets() -> Iterator[tuple[str, int]]:
    """``(preset, parameter count)`` for every preset."""
    for name, count, _ in rows(flops=False):
        yield name, count


def main(argv: list[str]) -> None:
    args = argv[1:]
    flops = "--no-flops" not in args
    args = [a for a in args if a != "--no-flops"]
    pattern = args[0] if args else ""
    for name, count, fl in rows(pattern, flops):
        extra = "" if fl is None else f"\t{int(fl)}\t{int(fl) // 2}"
        print(f"{name}\t{count}{extra}", flush=True)


if __name__ == "__main__":
    main(sys.argv)
