"""A labelled corpus of person names, street addresses, places and dates of birth.

Synthetic, from Faker (MIT licence) in many locales, written into templates of
support tickets, e-mails, chat messages and form fills. Only the generator is
committed; the same split and seed give the same documents on every machine.

Three template sets and three locale sets that never meet:

- ``train``: :data:`TRAIN_TEMPLATES` over :data:`TRAIN_LOCALES`. The model
  (bench/train_pii.py) is fitted and tuned on it, and its gazetteers are
  drawn from these locales only. A draw with another seed is the
  in-distribution test.
- ``dev``: :data:`DEV_TEMPLATES` over :data:`DEV_LOCALES`, other sentences
  and countries, used to choose features and decoding (a tuning set);
- ``held_apart``: :data:`HELD_APART_TEMPLATES` over :data:`HELD_APART_LOCALES`,
  never used in training or tuning: other sentences, other cue words, other
  countries' names and streets. Only its totals are printed (bench/pii.py).

Dates that are not dates of birth, organisations, product names and ordinary
words that are also names ("Will", "May", "Mark") stand unlabelled among them.

Hard negatives (session 9): subject lines, ticket headings and sentences that
open on a capitalised ordinary word ("Subject: Report is empty", "Ticket 12:
Export fails"), which a tagger that learnt "Label: Word" from "City: Lyon"
takes for places. ``train`` writes words of Faker's lorem lists (real words
of seven training languages: :func:`training_words`) into its own headings;
``hard_negatives`` writes a support vocabulary written for it
(:data:`HELD_APART_WORDS`) into other headings: nothing in it is personal data,
so every span found there is a false positive.
"""

from __future__ import annotations

import datetime
import functools
import importlib
import random
import re
from collections.abc import Callable

from faker import Faker

from tests.pii_corpus import Document

# Every Faker locale with Latin, Greek or Cyrillic names and addresses, but the
# dev and held-apart ones and their nearest neighbours (Slovak and Czech, the
# South Slavic ones, Swiss German, the Indian subcontinent's English).
TRAIN_LOCALES: tuple[str, ...] = (
    "en_US",
    "en_GB",
    "fr_FR",
    "de_DE",
    "es_ES",
    "it_IT",
    "nl_NL",
    "pt_BR",
    "pl_PL",
    "sv_SE",
    "en_AU",
    "en_CA",
    "en_IE",
    "en_PH",
    "de_AT",
    "es_AR",
    "es_CO",
    "es_CL",
    "fr_BE",
    "fr_CA",
    "it_CH",
    "nl_BE",
    "no_NO",
    "is_IS",
    "lt_LT",
    "lv_LV",
    "et_EE",
    "hu_HU",
    "tr_TR",
    "id_ID",
    "el_GR",
    "ru_RU",
    "uk_UA",
    "bg_BG",
    "ga_IE",
    "sq_AL",
    # Round 7: names and places of more of the world (Africa, Asia, the
    # Caucasus), so that the model learns what an unknown name looks like.
    "az_AZ",
    "vi_VN",
    "zu_ZA",
    "fr_DZ",
    "en_KE",
    "en_NG",
    "yo_NG",
    "ig_NG",
    "ha_NG",
    "sw",
    "tw_GH",
    "en_TH",
    "uz_UZ",
    "es_CA",
)
DEV_LOCALES = ("da_DK", "fi_FI", "cs_CZ", "es_MX", "en_NZ", "pt_PT")
HELD_APART_LOCALES = ("ro_RO", "hr_HR", "en_IN", "sk_SK", "de_CH", "sl_SI")
# The held-apart split in two (round 7, issue 16): its *dev* half (every other
# template from the first, three of its locales) was read while improving the
# model and is a tuning figure; its *test* half (the other templates and
# locales) was never looked at but for its final totals. Chosen before either
# half was scored.
HELD_APART_DEV_LOCALES = ("ro_RO", "hr_HR", "en_IN")
HELD_APART_TEST_LOCALES = ("sk_SK", "de_CH", "sl_SI")

PERSON, ADDRESS, PLACE, DOB = "person", "address", "place", "dob"

# Slots: {person} {first} {last} -> person; {address} {street} -> address;
# {city} {country} -> place; {dob} -> dob. Unlabelled: {company} {product}
# {date} {order} {weekday} {month}.
TRAIN_TEMPLATES: tuple[str, ...] = (
    "Hi, my name is {person} and I can't log in since {date}.",
    "Hello support, this is {person}. My order {order} never arrived at {address}.",
    "Dear {person},\nthank you for contacting {company}. Your ticket {order} is closed.",
    "Name: {person}\nDate of birth: {dob}\nAddress: {address}\n",
    "Full name: {person}; DOB: {dob}; city: {city}; country: {country}.",
    "Customer {person} (born {dob}) asked for a refund of order {order}.",
    "Please update the shipping address to {street}, {city}.",
    "I moved from {city} to {city} last {month}, new address is {address}.",
    "Can you call {first} back? {first} said the {product} keeps crashing.",
    "Mr {last} wrote on {date} that the invoice is wrong.",
    "Ms {last} from {city} wants to upgrade to {product}.",
    "[10:42] {first}: hey, is the {product} down?\n[10:43] agent: checking now",
    "chat with {person}: package stuck in {country} customs since {weekday}",
    "Regards,\n{person}\n{address}",
    "Best wishes, {first}",
    "Will the {product} support export? May I get an answer by {weekday}?",
    "Mark the ticket as solved and bill the customer on {date}.",
    "The {product} release is planned for {month}; we will grant access to all users.",
    "Our office in {city} is closed on {weekday}.",
    "We ship to {country} and {country} within five days.",
    "{person} is the account owner, reachable at the usual address.",
    "Geburtsdatum: {dob}, Anschrift: {address}, Name: {person}",
    "Nom : {person}, né le {dob}, domicilié {address}",
    "Nombre: {person}. Fecha de nacimiento: {dob}. Dirección: {address}.",
    "Nome: {person}, data di nascita {dob}, residente in {address}",
    "Please send the replacement to {person}, {address}.",
    "The meeting with {company} about {product} is on {date}.",
    "Apple and Amazon invoices are attached; {person} will review them.",
    "Ticket {order}: wrong delivery, customer lives at {street}.",
    "Thanks {first}! I will check with {first} from billing.",
    "Travelling to {city}, {country} next {weekday}.",
    "Please hope for the best and turn it off and on again.",
    "Hey, {first} here from the {product} team.",
    "Thanks a lot,\n{person}",
    "Sincerely,\n{first} {last}\n{address}",
    "I'm {first} and I live in {city}. It's urgent, I can't pay.",
    "From: {person}\nTo: support\nSubject: order {order}",
    "Recipient: {person}, {address}",
    "The parcel for Dr {last} was returned to {city}.",
    "Sender: {first} {last}, {street}, {city}",
    "{first} and {first} from {company} joined the call on {weekday}.",
    "Is the {product} available in {country}? I'm asking for {first}.",
    "I'm not sure what happened. Can you check? It's urgent.",
    "Summer sale ends Friday. Thanks! Cheers, the Atlas team.",
    "Herr {last} und Frau {last} haben am {date} angerufen.",
    "Good afternoon! {person} speaking, I need a new invoice.",
    "Please contact {first} {last} ({city}) about the delay.",
    "Invoice address:\n{person}\n{street}\n{city}\n{country}",
    "Customer: {person}\nBirthday: {dob}\nLocation: {city}, {country}",
    "Hi {first},\nyour {product} trial ends on {date}. Reply to keep it.",
    "{first} wrote: the app works in {city} but not in {country}.",
    "Hope you are well, {first}. Rose and Lily are our new templates.",
    "Spoke to {person} today; address on file is {address}.",
    "Your order {order} ships from {city} on {weekday}.",
    "Profile: {last}, {first}; residence {city}; citizenship {country}",
    "Happy New Year! Our Christmas hours are on the website.",
    "Tell {first} that {person} from {company} called.",
    # Capitalised words that are nobody's: headings, roles, products, errors.
    "Title: {product} export fails\nPriority: High\nStatus: Open\nReporter: {person}",
    "Our Finance Director approved it; the Customer Success Team will follow up.",
    "Merci beaucoup ! Danke schön. Gracias. Grazie mille. Thanks, {first}.",
    "Error 503 Service Unavailable, then HTTP 404 Not Found on retry.",
    "Open the Billing Portal, then Admin Settings > Security > API Keys.",
    "I do not see the refund. I think the Enterprise plan includes it.",
    "The Nimbus Storage Gateway and Orbit Analytics Suite were updated on {date}.",
    "User IDs, SSO and SAML settings moved to the Identity Center.",
    "Mme {last} habite {address} depuis {month}.",
)

# Round 7: more contexts of the same kinds, composed from parts (openers,
# titles, verbs and prepositions before a name, chat and form layouts, postal
# blocks), so that the model learns what a name looks like next to words it
# has not seen rather than the few cues of the templates above.
_GREETINGS = ("Hi", "Hello", "Hey", "Dear", "Good morning", "Morning", "Thanks", "Thank you")
_TITLES = ("Mr", "Mrs", "Ms", "Miss", "Dr", "Prof.", "Mr.", "Mrs.", "Sir", "Madam", "Mx")
_BEFORE_NAME = (
    "Please send the invoice to",
    "I spoke with",
    "This was approved by",
    "Can you remind",
    "Ask",
    "Assigned to",
    "cc",
    "On behalf of",
    "Escalated by",
    "The case owner is",
    "We refunded",
    "Note for",
    "Message from",
    "Call back",
    "Waiting for",
    "Passed to",
    "the parcel is for",
    "signed for by",
    "Welcome aboard,",
    "A quick question for",
)
_AFTER_NAME = (".", ", thanks.", " today.", " before {weekday}.", " about order {order}.", "?")
_CHAT_ROLES = ("customer", "client", "visitor", "member", "guest", "caller")
_NAME_SLOTS = ("{person}", "{first}", "{first} {last}", "{last}")


def _composed() -> tuple[str, ...]:
    out: list[str] = []
    for i, before in enumerate(_BEFORE_NAME):
        name = _NAME_SLOTS[i % len(_NAME_SLOTS)]
        out.append(f"{before} {name}{_AFTER_NAME[i % len(_AFTER_NAME)]}")
        out.append(f"{before} {_TITLES[i % len(_TITLES)]} {{last}}{_AFTER_NAME[(i + 1) % 6]}")
    for i, greeting in enumerate(_GREETINGS):
        out.append(f"{greeting} {_NAME_SLOTS[i % 3]},\n{{product}} is back up.")
        out.append(f"{greeting} {_TITLES[i % len(_TITLES)]} {{last}}, your case {{order}} is open.")
        out.append(f"{greeting} team, {{person}} here again about {{product}}.")
    for role in _CHAT_ROLES:
        out.append(f"{role} {{first}}: hi, my {{product}} stopped syncing\nagent: on it")
        out.append(f"{role.title()}: {{person}}\nIssue: {{product}} login loop")
    out += [
        "To: {person}\n{address}\n{country}",
        "Deliver to {person}\n{street}\n{city}\n{country}",
        "{person}\n{address}\n{country}\nPhone on file.",
        "Billing contact: {person}; billing address: {address}, {country}",
        "Mail it to {person} at {address}, please.",
        "Pick-up point: {street}, {city}. Recipient {first} {last}.",
        "New address from {month}: {address}",
        "Our driver {first} could not find {street} in {city}.",
        "{first}, {first} and {person} were copied.",
        "Participants: {person}; {person}; {person}",
        "Owner {last}, {first} ({country}) asked to close the account.",
        "Shipping label: {person}, {address}",
        "{person} from {country} wrote at {weekday} noon.",
        "Heading to {city} for the {product} launch with {first}.",
        "Relocated: {city} -> {city}, {country}.",
        "The warehouse in {city}, {country}, sent it back to {address}.",
        "Ticket for {first} {last}: the {product} trial ends in {month}.",
        "Hope you're well {first}, the export is ready.",
        "Hello {first} {last}, we got your message from {date}.",
        "Can {first} sign in? {first} uses the {product} daily.",
        "Forwarding the note from {person} to {person}.",
        "Hi {first} - any news on {order}? Thanks, {first}",
        # Chat transcripts: a speaker's name before a colon is a name.
        "{first}: my invoice is wrong\nAgent: which one?\n{first}: the one from {month}",
        "[09:15] {first} {last}: hello?\n[09:16] Support: hi {first}, how can I help",
        "<{first}> the {product} is down again\n<ops> looking",
        "{person} wrote:\n> can you extend the trial?",
        "{first} (guest): is anyone there?",
        "{last}: ok thanks, bye",
        "Agent: could you confirm your name?\nCustomer: {person}",
        # A name after "for", "with", "to", "by".
        "This one is for {first}, not for {first}.",
        "Two seats for {person} and one for {first}.",
        "Flowers for {first} {last}, delivered to {address}.",
        "Invoices for {last} and {last} are attached.",
        "Booked by {person} with {first} as backup.",
        "Sent to {first} by {first} on {weekday}.",
    ]
    return tuple(out)


# Round 8: places. A town or a country alone is judged by the words around it
# ("based in", "moved to", "nationality", "Wohnort:", "j'habite à") and by where
# it stands (the last line of a postal block, before a comma or a full stop, or
# before the next sentence's capital), in the training languages. Written from
# how people write, not from the dev or held-apart templates' errors.
_BEFORE_PLACE = (
    "I live in",
    "I'm based in",
    "We are based in",
    "She moved to",
    "He moved here from",
    "We are relocating to",
    "calling from",
    "I'm travelling to",
    "our shop is located in",
    "the warehouse near",
    "I was born in",
    "I grew up in",
    "Hometown:",
    "home town",
    "Nationality:",
    "nationality",
    "a citizen of",
    "a resident of",
    "City:",
    "Town:",
    "Country:",
    "Country of residence:",
    "Place of birth:",
    "Location:",
    "Region:",
    "I'm visiting",
    "the flight to",
    "the parcel is still in",
    "it arrived in",
    "delivery to",
    "the branch in",
    "ich wohne in",
    "Wohnort:",
    "Land:",
    "umgezogen nach",
    "j'habite à",
    "Ville :",
    "Pays :",
    "vivo en",
    "Ciudad:",
    "País:",
    "abito a",
    "Città:",
    "ik woon in",
    "Woonplaats:",
    "moro em",
    "Cidade:",
    "mieszkam w",
    "Miasto:",
    "jag bor i",
    "Ort:",
)
_AFTER_PLACE = (
    ".",
    ", thanks.",
    " since {month}.",
    "?",
    " and the {product} is slow there.",
    " for two weeks.",
    "\n",
    " (near {city}).",
)


def _places() -> tuple[str, ...]:
    out: list[str] = []
    for i, before in enumerate(_BEFORE_PLACE):
        slot = ("{city}", "{country}")[i % 2]
        out.append(f"{before} {slot}{_AFTER_PLACE[i % len(_AFTER_PLACE)]}")
        other = ("{country}", "{city}")[i % 2]
        out.append(f"{before} {other}{_AFTER_PLACE[(i + 3) % len(_AFTER_PLACE)]}")
    out += [
        "{person}\n{street}\n{city}\n{country}",
        "Address: {street}, {city}, {country}",
        "Payee: {person}, {street}, {city}",
        "Billing: {address}, {country}",
        "{person}, {city} ({country})",
        "Moving from {city} to {city} in {month}.",
        "From {country} to {country}: shipping takes a week.",
        "Route: {city} -> {city} -> {city}",
        "Sent from {city}. Received in {city}.",
        "The {product} is blocked in {country} and {country}.",
        "Office hours in {city}: {weekday} to {weekday}.",
        "{city}, {date}\nDear {person},",
        "{city}, {country}\n{date}",
        "Our team in {city} and {first} from {country} will call.",
        "Greetings from {country}! {first} here.",
        "Do you deliver to {city}? Asking for {first}.",
        "{country} customers: the {product} outage is over.",
        "{first} ({city}): my refund is late",
        # Session 9: postal blocks under a sign-off, a street line then a town
        # line (the headings above made a capitalised line-start word weaker).
        "Kind regards,\n{first} {last}\n{street}\n{city}",
        "Best,\n{person}\n{street}\n{city}\n{country}",
        "Yours,\n{first}\n{street}\n{city}",
        "{person}\n{street}\n{city}",
        "Mit freundlichen Grüßen\n{person}\n{street}\n{city}",
        "Cordialement,\n{person}\n{street}\n{city}",
        "Saludos,\n{person}\n{street}\n{city}",
        "Cordiali saluti,\n{first} {last}\n{street}\n{city}",
    ]
    return tuple(out)


# Session 9: headings and sentences that open on a capitalised ordinary word
# ({Word}: a lorem word in training), after labels that announce no place.
_HEADING_LABELS = (
    "Subject:",
    "Re:",
    "Fwd:",
    "Title:",
    "Summary:",
    "Issue:",
    "Problem:",
    "Note:",
    "Update:",
    "Status:",
    "Priority:",
    "Category:",
    "Ticket {order}:",
    "Bug {order}:",
    "Case {order} -",
    "Betreff:",
    "Objet :",
    "Asunto:",
    "Oggetto:",
    "Onderwerp:",
    "Temat:",
)
_HEADING_TAILS = (
    "",
    " {word}",
    " {word} {word}",
    " {word} {word} {word}.",
    " is {word} since {date}",
    " after the {product} update",
    " ({order})",
)


def _headings() -> tuple[str, ...]:
    out: list[str] = []
    for i, label in enumerate(_HEADING_LABELS):
        out.append(f"{label} {{Word}}{_HEADING_TAILS[i % len(_HEADING_TAILS)]}\n")
        out.append(f"{label} {{Word}} {{Word}}{_HEADING_TAILS[(i + 3) % len(_HEADING_TAILS)]}\n")
    out += [
        "{Word} {word} {word} {word}. {Word} {word} {word}.",
        "{Word} {word}? {Word} {word} {word} {word}!",
        "Hi, {Word} {word} {word} when I open the {product}.",
        "{Word}: {word} {word}. {Word}: {word}.",
        "{Word} {Word} {word} {word} {word}",
        "Thanks {first}. {Word} {word} {word} {word} on {weekday}.",
    ]
    return tuple(out)


# Session 10: street addresses in more of the shapes people write them ({road}:
# :func:`_road`), a street alone in a sentence ("it went to Kerkstraat 7c
# instead"), a street named after a person ("Rua Ana Costa, 12"), its number
# before or after it, a flat or a post-office box, a postcode before or after
# the town. Written from usage in the training languages, not from the dev or
# held-apart errors.
_ROADS = (
    "It went to {road} instead of my place.",
    "I now live on {road}.",
    "The parcel was delivered to {road} by mistake.",
    "Please collect it from {road} tomorrow.",
    "My new flat is at {road}, second door.",
    "The technician came to {road} but nobody opened.",
    "Send the documents to {road} before {weekday}.",
    "Ship it to {person}, {road}.",
    "Return address: {road}",
    "Our customer {first} {last} moved to {road} in {month}.",
    "{person}, {road}, wants a refund for {order}.",
    "Can you change my address to {road}? Thanks, {first}",
    "Please use {road} as my billing address.",
    "The driver could not find {road}.",
    "Address on the invoice: {person}, {road}",
    "{person}\n{road}\n{country}",
    "Shipping to: {road}",
    "Die Lieferung ging an {road} statt an mich.",
    "Ich wohne jetzt in der {road}.",
    "Bitte an {road} schicken.",
    "Le colis est parti au {road} au lieu de chez moi.",
    "Merci d'envoyer la facture au {road}.",
    "El paquete llegó a {road} por error.",
    "Mi nueva dirección es {road}.",
    "Il pacco è arrivato in {road} per errore.",
    "Het pakket ging naar {road} in plaats van naar mij.",
    "Paczka trafiła na {road} zamiast do mnie.",
    "A encomenda foi entregue na {road} por engano.",
    "Paketet kom till {road} i stället.",
    "Lieferadresse: {person}, {road}",
    "Adresse de livraison : {road}",
)
# Words that name a street's kind in the training languages, before its name
# ("Rua", "Via", "Avenue") or after it ("Road", "Lane"); suffixes a street's
# one-word name ends with ("Bergweg", "Lindgatan"). None of a dev or held-apart
# locale's own (Romanian "Calea", "Strada"; Portugal's "Dto").
_STREET_BEFORE = (
    *("Rua", "R.", "Avenida", "Av.", "Travessa", "Praça", "Largo", "Calle", "C/", "Paseo"),
    *("Camino", "Avda.", "Via", "Viale", "Piazza", "Corso", "Vicolo", "Rue", "Avenue"),
    *("Boulevard", "Bd", "Chemin", "Allée", "Impasse", "Place", "Jalan", "Jl.", "Aleja"),
    *("Plac", "Ul.", "Piazzale", "Rambla"),
)
_STREET_AFTER = (
    *("Street", "St", "St.", "Road", "Rd", "Rd.", "Avenue", "Ave", "Lane", "Ln", "Drive"),
    *("Dr.", "Way", "Court", "Place", "Close", "Crescent", "Terrace", "Square", "Hill"),
)
_STREET_SUFFIXES = (
    *("straße", "strasse", "str.", "weg", "gasse", "allee", "platz", "ring", "damm"),
    *("straat", "laan", "plein", "gracht", "kade", "gatan", "vägen", "gränd", "veien"),
    *("gata", "gate", "stræti", "vegur", "utca", "iela", "tee"),
)
_UNITS = (
    *("Apt {n}", "Apt. {n}{L}", "Flat {n}", "Unit {n}{L}", "Suite {nnn}", "Floor {n}"),
    *("Wohnung {n}", "{n}. OG", "Piso {n}", "Apto {n}", "Bloco {L}", "Int. {n}"),
    *("Bât. {L}", "Esc. {L}", "Scala {L}", "Lgh {nnn}", "m. {n}", "{n}/{n}"),
)
_PO_BOXES = (
    *("PO Box {nnn}", "P.O. Box {nnn}", "Postfach {nnn}", "BP {nnn}", "Apartado {nnn}"),
    *("Casella Postale {nnn}", "Postbus {nnn}", "Box {nnn}", "Caixa Postal {nnn}"),
)


def _road(fake: Faker, rnd: random.Random) -> str:
    """A street address of the locale's parts in one of many written shapes."""

    def fill(pattern: str) -> str:
        return (
            pattern.replace("{nnn}", str(rnd.randint(1, 9999)))
            .replace("{n}", str(rnd.randint(1, 40)))
            .replace("{L}", rnd.choice("ABCD"))
        )

    house = rnd.choice(
        (
            str(rnd.randint(1, 999)),
            f"{rnd.randint(1, 99)}{rnd.choice('abcABC')}",
            f"{rnd.randint(1, 99)}{rnd.choice('abc')}/{rnd.randint(1, 9)}",
            f"{rnd.randint(1, 99)}-{rnd.randint(1, 99)}",
            f"{rnd.randint(0, 9)}{rnd.randint(0, 99):02d}",
        )
    )
    last = str(fake.last_name()).split()[0]
    name = rnd.choice(
        (
            str(fake.street_name()),
            str(fake.street_name()),
            last + rnd.choice(_STREET_SUFFIXES),
            last + rnd.choice(_STREET_SUFFIXES),
            f"{rnd.choice(_STREET_BEFORE)} {fake.last_name()}",
            f"{fake.last_name()} {rnd.choice(_STREET_AFTER)}",
            f"{rnd.choice(_STREET_BEFORE)} {fake.first_name()} {fake.last_name()}",
            last,
        )
    )
    shape = rnd.randrange(8)
    if shape == 0:
        street = f"{house} {name}"
    elif shape == 1:
        street = f"{house}, {name}"
    elif shape == 2:
        street = f"{name}, {house}"
    elif shape == 3:
        street = fill(rnd.choice(_PO_BOXES))
    else:
        street = f"{name} {house}"
    if rnd.random() < 0.25:
        street += ", " + fill(rnd.choice(_UNITS))
    town, postcode = str(fake.city()), str(fake.postcode())
    tail = rnd.choice(("", "", "", f", {postcode} {town}", f", {town} {postcode}"))
    return street + tail


TRAIN_TEMPLATES = TRAIN_TEMPLATES + _composed() + _places() + _headings() + _ROADS

# Tuning only (its errors were read while choosing features and decoding).
DEV_TEMPLATES = (
    "Good morning, {person} here. The app crashed again on {date}.",
    "Applicant: {person} | Birthdate: {dob} | Residence: {address}",
    "Could someone reach out to {person}? They live at {address}.",
    "{first} just messaged: parcel went to {street} instead of my place",
    "Signed up on {date}, date of birth {dob}, hometown {city}.",
    "Cheers,\n{first} {last}\n{street}\n{city}",
    "Hey it's {first}, I'm in {city} till {weekday}, ping me",
    "The refund for {person} is approved; mail the cheque to {address}.",
    "Passenger {person}, born on {dob}, flying from {city} to {country}.",
    "Our partner {company} reports that {product} works fine in {country}.",
    "Will you fix it before {month}? Frank feedback: the {product} is slow.",
    "Form: surname {last}; given name {first}; nationality {country}",
    "Dear Mrs {last}, your appointment on {date} is confirmed.",
    "Delivery address changed by {first} to {address}",
    "Grant the refund, then bill the {product} order {order} again.",
)
# Written after the model's design was fixed; only their totals are ever printed.
HELD_APART_TEMPLATES = (
    "Subject: refund\n\nHi team, {person} again. Still waiting since {date}.",
    "Contact person: {person}\nPostal address: {address}\nBorn: {dob}",
    "Reminder for {first}: the {product} licence expires in {month}.",
    "Kind regards\n{person}\n{company}",
    "Please forward the documents to {person} at {address} before {weekday}.",
    "Our customer {first} {last} called from {city} about order {order}.",
    "user {first}: can u check my account pls\nbot: sure, one moment",
    "Beneficiary: {person}, {street}, {city}, {country}",
    "Mrs {last} says the courier left the parcel at {street}.",
    "Emergency contact {person}, d.o.b. {dob}",
    "Hello {first}, we received your request on {date} and will reply soon.",
    "I am writing from {country} regarding {product}; my colleague {first} agrees.",
    "Grace period ends in June, and Amber alerts are enabled for {product}.",
    "Attendees: {person}, {person} and {person}.",
    "Ship to: {person}\n{address}\n{country}",
)

# Session 9, for tuning the headings (a dev split): other labels, other words.
HARD_NEGATIVE_DEV_WORDS: tuple[str, ...] = (
    "router",
    "modem",
    "firewall",
    "proxy",
    "endpoint",
    "webhook",
    "timeout",
    "export",
    "import",
    "login",
    "logout",
    "signup",
    "billing",
    "payroll",
    "report",
    "request",
    "retry",
    "error",
    "warning",
    "update",
    "upgrade",
    "downgrade",
    "payment",
    "charge",
    "refund",
    "account",
    "plan",
    "feature",
    "release",
    "version",
    "install",
    "setup",
    "config",
    "schedule",
    "queue",
    "search",
    "filter",
    "sorting",
    "pagination",
    "dropdown",
    "checkbox",
    "toggle",
    "banner",
    "popup",
    "tooltip",
    "sidebar",
    "footer",
    "header",
)
HARD_NEGATIVE_DEV_TEMPLATES = (
    "Component: {Word} {word}\nKind: {Word}",
    "Area: {Word}. Feedback: {Word} {word} {word}.",
    "Task {order} - {Word} {word} {word}",
    "Request: {Word} {word} for {product}",
    "Goal: {Word} {word}\nAssunto: {Word} {word}",
    "{Word} {word} on {weekday}. {Word} {word} {word} {word}.",
    "Ticket {order}: {Word} {word} {word}.",
    "Emne: {Word} {word}\nTask: {Word}",
)

# Session 9, written for the test only: other headings, no personal data at all
# ({Word}: a word of HELD_APART_WORDS). Only their totals are printed.
HARD_NEGATIVE_TEMPLATES = (
    "Topic: {Word} {word} {word}\nSeverity: {Word}",
    "Incident {order}: {Word} {word} after {date}",
    "Headline: {Word} {Word} for {product} users",
    "Reason: {Word}\nAction: {Word} {word}",
    "Question: {Word} {word} {word}?",
    "Comment: {Word} {word} {word}, {word} {word}.",
    "Thema: {Word} {word}\nSujet : {Word} {word}",
    "{Word} {word} {word} again. {Word} {word} {word} since {weekday}.",
    "Result: {Word}. Next step: {Word} {word}.",
    "[{order}] {Word} {word} {word}",
)

HELD_APART_DEV_TEMPLATES = HELD_APART_TEMPLATES[0::2]
HELD_APART_TEST_TEMPLATES = HELD_APART_TEMPLATES[1::2]

_DOB_FORMATS = ("%d/%m/%Y", "%Y-%m-%d", "%d.%m.%Y", "%B %d, %Y", "%d %B %Y", "%m/%d/%Y")
_DATE_FORMATS = ("%d/%m/%Y", "%Y-%m-%d", "%B %d", "%d %B %Y")
_PRODUCTS = ("Pro plan", "Sync app", "Dashboard", "Widget X", "the API", "Nimbus", "Atlas")
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("January", "March", "April", "May", "June", "July", "August", "October")
_END = datetime.date(2026, 1, 1)

# Faker's lorem lists that are real words (MIT), one per training language.
_LOREM_LOCALES = ("en_US", "de_DE", "fr_FR", "it_IT", "es_ES", "nl_NL", "pl_PL")


@functools.cache
def training_words() -> tuple[str, ...]:
    """Lower-cased ordinary words (3+ letters) of :data:`_LOREM_LOCALES`' lorem lists.

    Some lists are corpus frequency lists with proper nouns in them (es_ES has
    "josé" and "pedro", pl_PL "Polska"): a word that is a first name in the
    list's own locale, or capitalised where the language does not capitalise
    nouns (all but German), is left out, so that no name is taught as a word.
    """
    words: set[str] = set()
    for locale in _LOREM_LOCALES:
        lorem = importlib.import_module(f"faker.providers.lorem.{locale}").Provider
        person = importlib.import_module(f"faker.providers.person.{locale}").Provider
        firsts = {
            name.lower()
            for attr in ("first_names", "first_names_male", "first_names_female")
            for name in getattr(person, attr, ())
        }
        words.update(
            w.lower()
            for w in lorem.word_list
            if w.isalpha()
            and len(w) > 2
            and w.lower() not in firsts
            and (locale == "de_DE" or not w[0].isupper())
        )
    return tuple(sorted(words))


# Written for the hard-negative test only (never in training or the gazetteers):
# what support tickets are about.
HELD_APART_WORDS: tuple[str, ...] = (
    "dashboard",
    "sync",
    "backup",
    "upload",
    "download",
    "checkout",
    "cart",
    "subscription",
    "renewal",
    "coupon",
    "discount",
    "shipment",
    "tracking",
    "notification",
    "reminder",
    "calendar",
    "widget",
    "plugin",
    "integration",
    "migration",
    "deployment",
    "rollback",
    "outage",
    "latency",
    "crash",
    "freeze",
    "glitch",
    "duplicate",
    "missing",
    "broken",
    "blank",
    "slow",
    "garbled",
    "expired",
    "locked",
    "pending",
    "failed",
    "stuck",
    "delayed",
    "cancelled",
    "refunded",
    "overcharged",
    "unpaid",
    "token",
    "session",
    "cookie",
    "cache",
    "browser",
    "firmware",
    "printer",
    "scanner",
    "keyboard",
    "battery",
    "adapter",
    "screen",
    "webcam",
    "password",
    "username",
    "avatar",
    "profile",
    "settings",
    "permissions",
    "workspace",
    "folder",
    "attachment",
    "spreadsheet",
    "template",
    "invoice",
    "receipt",
    "quote",
    "estimate",
    "payout",
    "balance",
    "transfer",
    "deposit",
    "withdrawal",
    "ledger",
    "onboarding",
    "sandbox",
    "licence",
    "mailbox",
    "quota",
    "storage",
    "bandwidth",
)
_SLOT = re.compile(r"\{(\w+)\}")


def _one_line(value: str) -> str:
    return re.sub(r"\s*\n\s*", ", ", value.strip())


def _slots(
    fake: Faker, rnd: random.Random, words: tuple[str, ...]
) -> dict[str, tuple[Callable[[], str], str | None]]:
    def date(formats: tuple[str, ...], low: int, high: int) -> str:
        day = _END - datetime.timedelta(days=rnd.randint(low, high))
        return day.strftime(rnd.choice(formats))

    return {
        "person": (lambda: str(fake.name()), PERSON),
        "first": (lambda: str(fake.first_name()), PERSON),
        "last": (lambda: str(fake.last_name()), PERSON),
        "address": (lambda: _one_line(str(fake.address())), ADDRESS),
        "street": (lambda: _one_line(str(fake.street_address())), ADDRESS),
        "road": (lambda: _road(fake, rnd), ADDRESS),
        "city": (lambda: str(fake.city()), PLACE),
        "country": (lambda: str(fake.country()), PLACE),
        "dob": (lambda: date(_DOB_FORMATS, 18 * 365, 80 * 365), DOB),
        "date": (lambda: date(_DATE_FORMATS, 0, 900), None),
        "company": (lambda: str(fake.company()), None),
        "product": (lambda: rnd.choice(_PRODUCTS), None),
        "order": (lambda: f"#{rnd.randint(10_000, 9_999_999)}", None),
        "weekday": (lambda: rnd.choice(_WEEKDAYS), None),
        "month": (lambda: rnd.choice(_MONTHS), None),
        "word": (lambda: rnd.choice(words), None),
        "Word": (lambda: rnd.choice(words).capitalize(), None),
        "Name": (lambda: str(fake.first_name()), None),
    }


def render(
    template: str,
    fake: Faker,
    rnd: random.Random,
    doc: Document,
    words: tuple[str, ...] = HELD_APART_WORDS,
) -> None:
    """Append ``template`` with its slots filled (labelled where they are PII) to
    ``doc``; ``{word}`` and ``{Word}`` are ordinary words of ``words``."""
    slots = _slots(fake, rnd, words)
    cursor = 0
    for match in _SLOT.finditer(template):
        doc.add(template[cursor : match.start()])
        make, kind = slots[match.group(1)]
        doc.add(make(), kind)
        cursor = match.end()
    doc.add(template[cursor:])


def generate(
    documents: int, seed: int, *, split: str = "train", per_document: tuple[int, int] = (2, 5)
) -> list[Document]:
    """``documents`` labelled documents of ``split`` (``train``, ``dev``, ``held_apart``,
    its halves ``held_apart_dev`` and ``held_apart_test``, ``hard_negatives_dev``
    or ``hard_negatives``)."""
    templates: tuple[str, ...]
    locales: tuple[str, ...]
    if split == "train":
        templates, locales = TRAIN_TEMPLATES, TRAIN_LOCALES
    elif split == "dev":
        templates, locales = DEV_TEMPLATES, DEV_LOCALES
    elif split == "held_apart":
        templates, locales = HELD_APART_TEMPLATES, HELD_APART_LOCALES
    elif split == "held_apart_dev":
        templates, locales = HELD_APART_DEV_TEMPLATES, HELD_APART_DEV_LOCALES
    elif split == "held_apart_test":
        templates, locales = HELD_APART_TEST_TEMPLATES, HELD_APART_TEST_LOCALES
    elif split == "hard_negatives":
        templates, locales = HARD_NEGATIVE_TEMPLATES, HELD_APART_TEST_LOCALES
    elif split == "hard_negatives_dev":
        templates, locales = HARD_NEGATIVE_DEV_TEMPLATES, DEV_LOCALES
    else:
        raise ValueError(split)
    words = (
        training_words()
        if split == "train"
        else HARD_NEGATIVE_DEV_WORDS
        if split == "hard_negatives_dev"
        else HELD_APART_WORDS
    )
    rnd = random.Random(seed)
    fakes = {}
    for i, locale in enumerate(locales):
        fake = Faker(locale)
        fake.seed_instance(seed * 31 + i)
        fakes[locale] = fake
    out = []
    for n in range(documents):
        locale = locales[n % len(locales)]
        doc = Document(locale)
        for _ in range(rnd.randint(*per_document)):
            render(rnd.choice(templates), fakes[locale], rnd, doc, words)
            doc.add(rnd.choice(("\n", " ", "\n\n")))
        out.append(doc)
    return out
