"""Domain errors are framework-free; the HTTP edge alone maps them to problem+json.

Every :class:`~bastion.errors.BastionError` in the package has a status through
the one table (``bastion.api.problems.STATUS_OF_KIND``), every problem type
means one thing, no module outside the HTTP edge imports the web framework,
and a domain error raised in a route of the real app (real middleware, real
uvicorn) is answered exactly as its ``Problem`` was before the split.
"""

from __future__ import annotations

import ast
import importlib
import pickle
import pkgutil
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from fastapi import APIRouter

import bastion
from bastion.api.app import create_app
from bastion.api.declare import PUBLIC_ROUTE
from bastion.api.problems import STATUS_OF_KIND, Problem, as_problem, status_of
from bastion.errors import PROBLEM_TYPE_BASE, BastionError, Kind
from bastion.gateway.entitlements import RateLimited
from bastion.knowledge.errors import UploadRefused
from tests.http_server import running_server

SRC = Path(bastion.__file__).parent
# Modules that speak HTTP: the api package, route modules, FastAPI dependencies
# that answer with HTTP headers of their own (WWW-Authenticate, DPoP-Nonce),
# app factories and process/server wiring, and the demo's stand-in upstream.
HTTP_EDGE_FILES = {
    "identity/auth.py",
    "identity/oidc.py",
    "access/guard.py",
    "gateway/app.py",
    "gateway/auth.py",
    "worker/health.py",
    "processes.py",
    "serve.py",
    "demo/upstream.py",
    "compose.py",
}
FRAMEWORK = ("fastapi", "starlette", "bastion.api")
# Types whose title differs between the errors that share them (the title is
# client-visible: changing it is for another issue). This set may only shrink.
TITLES_SHARED_BY_TYPE = {"busy", "idempotency-key-reused"}
E = TypeVar("E", bound=Exception)


def _is_http_edge(relative: str) -> bool:
    name = relative.rsplit("/", 1)[-1]
    return (
        relative.startswith("api/")
        or name == "routes.py"
        or name.endswith("_routes.py")
        or relative in HTTP_EDGE_FILES
    )


def _all_subclasses(cls: type[E]) -> Iterator[type[E]]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


@pytest.fixture(scope="module")
def domain_errors() -> list[type[BastionError]]:
    """Every BastionError subclass of the package (every module imported)."""
    for module in pkgutil.walk_packages(bastion.__path__, "bastion."):
        # Alembic's env runs only inside alembic; __main__ runs the CLI.
        if module.name.endswith(("__main__", "migrations.env")):
            continue
        importlib.import_module(module.name)
    found = [c for c in _all_subclasses(BastionError) if c.__module__.startswith("bastion.")]
    assert len(found) >= 40  # the walk reached the domains, not just this module
    return found


def test_every_kind_has_a_status() -> None:
    assert set(STATUS_OF_KIND) == set(Kind)
    assert all(400 <= status < 600 for status in STATUS_OF_KIND.values())


def test_every_domain_error_maps_to_a_status_and_its_type_means_one_thing(
    domain_errors: list[type[BastionError]],
) -> None:
    meaning: dict[str, set[int]] = defaultdict(set)
    titles: dict[str, set[str]] = defaultdict(set)
    for error in domain_errors:
        instance = error("detail")
        assert instance.type == PROBLEM_TYPE_BASE + error.slug, error
        assert error.slug and error.title, error
        meaning[instance.type].add(status_of(instance))
        titles[instance.type].add(error.title)
    # The HTTP edge's own problems share the namespace of types.
    for problem in _all_subclasses(Problem):
        if problem.type.startswith(PROBLEM_TYPE_BASE):
            meaning[problem.type].add(problem.status)
    assert {t: s for t, s in meaning.items() if len(s) > 1} == {}
    shared = {t.removeprefix(PROBLEM_TYPE_BASE) for t, s in titles.items() if len(s) > 1}
    assert shared == TITLES_SHARED_BY_TYPE


def test_no_module_outside_the_http_edge_imports_the_framework() -> None:
    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        relative = path.relative_to(SRC).as_posix()
        if _is_http_edge(relative):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            offenders += [
                f"{relative}: {n}"
                for n in names
                if any(n == f or n.startswith(f + ".") for f in FRAMEWORK)
            ]
    assert offenders == []


def test_errors_is_the_ground_floor() -> None:
    tree = ast.parse((SRC / "errors.py").read_text(encoding="utf-8"))
    imported = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    ]
    assert not [name for name in imported if name and name.startswith("bastion")]


def test_a_domain_error_survives_the_trip_out_of_a_worker_process() -> None:
    # Parse and scan errors come back from the offload processes pickled.
    sent = UploadRefused("too big", kind=Kind.TOO_LARGE, retry_after=3, reason="too-large")
    back = pickle.loads(pickle.dumps(sent))  # noqa: S301 - bytes this test just made
    assert (back.kind, back.slug, back.detail, back.retry_after, back.extensions) == (
        Kind.TOO_LARGE,
        "upload-refused",
        "too big",
        3,
        {"reason": "too-large"},
    )
    assert status_of(back) == 413 and as_problem(back).headers == {"Retry-After": "3"}


def test_an_extension_may_not_replace_a_standard_member() -> None:
    with pytest.raises(ValueError):
        UploadRefused("x", status=200)


router = APIRouter()


@router.get("/limited", **PUBLIC_ROUTE)
async def limited() -> None:
    # As gateway.entitlements.PlanGate raises it past a plan's requests per minute.
    problem = RateLimited("the 'starter' plan allows 3 requests per minute", retry_after=60)
    problem.extensions["retry_after"] = 60
    raise problem


@router.get("/too-large", **PUBLIC_ROUTE)
async def too_large() -> None:
    # As KnowledgeService.upload raises it: one type, the meaning of this instance.
    raise UploadRefused("uploads are limited to 10 bytes", kind=Kind.TOO_LARGE, reason="too-large")


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    app = create_app(extra_routers=[router])
    with running_server(app) as url, httpx.Client(base_url=url, timeout=5) as http:
        yield http


def test_a_domain_error_is_answered_as_its_problem_was(client: httpx.Client) -> None:
    answer = client.get("/limited")
    assert answer.status_code == 429
    assert answer.headers["content-type"] == "application/problem+json"
    assert answer.headers["retry-after"] == "60"
    assert answer.json() == {
        "retry_after": 60,
        "type": "https://bastion.dev/problems/rate-limited",
        "title": "Too many requests for the tenant's plan",
        "status": 429,
        "detail": "the 'starter' plan allows 3 requests per minute",
        "instance": "/limited",
        "request_id": answer.headers["x-request-id"],
    }
    refused = client.get("/too-large")
    assert refused.status_code == 413 and "retry-after" not in refused.headers
    assert refused.json() == {
        "reason": "too-large",
        "type": "https://bastion.dev/problems/upload-refused",
        "title": "The upload cannot be indexed",
        "status": 413,
        "detail": "uploads are limited to 10 bytes",
        "instance": "/too-large",
        "request_id": refused.headers["x-request-id"],
    }
