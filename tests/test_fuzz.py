"""Schemathesis fuzzes the running api and gateway from their own OpenAPI
documents (issue 14 item 4), signed in as every role.

Both processes are the ones the composition root builds, served by real
uvicorn on the embedded PostgreSQL and linked as in production
(:mod:`tests.linked_stack`). Every generated request — positive and negative
data, for every operation of both documents — is sent by a caller Hypothesis
draws with it: each role (with MFA) of the own tenant, or nobody. The caller's
access token is DPoP-bound (RFC 9449), and :class:`DpopSigner`, a ``requests``
auth that schemathesis attaches to every case (its ``auth.set_from_requests``
extension point), signs a fresh proof at send time: the method and URL actually
sent (``htm``/``htu``), a new ``jti``, the current ``iat`` and the token's
hash (``ath``) — so re-sent and replayed cases carry new proofs too. Path
parameters are drawn from the seeded tenants' real ids as well as the
generated ones (a ``flatmap_case`` hook), so that calls get past the tenant
check and reach the routes' own code.

The properties, checked on every answer:

* no 5xx (``not_a_server_error``);
* every answer's status, media type, headers and body conform to the
  document (``status_code_conformance``, ``content_type_conformance``,
  ``response_headers_conformance``, ``response_schema_conformance``);
* every error (4xx) is RFC 9457 problem+json: the media type, a ``type``
  URI, a ``title`` and the answer's own ``status`` (:func:`problem_details`),
  unless the document gives that status another media type (the OAuth
  endpoints' RFC 6749 JSON, the sign-in pages' HTML).

One kind of answer is not held to the document, and is counted instead: the
HTTP server's own plain-text 400 to a request line or headers past its
parser's limit (80 KiB), which no operation ever sees.

``make test`` runs :data:`EXAMPLES` examples per operation and data mode (four
times as many on the gateway's few operations), derandomized so that a run is
repeatable; ``make fuzz`` runs many more (``BASTION_FUZZ_EXAMPLES``, random
unless ``BASTION_FUZZ_SEED`` is set; ``BASTION_FUZZ_ONLY`` narrows it to the
operations whose label holds it) and prints the count of requests, the time
they took and the slowest operations.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from bastion.access.authorize import ROLES
from tests.conftest import DbHandles
from tests.linked_stack import Linked, linked_stack

# Examples per operation and per data mode (positive, negative).
EXAMPLES = int(os.environ.get("BASTION_FUZZ_EXAMPLES", "3"))
SEED = os.environ.get("BASTION_FUZZ_SEED")
ONLY = os.environ.get("BASTION_FUZZ_ONLY", "")  # fuzz only operations whose label holds it
CALLERS: tuple[str | None, ...] = (*ROLES, None)  # None: nobody signed in
MODES = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
PROBLEM_JSON = "application/problem+json"
PARSER_REFUSAL = b"Invalid HTTP request received."  # uvicorn's, when httptools fails
REPORTED_CHARS = 1500  # of one failure's text, in the test's failure message


@schemathesis.check
def problem_details(
    ctx: schemathesis.CheckContext, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    """An error answer is an RFC 9457 problem document (section 3.1), unless
    the document gives that answer another media type: the OAuth endpoints'
    errors are RFC 6749 section 5.2 JSON, and the sign-in page's are HTML."""
    if response.status_code < 400:
        return None
    documented = _documented_media_types(case, response.status_code)
    media_type = response.headers.get("content-type", [""])[0].split(";")[0].strip()
    if documented and (PROBLEM_JSON not in documented or media_type in documented - {PROBLEM_JSON}):
        return None  # content_type_conformance holds the answer to the document
    assert media_type == PROBLEM_JSON, f"{response.status_code} served as {media_type!r}"
    body = response.json()
    assert isinstance(body, dict), "a problem document is an object"
    assert isinstance(body.get("type"), str) and body["type"], "a problem has a type"
    assert isinstance(body.get("title"), str), "a problem has a title"
    assert body.get("status") == response.status_code, "the problem's status is the answer's"
    return None


def _documented_media_types(case: schemathesis.Case, status: int) -> set[str]:
    """The media types the document gives ``status`` of the case's operation."""
    responses = case.operation.definition.raw.get("responses", {})
    answer = responses.get(str(status)) or responses.get(f"{str(status)[0]}XX") or {}
    if "$ref" in answer:
        name = answer["$ref"].rsplit("/", 1)[-1]
        answer = case.operation.schema.raw_schema["components"]["responses"][name]
    return set(answer.get("content", {}))


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    problem_details,
]


class DpopSigner(requests.auth.AuthBase):
    """A fresh DPoP proof on every request actually sent (RFC 9449 section 4.2),
    with ``Authorization: DPoP`` (section 7.1), for the current caller; counts
    the requests per caller."""

    def __init__(self, linked: Linked) -> None:
        self.linked = linked
        self.caller: str | None = None
        self.sent: Counter[str] = Counter()
        self.unparsed = 0  # requests the HTTP server refused before the app saw them

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        self.sent[self.caller or "anonymous"] += 1
        if self.caller is None:
            return request
        key, token = self.linked.credentials(self.caller)
        request.headers["Authorization"] = f"DPoP {token}"
        assert request.method is not None and request.url is not None
        request.headers["DPoP"] = key.proof(request.method, request.url, access_token=token)
        return request


_PLACEHOLDER = re.compile(r"{([^}/]+)}")
_CREDENTIALS = re.compile(r"((?:Authorization: DPoP|DPoP:) )[\w.-]+")


def _known_values(linked: Linked) -> dict[str, list[str]]:
    """Real values of the path parameters (own tenant first: shrinking goes there)."""
    sides = ("own", "other")
    return {
        "tenant_id": [str(linked.tenants[side]) for side in sides],
        "namespace": [
            "support",
            *(str(linked.namespaces[side]) for side in sides),
        ],
        "document_id": [str(linked.documents[side]) for side in sides],
        "user_id": [str(user) for user in linked.users.values()],
        "role": list(ROLES),
    }


def _register_hooks(schema: Any, linked: Linked, signer: DpopSigner) -> None:
    schema.auth.set_from_requests(signer)
    known = _known_values(linked)

    @schema.hook
    def flatmap_case(_context: schemathesis.HookContext, case: schemathesis.Case) -> Any:
        """Each path parameter: a real value of the seeded data, or the generated one."""
        choices = {}
        for name in _PLACEHOLDER.findall(case.path):
            options = list(known.get(name, ()))
            if name in case.path_parameters:
                options.append(case.path_parameters[name])
            if options:
                choices[name] = st.sampled_from(options)

        def placed(picked: dict[str, Any]) -> schemathesis.Case:
            case.path_parameters = {**case.path_parameters, **picked}
            return case

        return st.fixed_dictionaries(choices).map(placed)


@dataclass
class Findings:
    requests: int = 0
    seconds: float = 0.0
    operations: int = 0
    failures: list[str] = field(default_factory=list)
    seconds_per_operation: dict[str, float] = field(default_factory=dict)

    def slowest(self, n: int = 3) -> str:
        ranked = sorted(self.seconds_per_operation.items(), key=lambda item: -item[1])[:n]
        return ", ".join(f"{label} {seconds:.1f} s" for label, seconds in ranked)


def fuzz(url: str, linked: Linked, examples: int) -> tuple[Findings, DpopSigner]:
    """Fuzz every operation of the document ``url`` serves; collect what failed."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    signer = DpopSigner(linked)
    _register_hooks(schema, linked, signer)
    findings = Findings()
    started = time.monotonic()
    with requests.Session() as session:
        for result in schema.get_all_operations():
            try:
                operation = result.ok()  # type: ignore[union-attr]
            except AttributeError:
                findings.failures.append(f"not fuzzable: {result.err()}")  # type: ignore[union-attr]
                continue
            if ONLY not in operation.label:
                continue
            findings.operations += 1
            operation_started = time.monotonic()
            for mode in MODES if _has_input(operation) else MODES[:1]:
                failure = _fuzz_operation(operation, mode, session, url, signer, examples)
                if failure is not None:
                    findings.failures.append(failure)
            findings.seconds_per_operation[operation.label] = time.monotonic() - operation_started
    findings.seconds = time.monotonic() - started
    findings.requests = sum(signer.sent.values())
    return findings, signer


def _has_input(operation: Any) -> bool:
    """Whether the operation takes any input that negative data could break."""
    return bool(list(operation.iter_parameters())) or bool(operation.body)


def _fuzz_operation(
    operation: Any,
    mode: GenerationMode,
    session: requests.Session,
    url: str,
    signer: DpopSigner,
    examples: int,
) -> str | None:
    """Run ``examples`` cases of one operation in one data mode; the failure, if any."""
    failed_as: list[str | None] = []

    @given(case=operation.as_strategy(generation_mode=mode), caller=st.sampled_from(CALLERS))
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=SEED is None and examples <= 20,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: bounded in requests
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case, caller: str | None) -> None:
        signer.caller = caller
        response = case.call(base_url=url, session=session, timeout=60)
        if response.status_code == 400 and response.content == PARSER_REFUSAL:
            # The HTTP parser's own answer: the request line or headers are past
            # llhttp's 80 KiB, so no operation of the document was reached (the
            # app answers 414/431 problems below that). Counted and reported.
            signer.unparsed += 1
            return
        try:
            case.validate_response(response, checks=CHECKS)
        except BaseException:
            failed_as.append(caller)
            raise

    if SEED is not None:
        run = seed(int(SEED))(run)
    try:
        run()
    except Unsatisfiable:
        if mode is GenerationMode.NEGATIVE:
            return None  # no input of the operation can be made invalid (any string is)
        raise
    except (Exception, BaseExceptionGroup) as exc:  # a failed property: reported with the others
        text = _CREDENTIALS.sub(r"\1 […]", str(exc))  # long, and useless to a reader
        if len(text) > REPORTED_CHARS:
            text = text[:REPORTED_CHARS] + " […]"
        who = (failed_as[-1] if failed_as else None) or "anonymous"
        return f"{operation.label} ({mode.value}, as {who}): {type(exc).__name__}: {text}"
    return None


@pytest.fixture(scope="module")
def linked(database: DbHandles) -> Iterator[Linked]:
    with linked_stack(database) as stack:
        yield stack


@pytest.mark.parametrize("process", ["api", "gateway"])
def test_fuzzing_finds_no_server_error_and_no_schema_violation(
    linked: Linked, process: str
) -> None:
    url = linked.api_url if process == "api" else linked.gateway_url
    # The gateway has 5 operations to the api's 50: more examples each, so
    # that every caller is drawn there too.
    findings, signer = fuzz(url, linked, EXAMPLES if process == "api" else EXAMPLES * 4)
    print(
        f"\nfuzz {process}: {findings.requests} requests over {findings.operations} "
        f"operations in {findings.seconds:.1f} s, {len(findings.failures)} failures; "
        f"per caller: {dict(sorted(signer.sent.items()))}; refused by the HTTP parser "
        f"before the app: {signer.unparsed}; slowest: {findings.slowest()}"
    )
    assert findings.failures == [], "\n\n".join(findings.failures)
    assert findings.operations >= (20 if process == "api" else 3) or ONLY
    # Every caller was drawn (a tokenless fuzz would prove little).
    assert ONLY or set(signer.sent) == {caller or "anonymous" for caller in CALLERS}


def test_receipt_keys_are_served_as_documented(linked: Linked) -> None:
    """Found by the fuzz: the JWK Set (RFC 7517 section 8.5) was documented as
    plain JSON."""
    document = httpx.get(f"{linked.api_url}/openapi.json", timeout=30).json()
    operation = document["paths"]["/.well-known/bastion-receipt-keys"]["get"]
    documented = set(operation["responses"]["200"]["content"])
    answer = httpx.get(f"{linked.api_url}/.well-known/bastion-receipt-keys", timeout=30)
    assert answer.status_code == 200
    assert documented == {answer.headers["content-type"].split(";")[0]}
    assert documented == {"application/jwk-set+json"}
