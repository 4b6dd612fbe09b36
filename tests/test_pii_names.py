"""Names, street addresses, places and dates of birth (issue 16): what the tagger
finds, what it leaves alone in ordinary sentences, its bounds on bad input, and
its kinds in the tenant's vault on the real database. The sentences here were
written for this file, never seen by the training (tests/pii_names_corpus.py)."""

from __future__ import annotations

import time
from uuid import UUID, uuid4

import numpy as np
import psycopg
import pytest

from bastion.db.pool import Database
from bastion.safety import pii_names
from bastion.safety.pii import KINDS, PiiRecognizer
from bastion.safety.pii_allow import PiiAllowLists, StaticAllowLists
from bastion.safety.vault import PiiVault
from bastion.secrets import LocalKeystore
from bastion.secrets.kms import LocalKMS
from bastion.secrets.tenant_keys import TenantKeys
from bastion.tenants.service import TenantService
from tests.conftest import DbHandles

MODEL_KINDS = ("person", "address", "place", "dob")
RECOGNIZER = PiiRecognizer()

FOUND = [
    ("Please ask Olivia Martins to call us back tomorrow.", "person", "Olivia Martins"),
    ("Dear Mr Kowalczyk, your parcel is on its way.", "person", "Kowalczyk"),
    ("Regards,\nHelga Brandvold\n", "person", "Helga Brandvold"),
    ("Send the new card to 14 Larkspur Avenue, please.", "address", "14 Larkspur Avenue"),
    ("New address: Rua Augusta 45, 1100-048 Lisboa", "address", "Rua Augusta 45"),
    ("I moved to Hamburg in the spring.", "place", "Hamburg"),
    ("We are shipping from Norway to Chile.", "place", "Chile"),
    ("Date of birth: 04/11/1979, member since 2019.", "dob", "04/11/1979"),
    ("She was born on 3 May 1990 and lives abroad.", "dob", "3 May 1990"),
    ("Geburtsdatum 1968-02-29", "dob", "1968-02-29"),
]

# (sentence, word): the word is an ordinary word here, not anyone's personal data.
LEFT_ALONE = [
    ("Will the export be ready by Friday?", "Will"),
    ("May I have a copy of the invoice?", "May"),
    ("The release moved to May because of the audit.", "May"),
    ("I ordered the Jordan sneakers in size 44.", "Jordan"),
    ("Apple charged my card twice this month.", "Apple"),
    ("Mark the ticket as urgent and close it.", "Mark"),
    ("Summer discount applies to the yearly plan.", "Summer"),
    ("The parcel was delivered on 04/11/2024 at noon.", "04/11/2024"),
    ("Order 55412 was placed on 1990-05-03.", "1990-05-03"),
    # Organisations, products, jobs, greetings and list numbers (the demo tickets').
    ("Quarterly churn review Vandelay Hydraulics", "Vandelay Hydraulics"),
    ("Our supplier Becker Logistik GmbH ships on Mondays.", "Becker Logistik GmbH"),
    ("Please close my Acme Cloud Console account.", "Acme Cloud Console"),
    ("The documentation says the Business plan allows it.", "Business"),
    ("Request IDs from last night: req_8fd2a1 and req_8fd2b7.", "IDs"),
    ("Thanks for the quick fix.\nMerci,\nthe billing desk", "Merci"),
    ("Steps:\n1. Open the settings\n2. Tell the team\n", "2. Tell"),
]

# (sentence, name): a person named beside an organisation or a job is still found.
NAMED_BESIDE_AN_ORGANISATION = [
    ("Please forward this to our Finance Manager Jan Kowalski today.", "Jan Kowalski"),
    ("Vielen Dank,\nLukas Becker", "Lukas Becker"),
    ("Hi Dana Whitfield, the Acme Cloud Console is back.", "Dana Whitfield"),
]


def _covered(text: str, kind: str, value: str) -> bool:
    start = text.index(value)
    spans = [(e.start, e.end) for e in RECOGNIZER.find(text) if e.kind == kind]
    return all(
        any(s <= i < e for s, e in spans)
        for i in range(start, start + len(value))
        if text[i].isalnum()
    )


def test_the_new_kinds_are_kinds() -> None:
    assert set(MODEL_KINDS) <= set(KINDS)


@pytest.mark.parametrize(("text", "kind", "value"), FOUND)
def test_names_addresses_places_and_dates_of_birth_are_found(
    text: str, kind: str, value: str
) -> None:
    assert _covered(text, kind, value), (text, RECOGNIZER.find(text))


@pytest.mark.parametrize(("text", "word"), LEFT_ALONE)
def test_ordinary_words_are_not_taken_for_names_by_a_list(text: str, word: str) -> None:
    start = text.index(word)
    taken = [
        e
        for e in RECOGNIZER.find(text)
        if e.kind in MODEL_KINDS and e.start < start + len(word) and start < e.end
    ]
    assert taken == [], text


@pytest.mark.parametrize(("text", "name"), NAMED_BESIDE_AN_ORGANISATION)
def test_a_person_beside_an_organisation_or_a_job_is_still_found(text: str, name: str) -> None:
    assert _covered(text, "person", name), (text, RECOGNIZER.find(text))


# Round 8: towns and countries the training never saw (Slovak, Slovenian and
# Czech spellings), after the cues of forms and sentences: a place, not a person.
PLACES_AFTER_A_CUE = [
    ("Nationality: Kazachstán", "Kazachstán"),
    ("Country of residence: Moldavsko", "Moldavsko"),
    ("Place of birth: Banská Bystrica", "Banská Bystrica"),
    ("We are based in Ljubljana since 2019.", "Ljubljana"),
]


@pytest.mark.parametrize(("text", "place"), PLACES_AFTER_A_CUE)
def test_an_unknown_town_or_country_after_a_place_cue_is_a_place(text: str, place: str) -> None:
    found = [(e.kind, e.value) for e in RECOGNIZER.find(text)]
    assert found == [("place", place)], found


# Session 10: a street's one-word name and its house number after it, alone in
# a sentence (no postcode, no town after it to give it away). Of ten written in
# one sitting, the three both models find are left out; the session-9 model
# finds none of these seven, the session-10 one three. Regression cases, not a
# measure (bench/pii.py's dev and held-apart figures are); the four still
# missed are strict expected failures.
STREETS_IN_A_SENTENCE = [
    ("The courier dropped it at Lindenhofgasse 7b by mistake.", "Lindenhofgasse 7b"),
    ("The parcel ended up at Kalnciema 48 instead.", "Kalnciema 48"),
    ("Please redeliver it to Grevgatan 21 tomorrow.", "Grevgatan 21"),
]
# Written in the same sitting and still missed by the session-10 model: a
# street's name that reads as a surname or a word, with nothing after it that
# only an address has.
STREETS_IN_A_SENTENCE_MISSED = [
    ("It was left outside Tammsaare 12a, not at my door.", "Tammsaare 12a"),
    ("My new flat is on Rákóczi 33, third floor.", "Rákóczi 33"),
    ("We moved the office to Ostermalm 4c last week.", "Ostermalm 4c"),
    ("The invoice still shows Pilies 17, which is wrong.", "Pilies 17"),
]


@pytest.mark.parametrize(
    ("text", "street"),
    [
        *STREETS_IN_A_SENTENCE,
        *(
            pytest.param(
                *case,
                marks=pytest.mark.xfail(
                    strict=True,
                    reason="measured miss of the shipped tagger (issue 16): the street's "
                    "name reads as a surname or a word and nothing after it is an address's",
                ),
            )
            for case in STREETS_IN_A_SENTENCE_MISSED
        ),
    ],
)
def test_a_street_and_its_house_number_in_a_sentence_are_one_address(
    text: str, street: str
) -> None:
    found = [(e.kind, e.value) for e in RECOGNIZER.find(text) if e.kind in MODEL_KINDS]
    assert found == [("address", street)], found


# Session 10: a street the tagger reads as an address but written without a
# house number was dropped whole (an address needs a number), so it stayed in
# clear; it is now kept as a place. Written fresh; all five were left in clear.
STREETS_WITHOUT_A_NUMBER = [
    ("Please send the parcel to Strada Dobre, my new home.", "Strada Dobre"),
    ("Deliver it to Calle Mayor please.", "Calle Mayor"),
    ("Ship it to Via Roma, Firenze.", "Via Roma"),
    ("Our office is at Kungsgatan, Stockholm.", "Kungsgatan"),
    ("Address: Lindenallee, Potsdam", "Lindenallee"),
]


@pytest.mark.parametrize(("text", "street"), STREETS_WITHOUT_A_NUMBER)
def test_a_street_without_a_house_number_is_not_left_in_clear(text: str, street: str) -> None:
    start = text.index(street)
    covered = {
        i for e in RECOGNIZER.find(text) if e.kind in MODEL_KINDS for i in range(e.start, e.end)
    }
    assert all(i in covered for i in range(start, start + len(street)) if text[i].isalnum())


# Session 9: a subject line or a ticket heading opens on a capitalised ordinary
# word; after "Subject:" it is no town (the tagger had learnt "Label: Word" from
# "City: Lyon"). Regression cases, seen while choosing the model, not a measure
# (bench/pii.py's held-apart hard negatives are).
HEADINGS = [
    "Subject: Report is empty",
    "Re: Timeout on login",
    "Ticket 5.3: Export fails when the webhook retries.",
    "Betreff: Rechnung fehlt",
    "Objet : Facture en double",
]


@pytest.mark.parametrize("text", HEADINGS)
def test_a_heading_that_opens_on_an_ordinary_word_holds_no_personal_data(text: str) -> None:
    assert [e for e in RECOGNIZER.find(text) if e.kind in MODEL_KINDS] == [], text


def test_a_name_and_an_address_in_a_heading_are_still_found() -> None:
    text = "Re: Refund for Maria Rossi, Via Roma 12, Milano"
    assert _covered(text, "person", "Maria Rossi")
    assert _covered(text, "address", "Via Roma 12")


def test_paris_hilton_is_not_a_place() -> None:
    text = "Paris Hilton was mentioned in the newsletter again."
    kinds = {e.kind for e in RECOGNIZER.find(text) if e.start == 0}
    assert "place" not in kinds, RECOGNIZER.find(text)


def test_a_name_split_by_a_pattern_keeps_its_other_parts_redacted() -> None:
    # The e-mail address is the pattern kind's; the name around it stays the tagger's.
    text = "Contact: Ingrid Solheim-Vik <ingrid@example.com> for the refund"
    found = RECOGNIZER.find(text)
    assert [e.kind for e in found if "@" in e.value] == ["email"]
    assert any(e.kind == "person" and "Solheim" in e.value for e in found), found


def test_nothing_of_a_scanned_text_is_kept_in_the_model() -> None:
    # The feature cache is the model's vocabulary only: an unseen name must not
    # stay in memory after the call (a tenant's names would outlive its shred).
    model = pii_names.load()
    own, context = len(model._own), len(model._context)
    name = f"Zqxwvyn{uuid4().hex[:6]} Oyelaran-Brandtberg"
    RECOGNIZER.find(f"Dear {name}, we received your letter.")
    assert (len(model._own), len(model._context)) == (own, context)
    assert not any("zqxwvyn" in word for word in model._own)


def _seconds(text: str) -> float:
    started = time.perf_counter()
    found = RECOGNIZER.find(text)
    elapsed = time.perf_counter() - started
    assert all(0 <= e.start < e.end <= len(text) for e in found)
    return elapsed


def test_bad_input_takes_bounded_time_and_never_crashes() -> None:
    size = 256 * 1024
    # Prose the model runs on (a capitalised word that is not a function word):
    # a text of function words only never reaches the model at all.
    prose = ("The export finished and the report was sent to Dana today. " * 5000)[:size]
    baseline = _seconds(prose)
    worst = {
        "one long line of names": ("Anna Maria Smith-Jones " * 20000)[:size],
        "names on lines": ("Olaf Berg\n" * 30000)[:size],
        "one word": "A" + "b" * (size - 1),
        "capitals only": ("ABCDEFGH " * 40000)[:size],
        "numbers and commas": ("12, 3456 Main, " * 30000)[:size],
        "mixed scripts": ("Иван Петров 王小明 محمد علي Ωμέγα Straße 5 " * 8000)[:size],
        "right to left": (
            "\u202eFrank Ocean\u202c \u05d3\u05d5\u05d3 \u200f\u0634\u0627\u0631\u0639 7 " * 9000
        )[:size],
        "dates everywhere": ("born 01/02/1990 " * 20000)[:size],
        "phone labels": ("Tel. kom. 555 12 34, Rufnummer: 1234 5678; " * 7000)[:size],
    }
    seconds = {name: _seconds(text) for name, text in worst.items()}
    # Linear work: no input is more than a few times as slow as prose of its size
    # (generous: the suite runs on a loaded 2-core box).
    for name, spent in seconds.items():
        assert spent <= max(12 * baseline, 1.5), (name, spent, baseline)


# -- in the vault, on the real database ----------------------------------------------


async def _tenant(db: Database) -> tuple[UUID, UUID]:
    service = TenantService(db)
    tenant = await service.create_tenant(f"names-{uuid4().hex[:8]}", "names")
    owner = await service.add_member(tenant.id, f"owner-{uuid4().hex[:6]}@names.test", "owner")
    return tenant.id, owner


def _count(database: DbHandles, sql: str, *args: object) -> int:
    with psycopg.connect(database.superuser) as conn:
        row = conn.execute(sql, args).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.anyio
async def test_a_name_gets_one_token_per_tenant_and_is_revealed_with_an_audit(
    db: Database, keystore: LocalKeystore, database: DbHandles
) -> None:
    vault = PiiVault(TenantKeys(LocalKMS(keystore)))
    (a, owner), (b, _) = await _tenant(db), await _tenant(db)
    ticket = (
        "Customer Olivia Martins asked for a refund; Olivia Martins lives at 14 Larkspur Avenue."
    )
    first = await vault.tokenize(db, a, ticket)
    again = await vault.tokenize(db, a, "Please call Olivia Martins back.")
    other = await vault.tokenize(db, b, ticket)
    assert "Martins" not in first.text and "Larkspur" not in first.text
    person = [t.token for t in first.tokens if t.kind == "person"]
    assert len(person) == 1 and person[0].startswith("⟦PERSON_")
    assert first.text.count(person[0]) == 2  # the same name, the same token
    assert [t.token for t in again.tokens if t.kind == "person"] == person
    assert person[0] not in other.text  # another tenant's token is unrelated
    before = _count(
        database,
        "SELECT count(*) FROM bastion.audit_events WHERE tenant_id = %s AND action = 'pii.reveal'",
        a,
    )
    restored, revealed = await vault.reveal_text(
        db, a, first.text, user_id=owner, role="owner", reason="refund follow-up"
    )
    assert restored == ticket
    assert {r.kind for r in revealed} >= {"person", "address"}
    after = _count(
        database,
        "SELECT count(*) FROM bastion.audit_events WHERE tenant_id = %s AND action = 'pii.reveal'",
        a,
    )
    assert after == before + 1


@pytest.mark.anyio
async def test_a_staff_name_on_the_allow_list_stays_in_clear(
    db: Database, keystore: LocalKeystore, database: DbHandles
) -> None:
    tenant, _ = await _tenant(db)
    allow = PiiAllowLists(StaticAllowLists({tenant: ["Olivia Martins"]}))
    vault = PiiVault(TenantKeys(LocalKMS(keystore)), allow_lists=allow)
    done = await vault.tokenize(db, tenant, "Olivia Martins answered Piotr Zielinski's ticket.")
    assert done.text.startswith("Olivia Martins answered ⟦PERSON_"), done.text
    assert "Zielinski" not in done.text
    stored = _count(
        database,
        "SELECT count(*) FROM bastion.pii_vault WHERE tenant_id = %s AND kind = 'person'",
        tenant,
    )
    assert stored == 1  # only the customer's name was stored


NEVER_NAMED = (
    "The refund was issued.",
    "When was the refund issued?",
    "If it fails, please retry.",
    "Thanks!",
    "I do.",
    "Merci, and see you in May.",
    "no capital letter here at all",
    "",
)


def test_the_model_is_skipped_only_where_it_could_not_change_what_is_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tagger skips its model on a text none of whose chunks can be personal
    data (function words, greetings, months, lower case, a lone "I"): the
    gateway's short prompts and answers. Proven three ways: on those texts the
    model is not run; with any scores at all (random ones) they still yield
    nothing; and on sentences of every kind, with and without findings, the
    result is the one of running the model always."""
    model = pii_names.load()
    scored: list[str] = []
    real_scores = pii_names.NameModel.scores

    def spy(self: pii_names.NameModel, toks: list[pii_names.Token], indexes: list[int]) -> object:
        scored.append(" ".join(toks[i].text for i in indexes))
        return real_scores(self, toks, indexes)

    monkeypatch.setattr(pii_names.NameModel, "scores", spy)
    for text in NEVER_NAMED:
        assert list(model.find(text)) == []
    assert scored == []
    assert list(model.find(FOUND[0][0])) != [] and scored  # the spy sees a real run

    texts = [t for t, *_ in FOUND + LEFT_ALONE + NAMED_BESIDE_AN_ORGANISATION]
    texts += [line for text in texts for line in text.splitlines()] + list(NEVER_NAMED)
    shortcut = [list(model.find(text)) for text in texts]
    monkeypatch.setattr(pii_names, "_any_may_be_named", lambda *_: True)
    assert [list(model.find(text)) for text in texts] == shortcut

    rng = np.random.default_rng(16)

    def any_scores(
        self: pii_names.NameModel, toks: list[pii_names.Token], indexes: list[int]
    ) -> object:
        raw = rng.normal(size=(len(indexes), len(pii_names.CLASSES))).astype(np.float32)
        return raw - np.log(np.exp(raw).sum(axis=1, keepdims=True))

    monkeypatch.setattr(pii_names.NameModel, "scores", any_scores)
    for _ in range(20):
        for text in NEVER_NAMED:
            assert list(model.find(text)) == []
