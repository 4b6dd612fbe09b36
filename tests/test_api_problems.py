"""Every error of the HTTP skeleton is RFC 9457 problem+json, over real HTTP."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import structlog
from fastapi import APIRouter, HTTPException
from pydantic import BaseModel

from bastion.api import app as app_module
from bastion.api.app import create_app
from bastion.api.declare import PUBLIC_ROUTE
from bastion.api.middleware import valid_request_id
from bastion.api.problems import Conflict
from bastion.gateway.app import create_gateway_app
from bastion.logs import configure_logging
from bastion.worker.health import create_worker_health_app
from tests.http_server import running_server

# A fake in the shape of a live Stripe key, assembled at run time so secret
# scanners do not flag the test suite itself.
FAKE_STRIPE_KEY = "sk_" + "live_SECRETVALUE"

PROBLEM = "application/problem+json"
LEAKY = "postgresql://bastion:hunter2@db.internal/prod"
CAP = 4096


class Ticket(BaseModel):
    title: str
    priority: int


router = APIRouter()


@router.post("/tickets", **PUBLIC_ROUTE)
async def create_ticket(ticket: Ticket) -> dict[str, str]:
    return {"title": ticket.title}


@router.get("/boom", **PUBLIC_ROUTE)
async def boom() -> None:
    raise RuntimeError(LEAKY)


@router.get("/conflict", **PUBLIC_ROUTE)
async def conflict() -> None:
    raise Conflict("ticket 7 already exists", ticket_id=7)


@router.get("/teapot", **PUBLIC_ROUTE)
async def teapot() -> None:
    raise HTTPException(status_code=418, detail="short and stout")


class Readiness:
    """A readiness check the tests switch between ok, failing and slow."""

    mode = "ok"

    async def __call__(self) -> None:
        if self.mode == "fail":
            raise ConnectionError(LEAKY)
        if self.mode == "slow":
            await asyncio.sleep(5)


readiness = Readiness()


@pytest.fixture(scope="module", autouse=True)
def quiet_json_logs() -> Iterator[io.StringIO]:
    """Production logging, into a buffer; the previous configuration is restored."""
    saved_structlog = structlog.get_config()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    stream = io.StringIO()
    configure_logging("info", json=True, stream=stream)
    yield stream
    structlog.configure(**saved_structlog)
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    app = create_app(readiness=readiness, extra_routers=[router], max_body_bytes=CAP)
    with running_server(app) as url, httpx.Client(base_url=url, timeout=5) as http:
        yield http


@pytest.fixture
def readiness_mode() -> Iterator[Readiness]:
    yield readiness
    readiness.mode = "ok"


def _problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    """Assert ``response`` is a complete problem of ``slug``; return its body."""
    assert response.status_code == status
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["type"] == f"https://bastion.dev/problems/{slug}"
    assert body["status"] == status
    assert body["title"]
    # The matched route's template (here the path itself), never more of the
    # path as sent; absent when no route matched.
    assert body.get("instance", response.request.url.path) == response.request.url.path
    assert body["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text
    return dict(body)


def test_health_and_readiness(client: httpx.Client) -> None:
    health = client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}


def test_not_ready_fails_closed_without_leaking(
    client: httpx.Client, readiness_mode: Readiness
) -> None:
    readiness_mode.mode = "fail"
    response = client.get("/readyz")
    _problem(response, 503, "not-ready")
    assert "hunter2" not in response.text
    assert "db.internal" not in response.text
    assert "ConnectionError" not in response.text


def test_slow_readiness_is_not_ready(
    client: httpx.Client, readiness_mode: Readiness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(app_module, "READINESS_TIMEOUT", 0.2)
    readiness_mode.mode = "slow"
    _problem(client.get("/readyz"), 503, "not-ready")


def test_unknown_route_is_404_problem(client: httpx.Client) -> None:
    _problem(client.get("/no/such/route"), 404, "not-found")


def test_wrong_method_is_405_problem_keeping_allow(client: httpx.Client) -> None:
    response = client.delete("/tickets")
    _problem(response, 405, "method-not-allowed")
    assert response.headers["allow"] == "POST"


def test_malformed_json_is_400(client: httpx.Client) -> None:
    response = client.post(
        "/tickets", content=b'{"title": "x", ', headers={"content-type": "application/json"}
    )
    body = _problem(response, 400, "malformed-json")
    assert "errors" not in body


def test_non_utf8_body_is_400(client: httpx.Client) -> None:
    response = client.post(
        "/tickets",
        content=b'{"title": "\xff\xfe", "priority": 1}',
        headers={"content-type": "application/json"},
    )
    body = _problem(response, 400, "malformed-json")
    assert "UTF-8" in str(body["detail"])


def test_invalid_fields_are_422_without_echoing_input(client: httpx.Client) -> None:
    response = client.post("/tickets", json={"title": "t", "priority": FAKE_STRIPE_KEY})
    body = _problem(response, 422, "validation-error")
    assert "SECRETVALUE" not in response.text
    (error,) = body["errors"]
    assert set(error) == {"loc", "msg"}
    assert error["loc"] == ["body", "priority"]
    assert "integer" in error["msg"]


def test_missing_fields_are_listed(client: httpx.Client) -> None:
    body = _problem(client.post("/tickets", json={}), 422, "validation-error")
    locs = sorted(tuple(e["loc"]) for e in body["errors"])
    assert locs == [("body", "priority"), ("body", "title")]


def test_unexpected_exception_is_500_without_details(client: httpx.Client) -> None:
    response = client.get("/boom", headers={"x-request-id": "trace-500-abcdef"})
    body = _problem(response, 500, "internal-error")
    assert body["request_id"] == "trace-500-abcdef"
    for leak in ("hunter2", "postgresql", "RuntimeError", "Traceback"):
        assert leak not in response.text
    # The server is still answering on the same client afterwards.
    assert client.get("/healthz").status_code == 200


def test_problem_subclass_keeps_detail_and_extensions(client: httpx.Client) -> None:
    body = _problem(client.get("/conflict"), 409, "conflict")
    assert body["detail"] == "ticket 7 already exists"
    assert body["ticket_id"] == 7


def test_other_http_errors_are_about_blank(client: httpx.Client) -> None:
    response = client.get("/teapot")
    assert response.status_code == 418
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["type"] == "about:blank"
    assert body["status"] == 418
    assert body["detail"] == "short and stout"


def test_oversized_declared_body_is_413(client: httpx.Client) -> None:
    big = json.dumps({"title": "x" * (CAP * 2), "priority": 1})
    response = client.post("/tickets", content=big, headers={"content-type": "application/json"})
    body = _problem(response, 413, "payload-too-large")
    assert str(CAP) in str(body["detail"])


def test_oversized_streamed_body_is_413(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:  # chunked, no Content-Length: counted as it arrives
        yield b'{"title": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'", "priority": 1}'

    response = client.post(
        "/tickets", content=chunks(), headers={"content-type": "application/json"}
    )
    _problem(response, 413, "payload-too-large")


def test_body_under_the_cap_is_accepted(client: httpx.Client) -> None:
    title = "x" * (CAP - 100)
    response = client.post("/tickets", json={"title": title, "priority": 1})
    assert response.status_code == 200
    assert response.json() == {"title": title}


def test_oversized_headers_are_431(client: httpx.Client) -> None:
    response = client.get("/healthz", headers={"x-big": "a" * 40_000})
    _problem(response, 431, "headers-too-large")
    assert "a" * 100 not in response.text


def test_request_id_echoed_when_valid(client: httpx.Client) -> None:
    response = client.get("/healthz", headers={"x-request-id": "req-12345678"})
    assert response.headers["x-request-id"] == "req-12345678"


@pytest.mark.parametrize(
    "bad", ["<script>alert(1)</script>", "a" * 200, "short", "two words here!", "abc%0d%0aX: y"]
)
def test_request_id_replaced_when_invalid(client: httpx.Client, bad: str) -> None:
    response = client.get("/no/such/route", headers={"x-request-id": bad})
    replaced = response.headers["x-request-id"]
    assert replaced != bad
    assert len(replaced) == 32 and valid_request_id(replaced)
    assert response.json()["request_id"] == replaced
    assert bad not in response.text


@pytest.mark.parametrize("bad", ["abcdefgh\n", "abcdefgh\r\nSet-Cookie: x=1", "abc\x00defgh"])
def test_request_id_with_control_characters_is_invalid(bad: str) -> None:
    # Real HTTP clients refuse to send these; the check must refuse them anyway.
    assert not valid_request_id(bad)


def test_generated_request_ids_are_unique(client: httpx.Client) -> None:
    ids = {client.get("/healthz").headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


def test_no_docs_ui_but_openapi(client: httpx.Client) -> None:
    assert client.get("/docs").status_code == 404
    assert client.get("/redoc").status_code == 404
    schema = client.get("/openapi.json")
    assert schema.status_code == 200
    assert "/tickets" in schema.json()["paths"]
    assert "server" not in schema.headers


def test_gateway_and_worker_health_apps() -> None:
    async def failing() -> None:
        raise ConnectionError(LEAKY)

    for app in (create_gateway_app(), create_worker_health_app(failing)):
        with running_server(app) as url, httpx.Client(base_url=url, timeout=5) as http:
            assert http.get("/healthz").json() == {"status": "ok"}
            ready = http.get("/readyz")
            if app.title == "Bastion worker":
                _problem(ready, 503, "not-ready")
            else:
                assert ready.status_code == 200


def test_an_app_with_an_undeclared_route_refuses_to_start() -> None:
    from bastion.api.declare import UndeclaredRoute

    naked = APIRouter(prefix="/naked")

    @naked.get("/secret")
    async def secret() -> dict[str, str]:
        return {"leaked": "yes"}

    with pytest.raises(UndeclaredRoute, match="GET /naked/secret"):
        create_app(extra_routers=[naked])
