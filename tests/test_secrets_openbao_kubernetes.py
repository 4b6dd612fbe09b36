"""OpenBao's Kubernetes auth method, for real: a real ``bao server -dev`` on
127.0.0.1 with the ``kubernetes`` auth method enabled, and, as the cluster's
API server, a small HTTPS server that speaks the TokenReview API
(``POST /apis/authentication.k8s.io/v1/tokenreviews``), like the provider
doubles. OpenBao insists on a CA for the API server once the local pod files
are switched off (``disable_local_ca_jwt``), so the stand-in serves TLS under a
throwaway CA made here with ``cryptography``.

The service-account tokens are JWTs signed with a throwaway key: OpenBao
does not verify them itself (no ``pem_keys``), it asks the API server, and
binds the role to the service account the *API server* names.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import logging
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from joserfc import jwt
from joserfc.jwk import ECKey

from bastion.secrets import KeyContext, open_key_ring, resolve_ref
from bastion.secrets.errors import InvalidSecretRef, SecretsBackendRefused
from bastion.secrets.openbao import OpenBaoKeystore, OpenBaoKMS
from bastion.settings import Settings
from tests.test_secrets_openbao import Bao, _start_bao

REVIEW_PATH = "/apis/authentication.k8s.io/v1/tokenreviews"
ROLE = "bastion"
NAMESPACE, ACCOUNT = "bastion", "api"  # what the role is bound to
SIGNER = ECKey.generate_key("P-256")  # the throwaway "cluster" key


@dataclass(frozen=True)
class ServiceAccount:
    namespace: str
    name: str
    uid: str = field(default_factory=lambda: str(uuid4()))

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.name}"


def _sa_token(claims_of: ServiceAccount) -> str:
    """A service-account JWT (the legacy secret-token claims) that claims ``claims_of``."""
    now = int(time.time())
    claims = {
        "iss": "kubernetes/serviceaccount",
        "sub": claims_of.username,
        "kubernetes.io/serviceaccount/namespace": claims_of.namespace,
        "kubernetes.io/serviceaccount/service-account.name": claims_of.name,
        "kubernetes.io/serviceaccount/service-account.uid": claims_of.uid,
        "iat": now,
        "exp": now + 3600,
    }
    return jwt.encode({"alg": "ES256"}, claims, SIGNER)


class ApiServer:
    """The TokenReview API of a cluster: it knows the tokens it issued.

    OpenBao reviews with the presented token itself as bearer (no
    ``token_reviewer_jwt``), so the bearer must be a token it knows, too."""

    def __init__(self) -> None:
        self.accounts: dict[str, ServiceAccount] = {}
        self.reviews = 0

    def issue(self, account: ServiceAccount, claims_of: ServiceAccount | None = None) -> str:
        token = _sa_token(claims_of or account)
        self.accounts[token] = account
        return token

    def review(self, bearer: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if bearer not in self.accounts:
            return 401, {"kind": "Status", "status": "Failure", "code": 401}
        self.reviews += 1
        account = self.accounts.get(str((body.get("spec") or {}).get("token", "")))
        status: dict[str, Any] = {"authenticated": False, "error": "invalid bearer token"}
        if account is not None:
            status = {
                "authenticated": True,
                "user": {
                    "username": account.username,
                    "uid": account.uid,
                    "groups": [
                        "system:serviceaccounts",
                        f"system:serviceaccounts:{account.namespace}",
                    ],
                },
            }
        return 201, {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": body.get("spec"),
            "status": status,
        }


def _tls_files(tmp: Path) -> tuple[Path, Path, str]:
    """A throwaway CA and a certificate of 127.0.0.1 it issued: (cert, key, CA PEM)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test cluster CA")])

    def certificate(subject: x509.Name, public: Any, *, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        return builder.sign(ca_key, hashes.SHA256())

    ca_cert = certificate(ca_name, ca_key.public_key(), ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = certificate(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")]),
        key.public_key(),
        ca=False,
    )
    cert_file, key_file = tmp / "apiserver.pem", tmp / "apiserver.key"
    cert_file.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file, ca_cert.public_bytes(serialization.Encoding.PEM).decode()


@contextlib.contextmanager
def serving_api_server(api: ApiServer, tmp: Path) -> Iterator[tuple[str, str]]:
    """Serve ``api`` over TLS on 127.0.0.1; yield (its URL, its CA's PEM)."""
    cert_file, key_file, ca_pem = _tls_files(tmp)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            bearer = self.headers.get("Authorization", "").removeprefix("Bearer ")
            status, answer = api.review(bearer, body) if self.path == REVIEW_PATH else (404, {})
            payload = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # quiet: the test output is grepped for tokens

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, name="test-apiserver", daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", ca_pem
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Cluster:
    bao: Bao
    api: ApiServer
    tmp: Path

    def settings(self, token_file: Path, **extra: object) -> Settings:
        values: dict[str, object] = {
            "home": self.tmp / f"home-{uuid4().hex[:6]}",
            "secrets_backend": "openbao",
            "openbao_addr": self.bao.addr,
            "openbao_auth": "kubernetes",
            "openbao_kubernetes_role": ROLE,
            "openbao_kubernetes_token_file": token_file,
        }
        values.update(extra)
        return Settings(**values)  # type: ignore[arg-type]

    def token_file(self, token: str) -> Path:
        path = self.tmp / f"token-{uuid4().hex[:6]}"
        path.write_text(token + "\n")
        return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("k8s")
    api = ApiServer()
    with serving_api_server(api, tmp) as (url, ca_pem):
        bao = _start_bao(tmp)
        try:
            bao.root.sys.enable_auth_method("kubernetes")
            bao.root.auth.kubernetes.configure(
                kubernetes_host=url, kubernetes_ca_cert=ca_pem, disable_local_ca_jwt=True
            )
            bao.root.auth.kubernetes.create_role(
                ROLE,
                bound_service_account_names=[ACCOUNT],
                bound_service_account_namespaces=[NAMESPACE],
                policies=["bastion"],
                ttl="1h",
            )
            yield Cluster(bao, api, tmp)
        finally:
            bao.stop()


def test_the_bound_service_account_signs_in_and_its_token_works(cluster: Cluster) -> None:
    account = ServiceAccount(NAMESPACE, ACCOUNT)
    reviews = cluster.api.reviews
    settings = cluster.settings(cluster.token_file(cluster.api.issue(account)))
    ring = open_key_ring(settings)
    store, kms = ring.keystore, ring.kms
    assert isinstance(store, OpenBaoKeystore) and isinstance(kms, OpenBaoKMS)
    assert cluster.api.reviews == reviews + 1  # OpenBao asked the API server
    # The token is the role's, issued to the service account the API server named.
    meta = cluster.bao.root.auth.token.lookup(store.session.client.token)["data"]
    assert meta["path"].startswith("auth/kubernetes/login")
    assert meta["meta"]["role"] == ROLE
    assert meta["meta"]["service_account_name"] == ACCOUNT
    assert meta["meta"]["service_account_namespace"] == NAMESPACE
    assert meta["meta"]["service_account_uid"] == account.uid
    assert "bastion" in meta["policies"]

    # It works: reads a KV secret an operator wrote, wraps and unwraps a data key.
    path = f"bastion/k8s-{uuid4().hex[:8]}"
    cluster.bao.root.secrets.kv.v2.create_or_update_secret(path, secret={"field": "from-kv"})
    assert resolve_ref(store, f"bao://kv/{path}#field") == b"from-kv"
    context = KeyContext(uuid4(), "data-key", 1)
    fresh = OpenBaoKMS(kms.session, kms.mount, cache_seconds=0)  # every unwrap asks OpenBao
    data_key, blob = fresh.generate_data_key(context)
    assert blob.startswith(b"vault:v1:") and fresh.unwrap(blob, context) == data_key

    # A revoked token: the session signs in again with the (re-read) token file.
    old = store.session.client.token
    cluster.bao.root.auth.token.revoke(old)
    assert resolve_ref(store, f"bao://kv/{path}#field") == b"from-kv"
    assert store.session.client.token != old and cluster.api.reviews == reviews + 2


@pytest.mark.parametrize(
    "presented",
    ["another-account", "another-namespace", "forged-claims", "unknown-to-the-cluster"],
)
def test_a_token_of_another_service_account_is_refused_in_one_line(
    cluster: Cluster,
    presented: str,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    bound = ServiceAccount(NAMESPACE, ACCOUNT)
    if presented == "another-account":
        token = cluster.api.issue(ServiceAccount(NAMESPACE, "worker"))
    elif presented == "another-namespace":
        token = cluster.api.issue(ServiceAccount("other-tenant", ACCOUNT))
    elif presented == "forged-claims":
        # It claims the bound account; the API server knows it as another one.
        token = cluster.api.issue(ServiceAccount("other-tenant", "intruder"), claims_of=bound)
    else:
        token = _sa_token(bound)  # never issued by the cluster
    with pytest.raises(SecretsBackendRefused) as refused:
        open_key_ring(cluster.settings(cluster.token_file(token)))
    message = str(refused.value)
    assert message == (
        f"secrets backend openbao at {cluster.bao.addr} refused the kubernetes sign-in "
        "(check the role and the credentials it references)"
    )
    assert "\n" not in message
    out, err = capfd.readouterr()
    seen = [message, repr(refused.value), repr(refused.value.__context__), caplog.text, out, err]
    assert token not in "".join(seen) and token.split(".")[2] not in "".join(seen)
    # No token of the role was issued to it.
    accessors = cluster.bao.root.list("auth/token/accessors") or {"data": {"keys": []}}
    for accessor in accessors["data"]["keys"]:
        meta = cluster.bao.root.auth.token.lookup_accessor(accessor)["data"].get("meta") or {}
        assert meta.get("service_account_namespace") in (None, NAMESPACE)
        assert meta.get("service_account_name") in (None, ACCOUNT)


def test_a_missing_or_empty_token_file_is_a_clear_error(cluster: Cluster) -> None:
    reviews = cluster.api.reviews
    missing = cluster.tmp / "no-such-token"
    with pytest.raises(InvalidSecretRef) as unreadable:
        open_key_ring(cluster.settings(missing))
    assert str(unreadable.value) == (
        f"secrets backend openbao at {cluster.bao.addr}: the Kubernetes service-account "
        f"token file {missing} cannot be read (BASTION_OPENBAO_KUBERNETES_TOKEN_FILE)"
    )
    empty = cluster.token_file("")
    with pytest.raises(InvalidSecretRef) as blank:
        open_key_ring(cluster.settings(empty))
    assert str(blank.value) == (
        f"secrets backend openbao at {cluster.bao.addr}: the Kubernetes service-account "
        f"token file {empty} is empty (BASTION_OPENBAO_KUBERNETES_TOKEN_FILE)"
    )
    assert cluster.api.reviews == reviews  # nothing was sent
