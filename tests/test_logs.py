"""Structured logs are JSON lines that never carry secrets."""

from __future__ import annotations

import io
import json
import logging

import structlog

from bastion.logs import MASK, configure_logging, get_logger


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


def test_secret_values_are_masked_at_any_depth() -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    get_logger("t").info(
        "login",
        password="hunter2",
        nested={"deep": {"api_key": "sk_live_abc123", "fine": "visible"}},
        headers=[{"authorization": "Bearer eyJhbGciOi"}],
        dsn_in_text="connecting to postgresql://app:s3cretpw@db:5432/x",
        conninfo="host=/tmp port=5432 user=app password=s3cretpw2",
    )
    text = stream.getvalue()
    for secret in ("hunter2", "sk_live_abc123", "eyJhbGciOi", "s3cretpw", "s3cretpw2"):
        assert secret not in text
    (line,) = _lines(stream)
    assert line["password"] == MASK
    assert line["nested"] == {"deep": {"api_key": MASK, "fine": "visible"}}
    assert "postgresql://app:***@db:5432/x" in str(line["dsn_in_text"])
    assert line["level"] == "info" and line["event"] == "login" and "timestamp" in line


def test_exception_text_is_scrubbed() -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    try:
        raise RuntimeError("could not reach postgresql://u:topsecret@db/app")
    except RuntimeError:
        get_logger("t").exception("failed")
        logging.getLogger("uvicorn.error").exception("from stdlib")
    text = stream.getvalue()
    assert "topsecret" not in text
    assert len(_lines(stream)) == 2
    assert all("RuntimeError" in str(line.get("exception")) for line in _lines(stream))


def test_request_id_is_carried_by_every_line() -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    with structlog.contextvars.bound_contextvars(request_id="req-123456789"):
        get_logger("t").info("one")
        logging.getLogger("uvicorn.error").info("two")
    assert [line["request_id"] for line in _lines(stream)] == ["req-123456789"] * 2
