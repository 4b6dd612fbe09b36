"""Transport security at the edges (issue 18): the public listeners serve HTTPS
with a certificate from files (plain HTTP only in development on loopback),
and a process can take its X.509-SVID from files cert-manager or SPIRE's
spiffe-helper keep current, re-read in place under a running listener.

Real TLS on 127.0.0.1 (uvicorn, OpenSSL), real certificates from a workload
CA on a key ring of the test's own, real ``bastion serve`` processes for the
refusals to start.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from bastion.api.mtls import WORKLOAD_ID, WorkloadGate
from bastion.identity.workload import (
    PeerVerifier,
    Svid,
    SvidFiles,
    WorkloadCA,
    WorkloadError,
    WorkloadTls,
    _load_chain,
    renewing,
    spiffe_id,
)
from bastion.secrets import LocalKeystore
from bastion.serve import PublicTls, public_tls, server_options, tls_config
from bastion.settings import PlainPublicHttpRefused, Settings
from tests.conftest import short_tempdir
from tests.http_server import bound_socket
from tests.served import free_port

TD = "bastion.internal"
API = spiffe_id(TD, "api")


@pytest.fixture(scope="module")
def home() -> Iterator[Path]:
    base = short_tempdir("bastion-tls-")
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def ca(home: Path) -> WorkloadCA:
    authority = WorkloadCA(LocalKeystore(home / "keystore.bin", home / "master.key"), TD)
    authority.init()
    return authority


@pytest.fixture(scope="module")
def other_ca(home: Path) -> WorkloadCA:
    """A second trust anchor (another cluster's CA, or the next one in a CA rollover)."""
    authority = WorkloadCA(LocalKeystore(home / "other.bin", home / "other.key"), TD)
    authority.init()
    return authority


def _serve(config: uvicorn.Config, sock: socket.socket) -> Iterator[uvicorn.Server]:
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield server
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()


serve = contextmanager(_serve)


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _publish(directory: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` the way the kubelet updates a Secret volume: into a new
    directory, then one atomic rename of the ``..data`` symlink the visible
    names point through (a reader sees the old set or the new one, never half)."""
    stamp = directory / f"..{time.monotonic_ns()}"
    stamp.mkdir()
    for name, data in files.items():
        (stamp / name).write_bytes(data)
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    tmp = directory / "..data_tmp"
    tmp.symlink_to(stamp.name)
    os.replace(tmp, directory / "..data")


def _svid_files(svid: Svid, bundle: bytes) -> dict[str, bytes]:
    return {"svid.pem": svid.chain_pem(), "svid.key": svid.key_pem(), "bundle.pem": bundle}


def _client_context(root_pem: str, svid: Svid | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(cadata=root_pem)
    if svid is not None:
        _load_chain(context, svid)
    return context


def _served_serial(conn: http.client.HTTPSConnection) -> int:
    assert conn.sock is not None
    der = conn.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
    return x509.load_der_x509_certificate(der).serial_number


def _get(conn: http.client.HTTPSConnection, path: str) -> tuple[int, bytes, dict[str, str]]:
    conn.request("GET", path)
    response = conn.getresponse()
    return response.status, response.read(), dict(response.getheaders())


# -- SVIDs from files (cert-manager, SPIRE's spiffe-helper) ---------------------------


def _gated_app(tls: WorkloadTls, verifier: PeerVerifier) -> Any:
    """A route only the api's SPIFFE ID may call, behind the real gate; its
    lifespan runs the renewal loop, as every process's does."""

    async def who(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(request.scope["state"][WORKLOAD_ID]))

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        async with renewing(tls):
            yield

    app = Starlette(routes=[Route("/who", who)], lifespan=lifespan)
    return WorkloadGate(
        app,
        listener="gateway",
        routes=app.routes,
        callers={"/who": frozenset({API})},
        verifier=verifier,
    )


def test_svid_files_rotate_under_a_running_listener_without_dropping_a_connection(
    ca: WorkloadCA, other_ca: WorkloadCA, tmp_path: Path
) -> None:
    """The gateway's SVID comes from files (no CA key in the process). The files
    are replaced in place as cert-manager's kubelet does: new handshakes get the
    new leaf within the poll interval, a connection opened before keeps working;
    a CA dropped from the bundle stops vouching for its leaves (403, audited
    reason ``issuer-not-trusted``), and a key that does not match its leaf
    (a writer caught half-way) is refused and the old SVID kept."""
    svid_dir = tmp_path / "svid"
    svid_dir.mkdir()
    both_roots = (ca.root_pem() + other_ca.root_pem()).encode()
    first = ca.issue("gateway")
    _publish(svid_dir, _svid_files(first, both_roots))

    files = SvidFiles(svid_dir, TD, poll_seconds=0.05)
    tls = WorkloadTls(files, "gateway")
    verifier = PeerVerifier(files, refresh_seconds=0.05)
    sock = bound_socket()
    port = sock.getsockname()[1]
    config = tls_config(_gated_app(tls, verifier), tls.server_context(), lifespan="on")
    api_from_ca = _client_context(ca.root_pem(), ca.issue("api"))
    api_from_other = _client_context(ca.root_pem() + other_ca.root_pem(), other_ca.issue("api"))

    def connect(context: ssl.SSLContext) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)

    with serve(config, sock):
        held = connect(api_from_ca)
        assert _get(held, "/who")[:2] == (200, API.encode())
        assert _served_serial(held) == first.cert.serial_number
        # Both CAs are in the bundle: the other CA's api is admitted.
        other = connect(api_from_other)
        assert _get(other, "/who")[0] == 200
        other.close()

        # Renewal in place, and the other CA leaves the bundle.
        second = ca.issue("gateway")
        _publish(svid_dir, _svid_files(second, ca.root_pem().encode()))
        deadline = time.monotonic() + 5
        while True:
            fresh = connect(api_from_ca)
            status, _body, _headers = _get(fresh, "/who")
            assert status == 200
            if _served_serial(fresh) == second.cert.serial_number:
                break
            fresh.close()
            assert time.monotonic() < deadline, "the renewed SVID was not served"
            time.sleep(0.05)
        fresh.close()

        # The connection opened before the renewal was not dropped: it still
        # answers, on its own handshake's certificate.
        assert _get(held, "/who")[:2] == (200, API.encode())
        assert _served_serial(held) == first.cert.serial_number
        held.close()

        # The other CA no longer vouches: its api's new call is refused.
        other = connect(api_from_other)
        status, body, headers = _get(other, "/who")
        other.close()
        assert status == 403 and headers["content-type"] == "application/problem+json"
        assert b"/workload-refused" in body and b"issuer-not-trusted" in body

        # A key of another leaf (half-written files) is refused; the SVID stays.
        stray = ca.issue("gateway")
        _publish(
            svid_dir,
            {
                "svid.pem": stray.chain_pem(),
                "svid.key": first.key_pem(),
                "bundle.pem": ca.root_pem().encode(),
            },
        )
        with pytest.raises(WorkloadError, match="does not match"):
            tls.renew()
        assert tls.svid.cert == second.cert
        after = connect(api_from_ca)
        assert _get(after, "/who")[0] == 200
        assert _served_serial(after) == second.cert.serial_number
        after.close()


def test_svid_files_of_another_workload_are_refused(ca: WorkloadCA, tmp_path: Path) -> None:
    """A mounted SVID that is not this process's SPIFFE ID does not start it."""
    _publish(tmp_path, _svid_files(ca.issue("worker"), ca.root_pem().encode()))
    with pytest.raises(WorkloadError, match=r"not spiffe://bastion\.internal/bastion/gateway"):
        WorkloadTls(SvidFiles(tmp_path, TD), "gateway")


# -- the public listeners: HTTPS from files ------------------------------------------


def test_public_listener_serves_https_and_reloads_its_certificate_in_place(
    ca: WorkloadCA, tmp_path: Path
) -> None:
    """A development certificate (``bastion ca issue server``) on the public
    listener: clients verify it by name; a renewed pair of files is served to
    new handshakes, a connection opened before keeps working."""
    first = ca.issue_server(["localhost"], ["127.0.0.1"])
    _publish(tmp_path, {"tls.crt": first.chain_pem(), "tls.key": first.key_pem()})
    tls = PublicTls(tmp_path / "tls.crt", tmp_path / "tls.key")
    sock = bound_socket()
    port = sock.getsockname()[1]

    async def ok(_request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/ok", ok)])
    context = tls.context
    config = uvicorn.Config(
        app,
        **{
            **server_options(),
            "lifespan": "off",
            "ssl_context_factory": lambda _c, _d: context,
        },
    )
    trust = ssl.create_default_context(cadata=ca.root_pem())  # checks the host name

    with serve(config, sock):
        held = http.client.HTTPSConnection("127.0.0.1", port, context=trust, timeout=10)
        assert _get(held, "/ok")[:2] == (200, b"ok")
        assert _served_serial(held) == first.cert.serial_number
        # Plain HTTP to the HTTPS port gets no answer from the app.
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        with pytest.raises((http.client.HTTPException, OSError)):
            _get(plain, "/ok")
        plain.close()

        assert tls.reload() is False  # unchanged: nothing loaded
        second = ca.issue_server(["localhost"], ["127.0.0.1"])
        _publish(tmp_path, {"tls.crt": second.chain_pem(), "tls.key": second.key_pem()})
        assert tls.reload() is True
        fresh = http.client.HTTPSConnection("localhost", port, context=trust, timeout=10)
        assert _get(fresh, "/ok")[0] == 200
        assert _served_serial(fresh) == second.cert.serial_number
        fresh.close()
        assert _get(held, "/ok")[:2] == (200, b"ok")
        held.close()


def _serve_refused(home: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``bastion serve api`` with ``env``; it must not start."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    base.pop("DATABASE_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "bastion", "serve", "api"],
        env={**base, "BASTION_HOME": str(home / "home"), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_response_leaves_in_one_write_and_a_close_loses_nothing() -> None:
    """The internal listener's transport (bastion.serve.CoalescingTransport):
    uvicorn's two writes of a response (status line and headers, then body)
    reach the socket as one write — one TLS record, one send(2) — as soon as the
    body is written (no wait for the loop's turn to end); a head alone goes out
    at the turn's end; a close in the same turn still sends what was written."""
    import asyncio

    from bastion.serve import CoalescingTransport

    class Recording(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.writes: list[bytes] = []
            self.closed = False

        def write(self, data: Any) -> None:
            self.writes.append(bytes(data))

        def close(self) -> None:
            self.closed = True

        def is_closing(self) -> bool:
            return self.closed

        def get_write_buffer_size(self) -> int:
            return 0

    async def scenario() -> None:
        inner = Recording()
        transport = CoalescingTransport(inner, asyncio.get_running_loop())
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        assert inner.writes == []  # the head waits for what follows it
        assert transport.get_write_buffer_size() == 38
        transport.write(b"{}")
        assert inner.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
        await asyncio.sleep(0)
        assert len(inner.writes) == 1  # nothing written twice
        # A head with no body (204) goes out at the end of the turn.
        transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        assert len(inner.writes) == 1
        await asyncio.sleep(0)
        assert inner.writes[-1] == b"HTTP/1.1 204 No Content\r\n\r\n"
        transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n")
        transport.close()  # Connection: close, in the same turn
        assert inner.writes[-1].endswith(b"content-length: 4\r\n\r\n") and inner.closed
        await asyncio.sleep(0)
        assert len(inner.writes) == 3  # nothing written twice

    asyncio.run(scenario())


def test_the_internal_listener_issues_no_session_tickets(ca: WorkloadCA) -> None:
    """No TLS 1.3 session tickets on the mTLS listener (RFC 8446 section 4.6.1):
    no client resumes, so each handshake's two ticket seals and sends were
    wasted work; the call is still admitted by the peer's certificate."""
    gateway, api = WorkloadTls(ca, "gateway"), WorkloadTls(ca, "api")
    sock = bound_socket()
    port = sock.getsockname()[1]
    config = tls_config(
        _gated_app(gateway, PeerVerifier(ca)), gateway.server_context(), log_level="warning"
    )
    with serve(config, sock):
        context = _client_context(ca.root_pem(), api.svid)
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
        try:
            status, body, _headers = _get(conn, "/who")
            assert (status, body) == (200, API.encode())
            assert conn.sock is not None
            session = conn.sock.session  # type: ignore[attr-defined]
            assert session is not None and not session.has_ticket
            assert not conn.sock.session_reused  # type: ignore[attr-defined]
        finally:
            conn.close()


def test_a_request_leaves_in_one_write_when_the_client_reads() -> None:
    """The api's mTLS client (bastion.identity.workload_transport): httpcore's
    writes of a request's head and body are held until it reads the response
    and sent as one (one TLS record); a large body streams at the cap."""
    import asyncio

    import httpcore

    from bastion.identity.workload_transport import MAX_HELD_BYTES, OneWriteStream

    class Recording(httpcore.AsyncNetworkStream):
        def __init__(self) -> None:
            self.writes: list[bytes] = []

        async def write(self, buffer: bytes, timeout: float | None = None) -> None:
            self.writes.append(buffer)

        async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
            return b"HTTP/1.1 200 OK\r\n"

        async def aclose(self) -> None:
            pass

    async def scenario() -> None:
        inner = Recording()
        stream = OneWriteStream(inner)
        await stream.write(b"POST /v1/chat/completions HTTP/1.1\r\n\r\n")
        await stream.write(b"{}")
        await stream.write(b"")  # h11's end of a sized body
        assert inner.writes == []
        assert await stream.read(65536) == b"HTTP/1.1 200 OK\r\n"
        assert inner.writes == [b"POST /v1/chat/completions HTTP/1.1\r\n\r\n{}"]
        big = b"x" * MAX_HELD_BYTES
        await stream.write(b"head")
        await stream.write(big)  # over the cap: sent without waiting for a read
        assert inner.writes[-1] == b"head" + big
        await stream.read(65536)
        assert len(inner.writes) == 2  # nothing sent twice

    asyncio.run(scenario())


def test_public_listener_without_tls_refuses_to_start(home: Path) -> None:
    """No certificate configured and a bind other than loopback (development
    mode or not): ``bastion serve`` stops before it builds or binds anything,
    with one line saying what to set; nothing listens on the port. (Loopback
    outside development mode: the same check, in-process, below.)"""
    port = free_port()
    result = _serve_refused(
        home,
        BASTION_API_HOST="0.0.0.0",  # noqa: S104 - the bind under test
        BASTION_API_PORT=str(port),
        BASTION_DEV_MODE="1",
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the api's public listener") and "needs TLS" in last
    assert "BASTION_PUBLIC_TLS_CERT_FILE" in last
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    assert not (home / "home" / "postgres").exists()  # refused before the database


def test_plain_http_in_dev_mode_on_loopback_is_logged_at_start_up(
    caplog: pytest.LogCaptureFixture, tmp_path: Path, ca: WorkloadCA
) -> None:
    """The one case plain HTTP is allowed says so, once, at start-up; with a
    certificate the listener says it serves TLS."""
    with caplog.at_level("INFO"):
        assert public_tls(Settings(dev_mode=True, api_host="127.0.0.1"), "gateway") is None
    plain = [r for r in caplog.records if "public_transport_plain_http" in r.getMessage()]
    assert len(plain) == 1 and plain[0].levelname == "WARNING"
    with pytest.raises(PlainPublicHttpRefused):
        public_tls(Settings(dev_mode=True, api_host="10.0.0.5"), "gateway")
    with pytest.raises(PlainPublicHttpRefused):
        public_tls(Settings(dev_mode=False, api_host="127.0.0.1"), "gateway")

    cert = ca.issue_server(["localhost"])
    (tmp_path / "tls.crt").write_bytes(cert.chain_pem())
    (tmp_path / "tls.key").write_bytes(cert.key_pem())
    settings = Settings(
        api_host="0.0.0.0",  # noqa: S104 - allowed: it serves TLS
        issuer="https://api.example.com",  # a wildcard bind names its public URLs
        gateway_public_url="https://gateway.example.com",
        public_tls_cert_file=tmp_path / "tls.crt",
        public_tls_key_file=tmp_path / "tls.key",
    )
    caplog.clear()
    with caplog.at_level("INFO"):
        assert isinstance(public_tls(settings, "api"), PublicTls)
    assert "public_transport_tls" in caplog.text
    assert settings.resolved_issuer == "https://api.example.com"
    assert settings.gateway_url == "https://gateway.example.com"
