"""The learned tier of the injection screen: hashed character and word n-grams
and a linear model.

Cheap by construction: a text is NFKC-folded and casefolded (UAX #15); its
character 3-, 4- and 5-grams and its word unigrams and bigrams (words are runs
of word characters) are hashed, vectorised in numpy, into :data:`DIMENSIONS` buckets,
and a logistic-regression weight vector trained by ``bench/train_injection.py``
(``make train-injection``) scores them. Character n-grams carry spelling and
other languages without a tokenizer; word n-grams carry phrasing.

Long texts are scanned at three scales (:data:`SCALES`): 1024-character
windows for long jailbreaks, 256- and 128-character windows so that one
instruction in a long document is less diluted; the highest window counts.
A window counts each distinct n-gram once (binary features, as training
computes them): a line that a log or a template repeats twenty times weighs
what it weighs once, where a sum of every occurrence grew with the square root
of the repetitions. Every feature sits at a position; one sort of the features
by bucket gives each its bucket's previous occurrence, and a window counts the
features whose previous occurrence lies before it, so every window of every
scale comes from a few counts per stride (n log n in the text's length).

A small layer over word vectors distilled from all-MiniLM-L6-v2 is fitted
with the n-grams at training time only: it shapes their weights and decays to
nearly a constant, which is folded into the bias (``bench/train_injection.py``).
Nothing but the n-gram weights ships.

The threshold is the one that keeps false positives at or under 1.5% on
*unseen* sources: chosen on out-of-fold scores, each training source group
scored by a model that never saw it (``bench/train_injection.py``).

Matrix products (in the cipher scoring of decoding.py) run on the calling
thread only (:func:`one_blas_thread`): a server screens many texts at once,
and BLAS helper threads per product only add contention — on a busy machine
they doubled the CPU time of screening some megabytes, for the same result.

The weights ship inside the package (``model/injection-ngram.npz``). They are
verified (format, shape, SHA-256) when loaded; a missing or corrupt file raises
:class:`ClassifierUnavailable` — at start-up, since :mod:`bastion.compose`
loads the model before serving — never a silent allow-all.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import unicodedata
import zipfile
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from threadpoolctl import ThreadpoolController

from bastion.errors import BastionError, Kind

FORMAT = "bastion-injection-ngram/6"
DIMENSIONS = 1 << 19
NGRAMS = (3, 4, 5)
WORD_NGRAMS = (1, 2)
WINDOW = 1024
STRIDE = 512
SCALES = ((WINDOW, STRIDE), (256, 128), (128, 64))
"""Window sizes and strides, in characters, of the scan: a long window for
long jailbreaks, short ones so that an instruction hidden in a long benign
document is less diluted by the document around it. (Adding the 128-character
scale raised out-of-fold detection from 65.8% to 72.6% at 1.5% false positives.)"""
MODEL_PATH = Path(__file__).parent / "model" / "injection-ngram.npz"
assert all(stride & (stride - 1) == 0 and size == 2 * stride for size, stride in SCALES)
_NONE_BEFORE = -4 * WINDOW  # a previous occurrence at least two chunks before any chunk
_ONE_WINDOW = min(size for size, _stride in SCALES) + 2  # read whole at every scale

_NON_WORD = re.compile(r"\W")
_ASCII_WORD = bytes(int(re.match(r"\w", chr(b)) is not None) for b in range(256))
# One odd 64-bit multiplier per position in the n-gram, one seed per n.
_MULTIPLIERS = np.array(
    [
        0x9E3779B97F4A7C15,
        0xC2B2AE3D27D4EB4F,
        0x165667B19E3779F9,
        0xD6E8FEB86659FD93,
        0xFF51AFD7ED558CCD,
    ],
    dtype=np.uint64,
)
_SEEDS = {n: np.uint64(0x27D4EB2F165667C5 * n & 0xFFFFFFFFFFFFFFFF) for n in NGRAMS}
_WORD_SEEDS = {n: np.uint64(0x94D049BB133111EB * n & 0xFFFFFFFFFFFFFFFF) for n in WORD_NGRAMS}
_MIX = np.uint64(0xC4CEB9FE1A85EC53)
# Polynomial hash of a word from one prefix sum: H[e] - H[s] scaled by the
# inverse of base**s (odd numbers are invertible modulo 2**64).
_BASE = 0x100000001B3
_BASE_INVERSE = pow(_BASE, -1, 1 << 64)


class ClassifierUnavailable(BastionError):
    """The injection classifier's weights are missing or corrupt: screening cannot run."""

    slug = "injection-classifier-unavailable"
    title = "The injection classifier could not be loaded"
    kind = Kind.INTERNAL


def prepare(text: str) -> str:
    """The form that is hashed: NFKC, casefolded, whitespace runs as one space."""
    ascii_only = text.isascii()
    folded = text.lower() if ascii_only else unicodedata.normalize("NFKC", text).casefold()
    return " " + " ".join(folded.split()) + " "  # split(): the characters \s matches


def _mix(h: npt.NDArray[np.uint64]) -> npt.NDArray[np.int64]:
    # Array arithmetic on uint64 wraps silently (modulo 2**64, as meant).
    h = h ^ (h >> np.uint64(31))
    h = h * _MIX
    h = h ^ (h >> np.uint64(29))
    return (h & np.uint64(DIMENSIONS - 1)).astype(np.int64)  # DIMENSIONS is a power of 2


_POWERS: dict[int, npt.NDArray[np.uint64]] = {}
_POWERS_KEPT = 1 << 16  # powers kept between calls: a short text computes none


def _powers(base: int, count: int) -> npt.NDArray[np.uint64]:
    """``base**0 .. base**count`` modulo 2**64."""
    kept = _POWERS.get(base)
    if kept is not None and kept.size > count:
        return kept[: count + 1]
    out = np.ones(max(count, _POWERS_KEPT) + 1, dtype=np.uint64)
    out[1:] = np.cumprod(np.full(out.size - 1, base, dtype=np.uint64))
    if out.size == _POWERS_KEPT + 1:
        out.flags.writeable = False
        _POWERS[base] = out
    return out[: count + 1]


def hashed(prepared: str) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Every feature of ``prepared`` as (position, bucket) pairs.

    Character 3-, 4- and 5-grams sit at the position they start at; word
    unigrams and bigrams at the start of their first word. Positions let the
    scan sum any window of the text from one cumulative sum.
    """
    positions, buckets, _starts, _words = scan(prepared)
    return positions, buckets


def word_hash(word: str) -> int:
    """The hash :func:`scan` gives ``word`` (one run of word characters, prepared)."""
    _starts, words = scan(prepare(word))[2:]
    if words.size != 1:
        raise ValueError("not one word")
    return int(words[0])


def scan(
    prepared: str,
) -> tuple[
    npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.uint64]
]:
    """:func:`hashed`'s (position, bucket) pairs, then every word's start and
    its hash (training's word-vector layer looks words up by it)."""
    points = np.frombuffer(prepared.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    size = points.size
    positions: list[npt.NDArray[np.int64]] = []
    raw: list[npt.NDArray[np.uint64]] = []  # mixed into buckets at once
    # The n-gram sums share their prefix: the (n+1)-gram's is the n-gram's plus one term.
    running = np.zeros(size, dtype=np.uint64)
    for k in range(max(NGRAMS)):
        count = size - k
        if count <= 0:
            break
        running = running[:count] + points[k : k + count] * _MULTIPLIERS[k]
        if k + 1 in _SEEDS:
            positions.append(np.arange(count, dtype=np.int64))
            raw.append(running + _SEEDS[k + 1])
    # Words: runs of \w characters (the substitution keeps every offset).
    if prepared.isascii():  # \w's ASCII characters, marked in C
        word = np.frombuffer(prepared.encode("ascii").translate(_ASCII_WORD), dtype=np.uint8) != 0
    else:
        spaced = _NON_WORD.sub(" ", prepared).encode("utf-32-le")
        word = np.frombuffer(spaced, dtype=np.uint32) != 32
    edges = np.diff(np.concatenate(([0], word.astype(np.int8), [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    words = np.zeros(0, dtype=np.uint64)
    if starts.size:
        prefix = np.zeros(size + 1, dtype=np.uint64)
        prefix[1:] = np.cumsum(points * _powers(_BASE, size)[:size])
        words = (prefix[ends] - prefix[starts]) * _powers(_BASE_INVERSE, size)[starts]
        grams = {
            1: words ^ _WORD_SEEDS[1],
            2: words[:-1] * _MULTIPLIERS[0] + words[1:] * _MULTIPLIERS[1] + _WORD_SEEDS[2],
        }
        for n in WORD_NGRAMS:
            positions.append(starts[: grams[n].size].astype(np.int64))
            raw.append(grams[n])
    if not positions:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, starts, words
    return np.concatenate(positions), _mix(np.concatenate(raw)), starts, words


def features(text: str) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Sparse features of one window: (buckets, values), each distinct bucket
    once, valued one over the square root of their number: a unit binary
    vector (what training and scoring share). Counted once, a line a log or a
    template repeats twenty times weighs what it weighs once."""
    _positions, flat = hashed(prepare(text)[: WINDOW + 2])
    if flat.size == 0:
        return flat, np.zeros(0)
    distinct = np.unique(flat)
    return distinct, np.full(distinct.size, 1.0 / math.sqrt(distinct.size))


@dataclass(frozen=True)
class Model:
    weights: npt.NDArray[np.float32]
    bias: float
    threshold: float
    """Probability at or over which the classifier corroborates the rules'
    evidence of intent."""
    alone_threshold: float
    """Probability at or over which a text is judged an injection on the
    classifier's word alone (no rule found intent)."""
    meta: dict[str, Any]

    def logit(self, text: str, *, windowed: bool = False) -> float:
        """The highest window logit of ``text``, over every window of every scale.

        A text short enough to be one window at every scale takes a shorter
        path, to the same score (``windowed``: the general path whatever the
        length, which the tests compare it with)."""
        prepared = prepare(text)
        if prepared.strip() == "":
            return self.bias
        positions, buckets, _starts, _words = scan(prepared)
        n = len(prepared)
        if n <= _ONE_WINDOW and not windowed:
            return self._one_window_logit(buckets)
        # Each feature with the position of the bucket's previous occurrence
        # (far before the text: none): in a window it counts when that one is
        # before the window. One sort of (bucket, position) finds them all.
        bits = n.bit_length()
        # The keys are distinct and in no order: numpy's default sort (SIMD
        # where the CPU has it) measured 4-9x faster than "stable" here, 1k-110k keys.
        order = np.sort((buckets << bits) | positions)
        positions = order & ((1 << bits) - 1)
        previous = np.full(order.size, _NONE_BEFORE, dtype=np.int64)
        again = np.flatnonzero((order[1:] >> bits) == (order[:-1] >> bits)) + 1
        previous[again] = positions[again - 1]
        weights = self.weights[order >> bits].astype(np.float64)
        best = -math.inf
        for size, stride in SCALES:
            if n <= size + 2:
                first = previous < 0
                sums = np.array([weights[first].sum()])
                cnts = np.array([max(int(first.sum()), 1)])
            else:
                # Window k is chunks k and k + 1 of ``stride`` characters (size is
                # two strides): a feature in chunk k counts when its previous
                # occurrence is in an earlier chunk, one in chunk k + 1 when it is
                # two chunks back or more. Per chunk, the features' weights and
                # counts by how far back (0, 1, 2 or more chunks) in one pass.
                shift = stride.bit_length() - 1
                chunk = positions >> shift
                back = np.minimum(chunk - (previous >> shift), 2)
                cells = 3 * (n // stride + 2)
                cell = 3 * chunk + back
                by_back = np.bincount(cell, weights=weights, minlength=cells)
                counted = np.bincount(cell, minlength=cells)
                k = 3 * (np.arange(0, n - stride, stride) >> shift)
                sums = by_back[k + 1] + by_back[k + 2] + by_back[k + 5]
                cnts = np.maximum(counted[k + 1] + counted[k + 2] + counted[k + 5], 1)
            best = max(best, float((sums / np.sqrt(cnts)).max()))
        return self.bias + best

    def _one_window_logit(self, buckets: npt.NDArray[np.int64]) -> float:
        """:meth:`logit` of a prepared text that every scale reads as one
        window: its distinct buckets (in bucket order, as the general path sums
        them), no previous occurrences to find."""
        distinct = np.unique(buckets)
        total = float(self.weights[distinct].astype(np.float64).sum())
        return self.bias + total / math.sqrt(max(distinct.size, 1))

    def probability(self, text: str) -> float:
        z = self.logit(text)
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))


def weights_digest(
    weights: npt.NDArray[np.float32], bias: float, thresholds: tuple[float, float]
) -> str:
    """SHA-256 over the weights (as stored), the bias and both thresholds: a
    threshold raised in the file would switch the classifier off."""
    scalars = (float(bias), *map(float, thresholds))
    return hashlib.sha256(weights.astype("<f4").tobytes() + repr(scalars).encode()).hexdigest()


def save(
    path: Path,
    weights: npt.NDArray[np.float32],
    bias: float,
    threshold: float,
    alone_threshold: float,
    meta: dict[str, Any],
) -> str:
    """Write a model file; returns the weights' digest (recorded inside it)."""
    weights = weights.astype("<f4")
    digest = weights_digest(weights, bias, (threshold, alone_threshold))
    header = {
        "format": FORMAT,
        "dimensions": DIMENSIONS,
        "ngrams": list(NGRAMS),
        "word_ngrams": list(WORD_NGRAMS),
        "bias": float(bias),
        "threshold": float(threshold),
        "alone_threshold": float(alone_threshold),
        "sha256": digest,
        **meta,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        header_array = np.array(json.dumps(header, sort_keys=True))
        np.savez_compressed(out, weights=weights, header=header_array)
    return digest


def load(path: Path) -> Model:
    """Load and verify a model file, or raise :class:`ClassifierUnavailable`."""
    try:
        with np.load(path, allow_pickle=False) as data:
            weights = np.asarray(data["weights"], dtype="<f4")
            header = json.loads(str(data["header"]))
    except FileNotFoundError:
        raise ClassifierUnavailable(f"no classifier weights at {path.name}") from None
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError) as exc:
        raise ClassifierUnavailable(
            f"the classifier weights in {path.name} are unreadable ({type(exc).__name__})"
        ) from None
    if (
        header.get("format") != FORMAT
        or header.get("dimensions") != DIMENSIONS
        or header.get("ngrams") != list(NGRAMS)
        or header.get("word_ngrams") != list(WORD_NGRAMS)
        or weights.shape != (DIMENSIONS,)
        or not np.isfinite(weights).all()
    ):
        raise ClassifierUnavailable(f"the classifier weights in {path.name} have the wrong format")
    try:
        bias = float(header["bias"])
        thresholds = (float(header["threshold"]), float(header["alone_threshold"]))
    except (KeyError, TypeError, ValueError):
        raise ClassifierUnavailable(
            f"the classifier weights in {path.name} have the wrong format"
        ) from None
    if not 0.0 < thresholds[0] <= thresholds[1] < 1.0:
        raise ClassifierUnavailable(f"the classifier weights in {path.name} have the wrong format")
    if weights_digest(weights, bias, thresholds) != header.get("sha256"):
        raise ClassifierUnavailable(f"the classifier weights in {path.name} fail their checksum")
    return Model(weights, bias, *thresholds, {k: v for k, v in header.items() if k != "bias"})


_THREADED_ROWS = 256
"""OpenBLAS threads a product of a few dozen columns from about 300 rows
(its threshold on rows times columns, times the inner size for a matrix
product); fewer rows run on the calling thread anyway, without a limit set."""


@cache
def _blas() -> Any:
    return ThreadpoolController()  # finds the loaded BLAS once (about a millisecond)


def one_blas_thread(rows: int) -> AbstractContextManager[Any]:
    """BLAS limited to one thread for a block's matrix products of ``rows``
    rows, then restored (the limit is the process's: screens running at once
    on several threads may leave it at one, which is what each of them wants)."""
    if rows < _THREADED_ROWS:
        return nullcontext()
    limiter: AbstractContextManager[Any] = _blas().limit(limits=1, user_api="blas")
    return limiter


@cache
def model() -> Model:
    """The shipped model, loaded once; raises :class:`ClassifierUnavailable`."""
    return load(MODEL_PATH)
