"""Confusable characters: letters of other scripts that look like Latin ones.

The "intentional" set of Unicode TS #39 (Unicode Security Mechanisms, §4
confusable detection) plus the Cyrillic, Greek, Armenian and Latin-extended
letters used in published homoglyph attacks, each mapped to the Latin letter
it imitates. Used where text is compared or matched after folding: the
injection screen's rules and the egress check's tainted-text comparison.
"""

from __future__ import annotations

CONFUSABLES: dict[str, str] = dict(
    zip(
        (
            "\u0410\u0412\u0421\u0415\u041d\u0406\u0408\u041a\u041c\u041e\u0420\u0405"
            "\u0422\u0425\u04ae\u0430\u0435\u043e\u0440\u0441\u0443\u0445\u0455\u0456"
            "\u0458\u04bb\u0501\u051b\u051d\u04cf\u0405\u0391\u0392\u0395\u0396\u0397"
            "\u0399\u039a\u039c\u039d\u039f\u03a1\u03a4\u03a5\u03a7\u03b1\u03bf\u03b9"
            "\u03c1\u03c5\u03bd\u03f3\u0251\u0261\u0269\u0131\u028f\u0585\u057d\u0570"
            "\u01c3"
        ),
        "ABCEHIJKMOPSTXYaeopcyxsijhdqwlSABEZHIKMNOPTYXaoipuvjagiiyouh!",
        strict=True,
    )
)
