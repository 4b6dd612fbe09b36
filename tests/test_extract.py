"""Text extraction from uploads: each supported type, normalisation, and every
refusal reason, including encrypted PDFs, PDF bombs and pathological HTML."""

from __future__ import annotations

import time
import tracemalloc
import zlib
from io import BytesIO
from typing import Any

import pytest
from pypdf import PdfReader, PdfWriter

from bastion.knowledge.extract import (
    REASONS,
    SUPPORTED_TYPES,
    ExtractionError,
    extract_text,
    normalise,
)
from tests.pdf_bombs import operator_bomb


def make_pdf(contents: list[bytes], *, flate: bool = False) -> bytes:
    """A minimal valid PDF 1.4: one page per content stream, Helvetica as /F1."""
    count = len(contents)
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(count))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        f"<< /Type /Pages /Kids [{kids}] /Count {count} >>".encode(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    for i, content in enumerate(contents):
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>".encode()
        )
        flt = " /Filter /FlateDecode" if flate else ""
        objects.append(
            f"<< /Length {len(content)}{flt} >>\nstream\n".encode() + content + b"\nendstream"
        )
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, obj in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + obj + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    for offset in offsets:
        out += f"{offset:010d} 00000 n \n".encode()
    out += (
        f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n"
    ).encode()
    return bytes(out)


def text_page(*lines: str) -> bytes:
    ops = ["BT /F1 12 Tf 14 TL 72 712 Td"]
    ops += [f"({line}) Tj T*" for line in lines]
    ops.append("ET")
    return " ".join(ops).encode("latin-1")


def deflated_spaces(size: int) -> bytes:
    """``size`` spaces, zlib level 9, compressed in 1 MB pieces (about 1000:1)."""
    compressor = zlib.compressobj(9)
    piece = b" " * 1_000_000
    parts = [compressor.compress(piece) for _ in range(size // len(piece))]
    parts.append(compressor.flush())
    return b"".join(parts)


def reason_of(body: bytes, content_type: str, **kwargs: Any) -> str:
    with pytest.raises(ExtractionError) as info:
        extract_text(body, content_type, **kwargs)
    assert info.value.reason in REASONS
    return info.value.reason


# --- supported types ----------------------------------------------------------


def test_supported_types() -> None:
    assert frozenset({"text/plain", "text/markdown", "text/html", "application/pdf"}) == (
        SUPPORTED_TYPES
    )


def test_plain_text() -> None:
    body = b"Refund request\r\n\r\n\r\n\r\nPlease   refund\tthe\t\tsecond charge.\r\n"
    assert extract_text(body, "text/plain") == "Refund request\n\nPlease refund the second charge."


def test_markdown_is_kept_as_text() -> None:
    body = b"# Title\n\n- one\n- **two**\n\n```\ncode\n```\n"
    assert extract_text(body, "text/markdown") == "# Title\n\n- one\n- **two**\n\n```\ncode\n```"


def test_content_type_parameters_and_case() -> None:
    body = "café".encode("latin-1")
    assert extract_text(body, "Text/Plain; charset=ISO-8859-1") == "café"
    assert extract_text(body, 'text/plain; charset="latin-1"') == "café"
    # The explicit argument wins over the parameter.
    assert extract_text("café".encode(), "text/plain; charset=latin-1", charset="utf-8") == "café"


def test_latin1_with_declared_charset() -> None:
    body = "Crème brûlée à Zürich".encode("latin-1")
    assert extract_text(body, "text/plain", charset="latin-1") == "Crème brûlée à Zürich"


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_bom_is_honoured(encoding: str) -> None:
    body = "Grüße, 世界".encode(encoding)
    assert extract_text(body, "text/plain") == "Grüße, 世界"
    # The BOM wins over a declared charset (WHATWG Encoding Standard).
    assert extract_text(body, "text/plain", charset="latin-1") == "Grüße, 世界"


def test_utf16_declared_without_bom() -> None:
    body = "hello".encode("utf-16-be")
    assert extract_text(body, "text/plain", charset="utf-16-be") == "hello"


def test_normalisation() -> None:
    text = "Cafe\u0301 \u00a0 x\x07y\x1b[31m\r\n\x0cnext\u2028line\ufeff\n\n\n\n  end  \t"
    assert normalise(text) == "Café xy[31m\n\nnext\nline\n\nend"
    assert extract_text(text.encode(), "text/plain") == "Café xy[31m\n\nnext\nline\n\nend"


def test_html() -> None:
    body = b"""<!DOCTYPE html>
<html><head><title>Ignored title</title>
<style>p { color: red }</style>
<script>if (a < b) { document.write("<p>no</p>"); }</script>
</head>
<body>
  <h1>Refund   policy</h1>
  <p>We refund
     double charges &amp; duplicate invoices&nbsp;within 10&#160;days.</p>
  <!-- internal note: never shown -->
  <template><p>template content</p></template>
  <ul><li>Visa</li><li>Mastercard</ul>
  <table><tr><td>Plan</td><td>Price</td></tr><tr><td>Team</td><td>&euro;49</td></tr></table>
  <p>1 &lt; 2 and 3 > 2<br>new line</p>
  <pre>  keep
  lines</pre>
</body></html>"""
    assert extract_text(body, "text/html") == (
        "Refund policy\n\n"
        "We refund double charges & duplicate invoices within 10 days.\n\n"
        "Visa\nMastercard\n\n"
        "Plan Price\nTeam €49\n\n"
        "1 < 2 and 3 > 2\nnew line\n\n"
        "keep\nlines"
    )


def test_html_without_head_end_tag() -> None:
    assert extract_text(b"<head><title>t</title><p>Body text", "text/html") == "Body text"
    assert extract_text(b"<head><meta charset=utf-8>Loose text", "text/html") == "Loose text"


def test_html_only_hidden_content_is_empty() -> None:
    assert reason_of(b"<script>alert(1)</script><style>x{}</style>", "text/html") == "empty"


@pytest.mark.parametrize("unit", ["<!--", "<", "</", "<a ", "<![", "<a b='", "<p>x", "&#"])
def test_html_pathological_markup_is_fast(unit: str) -> None:
    body = (unit * (200_000 // len(unit))).encode()
    started = time.perf_counter()
    try:
        extract_text(body, "text/html")
    except ExtractionError as exc:
        assert exc.reason == "empty"
    assert time.perf_counter() - started < 3.0


def test_pdf() -> None:
    body = make_pdf(
        [text_page("Hello refund", "Second line"), text_page("Page two")],
    )
    assert extract_text(body, "application/pdf") == "Hello refund\nSecond line\n\nPage two"


def test_pdf_flate_compressed() -> None:
    body = make_pdf([zlib.compress(text_page("Compressed hello"))], flate=True)
    assert extract_text(body, "application/pdf") == "Compressed hello"


def test_pdf_written_by_pypdf() -> None:
    writer = PdfWriter(clone_from=PdfReader(BytesIO(make_pdf([text_page("Round trip")]))))
    out = BytesIO()
    writer.write(out)
    assert extract_text(out.getvalue(), "application/pdf") == "Round trip"


# --- refusals -----------------------------------------------------------------


def test_reason_slugs() -> None:
    assert (
        frozenset(
            {
                "empty",
                "binary",
                "encoding",
                "unsupported-type",
                "pdf-invalid",
                "pdf-encrypted",
                "pdf-too-large",
                "too-large",
                "too-complex",
            }
        )
        == REASONS
    )
    assert ExtractionError("empty").reason == "empty"
    with pytest.raises(ValueError):
        ExtractionError("nope")


@pytest.mark.parametrize("content_type", sorted(SUPPORTED_TYPES))
def test_empty(content_type: str) -> None:
    assert reason_of(b"", content_type) == "empty"


@pytest.mark.parametrize("body", [b"   ", b"\n\r\n\t  \n", b"\xef\xbb\xbf \n", b"\x0c\x0b \n"])
def test_whitespace_only(body: bytes) -> None:
    assert reason_of(body, "text/plain") == "empty"


def test_nul_laden_binary() -> None:
    body = bytes(range(256)) * 40
    assert reason_of(body, "text/plain", charset="latin-1") == "binary"
    assert reason_of(b"hello\x00world", "text/plain") == "binary"


def test_mostly_control_characters() -> None:
    body = b"\x01\x02\x03\x04abc\x05\x06\x07\x08" * 100
    assert reason_of(body, "text/plain") == "binary"


@pytest.mark.parametrize(
    "magic",
    [
        b"\x89PNG\r\n\x1a\n",
        b"PK\x03\x04",
        b"\x7fELF",
        b"\x1f\x8b\x08",
        b"GIF89a",
        b"%PDF-1.7",
        b"\xff\xd8\xff\xe0",
    ],
)
def test_binary_magic(magic: bytes) -> None:
    body = magic + b"looks like text after the header" * 10
    for content_type in ("text/plain", "text/markdown", "text/html"):
        assert reason_of(body, content_type) == "binary"


def test_invalid_utf8() -> None:
    assert reason_of("café".encode("latin-1"), "text/plain") == "encoding"
    assert reason_of(b"ok \xed\xa0\x80 surrogate", "text/plain") == "encoding"


@pytest.mark.parametrize("charset", ["no-such-charset", "base64", "rot13", "unicode_escape"])
def test_unusable_charset(charset: str) -> None:
    assert reason_of(b"hello", "text/plain", charset=charset) == "encoding"


@pytest.mark.parametrize(
    "content_type",
    ["image/png", "application/octet-stream", "text/csv", "", "application/pdfx"],
)
def test_unsupported_type(content_type: str) -> None:
    assert reason_of(b"hello", content_type) == "unsupported-type"


def test_too_large_text() -> None:
    assert extract_text(b"a" * 100, "text/plain", max_chars=100) == "a" * 100
    assert reason_of(b"a" * 101, "text/plain", max_chars=100) == "too-large"
    # Refused before decoding when the body alone is far too big.
    assert reason_of(b"a" * 10_000, "text/plain", max_chars=100) == "too-large"


def test_too_large_pdf_text() -> None:
    body = make_pdf([text_page("x" * 60), text_page("y" * 60)])
    assert reason_of(body, "application/pdf", max_chars=100) == "too-large"


@pytest.mark.parametrize(
    "body",
    [
        b"this is not a PDF at all",
        b"%PDF-1.4\n garbage garbage",
        make_pdf([text_page("truncated")])[:200],
        bytes(range(256)) * 10,
    ],
)
def test_pdf_invalid(body: bytes) -> None:
    assert reason_of(body, "application/pdf") == "pdf-invalid"


@pytest.mark.parametrize("user_password", ["", "secret"])
def test_pdf_encrypted(user_password: str) -> None:
    writer = PdfWriter(clone_from=PdfReader(BytesIO(make_pdf([text_page("Secret")]))))
    writer.encrypt(user_password=user_password, owner_password="owner")
    out = BytesIO()
    writer.write(out)
    assert reason_of(out.getvalue(), "application/pdf") == "pdf-encrypted"


def test_pdf_too_many_pages() -> None:
    body = make_pdf([text_page(f"page {i}") for i in range(3)])
    assert reason_of(body, "application/pdf", max_pdf_pages=2) == "pdf-too-large"
    assert extract_text(body, "application/pdf", max_pdf_pages=3).startswith("page 0")


def test_pdf_bomb() -> None:
    # A ~200 KB file whose one content stream inflates to 200 MB of spaces.
    body = make_pdf([deflated_spaces(200_000_000)], flate=True)
    assert len(body) < 300_000
    tracemalloc.start()
    started = time.perf_counter()
    try:
        reason = reason_of(body, "application/pdf")
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reason in {"pdf-too-large", "too-large"}
    assert elapsed < 5.0
    assert peak < 200_000_000


def test_pdf_bomb_spread_over_pages() -> None:
    # Each stream stays under the per-stream limit; their sum does not.
    body = make_pdf([deflated_spaces(8_000_000)] * 12, flate=True)
    assert reason_of(body, "application/pdf") == "pdf-too-large"


@pytest.mark.parametrize(
    ("pages", "per_page"),
    [(1, 150_000), (6, 90_000)],  # over the bound of one page; of the whole document
    ids=["one-page", "spread-over-pages"],
)
def test_pdf_of_path_operators_is_refused_before_it_is_interpreted(
    pages: int, per_page: int
) -> None:
    # A few kilobytes of "1 0 0 1 0 0 cm": interpreted, 3-15 s of CPU (issue 23, A2).
    body = operator_bomb(pages, per_page)
    assert len(body) < 20_000
    started = time.process_time()
    assert reason_of(body, "application/pdf") == "too-complex"
    assert time.process_time() - started < 1.0


def test_a_dense_real_pdf_is_under_the_operator_bound() -> None:
    # A page of 4,000 glyphs each placed on its own (Td + Tj): 8,000 operators.
    glyphs = b"".join(b"1 0 Td (%c) Tj\n" % (65 + i % 26) for i in range(4_000))
    page = zlib.compress(b"BT /F1 9 Tf 20 780 Td\n" + glyphs + b"ET")
    body = make_pdf([page] * 20, flate=True)
    assert len(extract_text(body, "application/pdf").replace(" ", "")) >= 20 * 4_000
