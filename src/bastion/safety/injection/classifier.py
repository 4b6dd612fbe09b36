"""The learned tier of the injection screen: hashed character n-grams and a linear model.

Cheap by construction: a text is NFKC-folded and casefolded (UAX #15), its
character 3-, 4- and 5-grams are hashed (vectorised in numpy) into
:data:`DIMENSIONS` buckets, and a logistic-regression weight vector trained by
``bench/train_injection.py`` (``make train-injection``) scores them. Character
n-grams are multilingual without a tokenizer or a vocabulary.

Long texts are scored on bounded windows (:data:`WINDOW` characters, half
overlapping) and the highest window counts, computed from one cumulative sum
over the text, so the cost is linear in its length.

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
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bastion.errors import BastionError, Kind

FORMAT = "bastion-injection-ngram/1"
DIMENSIONS = 1 << 18
NGRAMS = (3, 4, 5)
WINDOW = 1024
STRIDE = 512
MODEL_PATH = Path(__file__).parent / "model" / "injection-ngram.npz"

_SPACES = re.compile(r"\s+")
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
_MIX = np.uint64(0xC4CEB9FE1A85EC53)


class ClassifierUnavailable(BastionError):
    """The injection classifier's weights are missing or corrupt: screening cannot run."""

    slug = "injection-classifier-unavailable"
    title = "The injection classifier could not be loaded"
    kind = Kind.INTERNAL


def prepare(text: str) -> str:
    """The form that is hashed: NFKC, casefolded, whitespace runs as one space."""
    ascii_only = text.isascii()
    folded = text.lower() if ascii_only else unicodedata.normalize("NFKC", text).casefold()
    return " " + _SPACES.sub(" ", folded).strip() + " "


def ngram_buckets(prepared: str) -> npt.NDArray[np.int64]:
    """Bucket of every n-gram, as an (len(NGRAMS), len(prepared)) array.

    Row r, column i is the bucket of the n-gram of length ``NGRAMS[r]`` that
    starts at i, or -1 past the end of the text (so columns line up with
    positions, which lets windows be summed with one cumulative sum).
    """
    points = np.frombuffer(prepared.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    size = points.size
    out = np.full((len(NGRAMS), size), -1, dtype=np.int64)
    for row, n in enumerate(NGRAMS):
        count = size - n + 1
        if count <= 0:
            continue
        with np.errstate(over="ignore"):
            h = np.full(count, _SEEDS[n], dtype=np.uint64)
            for k in range(n):
                h += points[k : k + count] * _MULTIPLIERS[k]
            h ^= h >> np.uint64(31)
            h *= _MIX
            h ^= h >> np.uint64(29)
        out[row, :count] = (h % np.uint64(DIMENSIONS)).astype(np.int64)
    return out


def features(text: str) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """Sparse features of one window: (buckets, values), values normalised by
    the square root of the n-gram count (what training and scoring share)."""
    buckets = ngram_buckets(prepare(text)[: WINDOW + 2])
    flat = buckets[buckets >= 0]
    if flat.size == 0:
        return flat, np.zeros(0)
    return flat, np.full(flat.size, 1.0 / math.sqrt(flat.size))


@dataclass(frozen=True)
class Model:
    weights: npt.NDArray[np.float32]
    bias: float
    threshold: float
    """Probability at or over which a text is judged an injection on its own."""
    weak_threshold: float
    """Probability at or over which the classifier adds weight to the rules."""
    meta: dict[str, Any]

    def logit(self, text: str) -> float:
        """The highest window logit of ``text``."""
        prepared = prepare(text)
        buckets = ngram_buckets(prepared)
        valid = buckets >= 0
        contrib = np.where(valid, self.weights[np.where(valid, buckets, 0)], 0.0).sum(axis=0)
        counts = valid.sum(axis=0)
        if prepared.strip() == "":
            return self.bias
        n = contrib.size
        if n <= WINDOW + 2:
            total = int(counts.sum())
            return self.bias + float(contrib.sum()) / math.sqrt(max(total, 1))
        c_sum = np.concatenate(([0.0], np.cumsum(contrib, dtype=np.float64)))
        c_cnt = np.concatenate(([0], np.cumsum(counts)))
        starts = np.arange(0, n - STRIDE, STRIDE)
        ends = np.minimum(starts + WINDOW, n)
        sums = c_sum[ends] - c_sum[starts]
        cnts = np.maximum(c_cnt[ends] - c_cnt[starts], 1)
        return self.bias + float((sums / np.sqrt(cnts)).max())

    def probability(self, text: str) -> float:
        z = self.logit(text)
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))


def weights_digest(weights: npt.NDArray[np.float32], bias: float) -> str:
    return hashlib.sha256(weights.astype("<f4").tobytes() + repr(float(bias)).encode()).hexdigest()


def save(
    path: Path,
    weights: npt.NDArray[np.float32],
    bias: float,
    threshold: float,
    weak_threshold: float,
    meta: dict[str, Any],
) -> str:
    """Write a model file; returns the weights' digest (recorded inside it)."""
    weights = weights.astype("<f4")
    digest = weights_digest(weights, bias)
    header = {
        "format": FORMAT,
        "dimensions": DIMENSIONS,
        "ngrams": list(NGRAMS),
        "bias": float(bias),
        "threshold": float(threshold),
        "weak_threshold": float(weak_threshold),
        "sha256": digest,
        **meta,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        np.savez_compressed(
            out, weights=weights, header=np.array(json.dumps(header, sort_keys=True))
        )
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
        or weights.shape != (DIMENSIONS,)
        or not np.isfinite(weights).all()
    ):
        raise ClassifierUnavailable(f"the classifier weights in {path.name} have the wrong format")
    bias = float(header["bias"])
    if weights_digest(weights, bias) != header.get("sha256"):
        raise ClassifierUnavailable(f"the classifier weights in {path.name} fail their checksum")
    return Model(
        weights,
        bias,
        float(header["threshold"]),
        float(header["weak_threshold"]),
        {k: v for k, v in header.items() if k not in ("bias",)},
    )


@cache
def model() -> Model:
    """The shipped model, loaded once; raises :class:`ClassifierUnavailable`."""
    return load(MODEL_PATH)
