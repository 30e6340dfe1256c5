"""Outputs of the Bible translation experiments (``experiments.translate_bible``,
``experiments.bible_decoder_only``): every hypothesis next to its verse reference, a few
samples beside their source and reference (well-known verses first), and the BLEU lines
the experiments end with."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax

# Verses shown first among the samples when the test set holds them.
SAMPLE_REFS = ("John 3:16", "Ruth 1:16", "Jonah 1:1", "Lamentations 3:22", "Philippians 4:13")


def samples(examples: Sequence[Mapping[str, str]], hyps: Sequence[str], num: int) -> list[str]:
    """``num`` test verses (``SAMPLE_REFS`` first, then in order): reference id, English
    source, Spanish reference and the hypothesis."""
    by_ref = {e["ref"]: i for i, e in enumerate(examples)}
    picks = [by_ref[r] for r in SAMPLE_REFS if r in by_ref][:num]
    picks += [i for i in range(len(examples)) if i not in picks]
    return [
        f"{examples[i]['ref']}\n  en:  {examples[i]['en']}\n  es:  {examples[i]['es']}\n"
        f"  out: {hyps[i]}"
        for i in picks[:num]
    ]


def write_translations(
    workdir: str, examples: Sequence[Mapping[str, str]], hyps: Sequence[str], num_samples: int
) -> list[str]:
    """Write ``translations_test.txt`` (``ref<TAB>hypothesis`` per verse) and
    ``samples.txt`` (``samples``) into ``workdir``; returns the samples."""
    if len(examples) != len(hyps):
        raise ValueError(f"{len(hyps)} hypotheses for {len(examples)} test verses")
    with open(os.path.join(workdir, "translations_test.txt"), "w") as f:
        f.write("".join(f"{e['ref']}\t{h}\n" for e, h in zip(examples, hyps, strict=True)))
    picked = samples(examples, hyps, num_samples)
    with open(os.path.join(workdir, "samples.txt"), "w") as f:
        f.write("\n\n".join(picked) + "\n")
    return picked


def report(
    workdir: str,
    examples: Sequence[Mapping[str, str]],
    hyps: Sequence[str],
    bleu: Mapping[str, Any],
    *,
    num_samples: int,
    how: str,
) -> None:
    """On process 0: ``write_translations``, print the samples, then ``<how>: <BLEU
    detail>``, and last ``bleu=<score>`` and ``sacrebleu_signature=<signature>``
    (``bleu``: ``common.evaluation.corpus_bleu``'s result)."""
    if jax.process_index() != 0:
        return
    print("\n".join(write_translations(workdir, examples, hyps, num_samples)))
    print(f"{how}: {bleu['bleu_detail']}")
    print(f"bleu={bleu['bleu']:.2f}")
    print(f"sacrebleu_signature={bleu['sacrebleu_signature']}", flush=True)
