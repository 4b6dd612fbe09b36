"""The billing routes' card-number check runs before the caller is known: an
anonymous megabyte must not be scanned on the api's event loop (issue 23, A3).

Before the fix a 1 MiB JSON body of digit strings cost 2.2 s of scanning on the
loop, for anyone, authenticated or not."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from uuid import uuid4

import httpx
import pytest

from bastion.compose import Identity
from bastion.db.pool import Database
from bastion.secrets import LocalKeystore
from tests.api_stack import api_server
from tests.conftest import DbHandles


async def _nothing(_db: Database, _identity: Identity) -> None:
    return None


@pytest.fixture(scope="module")
def api(database: DbHandles, keystore: LocalKeystore) -> Iterator[str]:
    with api_server(database, keystore, _nothing) as (url, _app, _identity):
        yield url


def test_an_anonymous_megabyte_to_a_billing_route_is_refused_unscanned(api: str) -> None:
    digits = json.dumps([str(n * 7919 % 10**9) for n in range(80_000)]).encode()
    assert 500_000 < len(digits) < 1 << 20
    started = time.perf_counter()
    answer = httpx.put(
        f"{api}/tenants/{uuid4()}/billing/plan",
        content=digits,
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    took = time.perf_counter() - started
    assert answer.status_code == 413
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert answer.json()["type"].endswith("/payload-too-large")
    assert took < 0.5, f"the api spent {took:.2f} s on it"
