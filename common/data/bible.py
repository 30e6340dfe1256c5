"""Verse-aligned English-Spanish Bible as a tfds dataset, read offline through `diatheke`.

Sources (both public domain, Debian packages): the World English Bible (SWORD module
`engWEB2015eb`, package `sword-text-web`) and the Reina-Valera 1909 (`spaRV1909eb`, package
`sword-text-sparv`), printed by the SWORD front end `diatheke` (package `diatheke`):

    diatheke -b engWEB2015eb -k "Gen 1:1 - Rev 22:21"

prints one line per verse, `Book c:v: text`, the text carrying OSIS markup (`<w
savlm="strong:...">word</w>`, poetry lines `<l .../>`, paragraphs `<div .../>`). `clean_text`
strips the markup; `parse_verses` reads the lines; `align` pairs the two Bibles on the
reference. The `bible_en_es` builder stores one example per verse pair with the features
`en`, `es`, `book`, `ref` ("John 3:16"), `chapter`, `verse` and `index` (canonical order),
in canonical order (shuffling is disabled, so `index` equals the position in the split).

31,077 pairs (of 31,102 WEB and 31,102 RV verses in the 66 books). Splits hold out WHOLE
BOOKS, fixed here and shared by every experiment on this corpus (the
encoder-decoder translation of Vaswani et al. and the decoder-only T-D / T-DMCA of Liu et al.):

    test         TEST_BOOKS        Ruth, Lamentations, Jonah, John, Philippians   (1,269 pairs)
    validation   VALIDATION_BOOKS  Esther, Joel, Colossians, I Peter              (440 pairs)
    train        the other 57 books of the Protestant canon                       (29,368 pairs)

chosen to cover narrative, poetry, prophecy, gospel and epistle in both splits; John rather
than a synoptic gospel so that test verses have no near-copies in Matthew/Luke in training.

Known imperfections of the source, kept as they are: the WEB module also holds the
deuterocanonical books, which the RV 1909 lacks (they are dropped: only `BOOKS` are read);
diatheke prints the WEB's Psalm superscriptions ("A Psalm by David.") before verse 1 and
repeats them stale before later verses, so they are dropped, while the RV 1909 has them
inside verse 1 (~115 Psalms verse-1 pairs carry a Spanish title without its English one);
~180 WEB words lack their separating space in the markup (`God</w><w ...>created`, `only
born</q><q marker=""><w ...>Son`), restored here by putting a space between adjacent `<w>` /
`<q>` elements; the WEB's glossary, printed after Revelation 22:21, is cut at the end-of-book
marker. Where the RV 1909 merges two verses into one (e.g. Jonah 1:17 into 2:1), the empty
verse is dropped.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from collections.abc import Iterator

from common.data.tfds_io import as_str, tf, tfds

EN_MODULE = "engWEB2015eb"  # World English Bible (Debian sword-text-web)
ES_MODULE = "spaRV1909eb"  # Reina-Valera 1909 (Debian sword-text-sparv)
MODULE_PACKAGES = {EN_MODULE: "sword-text-web", ES_MODULE: "sword-text-sparv"}
APT_PACKAGES = ("diatheke", "sword-text-web", "sword-text-sparv")
INSTALL_HINT = "apt-get install -y " + " ".join(APT_PACKAGES)
RANGE = "Gen 1:1 - Rev 22:21"

# The 66 books of the Protestant canon, in order, as diatheke's English locale names them.
BOOKS: tuple[str, ...] = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "I Samuel", "II Samuel", "I Kings", "II Kings", "I Chronicles", "II Chronicles", "Ezra",
    "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon",
    "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos",
    "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah",
    "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "I Corinthians",
    "II Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians",
    "I Thessalonians", "II Thessalonians", "I Timothy", "II Timothy", "Titus", "Philemon",
    "Hebrews", "James", "I Peter", "II Peter", "I John", "II John", "III John", "Jude",
    "Revelation of John",
)  # fmt: skip
# Whole books held out; every other book of BOOKS is `train`.
TEST_BOOKS: tuple[str, ...] = ("Ruth", "Lamentations", "Jonah", "John", "Philippians")
VALIDATION_BOOKS: tuple[str, ...] = ("Esther", "Joel", "Colossians", "I Peter")
SPLITS: tuple[str, ...] = ("train", "validation", "test")

# A verse line: optional pre-verse markup (headings), then `Book c:v: ` and the text.
_VERSE = re.compile(
    r"^(?P<pre>.*?)(?P<book>[^<>:]+?) (?P<chapter>\d+):(?P<verse>\d+): (?P<text>.*)$"
)
_BREAK_TAGS = re.compile(r"<(?:l|lb|lg|div|item|/item|list|/list|milestone|chapter)\b[^>]*>")
_TAG = re.compile(r"<[^>]*>")
_STRONGS = re.compile(r"<[GH]\d+>")  # Strong's numbers, as `-f plain -o n` would print them
_SPACE = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r" (?=[,.;:!?)])")
# Adjacent word / quotation elements with no space between them in the markup.
_ADJACENT = re.compile(r"(</(?:w|q)>)(?=<(?:w|q)[\s>])")
# The end of a book: what follows (the WEB's glossary after Revelation) is not verse text.
_BOOK_END = re.compile(r"<div\b[^>]*\btype=\"book\"[^>]*>")


def book_split(book: str) -> str:
    """The split of a whole book: `test`, `validation` or `train`."""
    if book not in BOOKS:
        raise ValueError(f"{book!r} is not one of the 66 books of BOOKS")
    if book in TEST_BOOKS:
        return "test"
    if book in VALIDATION_BOOKS:
        return "validation"
    return "train"


@dataclasses.dataclass(frozen=True)
class Verse:
    book: str
    chapter: int
    verse: int
    text: str

    @property
    def ref(self) -> str:
        return f"{self.book} {self.chapter}:{self.verse}"


def clean_text(markup: str) -> str:
    """Plain text of one verse's OSIS markup: anything after an end-of-book marker dropped,
    tags removed, adjacent `<w>` / `<q>` elements and poetry lines separated by one space,
    whitespace collapsed."""
    text = _BOOK_END.split(markup, maxsplit=1)[0]
    text = _ADJACENT.sub(r"\1 ", text)
    text = _BREAK_TAGS.sub(" ", text)
    text = _STRONGS.sub("", text)
    text = _TAG.sub("", text)
    text = _SPACE.sub(" ", text).strip()
    return _SPACE_BEFORE_PUNCT.sub("", text)


def parse_verses(output: str, module: str = "?") -> list[Verse]:
    """Verses of `BOOKS` in diatheke's output, in order; other books (the WEB's deuterocanon)
    are skipped. Raises ValueError on a repeated reference (a misformatted output)."""
    verses, seen = [], set()
    for line in output.splitlines():
        m = _VERSE.match(line)
        if m is None or m.group("book").strip() not in BOOKS:
            continue
        v = Verse(
            m.group("book").strip(),
            int(m.group("chapter")),
            int(m.group("verse")),
            clean_text(m.group("text")),
        )
        if v.ref in seen:
            raise ValueError(f"module {module}: verse {v.ref} appears twice in diatheke's output")
        seen.add(v.ref)
        verses.append(v)
    return verses


def run_diatheke(module: str, key: str = RANGE) -> str:
    """diatheke's output for `module` over `key` (raw OSIS lines, one per verse)."""
    exe = shutil.which("diatheke")
    if exe is None:
        raise FileNotFoundError(
            f"`diatheke` (the SWORD Bible reader) is not installed; install it and the two "
            f"Bibles with `{INSTALL_HINT}` (or `make install`)."
        )
    out = subprocess.run(
        [exe, "-b", module, "-k", key], capture_output=True, text=True, encoding="utf-8"
    )
    if out.returncode != 0:
        raise RuntimeError(f"diatheke -b {module} failed ({out.returncode}): {out.stderr[-500:]}")
    return out.stdout


@dataclasses.dataclass(frozen=True)
class Pair:
    book: str
    chapter: int
    verse: int
    en: str
    es: str
    index: int  # position in canonical order among the aligned pairs

    @property
    def ref(self) -> str:
        return f"{self.book} {self.chapter}:{self.verse}"


def align(en: list[Verse], es: list[Verse], min_overlap: float = 0.95) -> list[Pair]:
    """Pairs the verses of two Bibles on their `Book c:v` reference, in canonical order.

    Verses present on one side only, or empty on either side, are dropped. Raises ValueError
    when a side has no verses (an empty corpus) or when fewer than `min_overlap` of either
    side's references have a partner (a misaligned corpus: another versification, another
    locale's book names, or the wrong module).
    """
    for name, side, module in (("English", en, EN_MODULE), ("Spanish", es, ES_MODULE)):
        if not side:
            raise ValueError(
                f"empty corpus: the {name} side ({module}) has no verses of the 66 books; is "
                f"its SWORD module installed? (`apt-get install -y {MODULE_PACKAGES[module]}`)"
            )
    es_by_ref = {v.ref: v for v in es}
    common = [v.ref for v in en if v.ref in es_by_ref]
    for name, side in (("English", en), ("Spanish", es)):
        if len(common) < min_overlap * len(side):
            missing = [v.ref for v in side if v.ref not in set(common)][:5]
            raise ValueError(
                f"misaligned corpus: only {len(common)} of the {len(side)} {name} verse "
                f"references have a partner on the other side (need {min_overlap:.0%}); "
                f"unpaired, e.g. {missing}"
            )
    key = {b: i for i, b in enumerate(BOOKS)}
    en_sorted = sorted(en, key=lambda v: (key[v.book], v.chapter, v.verse))
    pairs = []
    for v in en_sorted:
        w = es_by_ref.get(v.ref)
        if w is None or not v.text or not w.text:
            continue
        pairs.append(Pair(v.book, v.chapter, v.verse, v.text, w.text, len(pairs)))
    return pairs


def read_pairs() -> list[Pair]:
    """All aligned verse pairs, read through diatheke (both Bibles in full: seconds)."""
    en = parse_verses(run_diatheke(EN_MODULE), EN_MODULE)
    es = parse_verses(run_diatheke(ES_MODULE), ES_MODULE)
    return align(en, es)


class BibleEnEs(tfds.core.GeneratorBasedBuilder):
    """tfds builder `bible_en_es`: one example per aligned verse, split by whole books."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "WEB (engWEB2015eb) and RV 1909 (spaRV1909eb) via diatheke."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "en": tfds.features.Text(),
                    "es": tfds.features.Text(),
                    "book": tfds.features.Text(),
                    "ref": tfds.features.Text(),
                    "chapter": tf.int32,
                    "verse": tf.int32,
                    "index": tf.int32,  # canonical position among all pairs
                }
            ),
            homepage="https://crosswire.org/sword/",
            disable_shuffling=True,  # canonical order: consecutive verses stay consecutive
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """Reads both Bibles through diatheke; downloads nothing."""
        del dl_manager  # Local packages only.
        pairs = read_pairs()
        by_split = {s: [p for p in pairs if book_split(p.book) == s] for s in SPLITS}
        for split, books in (("test", TEST_BOOKS), ("validation", VALIDATION_BOOKS)):
            missing = sorted(set(books) - {p.book for p in by_split[split]})
            if missing:
                raise ValueError(f"held-out {split} books {missing} have no aligned verses")
        return {s: self._generate_examples(by_split[s]) for s in SPLITS}

    def _generate_examples(self, pairs: list[Pair]) -> Iterator[tuple[int, dict]]:
        for p in pairs:
            yield (
                p.index,
                {
                    "en": p.en,
                    "es": p.es,
                    "book": p.book,
                    "ref": p.ref,
                    "chapter": p.chapter,
                    "verse": p.verse,
                    "index": p.index,
                },
            )


def load_examples(split: str, data_dir: str | None = None) -> list[dict]:
    """The verse pairs of `split` as dicts (`en`, `es`, `book`, `ref`, `chapter`, `verse`,
    `index`) in canonical order. Prepares `bible_en_es` (array_record, once) into
    `data_dir` on first use; `None` means tfds's default data dir. `split` is any tfds split
    string over `train`, `validation`, `test` (e.g. `"test[:100]"`)."""
    builder = BibleEnEs(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(file_format="array_record")
    source = builder.as_data_source(split=split)
    out = []
    for i in range(len(source)):
        ex = source[i]
        out.append(
            {
                **{k: as_str(ex[k]) for k in ("en", "es", "book", "ref")},
                **{k: int(ex[k]) for k in ("chapter", "verse", "index")},
            }
        )
    return sorted(out, key=lambda e: e["index"])


def load_pairs(split: str, data_dir: str | None = None) -> list[tuple[str, str]]:
    """`(english, spanish)` verse pairs of `split`, in canonical order."""
    return [(e["en"], e["es"]) for e in load_examples(split, data_dir)]
