"""The Wikipedia XML sample inside the `gensim` wheel as a tfds dataset, enwik8-style.

`gensim==4.4.0` (LGPL; the text is CC-BY-SA) ships a shortened English Wikipedia dump,
`gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`:
206 `<page>` elements, 6.09 MB of raw XML and wiki markup. Like enwik8 (the first 10^8 bytes
of a dump, modelled byte by byte), each example here is the exact raw text of one `<page>`
element, from its indentation to the newline after `</page>`, so the concatenated articles
of a split are a contiguous stretch of the dump (the `<mediawiki>`/`<siteinfo>` header,
2.9 kB, and the closing tag are left out).

Splits follow enwik8's 90 / 5 / 5 cut of the byte stream, moved to article boundaries: an
article goes to the split in which its first byte falls, over the page bytes in file order:

    train        bytes [0, 90%)     190 articles, 5,486,106 bytes ("AccessibleComputing" ...)
    validation   bytes [90%, 95%)    10 articles,   322,051 bytes ("Amateur astronomy" ...
                                                                 "Abortion")
    test         bytes [95%, 100%]    6 articles,   278,661 bytes ("Abstract (law)" ...
                                                                 "Algorithm")

so no article is split across two splits. The builder (`wikipedia_xml_sample`) reads the
installed file; nothing touches the network. The package is installed with `--no-deps`
(`make install` does it) and is never imported: only its data file is read.
"""

from __future__ import annotations

import bz2
import importlib.util
import pathlib
import re
from collections.abc import Iterator

import numpy as np

from common.data.tfds_io import as_bytes, tfds

INSTALL_HINT = "pip install --no-deps gensim==4.4.0"
SAMPLE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
# Split boundaries as fractions of the page bytes (enwik8: 90M / 5M / 5M of 100M).
TRAIN_FRACTION, VALIDATION_FRACTION = 0.90, 0.05
SPLITS = ("train", "validation", "test")

_PAGE = re.compile(rb"[ \t]*<page>.*?</page>\n?", re.S)
_TITLE = re.compile(rb"<title>(.*?)</title>", re.S)
_ID = re.compile(rb"<id>(\d+)</id>")


def sample_path() -> pathlib.Path:
    """Returns the installed dump file, found without importing `gensim`."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The Wikipedia XML sample comes from the `gensim` package; install it: "
            f"`{INSTALL_HINT}`."
        )
    path = pathlib.Path(spec.submodule_search_locations[0]) / SAMPLE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `{INSTALL_HINT}`.")
    return path


def read_pages(path: pathlib.Path | None = None) -> list[bytes]:
    """The raw bytes of every `<page>` element of the dump, in file order."""
    data = bz2.decompress((path or sample_path()).read_bytes())
    pages = _PAGE.findall(data)
    if not pages:
        raise ValueError(f"no <page> elements in {path or sample_path()}")
    return pages


def split_of_pages(sizes: list[int]) -> list[str]:
    """The split of each article: where its first byte falls in the page byte stream."""
    total = sum(sizes)
    out, start = [], 0
    for size in sizes:
        if start < TRAIN_FRACTION * total:
            out.append("train")
        elif start < (TRAIN_FRACTION + VALIDATION_FRACTION) * total:
            out.append("validation")
        else:
            out.append("test")
        start += size
    return out


class WikipediaXmlSample(tfds.core.GeneratorBasedBuilder):
    """tfds builder `wikipedia_xml_sample`: one example per article (its raw XML), split by
    whole articles at 90 / 5 / 5 % of the bytes."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "206 articles of the gensim 4.4.0 enwiki sample."}

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "index": np.int32,  # position of the article in the dump
                    "id": np.int64,  # Wikipedia page id
                    "title": tfds.features.Text(),
                    "text": tfds.features.Text(),  # the raw <page> element, UTF-8
                }
            ),
            homepage="https://pypi.org/project/gensim/",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        """Assigns the articles to splits; downloads nothing."""
        del dl_manager  # Local file only.
        pages = read_pages()
        splits = split_of_pages([len(p) for p in pages])
        return {
            name: self._generate_examples(
                [(i, p) for i, (p, s) in enumerate(zip(pages, splits, strict=True)) if s == name]
            )
            for name in SPLITS
        }

    def _generate_examples(
        self, pages: list[tuple[int, bytes]]
    ) -> Iterator[tuple[int, dict[str, object]]]:
        for index, page in pages:
            title = _TITLE.search(page)
            page_id = _ID.search(page)
            yield (
                index,
                {
                    "index": index,
                    "id": int(page_id.group(1)) if page_id else -1,
                    "title": title.group(1).decode("utf-8") if title else "",
                    "text": page.decode("utf-8"),
                },
            )


def load_articles(split: str, data_dir: str | None = None) -> list[dict[str, object]]:
    """The articles of ``split`` as ``{"index", "id", "title", "text": bytes}``, in dump order.

    Prepares `wikipedia_xml_sample` (array_record) into ``data_dir`` on first use (``None``:
    tfds's default data dir). ``split`` is any tfds split string over train / validation /
    test.
    """
    builder = WikipediaXmlSample(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare(file_format="array_record")
    source = builder.as_data_source(split=split)
    articles = [
        {
            "index": int(ex["index"]),
            "id": int(ex["id"]),
            "title": as_bytes(ex["title"]).decode("utf-8"),
            "text": as_bytes(ex["text"]),
        }
        for ex in (source[i] for i in range(len(source)))
    ]
    return sorted(articles, key=lambda a: a["index"])


def load_bytes(split: str, data_dir: str | None = None) -> np.ndarray:
    """The raw bytes of ``split``'s articles, concatenated in dump order: ``uint8 [n]``."""
    return np.frombuffer(b"".join(a["text"] for a in load_articles(split, data_dir)), np.uint8)
