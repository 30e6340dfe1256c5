"""Tests for the enwik8-style tfds builder over gensim's Wikipedia XML sample."""

from __future__ import annotations

import bz2
import importlib.util

import numpy as np
import pytest

from common.data import wikipedia


def test_missing_gensim_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps gensim==4\.4\.0"):
        wikipedia.sample_path()


def test_pages_are_the_raw_dump_between_header_and_footer():
    raw = bz2.decompress(wikipedia.sample_path().read_bytes())
    pages = wikipedia.read_pages()
    assert len(pages) == 206
    body = b"".join(pages)
    start = raw.index(b"  <page>")
    assert raw[start : start + len(body)] == body  # contiguous, byte for byte
    assert raw[start + len(body) :] == b"</mediawiki>\n"
    assert all(p.lstrip().startswith(b"<page>") and p.endswith(b"</page>\n") for p in pages)


def test_split_rule_is_where_the_first_byte_falls():
    sizes = [50, 30, 10, 5, 3, 2]  # total 100: starts 0, 50, 80, 90, 95, 98
    assert wikipedia.split_of_pages(sizes) == [
        "train",
        "train",
        "train",
        "validation",
        "test",
        "test",
    ]


@pytest.fixture(scope="module")
def splits(tfds_dir):
    return {s: wikipedia.load_articles(s, tfds_dir) for s in wikipedia.SPLITS}


def test_splits_hold_whole_articles_enwik8_style(splits, tfds_dir):
    pages = wikipedia.read_pages()
    counts = {name: len(arts) for name, arts in splits.items()}
    assert counts == {"train": 190, "validation": 10, "test": 6}
    indices = {name: [a["index"] for a in arts] for name, arts in splits.items()}
    # Contiguous stretches in dump order: train, then validation, then test.
    assert indices["train"] + indices["validation"] + indices["test"] == list(range(206))
    for name, arts in splits.items():
        for a in arts:
            assert a["text"] == pages[a["index"]], (name, a["title"])
    total = sum(len(p) for p in pages)
    val_start = sum(len(pages[i]) for i in indices["train"])
    test_start = val_start + sum(len(pages[i]) for i in indices["validation"])
    assert val_start >= 0.9 * total > val_start - len(pages[indices["train"][-1]])
    assert test_start >= 0.95 * total > test_start - len(pages[indices["validation"][-1]])
    assert splits["validation"][0]["title"] == "Amateur astronomy"
    assert [a["title"] for a in splits["test"]][-1] == "Algorithm"
    assert splits["train"][0]["title"] == "AccessibleComputing" and splits["train"][0]["id"] == 10


def test_load_bytes_concatenates_the_split(splits, tfds_dir):
    data = wikipedia.load_bytes("test", tfds_dir)
    assert data.dtype == np.uint8
    assert data.tobytes() == b"".join(a["text"] for a in splits["test"])
    assert len(data) == 278_661
    assert data.tobytes().decode("utf-8").count("<page>") == 6
