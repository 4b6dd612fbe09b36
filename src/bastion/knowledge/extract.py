"""Turn an uploaded document body into normalised plain text, or refuse it.

Supported media types are ``text/plain``, ``text/markdown`` (kept as text: it
is readable as it is), ``text/html`` and ``application/pdf``. A refusal is an
:class:`ExtractionError` whose ``reason`` is one of the stable slugs in
:data:`REASONS`, meant for API problem details and the audit log.

Text is decoded strictly with the declared charset (UTF-8 by default) unless a
byte order mark says otherwise: a BOM takes precedence over the declared
label, as in the WHATWG Encoding Standard's "decode" algorithm. Bodies that
are other formats in disguise (PNG, ZIP, ELF, gzip, PDF... magic numbers) or
that decode to NULs and control characters are refused as ``binary``.

HTML is reduced to its text with the standard library's tokenizer, without
the contents of ``script``, ``style``, ``head`` and ``template`` (HTML Living
Standard section 4), with block elements as line breaks.

PDFs are read with pypdf under tightened resource limits (pypdf's
:class:`~pypdf.Configuration`, set for this call only): a decompression bomb
hits the per-stream output limit and is refused as ``pdf-too-large``, as is a
document of more than ``max_pdf_pages`` pages; a document with more
content-stream operators than :data:`MAX_PDF_OPERATORS_PER_PAGE` on a page or
:data:`MAX_PDF_OPERATORS` in all is ``too-complex``, refused before any page
is interpreted (the worker also runs each extraction in a child process
under a CPU limit); encrypted documents are refused rather than decrypted,
and anything pypdf cannot parse is ``pdf-invalid``.

Every result is normalised: Unicode NFC (UAX #15), LF line ends, no control
characters other than newline and tab, runs of blanks collapsed, at most one
empty line in a row, no leading or trailing whitespace.
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from html.parser import HTMLParser
from io import BytesIO
from typing import Final

import pypdf
from pypdf.errors import LimitReachedError

__all__ = [
    "REASONS",
    "SUPPORTED_TYPES",
    "ExtractionError",
    "extract_text",
    "extracted_length",
    "normalise",
]

SUPPORTED_TYPES: Final = frozenset({"text/plain", "text/markdown", "text/html", "application/pdf"})

REASONS: Final = frozenset(
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


class ExtractionError(Exception):
    """The body could not be turned into text; ``reason`` is a slug from :data:`REASONS`."""

    def __init__(self, reason: str, detail: str | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown extraction failure reason {reason!r}")
        super().__init__(detail or reason)
        self.reason = reason

    def __reduce__(self) -> tuple[type[ExtractionError], tuple[str, str]]:
        # Rebuilt from (reason, detail), so it crosses into another process intact.
        return (type(self), (self.reason, str(self)))


# --- text --------------------------------------------------------------------

# Magic numbers of binary formats that turn up as "text" uploads (not those
# that are plain words, such as RIFF, which a text may well start with).
_BINARY_MAGIC: Final = (
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"\xff\xd8\xff",  # JPEG
    b"PK\x03\x04",  # ZIP, and so DOCX, XLSX, JAR...
    b"PK\x05\x06",  # empty ZIP
    b"\x7fELF",
    b"\x1f\x8b",  # gzip
    b"\xfd7zXZ\x00",
    b"7z\xbc\xaf\x27\x1c",
    b"\x28\xb5\x2f\xfd",  # zstd
    b"Rar!\x1a\x07",
    b"%PDF-",
    b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1",  # OLE2: old Office files
    b"MZ\x90\x00",  # Windows PE
    b"\xca\xfe\xba\xbe",  # Mach-O universal, Java class
    b"\xcf\xfa\xed\xfe",  # Mach-O 64
    b"\x00asm",  # WebAssembly
    b"SQLite format 3\x00",
)

# Byte order marks, longest first (UTF-32 LE starts with the UTF-16 LE BOM).
_BOMS: Final = (
    (codecs.BOM_UTF32_LE, "utf-32-le"),
    (codecs.BOM_UTF32_BE, "utf-32-be"),
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)

# Text codecs that interpret their input rather than just decode it.
_REFUSED_CODECS: Final = frozenset(
    {"unicode-escape", "raw-unicode-escape", "idna", "punycode", "undefined"}
)

# C0 and C1 controls other than tab, LF, CR and the page/line separators.
_CONTROL: Final = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f]")
_MAX_CONTROL_RATIO: Final = 0.1


def media_type(content_type: str) -> tuple[str, str | None]:
    """``text/html; charset=Shift_JIS`` → ``("text/html", "Shift_JIS")``.

    RFC 9110, section 8.3.1: a parameter value is a token or a double-quoted
    string; a type naming ``charset`` twice has no single meaning and is refused
    (:class:`ExtractionError`), so upload and extraction read one charset.
    """
    media, _, params = content_type.partition(";")
    charsets = []
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            value = value.strip()
            quoted = len(value) >= 2 and value[0] == value[-1] == '"'
            charsets.append((value[1:-1] if quoted else value) or None)
    if len(charsets) > 1:
        raise ExtractionError("encoding", "more than one charset parameter")
    return media.strip().lower(), charsets[0] if charsets else None


def _decode(body: bytes, charset: str | None) -> str:
    for bom, encoding in _BOMS:
        if body.startswith(bom):
            body, charset = body[len(bom) :], encoding
            break
    name = charset or "utf-8"
    try:
        codec = codecs.lookup(name)
    except LookupError:
        raise ExtractionError("encoding", "the charset is unknown") from None
    if codec.name in _REFUSED_CODECS:
        raise ExtractionError("encoding", "that charset is not accepted")
    try:
        # LookupError: a bytes-to-bytes codec such as base64 is no charset.
        return body.decode(codec.name, errors="strict")
    except (UnicodeDecodeError, LookupError):
        raise ExtractionError("encoding", "the body is not valid text in its charset") from None


def _check_not_binary(text: str) -> None:
    if "\x00" in text:
        raise ExtractionError("binary", "NUL characters in text")
    if not text:
        return
    controls = len(text) - len(_CONTROL.sub("", text))
    if controls / len(text) > _MAX_CONTROL_RATIO:
        raise ExtractionError("binary", "mostly control characters")


# --- HTML --------------------------------------------------------------------

# Elements whose content is never rendered as text (besides <head>).
_HIDDEN: Final = frozenset({"script", "style", "template"})
# Elements that may appear in <head>; anything else implicitly ends it.
_HEAD_CONTENT: Final = frozenset(
    {"title", "meta", "link", "style", "script", "base", "noscript", "template"}
)
_PARAGRAPHS: Final = frozenset(
    {
        "p",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "blockquote",
        "pre",
        "table",
        "ul",
        "ol",
        "dl",
        "figure",
        "section",
        "article",
        "aside",
        "header",
        "footer",
        "nav",
        "main",
        "form",
        "fieldset",
        "details",
        "address",
        "hr",
    }
)
_LINES: Final = frozenset(
    {"div", "li", "tr", "dt", "dd", "caption", "figcaption", "summary", "legend", "option"}
)
_CELLS: Final = frozenset({"td", "th"})
_WHITESPACE: Final = re.compile(r"\s+")


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._hidden: dict[str, int] = dict.fromkeys(_HIDDEN, 0)
        self._in_head = False
        self._title = 0
        self._pre = 0
        # Line breaks owed before the next text: adjacent block boundaries
        # (</li><li>) make one break, not several.
        self._breaks = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "head":
            self._in_head = True
            return
        if self._in_head and tag not in _HEAD_CONTENT:
            self._in_head = False  # the body started without </head>
        if tag in _HIDDEN:
            self._hidden[tag] += 1
        elif tag == "title":
            self._title += 1
        elif tag == "pre":
            self._pre += 1
        self._break(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # <br/>, <hr/>; a self-closed <script/> opens nothing.
        if self._in_head and tag not in _HEAD_CONTENT:
            self._in_head = False
        self._break(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "head":
            self._in_head = False
            return
        if tag in _HIDDEN:
            self._hidden[tag] = max(0, self._hidden[tag] - 1)
        elif tag == "title":
            self._title = max(0, self._title - 1)
        elif tag == "pre":
            self._pre = max(0, self._pre - 1)
        if tag != "br":  # </br> is read as <br> by browsers, but is rare
            self._break(tag)

    def handle_data(self, data: str) -> None:
        if any(self._hidden.values()) or self._title:
            return
        if self._in_head:
            if not data.strip():
                return
            self._in_head = False  # text outside an element ends the head
        if not self._pre:
            # Outside <pre>, source line breaks and indentation are not content.
            data = _WHITESPACE.sub(" ", data)
            if self._breaks and data == " ":
                return
        if self._breaks:
            self.parts.append("\n" * self._breaks)
            self._breaks = 0
        self.parts.append(data)

    def _break(self, tag: str) -> None:
        if tag == "br":
            self._breaks = min(self._breaks + 1, 2)
        elif tag in _PARAGRAPHS:
            self._breaks = 2
        elif tag in _LINES:
            self._breaks = max(self._breaks, 1)
        elif tag in _CELLS:
            self.parts.append(" ")


# html.parser without the mid-2025 security fixes (CVE-2025-6069; this
# project's Python 3.11.7 has none) takes quadratic time on some malformed
# markup: 250 KB of "<!--" took a minute. So a linear pre-pass hands it only
# well-formed tags and text. Every alternative below consumes all it scans
# (possessively, or lazily up to its terminator or the end of the input).
_MARKUP: Final = re.compile(
    r"""
      (?P<text>(?:[^<]|<(?![A-Za-z/!?]))++)
    | (?P<tag><(?P<end>/?)(?P<name>[A-Za-z][^\t\n\f\r />]*+)
        (?>[^>"']++|"[^"]*+"?|'[^']*+'?)*+(?P<close>>?))
    | <!--.*?(?:-->|\Z)
    | <!\[CDATA\[.*?(?:\]\]>|\Z)
    | <[!?/][^>]*+>?
    """,
    re.VERBOSE | re.DOTALL,
)
# Raw text elements: their content is not markup, and it is dropped anyway.
_RAW_TEXT_END: Final = {
    "script": re.compile(r"</script[\t\n\f\r />]", re.IGNORECASE),
    "style": re.compile(r"</style[\t\n\f\r />]", re.IGNORECASE),
}


def _well_formed(markup: str) -> str:
    """Markup without comments, declarations, script and style; stray ``<`` escaped."""
    out: list[str] = []
    pos = 0
    end = len(markup)
    while pos < end:
        match = _MARKUP.match(markup, pos)
        if match is None:  # cannot happen: "<" always matches some alternative
            break
        pos = match.end()
        if match.group("text") is not None:
            out.append(match.group("text").replace("<", "&lt;"))
        elif match.group("tag") is not None and match.group("close"):
            name = match.group("name").lower()
            raw_end = _RAW_TEXT_END.get(name)
            if raw_end is not None and not match.group("end"):
                found = raw_end.search(markup, pos)
                close = markup.find(">", found.end() - 1) if found else -1
                pos = end if close < 0 else close + 1
            else:
                out.append(match.group("tag"))
        # Anything else (comments, doctype, unterminated tags) is dropped.
    return "".join(out)


def _html_text(markup: str) -> str:
    parser = _TextExtractor()
    parser.feed(_well_formed(markup))
    parser.close()
    return "".join(parser.parts)


# --- PDF ---------------------------------------------------------------------

# Output limits for pypdf's decoders. A page's content stream is a few times
# the size of its text, so these are generous for real documents, yet a bomb
# is stopped after a moment and a few tens of MB: each stream is limited, and
# so is the sum over all pages (pypdf keeps what it decoded).
_PDF_STREAM_LIMIT: Final = 32 * 1024 * 1024
_PDF_TOTAL_LIMIT: Final = 64 * 1024 * 1024


def _pdf_limits(max_chars: int) -> tuple[int, int]:
    stream = min(_PDF_STREAM_LIMIT, max(1024 * 1024, 16 * max_chars))
    total = min(_PDF_TOTAL_LIMIT, max(2 * 1024 * 1024, 32 * max_chars))
    return stream, total


def _pdf_configuration(stream_limit: int) -> pypdf.Configuration:
    return pypdf.get_configuration().with_overwrites(
        maximum_declared_stream_length=stream_limit,
        array_based_stream_maximum_output_length=stream_limit,
        zlib_maximum_output_length=stream_limit,
        lzw_maximum_output_length=stream_limit,
        run_length_maximum_output_length=stream_limit,
        brotli_maximum_output_length=stream_limit,
        jbig2_maximum_output_length=stream_limit,
        image_maximum_buffer_size=stream_limit,
        stream_decoding_work_maximum_length=2 * stream_limit,
        xform_maximum_invocations_per_extraction=1_000,
        # Never run an external decoder on an untrusted upload.
        jbig2dec_binary=None,
        # Module-level limits of pypdf < 7 must not override these.
        disable_legacy_handling=True,
    )


# Text extraction interprets every operator of a content stream in Python:
# 10-20 µs each, so a few compressed kilobytes of "1 0 0 1 0 0 cm" cost
# seconds. A dense page of text, even positioned glyph by glyph, has a few
# ten thousand operators; a bomb has millions. Counted before any page is
# interpreted; past these bounds the document is refused as ``too-complex``.
MAX_PDF_OPERATORS_PER_PAGE: Final = 100_000
MAX_PDF_OPERATORS: Final = 500_000

# Content-stream operators (ISO 32000-2, 7.8.2, and Annex A): a token of one
# to three letters (or ' " * and the 0/1 of d0, d1), delimited like any PDF
# token, so names (/F1) and numbers do not count. Short words in literal
# strings count too: a bound a little too high for text, never too low.
_BEFORE = rb"\x00\t\n\x0c\r ()<>\[\]{}%"  # not "/": that starts a name
_AFTER = _BEFORE + rb"/"
_OPERATOR: Final = re.compile(
    rb"(?<![^" + _BEFORE + rb"])[A-Za-z'\"][A-Za-z*'\"01]{0,2}(?![^" + _AFTER + rb"])"
)


def _page_cost(page: pypdf.PageObject) -> tuple[int, int]:
    """Decoded bytes and operators of the page's content stream and the forms it may draw."""
    contents = page.get_contents()
    streams = [contents.get_data()] if contents is not None else []
    resources = page.get("/Resources")
    xobjects = resources.get_object().get("/XObject") if resources is not None else None
    if xobjects is not None:
        for ref in xobjects.get_object().values():
            xobject = ref.get_object()
            if xobject.get("/Subtype") == "/Form":
                streams.append(xobject.get_data())
    size = sum(len(data) for data in streams)
    operators = sum(sum(1 for _ in _OPERATOR.finditer(data)) for data in streams)
    return size, operators


def _pdf_text(body: bytes, max_chars: int, max_pages: int) -> str:
    stream_limit, total_limit = _pdf_limits(max_chars)
    pages: list[str] = []
    chars = 0
    decoded = 0
    operators = 0
    try:
        with pypdf.apply_configuration(_pdf_configuration(stream_limit)):
            reader = pypdf.PdfReader(BytesIO(body), strict=False)
            if reader.is_encrypted:
                raise ExtractionError("pdf-encrypted", "encrypted PDFs are not accepted")
            count = len(reader.pages)
            if count > max_pages:
                raise ExtractionError("pdf-too-large", f"{count} pages, at most {max_pages}")
            # Every page is measured before any is interpreted: a bomb on the
            # last page costs no interpretation of the others.
            for page in reader.pages:
                size, page_operators = _page_cost(page)
                decoded += size
                operators += page_operators
                if decoded > total_limit:
                    raise ExtractionError("pdf-too-large", "content streams too large")
                if page_operators > MAX_PDF_OPERATORS_PER_PAGE or operators > MAX_PDF_OPERATORS:
                    raise ExtractionError("too-complex", "too many content-stream operators")
            for page in reader.pages:
                text = page.extract_text()
                chars += len(text)
                if chars > max_chars:
                    raise ExtractionError("too-large", f"more than {max_chars} characters")
                pages.append(text)
    except ExtractionError:
        raise
    except (LimitReachedError, MemoryError, RecursionError):
        raise ExtractionError("pdf-too-large", "the PDF exceeds a resource limit") from None
    except Exception:
        # pypdf raises its own errors for malformed files, but also KeyError,
        # ValueError, AttributeError... from deep inside: all mean the same here.
        raise ExtractionError("pdf-invalid", "the PDF cannot be read") from None
    return "\n\n".join(pages)


# --- normalisation -----------------------------------------------------------

_NEWLINES: Final = re.compile(r"\r\n?|[\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")
_STRIP: Final = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f\ufeff]")
_BLANKS: Final = re.compile(r"[^\S\n]+")
_LINE_EDGES: Final = re.compile(r" ?\n ?")
_EMPTY_LINES: Final = re.compile(r"\n{3,}")


def normalise(text: str) -> str:
    """NFC, LF line ends, no controls but ``\\n``/``\\t``, blanks collapsed, stripped.

    Runs of spaces and tabs (and other Unicode blanks) become one space, so
    the result holds no tabs either.
    """
    text = unicodedata.normalize("NFC", text)
    text = _NEWLINES.sub("\n", text)
    text = _STRIP.sub("", text)
    text = _BLANKS.sub(" ", text)
    text = _LINE_EDGES.sub("\n", text)
    text = _EMPTY_LINES.sub("\n\n", text)
    return text.strip()


# --- entry point -------------------------------------------------------------


def extract_text(
    body: bytes,
    content_type: str,
    *,
    charset: str | None = None,
    max_chars: int = 2_000_000,
    max_pdf_pages: int = 500,
) -> str:
    """The normalised text of ``body``, or :class:`ExtractionError`.

    ``content_type`` may carry a ``charset`` parameter; an explicit
    ``charset`` argument wins over it.
    """
    media, declared = media_type(content_type)
    if media not in SUPPORTED_TYPES:
        raise ExtractionError("unsupported-type", "that media type is not supported")
    if not body:
        raise ExtractionError("empty", "empty body")
    if media == "application/pdf":
        text = _pdf_text(body, max_chars, max_pdf_pages)
    else:
        if body.startswith(_BINARY_MAGIC):
            raise ExtractionError("binary", "a binary file, not text")
        # Refuse a huge body before decoding and parsing it: no charset takes
        # more than four bytes a character, and markup is allowed ten.
        if len(body) > (10 if media == "text/html" else 4) * max_chars + 4:
            raise ExtractionError("too-large", f"more than {max_chars} characters")
        text = _decode(body, charset or declared)
        _check_not_binary(text)
        if media == "text/html":
            text = _html_text(text)
    text = normalise(text)
    if not text:
        raise ExtractionError("empty", "no text")
    if len(text) > max_chars:
        raise ExtractionError("too-large", f"more than {max_chars} characters")
    return text


def extracted_length(body: bytes, content_type: str, *, charset: str | None = None) -> int:
    """The length of :func:`extract_text`'s result, or its :class:`ExtractionError`.

    For checking an upload in another process: only a number comes back.
    """
    return len(extract_text(body, content_type, charset=charset))
