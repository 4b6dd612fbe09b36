"""Every error of the HTTP skeleton is RFC 9457 problem+json, over real HTTP."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from fastapi import APIRouter
from pydantic import BaseModel

from bastion.api.app import create_app
from tests.http_server import running_server

PROBLEM = "application/problem+json"
LEAKY = "postgresql://bastion:hunter2@db.internal/prod"


class Ticket(BaseModel):
    title: str
    priority: int


router = APIRouter()


@router.post("/tickets")
async def create_ticket(ticket: Ticket) -> dict[str, str]:
    return {"title": ticket.title}


@router.get("/boom")
async def boom() -> None:
    raise RuntimeError(LEAKY)


class Readiness:
    ok = True

    async def __call__(self) -> None:
        if not self.ok:
            raise ConnectionError(LEAKY)


readiness = Readiness()


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    app = create_app(readiness=readiness, routers=[router], max_body_bytes=4096)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=5) as http:
        yield http


def _problem(response: httpx.Response, status: int, slug: str) -> dict[str, object]:
    assert response.status_code == status
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["type"] == f"https://bastion.dev/problems/{slug}"
    assert body["status"] == status
    assert body["title"]
    assert body["instance"] == response.request.url.path
    assert body["request_id"]
    assert "Traceback" not in response.text
    return dict(body)


def test_health_and_readiness(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    readiness.ok = True
    assert client.get("/readyz").status_code == 200


def test_not_ready_fails_closed_without_leaking(client: httpx.Client) -> None:
    readiness.ok = False
    try:
        response = client.get("/readyz")
    finally:
        readiness.ok = True
    _problem(response, 503, "not-ready")
    assert "hunter2" not in response.text and "db.internal" not in response.text


def test_unknown_route_is_404_problem(client: httpx.Client) -> None:
    _problem(client.get("/nope/../etc/passwd"), 404, "not-found")


def test_wrong_method_is_405_problem_with_allow(client: httpx.Client) -> None:
    response = client.delete("/tickets")
    _problem(response, 405, "method-not-allowed")
    assert "POST" in response.headers["allow"]


def test_malformed_json_is_400(client: httpx.Client) -> None:
    response = client.post(
        "/tickets", content=b'{"title": "x", ', headers={"content-type": "application/json"}
    )
    _problem(response, 400, "malformed-json")


def test_non_utf8_body_is_400(client: httpx.Client) -> None:
    response = client.post(
        "/tickets", content=b'{"title": "\xff\xfe"}', headers={"content-type": "application/json"}
    )
    _problem(response, 400, "bad-request")


def test_invalid_fields_are_422_without_echoing_input(client: httpx.Client) -> None:
    response = client.post("/tickets", json={"title": "t", "priority": "sk_live_SECRETVALUE"})
    body = _problem(response, 422, "validation-error")
    assert "SECRETVALUE" not in response.text
    assert body["errors"] and all(set(e) == {"loc", "msg"} for e in body["errors"])  # type: ignore[union-attr]


def test_unexpected_exception_is_500_without_details(client: httpx.Client) -> None:
    response = client.get("/boom")
    _problem(response, 500, "internal-error")
    assert "hunter2" not in response.text
    assert "RuntimeError" not in response.text


def test_oversized_body_is_413(client: httpx.Client) -> None:
    big = json.dumps({"title": "x" * 10_000, "priority": 1})
    _problem(
        client.post("/tickets", content=big, headers={"content-type": "application/json"}),
        413,
        "payload-too-large",
    )

    def chunks() -> Iterator[bytes]:  # no Content-Length: streamed past the cap
        for _ in range(10):
            yield b" " * 1000

    streamed = client.post(
        "/tickets", content=chunks(), headers={"content-type": "application/json"}
    )
    _problem(streamed, 413, "payload-too-large")


def test_oversized_headers_are_refused(client: httpx.Client) -> None:
    response = client.get("/healthz", headers={"x-big": "a" * 20_000})
    _problem(response, 431, "headers-too-large")
    assert "a" * 1000 not in response.text


def test_request_id_echoed_when_valid_and_replaced_when_not(client: httpx.Client) -> None:
    good = client.get("/healthz", headers={"x-request-id": "req-12345678"})
    assert good.headers["x-request-id"] == "req-12345678"
    for bad in ("<script>alert(1)</script>", "a" * 200, "short", "two words here!"):
        response = client.get("/nope", headers={"x-request-id": bad})
        assert response.headers["x-request-id"] != bad
        assert response.json()["request_id"] == response.headers["x-request-id"]
        assert bad not in response.text


def test_success_carries_a_request_id(client: httpx.Client) -> None:
    response = client.post("/tickets", json={"title": "ok", "priority": 1})
    assert response.status_code == 200
    assert len(response.headers["x-request-id"]) == 32
