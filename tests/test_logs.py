"""JSON log lines: well-formed, carrying the request id, with secrets masked."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import APIRouter

from bastion.api.app import create_app
from bastion.api.declare import PUBLIC_ROUTE
from bastion.logs import MASK, configure_logging, get_logger, is_secret_key, scrub_text
from tests.conftest import Captured
from tests.http_server import running_server

# A fake in the shape of a live Stripe key, assembled at run time so secret
# scanners do not flag the test suite itself.
FAKE_STRIPE_KEY = "sk_" + "live_SECRETVALUE"

LEAKY = "postgresql://bastion:hunter2@db.internal:5432/prod"
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


def test_each_line_is_one_json_object_with_standard_fields(logs: Captured) -> None:
    get_logger("bastion.test").info("hello\nworld", answer=42)
    logging.getLogger("uvicorn.error").warning("port %d busy", 8700)
    lines = logs.text.splitlines()
    assert len(lines) == 2  # the newline in the event did not split the line
    ours, uvicorns = logs.records()
    assert ours["event"] == "hello\nworld"
    assert ours["level"] == "info"
    assert ours["logger"] == "bastion.test"
    assert ours["answer"] == 42
    assert ISO_UTC.fullmatch(ours["timestamp"])
    assert uvicorns["event"] == "port 8700 busy"
    assert uvicorns["level"] == "warning"
    assert uvicorns["logger"] == "uvicorn.error"
    assert ISO_UTC.fullmatch(uvicorns["timestamp"])


def test_level_filters(restore_logging: None) -> None:
    captured = Captured()
    configure_logging("warning", stream=captured.stream)
    get_logger("bastion.test").info("dropped")
    get_logger("bastion.test").warning("kept")
    assert [r["event"] for r in captured.records()] == ["kept"]


def test_unknown_level_is_refused(restore_logging: None) -> None:
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging("chatty")


def test_default_stream_is_the_current_stderr(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure_logging()
    get_logger("bastion.test").info("to_stderr", password="hunter2")
    err = capsys.readouterr().err
    assert json.loads(err)["event"] == "to_stderr"
    assert "hunter2" not in err


def test_secret_keys_are_masked_at_any_depth(logs: Captured) -> None:
    get_logger("bastion.test").info(
        "login",
        user="alice",
        password="hunter2",
        prompt_tokens=42,
        nested={
            "level1": {
                "level2": [
                    {"api_key": FAKE_STRIPE_KEY, "region": "eu"},
                    ("authorization", "Bearer tok_BEARERVALUE"),
                ],
                "ClientSecret": "cs_VALUE",
            }
        },
        headers={"Cookie": "sid=COOKIEVALUE", "Accept": "application/json"},
        signing_key=b"\x00" * 32,
    )
    for secret in ("hunter2", "SECRETVALUE", "BEARERVALUE", "cs_VALUE", "COOKIEVALUE"):
        assert secret not in logs.text
    (record,) = logs.records()
    assert record["password"] == MASK
    assert record["user"] == "alice"
    assert record["prompt_tokens"] == 42
    level2 = record["nested"]["level1"]["level2"]
    assert level2[0] == {"api_key": MASK, "region": "eu"}
    assert level2[1] == ["authorization", MASK]
    assert record["nested"]["level1"]["ClientSecret"] == MASK
    assert record["headers"] == {"Cookie": MASK, "Accept": "application/json"}
    assert record["signing_key"] == MASK


def test_dsn_password_is_masked_and_the_rest_kept(logs: Captured) -> None:
    log = get_logger("bastion.test")
    log.info("connecting", dsn=LEAKY)
    log.info("connecting to %s", LEAKY)
    log.info("conninfo", conninfo="host=db user=bastion password=hunter2 dbname=prod")
    logging.getLogger("psycopg").error("cannot reach %s", LEAKY)
    assert "hunter2" not in logs.text
    dsn, positional, conninfo, stdlib = logs.records()
    assert dsn["dsn"] == "postgresql://bastion:***@db.internal:5432/prod"
    assert positional["event"] == "connecting to postgresql://bastion:***@db.internal:5432/prod"
    assert conninfo["conninfo"] == "host=db user=bastion password=*** dbname=prod"
    assert stdlib["event"] == "cannot reach postgresql://bastion:***@db.internal:5432/prod"


def test_tracebacks_are_logged_and_scrubbed(logs: Captured) -> None:
    try:
        raise RuntimeError(f"cannot connect to {LEAKY}")
    except RuntimeError:
        get_logger("bastion.test").exception("failed")
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    assert "hunter2" not in logs.text
    for record in logs.records():
        assert "Traceback" in record["exception"]
        assert "postgresql://bastion:***@db.internal" in record["exception"]


@dataclass
class Credentials:
    user: str
    password: str


def test_objects_are_logged_by_scrubbed_repr(logs: Captured) -> None:
    cycle: dict[str, Any] = {"name": "loop"}
    cycle["self"] = cycle
    get_logger("bastion.test").info("objects", creds=Credentials("alice", "hunter2"), cycle=cycle)
    assert "hunter2" not in logs.text
    (record,) = logs.records()
    assert record["creds"] == "Credentials(user='alice', password=***)"
    assert record["cycle"]["name"] == "loop"  # a cycle ends at the depth limit


def test_console_rendering_is_redacted_too(restore_logging: None) -> None:
    captured = Captured()
    configure_logging("info", json=False, stream=captured.stream)
    get_logger("bastion.test").info("console", token="tok_VALUE", dsn=LEAKY)
    assert "console" in captured.text
    assert "tok_VALUE" not in captured.text
    assert "hunter2" not in captured.text


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("password", True),
        ("db_password", True),
        ("apiKey", True),
        ("X-Api-Key", True),
        ("access_token", True),
        ("Authorization", True),
        ("set-cookie", True),
        ("private_key", True),
        ("key_material", True),
        ("clientsecret", True),
        ("user", False),
        ("prompt_tokens", False),
        ("key_id", False),
        ("secret_ref", False),
        ("master_key_file", False),
        ("KeyError", False),
        ("database_url", False),  # its value is scrubbed as text instead
    ],
)
def test_secret_key_names(key: str, secret: bool) -> None:
    assert is_secret_key(key) is secret


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("postgresql://u:p@ss@db/app", "postgresql://u:***@db/app"),
        ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
        ("http://host:8080/cb?to=a@b.example", "http://host:8080/cb?to=a@b.example"),
        ("https://x.example/cb?api_key=abc&state=1", "https://x.example/cb?api_key=***&state=1"),
        ("Authorization: Bearer abc.def.ghi", "Authorization: ***"),
        ("Cookie: sid=abc; theme=dark", "Cookie: ***"),
        ('{"password": "x", "user": "u"}', '{"password": ***, "user": "u"}'),
        ("-----BEGIN " + "PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----", "***"),
        ("max_tokens=512 took 12:30", "max_tokens=512 took 12:30"),
    ],
)
def test_scrub_text(text: str, expected: str) -> None:
    assert scrub_text(text) == expected


def test_request_lines_carry_the_request_id(logs: Captured) -> None:
    router = APIRouter()

    @router.get("/work", **PUBLIC_ROUTE)
    async def work() -> dict[str, str]:
        get_logger("bastion.test").info("inside_route", token="tok_ROUTEVALUE")
        return {"done": "yes"}

    @router.get("/boom", **PUBLIC_ROUTE)
    async def boom() -> None:
        raise RuntimeError(LEAKY)

    app = create_app(extra_routers=[router])
    with running_server(app) as url, httpx.Client(base_url=url, timeout=5) as client:
        ok = client.get("/work", headers={"x-request-id": "req-logs-0001"})
        failed = client.get("/boom")
        access = logs.wait_for(lambda r: r["event"] == "request" and r.get("path") == "/work")
        logs.wait_for(lambda r: r["event"] == "request" and r.get("path") == "/boom")
    assert ok.headers["x-request-id"] == "req-logs-0001"

    records = logs.records()  # every line parses as JSON
    inside = next(r for r in records if r["event"] == "inside_route")
    assert inside["request_id"] == "req-logs-0001"
    assert inside["token"] == MASK
    assert access["request_id"] == "req-logs-0001"
    assert access["method"] == "GET"
    assert access["status"] == 200
    assert access["level"] == "info"
    assert isinstance(access["duration_ms"], float | int) and access["duration_ms"] >= 0

    # The failure is logged once, with its request id and a scrubbed traceback;
    # uvicorn does not log it again.
    failure_id = failed.headers["x-request-id"]
    (error,) = [r for r in records if r["event"] == "unhandled_exception"]
    assert error["request_id"] == failure_id
    assert error["level"] == "error"
    assert "RuntimeError" in error["exception"]
    assert not [r for r in records if r["event"] == "Exception in ASGI application"]
    assert "hunter2" not in logs.text
    assert "tok_ROUTEVALUE" not in logs.text

    # uvicorn's own lines came through the same JSON formatter.
    assert any(r["logger"].startswith("uvicorn") for r in records)
    # The request id is unbound once the request is over.
    get_logger("bastion.test").info("after")
    assert "request_id" not in logs.records()[-1]


def test_query_strings_stay_out_of_the_log_even_if_logging_is_configured_late(
    restore_logging: None,
) -> None:
    router = APIRouter()

    @router.get("/work", **PUBLIC_ROUTE)
    async def work() -> dict[str, str]:
        return {"done": "yes"}

    card = "4242424242424242"
    with running_server(create_app(extra_routers=[router])) as url:
        # Configured after uvicorn started (as a test or an embedding app may do).
        captured = Captured()
        configure_logging("debug", json=True, stream=captured.stream)
        with httpx.Client(base_url=url, timeout=5) as client:
            assert client.get(f"/work?card={card}").status_code == 200
        captured.wait_for(lambda r: r["event"] == "request" and r.get("path") == "/work")
    assert card not in captured.text
    assert not [r for r in captured.records() if r["logger"] == "uvicorn.access"]
