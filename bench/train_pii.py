"""Train the name, address and place tagger (:mod:`bastion.safety.pii_names`).

Data: synthetic only. tests/pii_names_corpus.py writes Faker's names,
addresses, towns and countries (Faker, MIT licence, the TRAIN_LOCALES only)
into the TRAIN_TEMPLATES; tests/pii_corpus.py adds tickets full of e-mail
addresses, phones, IBANs and keys (with a seed of their own); the gazetteers
are further Faker draws of the TRAIN_LOCALES. The dev and held-apart
templates and locales are never read here. The held-apart set is split in two
(tests/pii_names_corpus.py): a dev half whose errors were read while tuning
(its figure is a tuning figure) and a test half of other templates and
locales, of which only the final totals are ever looked at.

Model: multinomial logistic regression over the sparse features of each
candidate token, full-batch Adam in numpy, L2. Deterministic: the same
arguments give the same weights, bit for bit. So that the model learns to read
context and not only to look words up, the word and gazetteer features of a
fixed, seeded third of the training rows are dropped ("lexical dropout").

Run: .venv/bin/python bench/train_pii.py   (``make train-pii``)
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import numpy.typing as npt
from faker import Faker

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from bastion.safety import pii_names  # noqa: E402
from tests import pii_corpus  # noqa: E402
from tests.pii_corpus import Document  # noqa: E402
from tests.pii_names_corpus import TRAIN_LOCALES, generate, training_words  # noqa: E402

LEXICAL = ("w=", "g=", "p3=", "s3=", "s4=", "w-1|sh=", "g-1=", "g1=")
# What a word of a locale the model never saw looks like: its spelling (prefix
# and suffixes) is there, but neither the word nor a gazetteer hit is.
UNSEEN = ("w=", "g=")
RARE = 30  # occurrences in the training data below which a word may be made unseen


def gazetteers(seed: int, draws: int) -> dict[str, frozenset[str]]:
    """Lower-cased words of Faker's first names, last names, towns, countries
    and street names in the training locales, and its lorem lists' ordinary words."""
    sets: dict[str, set[str]] = {name: set() for name in pii_names.GAZETTEERS}
    makers = {
        "first": "first_name",
        "last": "last_name",
        "town": "city",
        "country": "country",
        "street": "street_name",
    }
    # "common" is not drawn: it is the lorem lists, whole.
    for i, locale in enumerate(TRAIN_LOCALES):
        fake = Faker(locale)
        fake.seed_instance(seed + i)
        for name, method in makers.items():
            for _ in range(draws):
                for tok in pii_names.tokens(str(getattr(fake, method)())):
                    if tok.kind == "w" and len(tok.text) > 1:
                        sets[name].add(tok.text.lower())
    sets["common"].update(training_words())
    return {name: frozenset(words) for name, words in sets.items()}


def connectors(docs: list[Document], minimum: int = 3) -> frozenset[str]:
    """Lower-case words seen inside labelled names and addresses ("rue", "van")."""
    seen: Counter[str] = Counter()
    for doc in docs:
        for label in doc.labels:
            if label.kind in (pii_names.PERSON, pii_names.ADDRESS):
                for tok in pii_names.tokens(doc.text[label.start : label.end]):
                    if tok.kind == "w" and tok.text.islower():
                        seen[tok.text] += 1
    return frozenset(word for word, n in seen.items() if n >= minimum)


def rows(
    docs: list[Document],
    lexicon: pii_names.Lexicon,
    *,
    dropout: float,
    unseen: float,
    min_count: int,
    seed: int,
) -> tuple[list[list[str]], list[int]]:
    """Features and class of every candidate token of ``docs``."""
    rnd = random.Random(seed)
    feats: list[list[str]] = []
    classes: list[int] = []
    # How often each candidate word occurs: a word of the templates ("Please",
    # "Ticket") is known wherever the model runs; a rare one (a name, a street)
    # is what an unseen locale brings, so only those are made unseen.
    seen: Counter[str] = Counter()
    for doc in docs:
        toks = pii_names.tokens(doc.text)
        seen.update(toks[i].text.lower() for i in pii_names.candidates(doc.text, toks, lexicon))
    for doc in docs:
        toks = pii_names.tokens(doc.text)
        owner = [0] * len(doc.text)
        for label in doc.labels:
            if label.kind in pii_names.CLASSES:
                index = pii_names.CLASSES.index(label.kind)
                owner[label.start : label.end] = [index] * (label.end - label.start)
        for i in pii_names.candidates(doc.text, toks, lexicon):
            tok = toks[i]
            names = pii_names.features(toks, i, lexicon)
            draw = rnd.random()
            count = seen[tok.text.lower()]
            if draw < dropout:
                names = [n for n in names if not n.startswith(LEXICAL)]
            elif count < min_count or (count < RARE and draw < dropout + unseen):
                names = [n for n in names if not n.startswith(UNSEEN)]
                names.append(pii_names.UNKNOWN)
            feats.append(names)
            classes.append(owner[tok.start])
    return feats, classes


def fit(
    ids: npt.NDArray[np.int64],
    row_of: npt.NDArray[np.int64],
    classes: npt.NDArray[np.int64],
    dimensions: int,
    *,
    steps: int,
    l2: float,
    rate: float,
) -> npt.NDArray[np.float32]:
    """Multinomial logistic regression, full-batch Adam, zero start."""
    n, k = classes.size, len(pii_names.CLASSES)
    onehot = np.zeros((n, k))
    onehot[np.arange(n), classes] = 1.0
    w = np.zeros((dimensions, k))
    m, v = np.zeros_like(w), np.zeros_like(w)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for step in range(1, steps + 1):
        z = np.zeros((n, k))
        for c in range(k):
            z[:, c] = np.bincount(row_of, weights=w[ids, c], minlength=n)
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        err = (p - onehot) / n
        grad = np.empty_like(w)
        for c in range(k):
            grad[:, c] = np.bincount(ids, weights=err[row_of, c], minlength=dimensions)
        grad += l2 * w
        m = beta1 * m + (1 - beta1) * grad
        v = beta2 * v + (1 - beta2) * grad * grad
        w -= rate * (m / (1 - beta1**step)) / (np.sqrt(v / (1 - beta2**step)) + eps)
        if step % 50 == 0:
            loss = -np.log(p[np.arange(n), classes] + 1e-12).mean()
            print(f"  step {step}: loss {loss:.4f}", flush=True)
    return w.astype(np.float32)


def main() -> None:
    if os.environ.get("PYTHONHASHSEED") != "0":
        # Some Faker providers (it_IT's towns) draw from sets, whose order is
        # the string hash's: fixed, the same arguments give the same weights.
        os.execve(
            sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONHASHSEED": "0"}
        )
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--draws", type=int, default=1500, help="gazetteer draws per locale")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--l2", type=float, default=1e-4)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--dropout", type=float, default=0.33)
    parser.add_argument(
        "--unseen",
        type=float,
        default=0.4,
        help="rows whose own word and gazetteer hit are dropped",
    )
    parser.add_argument("--min-count", type=int, default=2)
    parser.add_argument(
        "--pattern-tickets", type=float, default=0.5, help="pattern-kind tickets per document"
    )
    parser.add_argument("--out", type=Path, default=pii_names.MODEL_PATH)
    args = parser.parse_args()
    started = time.perf_counter()

    # The name templates, and the pattern kinds' tickets (labels: "Key", "IBAN",
    # "Phone:" are no names; their distractor names and addresses are), drawn
    # with seeds of their own: tests/test_pii_corpus.py and bench/pii.py use
    # pii_corpus.SEED and SEED + 1.
    docs = generate(args.docs, args.seed, split="train")
    tickets = round(args.docs * args.pattern_tickets)
    docs += pii_corpus.generate(tickets, pii_corpus.SEED + 100 + args.seed)
    docs += pii_corpus.generate_gaps(tickets // 2, pii_corpus.SEED + 200 + args.seed)
    lexicon = pii_names.Lexicon(gazetteers(args.seed, args.draws), connectors(docs))
    feats, classes = rows(
        docs,
        lexicon,
        dropout=args.dropout,
        unseen=args.unseen,
        min_count=args.min_count,
        seed=args.seed,
    )
    counts = Counter(name for names in feats for name in names)
    vocabulary = sorted(name for name, n in counts.items() if n >= args.min_count)
    index = {name: i for i, name in enumerate(vocabulary)}
    ids_list: list[int] = []
    row_list: list[int] = []
    for r, names in enumerate(feats):
        for name in names:
            found = index.get(name)
            if found is not None:
                ids_list.append(found)
                row_list.append(r)
    print(
        f"{len(docs)} documents, {len(feats)} candidate tokens "
        f"({Counter(classes)}), {len(vocabulary)} features, "
        f"gazetteers { ({k: len(v) for k, v in lexicon.sets.items()}) }, "
        f"{len(lexicon.connectors)} connectors"
    )
    weights = fit(
        np.asarray(ids_list, dtype=np.int64),
        np.asarray(row_list, dtype=np.int64),
        np.asarray(classes, dtype=np.int64),
        len(vocabulary),
        steps=args.steps,
        l2=args.l2,
        rate=args.rate,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    pii_names.save(args.out, vocabulary, weights, lexicon)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1e6:.1f} MB) in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
