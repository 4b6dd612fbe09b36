"""Model providers behind the gateway: any OpenAI-compatible endpoint, and ``local``.

Usage is always the provider's own count (OpenAI's ``usage`` object), never
the client's. Nothing a provider says — its URL, key, error body — reaches
the client: failures become :class:`ProviderError` with a short kind.

An upstream answer of 400, 413 or 422 is the request's own fault (a context
too long, ``max_tokens`` above the model's limit, a tool name it refuses):
it becomes :class:`UpstreamRejected`, which is no provider failure, and keeps
of the upstream's error object (OpenAI's ``{"error": {"type", "code",
"param", "message"}}``) only a ``type`` and ``code`` from a known vocabulary
and a ``param`` shaped like a path into the request; never the ``message``,
which may quote anything (the prompt, internal hosts, secrets). Every other
status is the provider's: 429 (``rate-limited``), 5xx, and also 401, 403 and
404, which say the gateway's key or model name is wrong, not the request.

``local`` needs no network: it answers from the context in the prompt
(the retrieved chunks the api put in the system message), quoting the
sentences that best match the question with their document ids, and says
that it is an extractive answer. It exists so the demo and tests work
offline; it is not a language model.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

from bastion import jsonsafe
from bastion.knowledge.embedders import get_embedder
from bastion.safety.signing import ToolCall
from bastion.telemetry.tracing import current_traceparent


class ProviderError(Exception):
    """The provider failed; ``kind`` is unavailable, rate-limited, timeout or bad-response."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


class UpstreamRejected(Exception):
    """The upstream refused the request itself (its 4xx): no fault of the provider's.

    ``status`` is the upstream's; ``error_type``, ``code`` and ``param`` are
    what of its error object passed :func:`rejection` (each None otherwise).
    """

    def __init__(
        self,
        status: int,
        *,
        error_type: str | None = None,
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(f"upstream rejected the request ({status})")
        self.status = status
        self.error_type = error_type
        self.code = code
        self.param = param


# Upstream statuses that blame the request (RFC 9110 §15.5.1, §15.5.14, §15.5.21).
REQUEST_FAULT_STATUSES = frozenset({400, 413, 422})
# The error ``type`` and ``code`` values passed on (OpenAI's, and the names
# vLLM, Azure OpenAI and other compatible servers give the same refusals).
KNOWN_ERROR_TYPES = frozenset(
    {"invalid_request_error", "BadRequestError", "validation_error", "content_filter"}
)
KNOWN_ERROR_CODES = frozenset(
    {
        "context_length_exceeded",
        "string_above_max_length",
        "array_above_max_length",
        "array_below_min_length",
        "integer_above_max_value",
        "integer_below_min_value",
        "decimal_above_max_value",
        "decimal_below_min_value",
        "empty_array",
        "invalid_value",
        "invalid_type",
        "invalid_function_parameters",
        "invalid_tool_name",
        "missing_required_parameter",
        "unknown_parameter",
        "unsupported_parameter",
        "unsupported_value",
        "content_filter",
        "content_policy_violation",
    }
)
# ``param`` names a place in the request the gateway sent: a top-level field,
# then ``[index]`` or ``.field`` steps through fields the gateway sends.
_PARAM_ROOTS = frozenset(
    {"model", "messages", "max_tokens", "temperature", "tools", "stream", "stream_options", "input"}
)
_PARAM_FIELDS = frozenset(
    {"role", "content", "function", "name", "description", "parameters", "type", "include_usage"}
)
_PARAM_STEP = re.compile(r"\[(\d{1,5})\]|\.([a-z_]{1,32})")
_PARAM_ROOT = re.compile(r"[a-z_]{1,32}")
_MAX_ERROR_BYTES = 16 << 10


def _param(value: Any) -> str | None:
    if not isinstance(value, str) or len(value) > 128:
        return None
    root = _PARAM_ROOT.match(value)
    if root is None or root.group() not in _PARAM_ROOTS:
        return None
    position = root.end()
    while position < len(value):
        step = _PARAM_STEP.match(value, position)
        if step is None or (step.group(2) is not None and step.group(2) not in _PARAM_FIELDS):
            return None
        position = step.end()
    return value


def rejection(status: int, body: bytes) -> UpstreamRejected:
    """The request refusal an upstream's ``status`` and error ``body`` describe.

    Only vetted members are kept: ``type`` and ``code`` when they are known
    values, ``param`` when it is a path into the request; the rest (the
    ``message`` above all) is dropped unread.
    """
    try:
        parsed = jsonsafe.loads(body)
    except ValueError:
        return UpstreamRejected(status)
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict):  # vLLM and others put the members at the top
        error = parsed if isinstance(parsed, dict) else {}
    return UpstreamRejected(
        status,
        error_type=_known(error.get("type"), KNOWN_ERROR_TYPES),
        code=_known(error.get("code"), KNOWN_ERROR_CODES),
        param=_param(error.get("param")),
    )


def _known(value: Any, vocabulary: frozenset[str]) -> str | None:
    return value if isinstance(value, str) and value in vocabulary else None


async def _refusal(response: aiohttp.ClientResponse) -> Exception:
    """The error a non-200 upstream answer stands for (its body read up to 16 KiB)."""
    if response.status not in REQUEST_FAULT_STATUSES:
        return ProviderError("rate-limited" if response.status == 429 else "unavailable")
    body = bytearray()
    async for piece in response.content.iter_chunked(1 << 12):
        body += piece
        if len(body) > _MAX_ERROR_BYTES:
            return UpstreamRejected(response.status)  # too long to be an error object
    return rejection(response.status, bytes(body))


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str
    usage: Usage
    tool_calls: tuple[ToolCall, ...] = ()


Message = dict[str, Any]
"""A chat message: ``role`` and ``content`` (strings), and as OpenAI's chat
completions have them, ``tool_call_id`` on a tool result and ``tool_calls``
on an assistant turn that proposed calls."""
# What a stream yields: text deltas, whole proposed tool calls, the usage last.
StreamItem = str | ToolCall | Usage


class Provider(Protocol):
    async def complete(
        self,
        model: str,
        messages: Sequence[Message],
        *,
        max_tokens: int,
        temperature: float,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> Completion: ...

    def stream(
        self,
        model: str,
        messages: Sequence[Message],
        *,
        max_tokens: int,
        temperature: float,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> AsyncIterator[StreamItem]:
        """Yield text deltas and proposed tool calls, then the :class:`Usage` last."""
        ...

    async def embed(self, model: str, inputs: Sequence[str]) -> tuple[list[list[float]], Usage]: ...

    async def aclose(self) -> None:
        """Release connections; the process calls it on shutdown."""
        ...


def _usage(body: Any) -> Usage:
    try:
        usage = body["usage"]
        prompt, completion = int(usage["prompt_tokens"]), int(usage.get("completion_tokens", 0))
    except (KeyError, TypeError, ValueError):
        raise ProviderError("bad-response") from None
    if prompt < 0 or completion < 0:
        raise ProviderError("bad-response")
    return Usage(prompt, completion)


# The longest line (one SSE event) read from an upstream stream, and the
# largest whole answer (many embeddings can be tens of MB).
_MAX_LINE_BYTES = 1 << 20
_MAX_BODY_BYTES = 64 << 20


def _environment_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url``, or None (also when NO_PROXY covers it)."""
    parts = urllib.parse.urlsplit(url)
    if urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def _trace_headers() -> dict[str, str]:
    """The provider call's ``traceparent``: the current span (the provider attempt's)."""
    traceparent = current_traceparent()
    return {"traceparent": traceparent} if traceparent else {}


class OpenAICompatible:
    """A provider speaking OpenAI's chat-completions protocol at ``base_url``.

    The HTTP client is aiohttp: measured by ``bench/gateway.py``, httpx's
    connection pool spent about half the gateway's CPU under 32 concurrent
    calls (it polls every pooled socket on each request), aiohttp a fraction.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | Callable[[], str],
        *,
        upstream_model: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.upstream_model = upstream_model
        self.base_url = base_url.rstrip("/")
        # A callable is asked on every call (it caches briefly itself): a rotated
        # upstream key is used without a restart (``bastion keys rotate provider``).
        self._api_key = api_key if callable(api_key) else (lambda: api_key)
        # ``timeout`` bounds each wait for the upstream (the first byte, then
        # every read of a stream), not a whole stream's length.
        self._timeout = aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=timeout)
        # An egress proxy from the environment (HTTPS_PROXY, NO_PROXY), as httpx
        # honoured: read once here, not per call (aiohttp's trust_env re-reads
        # the environment and ~/.netrc on every request).
        self._proxy = _environment_proxy(self.base_url)
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None

    def _client(self) -> aiohttp.ClientSession:
        # A session belongs to the event loop it was made in, so it is made on
        # first use, inside the loop that serves the requests.
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                read_bufsize=_MAX_LINE_BYTES,
                max_line_size=_MAX_LINE_BYTES,
            )
            self._session_loop = loop
        return self._session

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    def _request(self, path: str, payload: dict[str, Any]) -> Any:
        return self._client().post(
            self.base_url + path,
            proxy=self._proxy,
            data=json.dumps(payload, separators=(",", ":")),
            headers={
                "Authorization": f"Bearer {self._api_key()}",
                "Content-Type": "application/json",
                **_trace_headers(),
            },
        )

    async def _post(self, path: str, payload: dict[str, Any]) -> Any:
        try:
            async with self._request(path, payload) as response:
                if response.status != 200:
                    raise await _refusal(response)
                raw = bytearray()
                async for piece in response.content.iter_chunked(1 << 16):
                    raw += piece
                    if len(raw) > _MAX_BODY_BYTES:
                        raise ProviderError("bad-response")
        except TimeoutError:
            raise ProviderError("timeout") from None
        except aiohttp.ClientError:
            raise ProviderError("unavailable") from None
        try:
            return jsonsafe.loads(raw)
        except ValueError:
            raise ProviderError("bad-response") from None

    def _chat_payload(
        self,
        model: str,
        messages: Sequence[Message],
        max_tokens: int,
        temperature: float,
        tools: Sequence[dict[str, Any]] | None,
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "model": self.upstream_model or model,
            # An assistant turn that only proposed calls goes with null content, as OpenAI sends it.
            "messages": [
                {**m, "content": None} if m.get("tool_calls") and not m["content"] else m
                for m in messages
            ],
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if tools:
            payload["tools"] = list(tools)
        return payload

    async def complete(
        self,
        model: str,
        messages: Sequence[Message],
        *,
        max_tokens: int,
        temperature: float,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> Completion:
        payload = self._chat_payload(model, messages, max_tokens, temperature, tools)
        body = await self._post("/chat/completions", payload)
        try:
            choice = body["choices"][0]
            message = choice["message"]
            text = message.get("content") or ""
            finish = str(choice.get("finish_reason") or "stop")
            calls = tuple(
                ToolCall(str(c["id"]), str(c["function"]["name"]), str(c["function"]["arguments"]))
                for c in message.get("tool_calls") or []
            )
        except (KeyError, IndexError, TypeError, AttributeError):
            raise ProviderError("bad-response") from None
        if not isinstance(text, str):
            raise ProviderError("bad-response")
        return Completion(text, finish, _usage(body), calls)

    async def stream(
        self,
        model: str,
        messages: Sequence[Message],
        *,
        max_tokens: int,
        temperature: float,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> AsyncIterator[StreamItem]:
        payload = self._chat_payload(model, messages, max_tokens, temperature, tools)
        payload.update(stream=True, stream_options={"include_usage": True})
        usage: Usage | None = None
        # A proposed call arrives in fragments (by index: id and name first,
        # then pieces of the arguments); it is passed on whole, at the end.
        calls: dict[int, dict[str, str]] = {}
        try:
            async with self._request("/chat/completions", payload) as response:
                if response.status != 200:
                    raise await _refusal(response)
                async for raw_line in response.content:
                    if not raw_line.startswith(b"data:"):
                        continue
                    data = raw_line[5:].strip()
                    if data == b"[DONE]":
                        break
                    try:
                        chunk = jsonsafe.loads(data)
                    except ValueError:
                        raise ProviderError("bad-response") from None
                    if chunk.get("usage"):
                        usage = _usage(chunk)
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        text = delta.get("content")
                        if isinstance(text, str) and text:
                            yield text
                        _gather_tool_calls(calls, delta.get("tool_calls"))
        except TimeoutError:
            raise ProviderError("timeout") from None
        except aiohttp.ClientError:
            raise ProviderError("unavailable") from None
        except HttpProcessingError:  # e.g. a line longer than _MAX_LINE_BYTES
            raise ProviderError("bad-response") from None
        if usage is None:
            raise ProviderError("bad-response")  # no usage: nothing to settle from
        for _index, call in sorted(calls.items()):
            if not call["id"] or not call["name"]:
                raise ProviderError("bad-response")
            yield ToolCall(call["id"], call["name"], call["arguments"])
        yield usage

    async def embed(self, model: str, inputs: Sequence[str]) -> tuple[list[list[float]], Usage]:
        body = await self._post(
            "/embeddings", {"model": self.upstream_model or model, "input": list(inputs)}
        )
        try:
            rows = sorted(body["data"], key=lambda row: row["index"])
            vectors = [[float(x) for x in row["embedding"]] for row in rows]
        except (KeyError, TypeError, ValueError):
            raise ProviderError("bad-response") from None
        if len(vectors) != len(inputs):
            raise ProviderError("bad-response")
        return vectors, _usage(body)


def _gather_tool_calls(calls: dict[int, dict[str, str]], fragments: Any) -> None:
    """Add one chunk's ``delta.tool_calls`` fragments to ``calls``."""
    if fragments is None:
        return
    try:
        for fragment in fragments:
            call = calls.setdefault(int(fragment["index"]), {"id": "", "name": "", "arguments": ""})
            function = fragment.get("function") or {}
            call["id"] = str(fragment.get("id") or call["id"])
            call["name"] = str(function.get("name") or call["name"])
            call["arguments"] += str(function.get("arguments") or "")
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ProviderError("bad-response") from None


_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")
_WORD = re.compile(r"\w+")
_DOC = re.compile(r"\[doc:([0-9a-f-]{8,36})\]")


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


class LocalProvider:
    """Extractive answers from the prompt's own context; embeddings on the local model."""

    def __init__(self, embedder: str = "minilm", *, quotes: int = 2) -> None:
        self.embedder = embedder
        self.quotes = quotes

    async def aclose(self) -> None:
        pass  # holds no connections

    def _answer(self, messages: Sequence[Message]) -> str:
        question = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        context = "\n".join(m["content"] for m in messages if m["role"] == "system")
        # Short words (the, was, for…) match everything; they do not count.
        wanted = {w for w in _words(question) if len(w) > 3}
        scored = []
        document = None
        for line in context.splitlines():
            found = _DOC.search(line)
            if found:
                document = found.group(1)
            for sentence in _SENTENCE.findall(_DOC.sub("", line)):
                words = _words(sentence)
                overlap = len(wanted.intersection(words))
                if overlap and len(words) >= 3:
                    scored.append((overlap / (len(set(words)) ** 0.5), sentence.strip(), document))
        if not scored:
            return "(local extractive answer) The provided context does not answer this."
        ranked = sorted(scored, key=lambda item: -item[0])
        best = [item for item in ranked[: self.quotes] if item[0] >= ranked[0][0] / 2]
        quotes = " ".join(
            f"“{text}”" + (f" [doc:{doc}]" if doc else "") for _score, text, doc in best
        )
        return f"(local extractive answer, quoting the context) {quotes}"

    async def complete(
        self,
        model: str,
        messages: Sequence[Message],
        *,
        max_tokens: int,
        temperature: float,
        tools: Sequence[dict[str, Any]] | None = None,  # the local model proposes none
    ) -> Completion:
        words = self._answer(messages).split()
        text = " ".join(words[:max_tokens])
        prompt = sum(len(_words(m["content"])) for m in messages)
        # Cut at max_tokens: "length", as a provider says (a truncated answer is never cached).
        finish = "length" if len(words) > max_tokens else "stop"
        return Completion(text, finish, Usage(prompt, len(text.split())))

    async def stream(
        self,
        model: str,
        messages: Sequence[Message],
        *,
        max_tokens: int,
        temperature: float,
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> AsyncIterator[StreamItem]:
        completion = await self.complete(
            model, messages, max_tokens=max_tokens, temperature=temperature
        )
        words = completion.text.split(" ")
        for i, word in enumerate(words):
            yield word if i == 0 else " " + word
        yield completion.usage

    async def embed(self, model: str, inputs: Sequence[str]) -> tuple[list[list[float]], Usage]:
        matrix = get_embedder(self.embedder).embed(list(inputs))
        tokens = sum(len(_words(text)) for text in inputs)
        return matrix.tolist(), Usage(tokens, 0)
