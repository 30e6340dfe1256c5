"""``python -m experiments.zoo`` lists every preset once with its exact parameter count."""

from experiments import zoo
from nlp import gpt
from vision import swin, vit


def test_zoo_lists_every_preset_once():
    rows = dict(zoo.presets())
    assert set(gpt.PRESETS) | set(vit.PRESETS) | set(swin.PRESETS) <= set(rows)
    assert rows["vit-b/16"] == 86_567_656  # ViTForImageClassification, 1000 classes
    assert rows["swin-t"] == 28_288_354  # SwinForImageClassification
    assert rows["gpt2-small"] == 124_439_808  # GPT2LMHeadModel, tied head counted once
    assert rows["gpt1"] == 116_534_784  # OpenAIGPTLMHeadModel


def test_zoo_prints_tab_separated_lines(capsys):
    zoo.main(["zoo", "gpt2-"])
    lines = capsys.readouterr().out.strip().split("\n")
    assert [line.split("\t")[0] for line in lines] == [
        "gpt2-small",
        "gpt2-medium",
        "gpt2-large",
        "gpt2-xl",
    ]
    assert all(line.split("\t")[1].isdigit() for line in lines)
