"""``python -m tools.zoo`` lists every preset once with its exact parameter count, and
the vision presets with XLA's forward FLOPs (checked against a matmul count by hand and the
Swin paper's published figure)."""

import pytest

from diffusion import unet as ddpm_unet
from nlp import bert, gpt, long_lm, sparse_transformer, transformer
from tools import zoo
from vision import clip, swin, vit
from vision.sam import model as sam

MODULES = (gpt, sparse_transformer, long_lm, transformer, bert, vit, swin, clip, sam, ddpm_unet)


@pytest.mark.slow
def test_zoo_lists_every_preset_once():
    listed = list(zoo.presets())
    rows = dict(listed)
    assert len(rows) == len(listed)
    assert set(rows) == {name for module in MODULES for name in module.PRESETS}
    assert rows["vit-b/16"] == 86_567_656  # ViTForImageClassification, 1000 classes
    assert rows["swin-t"] == 28_288_354  # SwinForImageClassification
    assert rows["gpt2-small"] == 124_439_808  # GPT2LMHeadModel, tied head counted once
    assert rows["gpt1"] == 116_534_784  # OpenAIGPTLMHeadModel
    assert rows["clip-vit-b/32"] == 151_277_313  # CLIPModel (openai/clip-vit-base-patch32)
    assert rows["clip-vit-l/14"] == 427_616_513  # CLIPModel (openai/clip-vit-large-patch14)
    # segment_anything's Sam: image encoder + prompt encoder (6,220) + mask decoder (4,058,340)
    assert rows["sam-vit-b"] == 93_735_472
    assert rows["sam-vit-h"] == 641_090_608
    assert rows["ddpm-cifar10"] == 35_746_307  # diffusers UNet2DModel, google/ddpm-cifar10-32


def _vit_macs(image: int, patch: int, layers: int, d: int, d_ff: int, classes: int) -> int:
    """Multiply-adds of ViT's matmuls and convolution, counted by hand."""
    n = (image // patch) ** 2  # patches
    t = n + 1  # tokens with the class token
    embed = n * patch * patch * 3 * d
    block = t * (4 * d * d + 2 * d * d_ff) + 2 * t * t * d  # qkv+out, MLP, scores and mix
    return embed + layers * block + d * classes


def test_vision_flops_from_xla_cost_analysis():
    rows = {name: fl for name, _, fl in zoo.rows("vit-b/16")}
    by_hand = _vit_macs(224, 16, 12, 768, 3072, 1000)  # 17.56 G
    # XLA adds the elementwise work (softmax, LayerNorm, GELU): within 3% of the matmuls.
    assert by_hand <= rows["vit-b/16"] / 2 <= 1.03 * by_hand
    swin_t = {name: fl for name, _, fl in zoo.rows("swin-t")}
    assert set(swin_t) == {"swin-t", "swin-t-384", "swin-toy"}
    # Swin paper table 1: Swin-T at 224 is 4.5 G multiply-adds (ours: 4.71 G with the
    # elementwise work included).
    assert swin_t["swin-t"] / 2 == pytest.approx(4.5e9, rel=0.06)
    assert swin_t["swin-t-384"] > 3 * swin_t["swin-t"]  # (384/224)^2 = 2.9x the tokens
    assert [fl for _, _, fl in zoo.rows("gpt2-small")] == [None]  # not a vision preset


def test_zoo_prints_tab_separated_lines(capsys):
    zoo.main(["zoo", "gpt2-"])
    lines = capsys.readouterr().out.strip().split("\n")
    assert [line.split("\t")[0] for line in lines] == [
        "gpt2-small",
        "gpt2-medium",
        "gpt2-large",
        "gpt2-xl",
    ]
    assert all(len(line.split("\t")) == 2 and line.split("\t")[1].isdigit() for line in lines)
    zoo.main(["zoo", "clip-tiny"])
    name, count, flops, macs = capsys.readouterr().out.strip().split("\t")
    assert (name, int(count)) == ("clip-tiny", 70_945)
    assert int(macs) == int(flops) // 2 > 0
    zoo.main(["zoo", "clip-tiny", "--no-flops"])
    assert capsys.readouterr().out.strip() == "clip-tiny\t70945"
