"""A client generated from the api's OpenAPI document works (issue 14 item 5).

openapi-python-client generates a Python client, at test time, from the
document the running api serves (``/openapi.json``), so the client is always
the current document's; it runs from ``.venv/client-generator`` (the install
step puts it there: its typer pin conflicts with Bastion's). A user signs in
with the authorization code flow and PKCE (the browser's part is the project's
own :func:`bastion.identity.client.login`), and the generated client then
makes every API call — upload, search, ask — with the DPoP-bound token, a fresh
proof per request from :class:`bastion.identity.client.DpopAuth`, against the
api and gateway ``bastion up`` runs.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import types
from collections.abc import AsyncIterator, Iterator
from io import BytesIO
from pathlib import Path
from uuid import UUID

import httpx
import pytest

from bastion.db.pool import Database
from bastion.identity.client import login
from bastion.knowledge.service import KnowledgeService
from bastion.secrets.kms import LocalKMS
from bastion.secrets.tenant_keys import TenantKeys
from tests.conftest import DbHandles
from tests.linked_stack import NAMESPACE, PASSWORD, SIGNS_IN, Linked, linked_stack

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / ".venv" / "client-generator" / "bin" / "openapi-python-client"
GENERATOR_CONFIG = ROOT / "tests" / "client_generator.yml"
PACKAGE = "bastion_generated_client"
MARKER = "zephyrine"  # a word only the uploaded document holds
UPLOADED = (
    f"Ticket 2077: the {MARKER} shipment to Lisbon was lost in transit. "
    "The carrier confirmed the loss and the customer asked for a replacement."
)


@pytest.fixture(scope="module")
def linked(database: DbHandles) -> Iterator[Linked]:
    with linked_stack(database) as stack:
        yield stack


@pytest.fixture(scope="module")
def generated(
    linked: Linked, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[types.ModuleType]:
    """The client package generated from the document the api serves."""
    assert GENERATOR.exists(), "run `make` once: it installs the client generator"
    work = tmp_path_factory.mktemp("generated-client")
    document = work / "api.json"
    document.write_bytes(httpx.get(f"{linked.api_url}/openapi.json", timeout=30).content)
    subprocess.run(
        [
            *(str(GENERATOR), "generate", "--path", str(document), "--meta", "none"),
            *("--config", str(GENERATOR_CONFIG), "--output-path", str(work / PACKAGE)),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    sys.path.insert(0, str(work))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(work))
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(f"{PACKAGE}.")]:
            del sys.modules[name]


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30, follow_redirects=False) as client:
        yield client


async def test_sign_in_upload_search_and_ask_with_the_generated_client(
    linked: Linked, generated: types.ModuleType, http: httpx.AsyncClient, db: Database
) -> None:
    operations = importlib.import_module(f"{PACKAGE}.api.default")
    # By operation id: the module names come from the document.
    upload = importlib.import_module(
        f"{operations.__name__}.upload_tenants_tenant_id_knowledge_namespaces_namespace_documents_post"
    )
    search = importlib.import_module(
        f"{operations.__name__}.search_tenants_tenant_id_knowledge_namespaces_namespace_search_post"
    )
    ask = importlib.import_module(
        f"{operations.__name__}.ask_tenants_tenant_id_knowledge_namespaces_namespace_questions_post"
    )
    models = importlib.import_module(f"{PACKAGE}.models")
    File = importlib.import_module(f"{PACKAGE}.types").File
    tokens = await login(
        http,
        linked.api_url,
        tenant=linked.slugs["own"],
        email=linked.email(SIGNS_IN),
        password=PASSWORD,
    )
    tenant = linked.tenants["own"]
    client = generated.AuthenticatedClient(
        base_url=linked.api_url,
        token=tokens.access_token,
        prefix="DPoP",
        timeout=httpx.Timeout(30),
        httpx_args={"auth": tokens.auth()},  # a fresh DPoP proof per request
    )
    with client:
        uploaded = upload.sync_detailed(
            tenant,
            NAMESPACE,
            client=client,
            body=File(payload=BytesIO(UPLOADED.encode()), mime_type="text/plain"),
            title="Lost shipment",
            content_type="text/plain",
        )
        assert uploaded.status_code in (200, 201, 202), uploaded.content
        document = UUID(json.loads(uploaded.content)["id"])

        # The worker's part (not running here): index the pending upload.
        assert linked.keystore is not None
        kms = LocalKMS(linked.keystore)
        knowledge = KnowledgeService(db, TenantKeys(kms), default_embedder="hashing")
        assert (await knowledge.ingest(tenant, document)).status == "indexed"

        found = search.sync_detailed(
            tenant,
            NAMESPACE,
            client=client,
            body=models.SearchRequest(query=f"{MARKER} shipment", k=3),
        )
        assert found.status_code == 200, found.content
        hits = json.loads(found.content)["hits"]
        assert hits and str(document) == hits[0]["document_id"]
        assert MARKER in hits[0]["text"]

        answered = ask.sync_detailed(
            tenant,
            NAMESPACE,
            client=client,
            body=models.QuestionRequest(question=f"What happened to the {MARKER} shipment?", k=3),
        )
        assert answered.status_code == 200, answered.content
        answer = json.loads(answered.content)
        assert answer["answer"]
        assert str(document) in json.dumps(answer)  # cites the uploaded document

    # Without its DPoP proof the same token is refused (the client's auth did the signing).
    bare = generated.AuthenticatedClient(
        base_url=linked.api_url, token=tokens.access_token, prefix="DPoP"
    )
    with bare:
        refused = search.sync_detailed(
            tenant, NAMESPACE, client=bare, body=models.SearchRequest(query=MARKER, k=1)
        )
    assert refused.status_code == 401
    # The error is read as the document describes it (a problem of a listed type).
    problem = refused.parsed
    assert problem is not None and str(problem.type_).endswith("/unauthorized")
