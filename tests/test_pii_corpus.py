"""Precision and recall floors per entity type on the Faker corpus
(tests/pii_corpus.py, fixed seed, 9 locales). bench/pii.py prints the full
figures, on a held-out seed as well."""

from __future__ import annotations

import pytest

from bastion.safety.pii import KINDS, PiiRecognizer
from tests.pii_corpus import LOCALES, SEED, Score, generate, score

# (precision, recall) floors, a little under what the recognizers reach on
# SEED, so that a regression in any one kind fails here.
FLOORS: dict[str, tuple[float, float]] = {
    "email": (0.99, 0.99),
    "phone": (0.97, 0.95),
    "card": (0.99, 0.97),
    "iban": (0.99, 0.99),
    "us_ssn": (0.97, 0.97),
    "uk_nino": (0.97, 0.97),
    "fr_nir": (0.95, 0.97),
    "es_dni": (0.97, 0.97),
    "it_fiscal_code": (0.97, 0.97),
    "br_cpf": (0.97, 0.97),
    "nl_bsn": (0.97, 0.97),
    "ip_address": (0.99, 0.99),
    "secret": (0.99, 0.99),
    # Names and addresses of the tickets' distractors (issue 16): the Japanese
    # ones (one locale in nine) are not found, the tagger needs capitals; and
    # Faker's German filler, strings of capitalised nouns, is taken for names.
    "person": (0.80, 0.85),
    "address": (0.95, 0.50),
}
# Measured on the names corpus instead (tests/test_pii_names.py): this one has none.
ELSEWHERE = {"place", "dob"}


@pytest.fixture(scope="module")
def scores() -> dict[str, Score]:
    recognizer = PiiRecognizer()
    docs = generate(600, SEED)
    assert {d.locale for d in docs} == set(LOCALES)
    return score(docs, lambda text: [(e.kind, e.start, e.end) for e in recognizer.find(text)])


def test_every_kind_has_a_floor() -> None:
    assert set(FLOORS) | ELSEWHERE == set(KINDS)


@pytest.mark.parametrize("kind", sorted(FLOORS))
def test_precision_and_recall_floors(scores: dict[str, Score], kind: str) -> None:
    s = scores[kind]
    assert s.labelled >= 30, f"too few {kind} values in the corpus to measure"
    precision, recall = FLOORS[kind]
    assert s.precision >= precision, (kind, s)
    assert s.recall >= recall, (kind, s)


def test_the_corpus_is_the_same_on_every_run() -> None:
    first, again = generate(20, SEED), generate(20, SEED)
    assert [d.text for d in first] == [d.text for d in again]
    assert [d.labels for d in first] == [d.labels for d in again]
    for doc in first:
        for label in doc.labels:
            assert doc.text[label.start : label.end].strip() == doc.text[label.start : label.end]
