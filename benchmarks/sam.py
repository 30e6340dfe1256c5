"""Segment Anything on CPU: our predictor against ``segment_anything.SamPredictor``.

Run as ``python -m benchmarks.sam [--quick]``. Both sides run in one process, alternating
(ours first on even rounds), on the same machine, from the same weights:

* the reference ``sam_model_registry["vit_b"](checkpoint=None)`` (torch's init, seeded),
  converted to ours with ``vision.sam.convert.sam_variables_from_torch``; ``--quick`` uses
  the tests' tiny model (64 px) instead, to check the script in seconds;
* one 768 x 1024 uint8 image (random pixels: timing does not depend on content);
* embed: ``SamPredictor.set_image(image)`` against ``vision.sam.predictor.SamPredictor.embed``
  (both resize the longest side to 1024, normalise, pad and run the image encoder; ours is
  one compiled program, blocked on);
* prompt: one foreground point, three multimask outputs, masks thresholded at the original
  size (``predict(point, label)`` on both; ours is the second compiled program);
* before timing, the embeddings and the full-size mask logits of both sides are compared
  and their max abs differences printed.

The step time of a side is the median over rounds; torch uses its default intra-op threads.
The last line is ``RESULT embed_ratio_vs_torch=<ours / torch> prompt_ratio_vs_torch=<ours /
torch> prompt_ms=<ours, milliseconds>``.
"""

from __future__ import annotations

from benchmarks.harness import reexec_with_malloc_env

if __name__ == "__main__":  # malloc settings for both sides: see benchmarks/harness.py
    reexec_with_malloc_env("benchmarks.sam")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.harness import alternate, warm_up  # noqa: E402
from vision.sam import convert as sam_convert  # noqa: E402
from vision.sam import model as sam_model  # noqa: E402
from vision.sam.predictor import SamPredictor  # noqa: E402


def _reference_module():
    """``tests/vision/sam_reference.py``: imports segment_anything without torchvision."""
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "vision", "sam_reference.py")
    spec = importlib.util.spec_from_file_location("sam_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, few rounds")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    ref_lib = _reference_module()
    sa = ref_lib.segment_anything()
    torch.manual_seed(0)
    if args.quick:
        ref = ref_lib.build_tiny(seed=0, randomize_all=False)
        model = sam_model.from_preset("sam-tiny")
        image_shape = (48, 64, 3)
    else:
        ref = sa.sam_model_registry["vit_b"](checkpoint=None).eval()
        model = sam_model.from_preset("sam-vit-b")
        image_shape = (768, 1024, 3)
    variables = sam_convert.sam_variables_from_torch(ref.state_dict(), model)
    variables = jax.device_put(variables)
    image = np.random.default_rng(0).integers(0, 256, image_shape, dtype=np.uint8)
    h, w = image_shape[:2]
    point, label = np.array([[0.4 * w, 0.55 * h]]), np.array([1])

    theirs, ours = sa.SamPredictor(ref), SamPredictor(model, variables)
    theirs.set_image(image)
    emb = ours.embed(image)
    want = theirs.features.permute(0, 2, 3, 1).numpy()
    print(f"embedding max abs diff {np.abs(np.asarray(emb) - want).max():.2e}", flush=True)
    a = theirs.predict(point, label, return_logits=True)
    b = ours.predict(point, label, return_logits=True)
    print(
        f"mask logits max abs diff {np.abs(a[0] - b[0]).max():.2e}, "
        f"IoU {np.abs(a[1] - b[1]).max():.2e}",
        flush=True,
    )

    def embed_ours(n: int) -> float:
        for _ in range(n):
            jax.block_until_ready(ours.embed(image))
        return 0.0

    def embed_theirs(n: int) -> float:
        for _ in range(n):
            theirs.set_image(image)
        return 0.0

    def prompt_ours(n: int) -> float:
        for _ in range(n):
            ours.predict(point, label)
        return 0.0

    def prompt_theirs(n: int) -> float:
        for _ in range(n):
            theirs.predict(point, label)
        return 0.0

    rounds = args.rounds or (2 if args.quick else 5)
    print("embed (set_image / embed), s per call:", flush=True)
    sides = {"ours": embed_ours, "torch": embed_theirs}
    warm_up(sides, max_rounds=2, steps=1)
    wall, _ = alternate(sides, rounds, 1, label="embed round")
    embed = {k: statistics.median(v) for k, v in wall.items()}
    print("prompt (one point, 3 masks at the original size), s per call:", flush=True)
    sides = {"ours": prompt_ours, "torch": prompt_theirs}
    warm_up(sides, max_rounds=2, steps=5)
    wall, _ = alternate(sides, rounds, 20, label="prompt round")
    prompt = {k: statistics.median(v) for k, v in wall.items()}
    print(
        f"embed ours {embed['ours']:.3f}s torch {embed['torch']:.3f}s; "
        f"prompt ours {1e3 * prompt['ours']:.2f}ms torch {1e3 * prompt['torch']:.2f}ms"
    )
    print(
        f"RESULT embed_ratio_vs_torch={embed['ours'] / embed['torch']:.3f} "
        f"prompt_ratio_vs_torch={prompt['ours'] / prompt['torch']:.3f} "
        f"prompt_ms={1e3 * prompt['ours']:.2f}"
    )


if __name__ == "__main__":
    main()
