"""Peak memory of ``BPETokenizer.encode`` on a long text (run by test_bpe.py, not collected).

usage: python tests/data/bpe_memory_worker.py MEGABYTES [--whole]

Builds MEGABYTES of play-like text (lines of pseudo-words, a blank line between speeches),
trains a 1000-id tokenizer on its first 50 kB, then encodes the whole text with
``encode`` (or, with ``--whole``, with one ``tokenizers`` call, as encode did before it
worked in chunks). Prints one JSON line: the peak resident memory the encode added over
the memory before it (Linux's VmHWM after resetting it through ``/proc/self/clear_refs``),
the size of the returned list of ids alone, and the token count.
"""

import json
import sys

import numpy as np

from common.data.bpe import BPETokenizer


def play_text(n_bytes: int) -> str:
    rng = np.random.default_rng(0)
    syllables = ["ro", "me", "o", "ju", "li", "et", "thou", "art", "the", "and", "to", "be", "lo"]
    words = ["".join(rng.choice(syllables, rng.integers(1, 4))) for _ in range(3000)]
    words += ["ROMEO:", "JULIET:", "I", "'tis", "o'er", ",", ".", "!", "?", "3", "1597"]
    picks = rng.integers(0, len(words), 200_000)  # about 1 MB of words, repeated below
    ends = np.cumsum(rng.integers(3, 12, len(picks)))
    spans = zip(ends[:-1], ends[1:], strict=True)
    lines = [" ".join(words[i] for i in picks[a:b]) for a, b in spans]
    breaks = ["\n\n" if r < 0.1 else "\n" for r in rng.random(len(lines))]
    block = "".join(line + br for line, br in zip(lines, breaks, strict=True) if line)
    return (block * (n_bytes // len(block) + 1))[:n_bytes]


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def main(megabytes: str, *flags: str) -> None:
    text = play_text(int(float(megabytes) * 1e6))
    tok = BPETokenizer.train([text[:50_000]], 1000)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak) to the current resident size
    before = rss_kib("VmRSS")
    if "--whole" in flags:
        ids = tok.tokenizer.encode(text, add_special_tokens=False).ids
    else:
        ids = tok.encode(text)
    peak = rss_kib("VmHWM")
    objects = {id(i): sys.getsizeof(i) for i in ids if i > 256}  # 0-256 are cached
    list_mib = (sys.getsizeof(ids) + sum(objects.values())) / 2**20
    print(
        json.dumps(
            {
                "megabytes": float(megabytes),
                "tokens": len(ids),
                "peak_added_mib": (peak - before) / 1024,
                "list_mib": list_mib,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
