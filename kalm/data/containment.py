"""Find evaluation texts that appear whole inside longer training texts (containment).

An evaluation passage pasted into a long training document has a low Jaccard similarity with it,
so the MinHash/LSH near-copy check (``kalm.data.decontaminate.NearIndex``) misses it. This index catches
it exactly: a training text contains evaluation text ``E`` (both normalised with
``kalm.text.dedup_key``) when ``E`` is a substring of it and ``len(E) >= min_chars``; shorter
evaluation texts are left to the exact and near checks, since a short phrase ("the capital of
France") legitimately recurs in training data.

How: if ``E`` occurs in ``T`` then ``E``'s first ``W = min_chars`` characters occur there too, so
each evaluation text is keyed by the hash of its first ``W`` characters (8 bytes per text, which
scales to MTEB's million-passage corpora where an Aho-Corasick automaton over whole texts would
not), every ``W``-character window of a batch of training texts is hashed at once with a
polynomial rolling hash in numpy, windows whose hash is an anchor are looked up, and each candidate
is confirmed with ``str.startswith`` at its position: a hash collision never drops a record.

Hash: ``h(s) = sum_j code(s[j]) * B**j mod 2**64`` (uint64 arithmetic wraps, B odd so it is
invertible); the window at ``i`` is ``(P[i+W] - P[i]) * B**-i`` with ``P`` the prefix sums of
``code * B**k`` (Karp and Rabin, "Efficient randomized pattern-matching algorithms", 1987).
"""

from __future__ import annotations

import numpy as np

_BASE = 0x9E3779B97F4A7C15  # odd: invertible modulo 2**64
_BASE_INV = pow(_BASE, -1, 2**64)


def _powers(base: int, n: int) -> np.ndarray:
    out = np.empty(n, dtype=np.uint64)
    out[0] = 1
    if n > 1:
        out[1:] = base
        np.multiply.accumulate(out, out=out)  # wraps modulo 2**64, as intended
    return out


def _codes(texts: list[str]) -> np.ndarray:
    """Code points of the texts, concatenated (a lone surrogate, which JSON allows, is a code point too)."""
    return np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)


def window_hashes(codes: np.ndarray, width: int) -> np.ndarray:
    """Hash of every ``width``-long window of ``codes`` (uint64 code points): ``len - width + 1`` values."""
    n = len(codes)
    if n < width:
        return np.empty(0, dtype=np.uint64)
    prefix = np.zeros(n + 1, dtype=np.uint64)
    np.cumsum(codes * _powers(_BASE, n), out=prefix[1:])
    starts = n - width + 1
    return (prefix[width:] - prefix[:starts]) * _powers(_BASE_INV, starts)


class ContainmentIndex:
    """Evaluation texts of at least ``min_chars`` characters, searchable inside longer texts.

    ``texts`` is any sequence of strings (a list, or kalm.data.decontaminate's memory-mapped texts);
    ``arrays``: the ``anchors`` and ``anchor_ids`` of :meth:`arrays`, saved by an earlier build (so
    a shard job memory-maps them instead of hashing every evaluation text again)."""

    def __init__(self, texts, owners, min_chars: int, arrays: dict[str, np.ndarray] | None = None):
        if min_chars < 1:
            raise ValueError(f"min_chars must be >= 1, got {min_chars}")
        self.width, self.texts, self.owners = min_chars, texts, owners
        if arrays is not None:
            self.anchors, self.anchor_ids = arrays["anchors"], arrays["anchor_ids"]
            return
        long_ = np.array([i for i in range(len(texts)) if len(texts[i]) >= min_chars], dtype=np.int64)
        # the prefixes are all min_chars long: hash them in one pass, every min_chars-th window
        anchors = window_hashes(_codes([texts[i][:min_chars] for i in long_.tolist()]), min_chars)[::min_chars]
        order = np.argsort(anchors, kind="stable")
        self.anchors, self.anchor_ids = anchors[order], long_[order]

    def arrays(self) -> dict[str, np.ndarray]:
        """What a rebuild from the same texts would compute: save these, pass them back as ``arrays``."""
        return {"anchors": self.anchors, "anchor_ids": self.anchor_ids}

    def __len__(self) -> int:
        """How many evaluation texts are long enough to be searched."""
        return len(self.anchors)

    def query(self, texts: list[str]) -> list[list[int]]:
        """For each text, the indices (into the evaluation texts given to the constructor) of those it
        contains and is longer than (a text equal to an evaluation text is the exact check's business)."""
        out: list[list[int]] = [[] for _ in texts]
        if not len(self.anchors) or not texts:
            return out
        lengths = np.array([len(t) for t in texts], dtype=np.int64)
        ends = np.cumsum(lengths)
        hashes = window_hashes(_codes(texts), self.width)
        if not len(hashes):
            return out
        lo = np.searchsorted(self.anchors, hashes, side="left")
        found = np.flatnonzero(self.anchors[np.minimum(lo, len(self.anchors) - 1)] == hashes)
        hi = np.zeros_like(lo)
        hi[found] = np.searchsorted(self.anchors, hashes[found], side="right")
        owner = np.searchsorted(ends, found, side="right")  # the text each window starts in
        start = found - (ends - lengths)[owner]
        inside = start + self.width <= lengths[owner]  # not running into the next text
        for pos, t, s in zip(found[inside].tolist(), owner[inside].tolist(), start[inside].tolist()):
            text = texts[t]
            for e in self.anchor_ids[lo[pos] : hi[pos]].tolist():
                ev = self.texts[e]
                if len(text) > len(ev) and text.startswith(ev, s) and e not in out[t]:
                    out[t].append(e)
        return out
