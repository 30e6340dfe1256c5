"""CLIP on real Fashion-MNIST images with template captions: a smoke run learns zero-shot
classification with prompt templates it never saw, far above the 10% of chance; the
template and label-space checks refuse bad setups; the trainer's optimizer clamps the
temperature parameter to [0, log 100] after each step."""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import optim
from common.data import fashion_mnist
from common.data.bpe import BPETokenizer
from common.data.classification import CaptionedImages
from experiments import clip_fashion_mnist as exp
from vision import clip

# The smoke config (120 steps of 64 pairs, 1-layer towers) scores 0.67 on 2,000 test images
# with the unseen templates (seed 0); chance is 0.10. The bound leaves room for other
# platforms' numerics while still proving the text and image towers learned to align.
ACCURACY_BOUND = 0.40


@pytest.mark.slow
def test_smoke_run_beats_chance_with_unseen_templates(tfds_dir, tmp_path, capsys):
    config = exp.get_config("smoke")
    config.data.data_dir = tfds_dir
    workdir = str(tmp_path / "run")
    summary = exp.main(config, workdir)
    assert summary["test_examples"] == 2000
    assert summary["zero_shot_accuracy"] >= ACCURACY_BOUND
    assert summary["zero_shot_accuracy_train_templates"] >= ACCURACY_BOUND
    with open(os.path.join(workdir, "results.json")) as f:
        assert json.load(f)["zero_shot_accuracy"] == summary["zero_shot_accuracy"]
    out = capsys.readouterr().out
    assert f"zero_shot_accuracy={summary['zero_shot_accuracy']:.4f}" in out.splitlines()[-1]
    assert os.path.exists(os.path.join(workdir, "checkpoints"))


def test_templates_are_unseen_and_class_names_match_the_labels(monkeypatch):
    exp.check_templates()
    assert not set(exp.TRAIN_TEMPLATES) & set(exp.TEST_TEMPLATES)
    monkeypatch.setattr(exp, "TEST_TEMPLATES", (*exp.TEST_TEMPLATES, exp.TRAIN_TEMPLATES[0]))
    with pytest.raises(ValueError, match="test templates also used in training"):
        exp.check_templates()
    monkeypatch.undo()
    monkeypatch.setattr(exp, "CAPTION_NAMES", exp.CAPTION_NAMES[:9])
    with pytest.raises(ValueError, match="9 caption class names for a label space of 10"):
        exp.check_templates()


def test_captions_and_batches():
    captions = [t.format(n) for t in exp.TRAIN_TEMPLATES for n in exp.CAPTION_NAMES]
    tok = BPETokenizer.train(captions, 300)
    tokenize = exp.make_tokenize(tok, 12)
    ids = tokenize(["a photo of a coat."])
    assert tok.decode(ids[0]).startswith("a photo of a coat.<|endoftext|>")
    assert ids[0, -1] == tok.eot_id
    with pytest.raises(ValueError, match="longer than data.context_length=12"):
        tokenize(["a very long caption about an ankle boot on a dark background."])
    table = np.stack([tokenize([t.format(n) for n in exp.CAPTION_NAMES]) for t in ("{}", "a {}.")])
    images = np.arange(5 * 28 * 28, dtype=np.uint8).reshape(5, 28, 28, 1)
    labels = np.array([0, 3, 9, 3, 1])
    data = CaptionedImages(images, labels, table, 4, seed=1, transform=fashion_mnist.normalize)
    b = next(data)
    assert b["images"].shape == (4, 28, 28, 1) and b["images"].dtype == np.float32
    for img, tokens in zip(b["images"], b["tokens"], strict=True):  # caption names its image
        i = int(np.argmin(np.abs(fashion_mnist.normalize(images) - img).reshape(5, -1).sum(1)))
        assert tok.decode(tokens).split("<|")[0] in {
            f"{exp.CAPTION_NAMES[labels[i]]}",
            f"a {exp.CAPTION_NAMES[labels[i]]}.",
        }
    state = data.get_state()
    again = CaptionedImages(images, labels, table, 4, seed=1, transform=fashion_mnist.normalize)
    again.set_state(state)
    np.testing.assert_array_equal(next(again)["tokens"], next(data)["tokens"])
    with pytest.raises(ValueError, match="label 9 has no caption"):
        CaptionedImages(images, labels, table[:, :5], batch_size=4)


def test_trainer_optimizer_clamps_the_logit_scale():
    """The launcher's optimizer, ``common.optim.adamw`` with ``clip.clamp_logit_scale`` as
    its ``project``: a step that would take ``logit_scale`` past log(100) stops there, other
    parameters take AdamW's step."""
    config = exp.get_config("smoke")
    config.optim.update(lr=0.1, warmup_steps=0, total_steps=10)
    tx, schedule = optim.adamw(config.optim, clip.clamp_logit_scale(100.0))
    plain, _ = optim.adamw(config.optim)
    params = {"logit_scale": jnp.float32(4.6), "w": jnp.ones((2, 2))}
    grads = {"logit_scale": jnp.float32(-1.0), "w": jnp.full((2, 2), 0.5)}
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    unclamped = optax.apply_updates(params, plain.update(grads, plain.init(params), params)[0])
    assert float(unclamped["logit_scale"]) > math.log(100.0)
    assert float(new["logit_scale"]) == float(jnp.float32(math.log(100.0)))
    np.testing.assert_array_equal(new["w"], unclamped["w"])
    assert float(schedule(0)) == pytest.approx(0.1)
