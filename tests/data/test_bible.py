"""The verse-aligned WEB / RV 1909 corpus: real counts, known verses aligned in both
languages, whole books per split, and clear errors on an empty or misaligned corpus."""

import collections
import shutil

import pytest

from common.data import bible

pytestmark = pytest.mark.skipif(
    shutil.which("diatheke") is None, reason=f"diatheke missing: {bible.INSTALL_HINT}"
)


@pytest.fixture(scope="module")
def examples(tfds_dir):
    """All three splits, prepared once into the session's tfds dir (~30 s)."""
    return {s: bible.load_examples(s, tfds_dir) for s in bible.SPLITS}


def test_counts_and_whole_book_splits(examples):
    counts = {s: len(v) for s, v in examples.items()}
    # Measured: 31,077 pairs (31,102 verses per side; 25 verses empty on one side).
    assert counts == {"train": 29368, "validation": 440, "test": 1269}
    books = {s: {e["book"] for e in v} for s, v in examples.items()}
    assert books["test"] == set(bible.TEST_BOOKS)
    assert books["validation"] == set(bible.VALIDATION_BOOKS)
    assert len(books["train"]) == 66 - 9
    for a, b in (("train", "validation"), ("train", "test"), ("validation", "test")):
        assert not books[a] & books[b], (a, b, books[a] & books[b])
    indices = sorted(e["index"] for v in examples.values() for e in v)
    assert indices == list(range(31077))  # one canonical order over all splits
    for v in examples.values():
        assert all(e["en"] and e["es"] and "<" not in e["en"] + e["es"] for e in v)
        refs = [e["ref"] for e in v]
        assert len(set(refs)) == len(refs)


def test_known_verses_are_aligned(examples):
    by_ref = {e["ref"]: e for v in examples.values() for e in v}
    john = by_ref["John 3:16"]
    assert john["en"] == (
        "For God so loved the world, that he gave his only born Son, that whoever believes "
        "in him should not perish, but have eternal life."
    )
    assert john["es"] == (
        "Porque de tal manera amó Dios al mundo, que ha dado á su Hijo unigénito, para que "
        "todo aquel que en él cree, no se pierda, mas tenga vida eterna."
    )
    assert (john["book"], john["chapter"], john["verse"]) == ("John", 3, 16)
    assert john in examples["test"]
    gen = by_ref["Genesis 1:1"]
    # The markup has no space in "God</w><w ...>created"; clean_text restores it.
    assert gen["en"] == "In the beginning, God created the heavens and the earth."
    assert gen["es"] == "EN el principio crió Dios los cielos y la tierra."
    assert gen["index"] == 0
    rev = by_ref["Revelation of John 22:21"]  # the WEB's glossary after it is cut off
    assert rev["en"] == "The grace of the Lord Jesus Christ be with all the saints. Amen."


def test_load_pairs_matches_examples(examples, tfds_dir):
    pairs = bible.load_pairs("test[:3]", tfds_dir)
    assert pairs == [(e["en"], e["es"]) for e in examples["test"][:3]]
    assert examples["test"][0]["ref"] == "Ruth 1:1"


# ----------------------------------------------------------------------------- parsing


def test_clean_text_strips_markup():
    markup = (
        '<w savlm="strong:H0430">God</w><w savlm="strong:H1254">created</w> the '
        '<w savlm="x">earth</w>,<l eID="g1" level="1"/> <l level="2" sID="g2"/>and '
        '<q marker="">only born</q><q marker=""><w savlm="y">Son</w></q> . <G3588>'
        '<div eID="g3" type="book"/> The following words (a glossary)'
    )
    assert bible.clean_text(markup) == "God created the earth, and only born Son."


def test_parse_verses_reads_refs_and_skips_other_books():
    out = "\n".join(
        [
            "Genesis 1:1: In the beginning.",
            '<title type="psalm">Stale title</title> <l/>Psalms 3:2: Many <w s="1">say</w>.',
            "Tobit 1:1: Not in the 66 books.",
            "I Samuel 2:10: Text.",
            "(engWEB2015eb)",
        ]
    )
    verses = bible.parse_verses(out)
    assert [(v.ref, v.text) for v in verses] == [
        ("Genesis 1:1", "In the beginning."),
        ("Psalms 3:2", "Many say."),
        ("I Samuel 2:10", "Text."),
    ]
    with pytest.raises(ValueError, match="verse Genesis 1:1 appears twice"):
        bible.parse_verses("Genesis 1:1: a\nGenesis 1:1: b", "X")


# ----------------------------------------------------------------------------- bad input


def _verses(n, book="Genesis", text="t"):
    return [bible.Verse(book, 1, i + 1, text) for i in range(n)]


def test_align_drops_one_sided_and_empty_verses():
    en = _verses(40)
    es = _verses(39) + [bible.Verse("Exodus", 1, 1, "x")]
    es[3] = bible.Verse("Genesis", 1, 4, "")
    pairs = bible.align(en, es)
    assert [p.ref for p in pairs] == [f"Genesis 1:{i}" for i in range(1, 40) if i != 4]
    assert [p.index for p in pairs] == list(range(38))


def test_empty_corpus_is_a_clear_error():
    with pytest.raises(ValueError, match=r"empty corpus: the Spanish side \(spaRV1909eb\)"):
        bible.align(_verses(3), [])
    with pytest.raises(ValueError, match="apt-get install -y sword-text-web"):
        bible.align([], _verses(3))


def test_misaligned_corpus_is_a_clear_error():
    # Other book names (another locale) on one side: nothing pairs up.
    with pytest.raises(ValueError, match=r"misaligned corpus: only 0 of the 10 English"):
        bible.align(_verses(10), _verses(10, book="Exodus"))
    # Shifted verse numbers on half the verses.
    es = _verses(5) + [bible.Verse("Genesis", 2, i, "t") for i in range(5)]
    with pytest.raises(ValueError, match="only 5 of the 10"):
        bible.align(_verses(10), es)


def test_missing_diatheke_names_the_apt_command(monkeypatch):
    monkeypatch.setattr(bible.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install -y diatheke sword-text-web"):
        bible.run_diatheke(bible.EN_MODULE)


def test_split_of_every_book():
    splits = collections.Counter(bible.book_split(b) for b in bible.BOOKS)
    assert splits == {"train": 57, "validation": 4, "test": 5}
    with pytest.raises(ValueError, match="'Tobit' is not one of the 66 books"):
        bible.book_split("Tobit")
