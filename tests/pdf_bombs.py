"""PDF bombs for the tests: small files whose content streams cost seconds of CPU."""

from __future__ import annotations

import io

import pypdf
from pypdf.generic import DecodedStreamObject, DictionaryObject, NameObject

# One operator of the most expensive kind for pypdf's text extraction (a
# matrix product each): ~20 µs of CPU per operator, 15 bytes, compressing ~250:1.
MATRIX = b"1 0 0 1 0 0 cm\n"


def operator_bomb(pages: int, operators_per_page: int, unit: bytes = MATRIX) -> bytes:
    """A PDF of ``pages`` pages, each one word of text then ``operators_per_page``
    copies of ``unit``, Flate-compressed."""
    writer = pypdf.PdfWriter()
    font = writer._add_object(
        DictionaryObject(
            {
                NameObject("/Type"): NameObject("/Font"),
                NameObject("/Subtype"): NameObject("/Type1"),
                NameObject("/BaseFont"): NameObject("/Helvetica"),
            }
        )
    )
    for _ in range(pages):
        page = writer.add_blank_page(612, 792)
        page[NameObject("/Resources")] = DictionaryObject(
            {NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})}
        )
        content = DecodedStreamObject()
        content.set_data(b"BT /F1 12 Tf 72 720 Td (Hello) Tj ET\n" + unit * operators_per_page)
        page[NameObject("/Contents")] = writer._add_object(content.flate_encode(level=9))
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()
