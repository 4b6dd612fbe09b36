"""The gateway's memory of used envelope nonces (single use within the
envelope's validity window): replays stay refused, and the cost of a use does
not grow with the request rate.

Found while profiling the gateway's CPU per call (issue 18): every use swept
every nonce still in the window, so at 300 envelopes a second (18,000 live
nonces) a use cost 3.8 ms of CPU, more than the rest of a gateway call."""

from __future__ import annotations

import time
from pathlib import Path
from uuid import uuid4

import pytest

from bastion.safety.signing import CLOCK_SKEW_SECONDS, EnvelopeInvalid, SignedTokens
from bastion.secrets import LocalKeystore

RATE = 300  # envelopes a second
MAX_AGE = 20  # seconds: 7,500 live nonces at RATE (with the clock skew)


def _tokens(tmp_path: Path, clock: list[float]) -> SignedTokens:
    keystore = LocalKeystore(tmp_path / "keystore.bin", tmp_path / "master.key")
    return SignedTokens(keystore, "envelope", max_age=MAX_AGE, clock=lambda: clock[0])


def _use(tokens: SignedTokens, clock: list[float]) -> str:
    clock[0] += 1 / RATE
    nonce = uuid4().hex
    tokens.consume({"nonce": nonce, "ts": clock[0]})
    return nonce


def test_a_nonce_use_costs_the_same_with_thousands_live(tmp_path: Path) -> None:
    clock = [1_000_000.0]
    tokens = _tokens(tmp_path, clock)
    first = _use(tokens, clock)
    for _ in range(RATE * (MAX_AGE + CLOCK_SKEW_SECONDS + 1)):  # past a full window
        _use(tokens, clock)
    started = time.process_time()
    for _ in range(200):
        _use(tokens, clock)
    per_use = (time.process_time() - started) / 200
    # ~10 us each now; the sweep of 6,000 nonces took ~1 ms each.
    assert per_use < 250e-6, f"{per_use * 1e6:.0f} us per use"
    # Still single use: a nonce in the window is refused again ...
    live = _use(tokens, clock)
    with pytest.raises(EnvelopeInvalid):
        tokens.consume({"nonce": live, "ts": clock[0]})
    # ... and the expired ones were forgotten (their tokens fail verify() as expired).
    assert first not in tokens._seen
    assert len(tokens._seen) <= RATE * (MAX_AGE + CLOCK_SKEW_SECONDS) + 1
