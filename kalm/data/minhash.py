"""Vectorised MinHash signatures and LSH banding in numpy (no per-shingle Python loop).

Why our own numpy MinHash rather than a library (measured by ``scripts/bench_dedup.py``; figures
and date in docs/benchmarks.md, "Near-dup library choice"): datasketch's ``MinHash`` hashes every shingle with SHA-1 and then
updates ``num_perm`` permutations, one Python call per shingle (or per text with ``update_batch``),
and ``MinHashLSH`` keeps Python dicts of band tuples per record. Here a whole batch of texts is one
array of code points; the k-character shingles of every text are hashed with k vector operations;
one-permutation hashing with optimal densification turns each shingle hash into one (bin, value)
pair, so the cost is O(shingles), not O(shingles x num_perm); the band index is one ``uint64``
key per band per record, sorted by numpy, and only records that collide in a band reach Python.
rensa (Rust, ``RMinHash``) is measured beside it in the benchmark when installed.

Measured 2026-11-23 (2 CPU cores, 200,000 bilingual records, threshold 0.8, 128 permutations):
MinHash + LSH alone, kalm 28,260 records/s, rensa 0.5.0 12,558, datasketch 2.0 ``update_batch``
1,409, plain datasketch 263; end to end with JSON reading/writing, kalm 8,405 vs plain datasketch
256 (32.8x) at recall 0.958 vs 0.868 of the planted pairs. rensa is level end to end (JSON dominates)
but its LSH drops unverified candidates and its signatures are per-record Python objects; ours are
``.npy`` arrays that the sharded Snakemake jobs (``kalm.data.near_dedup``) hand over on disk and
memory-map, with no extra dependency.

Definitions (fixed, so that signatures written by one job compare with another job's):

- shingles: overlapping ``k``-character substrings of the text (character shingles, so Chinese
  needs no word segmentation); a text shorter than ``k`` is one shingle (padded with NULs).
- shingle hash: a polynomial hash of the code points mod 2**64, then a 64-bit finaliser.
- signature: ``uint32[num_perm]``, see :func:`signatures`. The fraction of equal positions of two
  signatures estimates the Jaccard similarity of their shingle sets.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

_M64 = (1 << 64) - 1
_BASE = np.uint64(0x100000001B3)  # FNV prime: spreads code points across the 64-bit word
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


_EMPTY = np.uint32(0xFFFFFFFF)
_DENSIFY_STEPS = 4096


def shingle_hashes(texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (hashes uint64[S], counts int64[len(texts)]) of every text's k-shingles, text by text."""
    if k < 1:
        raise ValueError("shingle size must be >= 1")
    pad = "\0" * k  # at least k NULs after each text: short (even empty) texts stay inside their own padding
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    joined = pad.join(texts) + pad
    cps = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    starts = np.zeros(len(texts), dtype=np.int64)
    if len(texts) > 1:
        starts[1:] = np.cumsum(lengths[:-1] + k)
    counts = np.maximum(lengths - k + 1, 1)
    total = int(counts.sum())
    # index of each shingle's first code point: starts[i] + 0..counts[i]-1
    offsets = np.repeat(starts - (np.cumsum(counts) - counts), counts) + np.arange(total, dtype=np.int64)
    with np.errstate(over="ignore"):
        h = np.zeros(total, dtype=np.uint64)
        for j in range(k):
            h = h * _BASE + cps[offsets + j] + np.uint64(1)
        # splitmix64 finaliser: the low and high bits both depend on every code point
        h ^= h >> np.uint64(30)
        h *= _MIX1
        h ^= h >> np.uint64(27)
        h *= _MIX2
        h ^= h >> np.uint64(31)
    return h, counts


@functools.lru_cache(maxsize=8)
def _densify_table(num_perm: int, seed: int) -> np.ndarray:
    """probe[t, j]: the bin that empty bin j copies from at attempt t (the same for every text)."""
    return np.random.default_rng(seed).integers(0, num_perm, size=(_DENSIFY_STEPS, num_perm))


def signatures(texts: Sequence[str], num_perm: int = 128, k: int = 5, seed: int = 1) -> np.ndarray:
    """MinHash signatures, ``uint32[len(texts), num_perm]`` (one-permutation hashing + densification).

    Each shingle hash is split into a bin (``h mod num_perm``) and a value (its high 32 bits); a
    text's signature holds the minimum value of each bin. Bins no shingle fell into are filled by
    optimal densification (Shrivastava, ICML 2017): empty bin j copies the value of bin
    ``probe[t, j]`` for the first attempt t that hits a non-empty bin, with ``probe`` fixed by
    ``seed``. Two texts then agree at a position with probability equal to their Jaccard
    similarity, as with ``num_perm`` independent permutations, at the cost of one hash per shingle.
    """
    n = len(texts)
    if not n:
        return np.empty((0, num_perm), dtype=np.uint32)
    h, counts = shingle_hashes(texts, k)
    if seed:
        with np.errstate(over="ignore"):
            h = (h ^ np.uint64(seed & _M64)) * _MIX1
            h ^= h >> np.uint64(29)
    text_id = np.repeat(np.arange(n, dtype=np.int64), counts)
    bins = (h % np.uint64(num_perm)).astype(np.int64)
    values = (h >> np.uint64(32)).astype(np.uint32)
    sig = np.full(n * num_perm, _EMPTY, dtype=np.uint32)
    np.minimum.at(sig, text_id * num_perm + bins, values)
    sig = sig.reshape(n, num_perm)
    orig = sig.copy()
    ei, ej = np.nonzero(orig == _EMPTY)
    if len(ei):
        probe = _densify_table(num_perm, seed)
        t = 0
        while len(ei):
            val = orig[ei, probe[t % _DENSIFY_STEPS, ej]]
            ok = val != _EMPTY
            sig[ei[ok], ej[ok]] = val[ok]
            ei, ej = ei[~ok], ej[~ok]
            t += 1
    return sig


@functools.lru_cache(maxsize=64)
def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.05, fn_weight: float = 0.95) -> tuple[int, int]:
    """(bands, rows) with bands*rows <= num_perm minimising the weighted false positive and false
    negative areas of the S-curve ``1-(1-s**r)**b`` around ``threshold`` (datasketch's criterion).

    The weights favour recall (datasketch's default is 0.5/0.5): every LSH candidate is verified
    against the threshold afterwards, so a false positive costs one signature comparison, while a
    false negative is a duplicate that stays. At threshold 0.8 and 128 permutations this gives
    16 bands x 8 rows: a pair at Jaccard 0.8 becomes a candidate with probability 0.95 (0.40 with
    9 x 13, the 0.5/0.5 choice), a pair at 0.5 with probability 0.06."""
    best, best_err = (1, num_perm), float("inf")
    s_lo = np.linspace(0.0, threshold, 200)
    s_hi = np.linspace(threshold, 1.0, 200)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - s_lo**r) ** b, s_lo)
            fn = np.trapezoid((1 - s_hi**r) ** b, s_hi)
            err = fp_weight * fp + fn_weight * fn
            if err < best_err:
                best, best_err = (b, r), err
    return best


def _band_coef(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1 << 63, size=rows, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def band_key(sigs: np.ndarray, band: int, rows: int, seed: int = 7) -> np.ndarray:
    """The uint64 key of one band of each record: a random linear hash of the band's ``rows``
    signature positions mod 2**64, plus the band number (so that bands never share keys). Equal to
    column ``band`` of :func:`band_keys`; a sharded job computes only the bands it owns."""
    if (band + 1) * rows > sigs.shape[1]:
        raise ValueError(
            f"band {band} of {rows} rows needs {(band + 1) * rows} permutations, signatures have {sigs.shape[1]}"
        )
    coef = _band_coef(rows, seed)
    with np.errstate(over="ignore"):
        block = np.asarray(sigs[:, band * rows : (band + 1) * rows]).astype(np.uint64)
        return (block * coef[None, :]).sum(axis=1, dtype=np.uint64) + np.uint64(band)


def band_keys(sigs: np.ndarray, bands: int, rows: int, seed: int = 7) -> np.ndarray:
    """One uint64 key per (record, band): :func:`band_key` of every band, ``uint64[n, bands]``."""
    if bands * rows > sigs.shape[1]:
        raise ValueError(
            f"{bands} bands x {rows} rows need {bands * rows} permutations, signatures have {sigs.shape[1]}"
        )
    keys = np.empty((sigs.shape[0], bands), dtype=np.uint64)
    for band in range(bands):
        keys[:, band] = band_key(sigs, band, rows, seed)
    return keys


def similarity(sig: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of one signature with each row of ``others``."""
    return (others == sig[None, :]).mean(axis=1)


def exact_jaccard(a: str, b: str, k: int) -> float:
    """Jaccard similarity of the k-character shingle sets (reference for tests and benchmarks)."""
    sa = {a[i : i + k] for i in range(max(len(a) - k + 1, 1))}
    sb = {b[i : i + k] for i in range(max(len(b) - k + 1, 1))}
    return len(sa & sb) / len(sa | sb)
