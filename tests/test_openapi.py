"""The OpenAPI documents of the api and the gateway (issue 14): the router and
the document agree both ways, path parameters are declared, errors are the
problem+json actually served, the documents are valid OpenAPI 3.1, and the
committed copies in docs/openapi/ are current.

No database: the apps are built by the composition root on a pool that is
never opened (building an app does not connect), and the requests made here
are answered before any route reaches the database.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from fastapi import APIRouter, FastAPI
from openapi_spec_validator import validate

from bastion.api.declare import PUBLIC_ROUTE
from bastion.api.openapi import path_parameters, served_operations
from bastion.cli import openapi_json
from bastion.compose import Overrides, build_api, build_gateway, openapi_documents
from bastion.db.pool import Database
from bastion.identity.workload import WorkloadCA
from bastion.secrets import LocalKeystore
from bastion.settings import Settings

DOCS = Path(__file__).resolve().parent.parent / "docs" / "openapi"


def _apps(routers: tuple[APIRouter, ...] = ()) -> Iterator[tuple[str, FastAPI]]:
    with tempfile.TemporaryDirectory() as tmp:
        overrides = Overrides(
            database=Database("postgresql:///never-opened", b"\0" * 32),
            keystore=LocalKeystore(Path(tmp) / "keystore.bin", Path(tmp) / "master.key"),
            models={},
            routers=routers,
        )
        settings = Settings(embedder="hashing")
        # As served: over mTLS, with a workload CA in this throwaway key ring.
        assert overrides.keystore is not None
        ca = WorkloadCA(overrides.keystore, settings.workload_trust_domain)
        ca.init()
        overrides = dataclasses.replace(overrides, workload_ca=ca)
        yield "api", build_api(settings, overrides).app
        yield "gateway", build_gateway(settings, overrides).app


def disagreements(app: FastAPI) -> list[str]:
    """Every way the router and its served document disagree (empty: none)."""
    document = app.openapi()
    served = {(method, path) for method, path, _route in served_operations(app)}
    found: list[str] = []
    for method, path in sorted(served):
        operation = document["paths"].get(path, {}).get(method)
        if operation is None:
            found.append(f"undocumented: {method.upper()} {path}")
            continue
        declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
        for name in path_parameters(path):
            if name not in declared:
                found.append(f"path parameter {name} undeclared: {method.upper()} {path}")
    for path, operations in document["paths"].items():
        for method in operations:
            if (method, path) not in served:
                found.append(f"documented but not served: {method.upper()} {path}")
    return found


def test_every_route_is_documented_and_every_operation_served() -> None:
    for name, app in _apps():
        assert disagreements(app) == [], name
        document = app.openapi()
        # The routes the issue found missing are there.
        paths = set(document["paths"])
        if name == "api":
            assert {"/token", "/authorize", "/.well-known/openid-configuration"} <= paths
            assert {"/.well-known/jwks.json", "/userinfo", "/webhooks/stripe"} <= paths
        assert {"/healthz", "/readyz", "/openapi.json"} <= paths


def test_an_undocumented_route_fails_the_comparison() -> None:
    hidden = APIRouter()

    @hidden.get("/tenants/{tenant_id}/hidden", include_in_schema=False, **PUBLIC_ROUTE)
    async def hidden_route() -> dict[str, str]:
        return {}

    async def raw(_request: Any) -> Any:
        raise AssertionError("never called")

    hidden.add_route("/raw", raw, methods=["POST"])  # not FastAPI's: no operation at all
    for name, app in _apps((hidden,)):
        assert disagreements(app) == [
            "undocumented: GET /tenants/{tenant_id}/hidden",
            "undocumented: POST /raw",
        ], name


def test_documents_are_valid_openapi_with_problems_and_security() -> None:
    for name, document in openapi_documents().items():
        validate(document)  # openapi-spec-validator: OpenAPI 3.1 and its JSON Schema dialect
        text = json.dumps(document)
        assert "HTTPValidationError" not in text, name
        schemes = document["components"]["securitySchemes"]
        assert schemes["DPoP"] == {**schemes["DPoP"], "type": "http", "scheme": "DPoP"}
        assert schemes["DPoPProof"]["in"] == "header" and schemes["DPoPProof"]["name"] == "DPoP"
        for path, operations in document["paths"].items():
            for method, operation in operations.items():
                where = f"{name} {method.upper()} {path}"
                assert "security" in operation, where
                for status, response in operation["responses"].items():
                    if status.startswith(("4", "5")):
                        assert set(response.get("content", {})) & {
                            "application/problem+json",
                            "application/json",  # RFC 6749 errors at the OAuth endpoints
                            "text/html",  # the browser's sign-in pages (RFC 6749 4.1.2.1)
                        }, where
                if "{tenant_id}" in path:
                    assert operation["security"] == [{"DPoP": [], "DPoPProof": []}], where
                    assert "404" in operation["responses"], where
    gateway = openapi_documents()["gateway"]
    chat = gateway["paths"]["/v1/chat/completions"]["post"]
    assert {"BastionEnvelope": []} in chat["security"]


def test_committed_documents_are_current() -> None:
    for name, document in openapi_documents().items():
        committed = (DOCS / f"{name}.json").read_text()
        assert committed == openapi_json(document), (
            f"docs/openapi/{name}.json is stale: run `bastion openapi --out docs/openapi`"
        )


def _documented_schema(document: dict[str, Any], path: str, method: str, status: int) -> Any:
    response = document["paths"][path][method]["responses"][str(status)]
    schema = response["content"]["application/problem+json"]["schema"]
    return {**schema, "components": document["components"]}


def _problem_validator(document: dict[str, Any], path: str, method: str, status: int) -> Any:
    schema = _documented_schema(document, path, method, status)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.anyio
async def test_served_problems_match_the_document() -> None:
    """A real 401 and a real 413 from the composed api validate against the
    schema the document gives for that operation and status."""
    app = next(iter(_apps()))[1]
    document = app.openapi()
    members = "/tenants/{tenant_id}/members"
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        unauthenticated = await client.get(members.format(tenant_id=uuid.uuid4()))
        too_large = await client.post("/webhooks/stripe", content=b"{" * ((1 << 20) + 1))
    assert unauthenticated.status_code == 401
    assert unauthenticated.headers["content-type"] == "application/problem+json"
    _problem_validator(document, members, "get", 401).validate(unauthenticated.json())
    assert too_large.status_code == 413
    assert too_large.headers["content-type"] == "application/problem+json"
    _problem_validator(document, "/webhooks/stripe", "post", 413).validate(too_large.json())
    # And a problem type the document does not list fails that validation.
    wrong = {**unauthenticated.json(), "type": "https://bastion.dev/problems/made-up"}
    with pytest.raises(jsonschema.ValidationError):
        _problem_validator(document, members, "get", 401).validate(wrong)
