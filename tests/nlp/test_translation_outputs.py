"""The translation experiments' outputs: one line per test verse in order, samples led by
the well-known verses, and the closing BLEU lines."""

import pytest

from nlp import translation


def examples(refs):
    return [{"ref": r, "en": f"en {r}", "es": f"es {r}"} for r in refs]


def test_write_translations_and_samples(tmp_path):
    ex = examples(["Ruth 1:1", "Ruth 1:2", "Ruth 1:16", "John 3:16"])
    hyps = ["h0", "h1", "h2", "h3"]
    picked = translation.write_translations(str(tmp_path), ex, hyps, num_samples=3)
    lines = (tmp_path / "translations_test.txt").read_text().splitlines()
    assert lines == ["Ruth 1:1\th0", "Ruth 1:2\th1", "Ruth 1:16\th2", "John 3:16\th3"]
    # SAMPLE_REFS order (John 3:16 before Ruth 1:16), then the test order.
    assert [s.split("\n")[0] for s in picked] == ["John 3:16", "Ruth 1:16", "Ruth 1:1"]
    assert picked[0] == "John 3:16\n  en:  en John 3:16\n  es:  es John 3:16\n  out: h3"
    assert (tmp_path / "samples.txt").read_text() == "\n\n".join(picked) + "\n"
    with pytest.raises(ValueError, match="3 hypotheses for 4 test verses"):
        translation.write_translations(str(tmp_path), ex, hyps[:3], num_samples=1)


def test_report_ends_with_bleu_and_signature(tmp_path, capsys):
    bleu = {"bleu": 12.345, "sacrebleu_signature": "nrefs:1|x", "bleu_detail": "BLEU = 12.35"}
    translation.report(str(tmp_path), examples(["Jonah 1:1"]), ["h"], bleu, num_samples=1, how="t")
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-3:] == ["t: BLEU = 12.35", "bleu=12.35", "sacrebleu_signature=nrefs:1|x"]
    assert out[0] == "Jonah 1:1"
