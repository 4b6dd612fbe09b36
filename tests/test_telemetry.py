"""OpenTelemetry traces through the real processes (issue 19 item 2).

The api and the gateway as ``bastion up`` links them, served by uvicorn on
the test database, the gateway's model behind a real HTTP provider double,
every span going to an in-memory exporter (the :class:`Overrides` hook). One
question is one trace: the api's request, its call to the gateway, the
gateway's request, its stages and its provider attempt, and both processes'
database transactions, linked parent to child; the provider receives the
trace in ``traceparent``. Planted personal data and secrets (in the prompt,
the headers, the query string, ``tracestate`` and baggage) reach no span and
no log line. A caller's ``traceparent`` is a parent only when well-formed;
its ``sampled`` flag decides nothing here; a malformed one starts a new trace.
A worker job deferred inside a request's trace is a span of that trace.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import psycopg
import pytest
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from pydantic import ValidationError

from bastion.db.pool import Database
from bastion.settings import ModelRoute, Settings
from bastion.telemetry.tracing import (
    ATTRIBUTES,
    build_tracing,
    current_trace_id,
    job_trace_args,
    parse_traceparent,
    span,
)
from bastion.tenants.service import TenantService
from bastion.worker.queue import queue_app, running_worker
from tests.conftest import Captured, DbHandles
from tests.http_server import running_server
from tests.linked_stack import NAMESPACE, Linked, linked_stack
from tests.provider_double import DoubleState, provider_double

pytestmark = pytest.mark.anyio

PROVIDER_KEY = f"sk-planted-provider-{secrets.token_hex(12)}"
QUESTIONS = "/tenants/{tenant_id}/knowledge/namespaces/{namespace}/questions"


@dataclass
class Traced:
    linked: Linked
    exporter: InMemorySpanExporter
    double: DoubleState

    def client(self, role: str = "contributor") -> httpx.AsyncClient:
        """The api's client for ``role``, each request with its DPoP proof."""

        async def sign(request: httpx.Request) -> None:
            key, token = self.linked.credentials(role)
            request.headers["Authorization"] = f"DPoP {token}"
            request.headers["DPoP"] = key.proof(
                request.method, str(request.url).split("?")[0], access_token=token
            )

        return httpx.AsyncClient(
            base_url=self.linked.api_url, event_hooks={"request": [sign]}, timeout=30
        )

    def questions(self) -> str:
        return QUESTIONS.format(tenant_id=self.linked.tenants["own"], namespace=NAMESPACE)


@pytest.fixture(scope="module")
def traced(database: DbHandles) -> Iterator[Traced]:
    exporter = InMemorySpanExporter()
    double = DoubleState(accepted_keys={PROVIDER_KEY})
    with running_server(provider_double(double)) as upstream:
        # The plan's model (Free admits bastion-local), served by the double.
        models = [
            ModelRoute(
                name="bastion-local",
                provider="openai_compatible",
                base_url=f"{upstream}/v1",
                api_key_ref="local://providers/double",
            )
        ]
        with linked_stack(
            database,
            gateway_models=models,
            span_processor=SimpleSpanProcessor(exporter),
            ring={"providers/double": PROVIDER_KEY.encode()},
        ) as linked:
            yield Traced(linked, exporter, double)


def _trace(exporter: InMemorySpanExporter, trace_id: int) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]


def _service(span: ReadableSpan) -> Any:
    return span.resource.attributes["service.name"]


def _parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def _one(spans: list[ReadableSpan], service: str, name: str) -> ReadableSpan:
    found = [s for s in spans if _service(s) == service and s.name == name]
    assert len(found) == 1, [(_service(s), s.name) for s in spans]
    return found[0]


def _ancestors(span: ReadableSpan, by_id: dict[int, ReadableSpan]) -> list[str]:
    chain = []
    while (parent := _parent_id(span)) is not None and parent in by_id:
        span = by_id[parent]
        chain.append(f"{_service(span)}:{span.name}")
    return chain


async def test_one_question_is_one_trace_from_the_api_to_the_provider(
    traced: Traced, logs: Captured
) -> None:
    traced.exporter.clear()
    async with traced.client() as client:
        response = await client.post(traced.questions(), json={"question": "When was my refund?"})
    assert response.status_code == 200, response.text
    echoed = parse_traceparent(response.headers["traceparent"])
    assert echoed is not None
    spans = _trace(traced.exporter, echoed.trace_id)
    by_id = {s.context.span_id: s for s in spans}

    request = _one(spans, "api", f"POST {QUESTIONS}")
    assert request.kind == SpanKind.SERVER and request.parent is None
    assert request.attributes is not None
    assert request.attributes["http.route"] == QUESTIONS
    assert request.attributes["http.response.status_code"] == 200
    call = _one(spans, "api", "api.gateway_call")
    assert _parent_id(call) == request.context.span_id
    # The gateway's request is the child of the api's call to it, in the same trace.
    served = _one(spans, "gateway", "POST /v1/chat/completions")
    assert served.kind == SpanKind.SERVER and _parent_id(served) == call.context.span_id
    for stage in ("entitle", "check_tools", "screen_input", "tokenize_input"):
        assert _parent_id(_one(spans, "gateway", f"gateway.{stage}")) == served.context.span_id
    attempt = _one(spans, "gateway", "gateway.provider")
    assert _parent_id(attempt) == served.context.span_id
    assert attempt.attributes is not None
    assert attempt.attributes["gen_ai.request.model"] == "bastion-local"
    # The provider was called as a child of that attempt.
    upstream = parse_traceparent(traced.double.last_traceparent)
    assert upstream is not None
    assert (upstream.trace_id, upstream.span_id) == (echoed.trace_id, attempt.context.span_id)
    # Both processes' database transactions hang in the same tree, under their request.
    for service, root in (("api", request), ("gateway", served)):
        transactions = [s for s in spans if _service(s) == service and s.name.startswith("db.")]
        assert transactions, service
        for tx in transactions:
            assert f"{service}:{root.name}" in _ancestors(tx, by_id)
    assert {s.context.trace_id for s in spans} == {echoed.trace_id}
    # Every attribute is on the allow-list.
    assert {k for s in spans for k in (s.attributes or {})} <= ATTRIBUTES
    # The logs carry the ids: the api's request line, the gateway's model call.
    trace_hex = f"{echoed.trace_id:032x}"
    line = logs.wait_for(
        lambda r: (
            r.get("event") == "request"
            and r.get("trace_id") == trace_hex
            and r["path"].endswith("/questions")
        )
    )
    assert line["span_id"] == f"{request.context.span_id:016x}"
    model_call = logs.wait_for(lambda r: r.get("event") == "model_call")
    assert model_call["trace_id"] == trace_hex


async def test_planted_personal_data_and_secrets_reach_no_span_and_no_log_line(
    traced: Traced, logs: Captured
) -> None:
    tag = secrets.token_hex(6)
    email = f"margaret.{tag}@example.com"
    card = "4111 1111 1111 1111"
    name = "Margaret Thistlewood"
    bearer = f"planted-bearer-{secrets.token_hex(16)}"
    header_secret = f"sk-planted-header-{secrets.token_hex(12)}"
    query_secret = f"sk-planted-query-{secrets.token_hex(12)}"
    planted = [email, card, card.replace(" ", ""), name, "Thistlewood"]
    planted += [PROVIDER_KEY, bearer, header_secret, query_secret, tag]
    question = (
        f"I am {name}, write to {email}; my card is {card}. "
        f"The provider key is {PROVIDER_KEY} and my token is Bearer {bearer}."
    )
    traced.exporter.clear()
    async with traced.client() as client:
        response = await client.post(
            traced.questions(),
            params={"api_key": query_secret, "email": email},
            json={"question": question},
            headers={
                "X-Api-Key": header_secret,
                "X-Customer": f"{name} <{email}>",
                "tracestate": f"vendor={header_secret}",
                "baggage": f"user={email},card={card.replace(' ', '')}",
            },
        )
        # And straight to the gateway, with the user's own token, the prompt verbatim.
        key, token = traced.linked.credentials("contributor")
        url = f"{traced.linked.gateway_url}/v1/chat/completions"
        direct = await client.post(
            url,
            params={"token": query_secret},
            json={"model": "bastion-local", "messages": [{"role": "user", "content": question}]},
            headers={
                "Authorization": f"DPoP {token}",
                "DPoP": key.proof("POST", url, access_token=token),
                "X-Api-Key": header_secret,
                "baggage": f"email={email}",
            },
        )
    assert response.status_code == 200, response.text
    assert direct.status_code == 200, direct.text
    # The provider got the calls (the secrets went through the real pipeline) ...
    assert traced.double.calls >= 2
    spans = traced.exporter.get_finished_spans()
    assert len(spans) > 10
    # ... and nothing planted is in a span: names, attributes, events, links,
    # status, resource (the whole exported form of each).
    exported = "\n".join(span.to_json() for span in spans)
    for value in planted:
        assert value not in exported, value
    # Nor in any log line of either process, nor in the traceparent the provider saw.
    logs.wait_for(lambda r: r.get("event") == "model_call")
    for value in planted:
        assert value not in logs.text, value
    assert not any(value in (traced.double.last_traceparent or "") for value in planted)


MALFORMED = [
    "00-zzzz-not-a-trace",
    "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",  # uppercase
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero parent id
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # 00 has no more fields
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" + "0" * 9000,
    "\u00e9\u00e9-4bf92f3577b34da6a3ce929d0e0e4736",  # not ASCII
]


async def test_a_callers_traceparent_is_a_parent_only_when_well_formed(traced: Traced) -> None:
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    traced.exporter.clear()
    async with httpx.AsyncClient(base_url=traced.linked.api_url, timeout=10) as client:
        # Well-formed, and "not sampled": continued, and recorded all the same
        # (whether this process records a trace is not the caller's choice).
        kept = await client.get(
            "/healthz", headers={"traceparent": f"00-{trace_id}-{parent_id}-00"}
        )
        assert kept.status_code == 200
        echoed = parse_traceparent(kept.headers["traceparent"])
        assert echoed is not None and f"{echoed.trace_id:032x}" == trace_id
        (root,) = _trace(traced.exporter, echoed.trace_id)
        assert f"{_parent_id(root):016x}" == parent_id and root.name == "GET /healthz"
        # A later version's extra fields are ignored (W3C trace context 3.2.4).
        later = await client.get(
            "/healthz", headers={"traceparent": f"cc-{trace_id}-{parent_id}-01-whatever"}
        )
        assert parse_traceparent(later.headers["traceparent"]).trace_id == echoed.trace_id  # type: ignore[union-attr]
        for header in MALFORMED:
            traced.exporter.clear()
            response = await client.get(
                "/healthz", headers=[(b"traceparent", header.encode("latin-1", "replace"))]
            )
            assert response.status_code == 200, header
            fresh = parse_traceparent(response.headers["traceparent"])
            assert fresh is not None and f"{fresh.trace_id:032x}" != trace_id, header
            (span,) = traced.exporter.get_finished_spans()
            assert span.parent is None and span.context.trace_id == fresh.trace_id, header


async def test_a_worker_job_joins_the_trace_of_the_request_that_enqueued_it(
    database: DbHandles,
) -> None:
    exporter = InMemorySpanExporter()
    api = build_tracing("api", processor=SimpleSpanProcessor(exporter))
    worker = build_tracing("worker", processor=SimpleSpanProcessor(exporter))
    queue = queue_app(database.queue)
    ran: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    @queue.task(name="telemetry.probe", queue="tools")
    async def probe(**kwargs: Any) -> None:
        await ran.put(kwargs)

    async with queue.open_async():
        with api.entry("POST /probe", kind=SpanKind.SERVER) as request:
            await queue.configure_task(name="telemetry.probe", queue="tools").defer_async(
                tenant_id="00000000-0000-0000-0000-000000000001", **job_trace_args()
            )
        async with running_worker(queue, tracing=worker):
            kwargs = await asyncio.wait_for(ran.get(), 20)
    # The task got its arguments, not the carrier.
    assert kwargs == {"tenant_id": "00000000-0000-0000-0000-000000000001"}
    (job,) = [s for s in exporter.get_finished_spans() if _service(s) == "worker"]
    assert job.name == "job telemetry.probe" and job.kind == SpanKind.CONSUMER
    assert job.context.trace_id == request.get_span_context().trace_id
    assert _parent_id(job) == request.get_span_context().span_id
    assert json.loads(job.to_json())["attributes"] == {"bastion.job": "telemetry.probe"}


async def test_an_ingest_job_enqueued_in_sql_joins_the_upload_requests_trace(
    traced: Traced, database: DbHandles
) -> None:
    """``bastion.enqueue_ingest`` (SQL, in the upload's transaction) carries
    the request's trace into the job (migration 0036): the worker's span of
    that ingestion is in the trace the caller's ``traceparent`` started."""
    exporter = InMemorySpanExporter()
    worker = build_tracing("worker", processor=SimpleSpanProcessor(exporter))
    queue = queue_app(database.queue)
    ran: asyncio.Queue[tuple[dict[str, Any], int]] = asyncio.Queue()

    # Stands in for the real ingestion (whose work other tests cover): it
    # records the arguments it got and the trace it runs in.
    @queue.task(name="knowledge.ingest", queue="ingest")
    async def ingest(**kwargs: Any) -> None:
        await ran.put((kwargs, otel_trace.get_current_span().get_span_context().trace_id))

    trace_id = secrets.randbits(128) | 1
    caller = f"00-{trace_id:032x}-{secrets.randbits(64) | 1:016x}-01"
    async with traced.client() as client:
        response = await client.post(
            traced.questions().replace("/questions", "/documents"),
            params={"title": "traced upload"},
            content=b"A document whose ingestion is traced.",
            headers={"Content-Type": "text/plain", "traceparent": caller},
        )
    assert response.status_code == 202, response.text
    document = response.json()["id"]
    async with queue.open_async(), running_worker(queue, tracing=worker):
        while True:  # (an ingestion another test left queued is let through)
            kwargs, job_trace = await asyncio.wait_for(ran.get(), 20)
            if kwargs.get("document_id") == document:
                break
    # The task got its arguments, not the carrier.
    assert set(kwargs) == {"tenant_id", "document_id", "user_id"}
    assert job_trace == trace_id
    request_spans = {s.context.span_id for s in _trace(traced.exporter, trace_id)}
    (job,) = [s for s in _trace(exporter, trace_id) if s.name == "job knowledge.ingest"]
    assert _parent_id(job) in request_spans  # a child of the upload request's spans


async def test_only_a_well_formed_traceparent_reaches_a_job_enqueued_in_sql(
    db: Database, database: DbHandles
) -> None:
    """What a caller passes to ``bastion.enqueue_billing_drain`` as the trace
    goes into the queue only as a well-formed version-00 ``traceparent``."""
    tenant = (await TenantService(db).create_tenant(f"tp-{secrets.token_hex(5)}", "tp")).id
    good = f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
    carried = {
        good: {"traceparent": good},
        good.upper(): {},
        f"00-{'0' * 32}-{secrets.token_hex(8)}-01": {},  # all-zero trace id
        f"00-{secrets.token_hex(16)}-{'0' * 16}-01": {},  # all-zero parent id
        f"ff-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01": {},
        good + "-extra": {},
        "x" * 10_000: {},
        None: {},
    }
    with psycopg.connect(database.queue, autocommit=True) as queue:  # the worker's role
        queue.execute("SET search_path = procrastinate, pg_catalog")  # as its connector does
        for traceparent, expected in carried.items():
            async with db.tenant_tx(tenant, None, "system") as tx:
                await tx.execute(
                    "SELECT bastion.enqueue_billing_drain(%s, %s)", (tenant, traceparent)
                )
            (args,) = queue.execute(
                "DELETE FROM procrastinate.procrastinate_jobs WHERE queueing_lock = %s "
                "RETURNING args",
                (f"billing:{tenant}",),
            ).fetchall()
            assert args[0] == {"tenant_id": str(tenant), **expected}, traceparent


def test_a_span_takes_no_attribute_off_the_list_and_the_collector_url_no_credentials() -> None:
    tracing = build_tracing("api", processor=SimpleSpanProcessor(InMemorySpanExporter()))
    with tracing.entry("GET /x", kind=SpanKind.SERVER):
        for name in ("http.request.body", "url.full", "url.query", "user.email", "prompt"):
            with pytest.raises(ValueError, match="not allowed"):
                span(name, {name: "anything"})
    for endpoint in (
        "http://user:secret@collector:4318/v1/traces",
        "http://collector:4318/v1/traces?api_key=secret",
        "ftp://collector/v1/traces",
    ):
        with pytest.raises(ValidationError):
            Settings(otlp_traces_endpoint=endpoint)
    assert Settings(otlp_traces_endpoint="http://collector:4318/v1/traces").otlp_traces_endpoint


def test_an_unrecorded_trace_opens_no_child_spans_and_keeps_its_ids() -> None:
    """Without an exporter nothing is recorded: the root still gives the logs
    and the next hop their ids, and no child span is made for no one."""
    exporter = InMemorySpanExporter()
    recorded = build_tracing("gateway", processor=SimpleSpanProcessor(exporter))
    for tracing, children in ((build_tracing("gateway"), 0), (recorded, 1)):
        with tracing.entry("call", kind=SpanKind.SERVER) as root, span("stage") as child:
            # No child made at all: the span handed back is the invalid one.
            assert child.get_span_context().is_valid is bool(children)
            assert child.is_recording() is bool(children)
            assert current_trace_id() == f"{root.get_span_context().trace_id:032x}"
    assert [s.name for s in exporter.get_finished_spans()] == ["stage", "call"]
