"""Traces with OpenTelemetry: one tracer provider per process, spans with an
allow-list of attributes, and the W3C ``traceparent`` header
(https://www.w3.org/TR/trace-context/, section 3.2) in and out.

A process (api, gateway, worker) builds one :class:`Tracing` from its
settings (:func:`build_tracing`): spans are exported over OTLP/HTTP when an
endpoint is configured, to the span processor a test or a benchmark hands in,
and otherwise recorded nowhere — a non-recording span still carries ids, so
the trace id still reaches the logs, the audit event and the next hop.

Entry points open a *root* span of the process and make its tracer the
ambient one (:meth:`Tracing.entry`): an HTTP request (``bastion.api.tracing``),
a worker job (``bastion.worker.queue``). Code below them opens child spans
with :func:`span`, which uses that ambient tracer, and is free when no entry
point set one (start-up work, background loops). Several apps built in one
test process each record into their own provider this way.

What a span may carry is closed (:data:`ATTRIBUTES`): the route *template*,
the method, the status, the model name, the tenant id (an opaque UUID), the
job name. Never a body, a prompt, a header, a query string or a
token: a name outside the list is a programming error (:class:`ValueError`),
and an exception is recorded by its type alone — its text may quote input.

An incoming ``traceparent`` is taken as the parent only when it is
well-formed (a malformed one starts a new trace, never an error). What the
caller may not decide: whether this process records the trace (the sampler
here looks at the trace id, not at the caller's ``sampled`` flag), and what
is passed on — ``tracestate`` and baggage are neither read nor forwarded.

This module imports nothing of Bastion: the layers above call into it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from types import TracebackType
from typing import Final
from uuid import UUID

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, Sampler, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, Status, StatusCode

PROCESSES: Final = frozenset({"api", "gateway", "worker"})

# The only attribute names a span may carry, each with what it holds.
ATTRIBUTES: Final = frozenset(
    {
        "http.request.method",  # GET, POST, ... (an unknown method is _OTHER)
        "http.route",  # the matched route's template, never the path
        "http.response.status_code",
        "gen_ai.request.model",  # a configured model's name, once entitled
        "bastion.tenant_id",  # an opaque UUID
        "bastion.role",  # the database role of a tenant transaction
        "bastion.job",  # a worker job's task name
        "bastion.target",  # the provider target that was tried
        "error.type",  # an exception's class name, never its text
    }
)
AttributeValue = str | int | bool | UUID

# Version 00 (section 3.2.2): trace-id, parent-id, flags, lowercase hex; a
# later version may append fields (section 3.2.4), which are ignored.
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_MAX_TRACEPARENT = 256  # a longer header is not parsed at all

_ambient: ContextVar[trace.Tracer | None] = ContextVar("bastion_tracer", default=None)


def _checked(attributes: Mapping[str, AttributeValue]) -> dict[str, str | int | bool]:
    checked: dict[str, str | int | bool] = {}
    for name, value in attributes.items():
        if name not in ATTRIBUTES:
            raise ValueError(f"span attribute {name!r} is not allowed")
        checked[name] = str(value) if isinstance(value, UUID) else value
    return checked


def parse_traceparent(header: str | None) -> SpanContext | None:
    """The remote span context of a well-formed ``traceparent``, else None.

    Rejected (section 3.2.2): version ``ff``, a version-00 header with extra
    fields, an all-zero trace or parent id, anything not lowercase hex.
    """
    if not header or len(header) > _MAX_TRACEPARENT:
        return None
    match = _TRACEPARENT.fullmatch(header.strip())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    context = SpanContext(
        int(trace_id, 16),
        int(span_id, 16),
        is_remote=True,
        trace_flags=trace.TraceFlags(int(flags, 16) & trace.TraceFlags.SAMPLED),
    )
    return context if context.is_valid else None


def format_traceparent(context: SpanContext) -> str:
    """``context`` as a version-00 ``traceparent`` value."""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def current_traceparent() -> str | None:
    """The ``traceparent`` to send on a call made from here (the current span), or None."""
    context = trace.get_current_span().get_span_context()
    return format_traceparent(context) if context.is_valid else None


def current_trace_id() -> str | None:
    """The current trace's id (32 hex digits), or None outside any trace."""
    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None


# The job argument that carries the enqueuing request's trace into a worker job.
JOB_TRACEPARENT = "traceparent"


def job_trace_args() -> dict[str, str]:
    """What to add to a job's arguments so that its span joins the current trace."""
    traceparent = current_traceparent()
    return {JOB_TRACEPARENT: traceparent} if traceparent else {}


class span:
    """A child span of the current one, on the ambient tracer; nothing without one.

    ``attributes`` must be named in :data:`ATTRIBUTES`. An exception leaving
    the block marks the span failed with its class name only.
    """

    __slots__ = ("_attributes", "_name", "_span", "_token")

    def __init__(self, name: str, attributes: Mapping[str, AttributeValue] | None = None) -> None:
        self._name = name
        self._attributes = _checked(attributes) if attributes else None
        self._span: Span | None = None
        self._token: object = None

    def __enter__(self) -> Span:
        tracer = _ambient.get()
        if tracer is None:
            return trace.INVALID_SPAN
        self._span = tracer.start_span(
            self._name,
            attributes=self._attributes,
            record_exception=False,
            set_status_on_exception=False,
        )
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._span is None:
            return
        if exc_type is not None:
            _failed(self._span, exc_type)
        self._span.end()
        otel_context.detach(self._token)  # type: ignore[arg-type]


def set_attributes(target: Span, attributes: Mapping[str, AttributeValue]) -> None:
    """Add allowed attributes to ``target`` (a span already open)."""
    if target.is_recording():
        target.set_attributes(_checked(attributes))


def _failed(target: Span, exc_type: type[BaseException]) -> None:
    # The class name only: an exception's text may quote a prompt or a value.
    target.set_attribute("error.type", exc_type.__name__)
    target.set_status(Status(StatusCode.ERROR))


class Tracing:
    """One process's tracer provider, and the entry points that use it."""

    def __init__(self, provider: TracerProvider, *, owns_processors: bool = True) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("bastion")
        self._owns_processors = owns_processors

    @contextmanager
    def entry(
        self,
        name: str,
        *,
        kind: SpanKind,
        traceparent: str | None = None,
        attributes: Mapping[str, AttributeValue] | None = None,
    ) -> Iterator[Span]:
        """The root span of one request or job, child of a well-formed
        ``traceparent`` (else of nothing), with this process's tracer ambient
        for the :func:`span` calls inside when the trace is recorded. An
        unrecorded trace (no exporter, or not sampled) gets no child spans:
        its root already carries the ids the logs and the next hop need, and
        children nobody records cost a few percent of a gateway call."""
        remote = parse_traceparent(traceparent)
        parent = trace.set_span_in_context(NonRecordingSpan(remote)) if remote else None
        root = self.tracer.start_span(
            name,
            context=parent if parent is not None else otel_context.Context(),
            kind=kind,
            attributes=_checked(attributes) if attributes else None,
            record_exception=False,
            set_status_on_exception=False,
        )
        tracer_token = _ambient.set(self.tracer if root.is_recording() else None)
        context_token = otel_context.attach(trace.set_span_in_context(root))
        try:
            yield root
        except BaseException as error:
            _failed(root, type(error))
            raise
        finally:
            root.end()
            otel_context.detach(context_token)
            _ambient.reset(tracer_token)

    def shutdown(self) -> None:
        """Flush and stop the exporters this process configured (not a test's)."""
        if self._owns_processors:
            self.provider.shutdown()


def build_tracing(
    process: str,
    *,
    otlp_endpoint: str | None = None,
    sample_ratio: float = 1.0,
    processor: SpanProcessor | None = None,
) -> Tracing:
    """The tracing of ``process`` (api, gateway, worker): spans batched to the
    OTLP/HTTP collector at ``otlp_endpoint``, or to ``processor`` (a test's,
    a benchmark's); with neither, spans are not recorded (ids only)."""
    if process not in PROCESSES:
        raise ValueError(f"no such process: {process!r}")
    recording = processor is not None or otlp_endpoint is not None
    sampler: Sampler = ALWAYS_OFF
    if recording:  # every trace: the static sampler, the cheaper one
        sampler = ALWAYS_ON if sample_ratio >= 1 else TraceIdRatioBased(sample_ratio)
    resource = Resource.create({"service.name": process, "service.namespace": "bastion"})
    provider = TracerProvider(resource=resource, sampler=sampler)
    if processor is not None:
        provider.add_span_processor(processor)
        return Tracing(provider, owns_processors=False)
    if otlp_endpoint is not None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    return Tracing(provider)
