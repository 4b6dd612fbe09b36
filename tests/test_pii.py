"""The PII recognizer on its own (no database): each kind, what must be left
alone, overlaps, vault tokens left as they are, bad input, linear time, and
the output scan the gateway runs on model answers."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable

import pytest

from bastion.api.problems import status_of
from bastion.safety.pii import (
    KINDS,
    PiiInputNotText,
    PiiInputTooLarge,
    PiiRecognizer,
    normalize,
    scan_output,
)
from bastion.safety.pii_patterns import SECRET_RE, may_hold_secret

recognizer = PiiRecognizer()


def kinds_in(text: str) -> list[tuple[str, str]]:
    return [(e.kind, e.value) for e in recognizer.find(text)]


# Fake values in the shapes of real keys (AWS's and Stripe's documentation
# examples), assembled at run time so secret scanners do not flag the suite.
@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("email", "jane.doe@example.com"),
        ("email", "first+tag@mail.example.co.uk"),
        ("phone", "+1 415 555 0142"),
        ("phone", "+44 20 7946 0958"),
        ("phone", "020 7946 0958"),
        ("phone", "+33 6 12 34 56 78"),
        ("phone", "(591)341-7776"),
        ("phone", "+1-780-563-6083x7783"),  # the extension is part of it
        ("phone", "3516014891"),  # Italian mobile, no telling shape: valid in IT's plan
        ("phone", "080-9141-7776"),
        ("card", "4242 4242 4242 4242"),
        ("card", "378282246310005"),
        ("card", "6304 0000 0000 0000 018"),
        ("iban", "GB82 WEST 1234 5698 7654 32"),
        ("iban", "DE89370400440532013000"),
        ("us_ssn", "123-45-6789"),
        ("uk_nino", "AB 12 34 56 C"),
        ("fr_nir", "2 84 05 75 112 233 43"),
        ("es_dni", "66741774Y"),
        ("es_dni", "Z9663232V"),
        ("it_fiscal_code", "SVRGLI02L27L899P"),
        ("br_cpf", "536.799.499-79"),
        ("ip_address", "203.0.113.24"),
        ("ip_address", "2001:db8::8a2e:370:7334"),
        ("ip_address", "fe80::1"),
        ("secret", "sk-proj-abcdefghijklmnopqrstuvwxyz123456"),
        ("secret", "sk_" + "live_4eC39HqLyjWDarjtT1zdp7dc"),
        ("secret", "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789"),
        ("secret", "AKIA" + "IOSFODNN7EXAMPLE"),
        ("secret", "xoxb-123456789012-abcdefghijklmnopqrstuvwx"),
        ("secret", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
        ("secret", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N"),
    ],
)
def test_each_kind_is_found_whole(kind: str, value: str) -> None:
    assert kinds_in(f"Value: {value}. Thanks") == [(kind, value)]


def test_bsn_needs_its_keyword() -> None:
    assert kinds_in("BSN: 740389129.") == [("nl_bsn", "740389129")]
    assert kinds_in("Reference 740389129.") == []  # nine digits alone are too common


def test_pem_private_key_block() -> None:
    block = (
        "-----BEGIN RSA " + "PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3\n"
        "-----END RSA PRIVATE KEY-----"
    )
    assert kinds_in(f"key:\n{block}\n") == [("secret", block)]


# One value of each branch of SECRET_RE; the regex runs only on texts holding
# one of its leads (may_hold_secret), so a lead missing there loses a branch.
_ALNUM = "aB3dE5fG7hJ9kL2mN4pQ6rS8tV1wX0yZ"


@pytest.mark.parametrize(
    "value",
    [
        "sk-" + _ALNUM,
        "sk-svcacct-" + _ALNUM,
        "sk-admin-" + _ALNUM,
        *(f"{head}_live_" + _ALNUM[:20] for head in ("sk", "rk", "pk")),
        *(f"{head}_test_" + _ALNUM[:20] for head in ("sk", "rk", "pk")),
        *(f"gh{letter}_" + _ALNUM + "abcd" for letter in "pousr"),
        "github_pat_" + _ALNUM[:22],
        "AKIA" + "ABCDEFGH12345678",
        "ASIA" + "ABCDEFGH12345678",
        *(f"xox{letter}-" + _ALNUM[:12] for letter in "abposr"),
        "AIza" + _ALNUM + "x-_",
        "glpat-" + _ALNUM[:20],
        "hf_" + _ALNUM[:30],
        "eyJ" + _ALNUM[:8] + ".eyJ" + _ALNUM[:8] + "." + _ALNUM[:8],
        "-----BEGIN " + "PRIVATE KEY-----\nMIIEow\n-----END PRIVATE KEY-----",
    ],
)
def test_every_secret_form_has_a_lead(value: str) -> None:
    # A branch added to SECRET_RE needs its lead in may_hold_secret and a case
    # above: this count is the tripwire.
    assert SECRET_RE.pattern.count("|") == 16
    assert SECRET_RE.fullmatch(value) is not None
    assert may_hold_secret(f"the key: {value} (rotated)")
    assert kinds_in(f"the key: {value} (rotated)") == [("secret", value)]


@pytest.mark.parametrize(
    "text",
    [
        "Due 2026-11-29, paid 29/11/2026, at 10:30:00.",
        "Order #12345678, ticket 4512, build 20261129.",
        "version 1.24.3 and total 1,299.00 EUR",
        "request id 06447400-5a34-186f-2b2c-3d4e5f607182",
        "commit 3f9a2c0b7d1e4a58c0ffee3f9a2c0b7d1e4a58c0",
        "Card 4242 4242 4242 4241 fails Luhn; IBAN GB82 WEST 1234 5698 7654 33 fails mod 97.",
        "SSN 666-12-3456 and 123-00-4567 are never issued; NI QQ 12 34 56 C is a specimen.",
        "DNI 66741774A has the wrong letter; CPF 111.111.111-11 is all one digit.",
        "IP 999.1.1.1 and 1.2.3 are not addresses; C++ std::vector is not IPv6.",
        "TheQuickBrownFoxJumpsOverTheLazyDog and src/bastion/knowledge/service.py",
        "MAC 00:1A:2B:3C:4D:5E and time 12:30",
    ],
)
def test_look_alikes_are_left_alone(text: str) -> None:
    assert kinds_in(text) == []


def test_card_is_not_half_taken_for_a_phone() -> None:
    assert kinds_in("ref 12 4242 4242 4242 4242 2026-11-29") == [("card", "4242 4242 4242 4242")]


def test_only_vault_tokens_vouched_for_are_left_alone() -> None:
    """A token's shape proves nothing (a card number has sixteen hex digits): the
    tokens the caller's vault vouches for are opaque, anything else is scanned."""
    tokens = ["⟦EMAIL_0123456789abcdef⟧", "⟦CARD_4242424242424242⟧", "⟦PHONE_0207946095800000⟧"]
    text = f"Mail {tokens[0]} or {tokens[1]} or {tokens[2]}."
    assert recognizer.find(text, opaque=tokens) == []
    assert kinds_in(text) == [("card", "4242424242424242")]
    assert scan_output(text, opaque=tokens).clean
    assert "4242424242424242" not in scan_output(text).text


def test_spans_are_ordered_and_disjoint() -> None:
    text = "a@b.example, 4242424242424242; +44 20 7946 0958; 10.0.0.1\n" * 50
    entities = recognizer.find(text)
    assert len(entities) == 200
    for before, after in itertools.pairwise(entities):
        assert before.end <= after.start
    assert all(text[e.start : e.end] == e.value for e in entities)


def test_kinds_can_be_narrowed() -> None:
    only = PiiRecognizer(kinds=("email",))
    assert [e.kind for e in only.find("a@b.example 4242424242424242")] == ["email"]
    with pytest.raises(ValueError, match="unknown kinds"):
        PiiRecognizer(kinds=("email", "shoe_size"))
    # Priority order: the tagger's kinds (issue 16) come after every pattern's.
    assert KINDS[0] == "secret" and KINDS[-4:] == ("phone", "address", "person", "place")


def test_normal_forms_share_a_value() -> None:
    assert normalize("email", "Jane.Doe@Example.COM") == normalize("email", "jane.doe@example.com")
    assert (
        normalize("phone", "+44 20 7946 0958")
        == normalize("phone", "020 7946 0958")
        == ("+442079460958")
    )
    assert normalize("card", "4242 4242 4242 4242") == "4242424242424242"
    assert normalize("ip_address", "2001:0db8:0000::1") == "2001:db8::1"


# --- bad input ------------------------------------------------------------------


def test_non_utf8_bytes_are_refused_clearly() -> None:
    with pytest.raises(PiiInputNotText) as refused:
        recognizer.find(b"caf\xe9 jane@example.com")
    assert status_of(refused.value) == 422
    assert refused.value.type.endswith("/pii-input-not-text")
    assert "byte offset 3" in str(refused.value.detail)
    assert "jane" not in str(refused.value.detail)  # the input is never echoed


def test_unpaired_surrogates_are_refused() -> None:
    with pytest.raises(PiiInputNotText):
        recognizer.find("call \ud800 +44 20 7946 0958")


def test_utf8_bytes_are_scanned() -> None:
    assert [e.kind for e in recognizer.find("café jane@example.com".encode())] == ["email"]


def test_ten_megabytes_are_refused_fast() -> None:
    text = "x" * (10 * 1024 * 1024)
    started = time.perf_counter()
    with pytest.raises(PiiInputTooLarge) as refused:
        recognizer.find(text)
    with pytest.raises(PiiInputTooLarge):
        recognizer.find(text.encode())
    assert time.perf_counter() - started < 1.0  # refused up front, not scanned
    assert status_of(refused.value) == 413


def test_a_small_limit_is_honoured() -> None:
    with pytest.raises(PiiInputTooLarge):
        PiiRecognizer(max_chars=10).find("a" * 11)


def _random(alphabet: str, size: int) -> str:
    rnd = random.Random(7)
    return "".join(rnd.choice(alphabet) for _ in range(size))


_SIZE = 200_000
_ADVERSARIAL: dict[str, Callable[[], str]] = {
    "digits-separators": lambda: _random("0123456789 -./+()", _SIZE),
    "hex-colons": lambda: _random("0123456789abcdef:", _SIZE),
    "colons": lambda: ":" * _SIZE,
    "dotted-digits": lambda: "1." * (_SIZE // 2),
    "token-chars": lambda: _random("abcXYZ019+/=_-", _SIZE),
    "long-word": lambda: "aB3" * (_SIZE // 3),
    "pem-unterminated": lambda: "-----BEGIN " + "PRIVATE KEY-----" + "A" * _SIZE,
    "phones": lambda: "020 7946 0958 " * (_SIZE // 14),
    "at-labels": lambda: "a@" + "a." * (_SIZE // 2),
    "bsn-keywords": lambda: "BSN " * (_SIZE // 4),
    # Each needs a numbering-plan check: the per-call budget keeps it bounded.
    "shapeless-phones": lambda: "3516014891, " * (_SIZE // 12),
}


@pytest.mark.parametrize("name", sorted(_ADVERSARIAL))
def test_linear_time_on_adversarial_input(name: str) -> None:
    text = _ADVERSARIAL[name]()
    started = time.perf_counter()
    recognizer.find(text)
    assert time.perf_counter() - started < 5.0  # quadratic would be minutes


# --- the output scan ----------------------------------------------------------------


def test_output_scan_masks_and_counts() -> None:
    answer = "Sure: write to jane@example.com, key sk-proj-abcdefghijklmnopqrstuvwx1234."
    scan = scan_output(answer)
    assert scan.text == "Sure: write to [EMAIL], key [SECRET]."
    assert scan.counts == {"email": 1, "secret": 1}
    assert not scan.clean


def test_output_scan_leaves_tokens_and_clean_text() -> None:
    answer = "The customer ⟦EMAIL_0123456789abcdef⟧ was refunded on 2026-11-29."
    scan = scan_output(answer)
    assert scan.clean and scan.text == answer and scan.counts == {}


def test_output_scan_refuses_bad_bytes() -> None:
    with pytest.raises(PiiInputNotText):
        scan_output(b"\xff\xfe")


def _kept_state(recognizer: PiiRecognizer) -> list[str]:
    """What the recognizer and its modules hold between calls: every
    module-level container and cache, and the recognizer's own attributes."""
    from bastion.safety import pii, pii_patterns

    kept = [repr(sorted(vars(recognizer).items(), key=lambda item: item[0]))]
    for module in (pii, pii_patterns):
        for name, value in sorted(vars(module).items()):
            if isinstance(value, dict | list | set | bytearray):
                kept.append(f"{module.__name__}.{name}={value!r}")
            elif hasattr(value, "cache_info"):
                kept.append(f"{module.__name__}.{name}={value.cache_info().currsize}")
    return kept


def test_a_scan_keeps_nothing_derived_from_the_text() -> None:
    """Issue 23, B9: after a shred, no process's memory recognises the tenant's
    text. Telephone numbers with no telling shape need a numbering-plan check;
    no memo of those checks (once: digests of every number seen, shared by
    all tenants, never shredded) outlives the call."""
    from bastion.safety import pii

    recognizer = PiiRecognizer()
    for region in recognizer.regions:  # per-region plans: metadata, no text
        pii._plan(region)
    before = _kept_state(recognizer)
    found = recognizer.find("ring 92 9007-3878 or 3516014891 today")
    assert [e.value for e in found if e.kind == "phone"] == ["92 9007-3878", "3516014891"]
    assert _kept_state(recognizer) == before
