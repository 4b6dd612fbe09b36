"""Running an ASGI app under uvicorn (uvloop, httptools) with Bastion's logging.

The public listeners serve HTTPS (RFC 9110 section 4.2.2; TLS 1.2 or 1.3,
RFC 8446) with a certificate from files, re-read when they change
(:class:`PublicTls`); plain HTTP only in development mode on loopback
(:func:`public_tls`), said in one log line at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from bastion.identity.workload import TLS_CHAIN_DER, verified_chain
from bastion.logs import get_logger
from bastion.settings import PlainPublicHttpRefused, Settings, is_loopback_host

_log = get_logger("bastion.serve")
# How often the public certificate's files are checked for a renewal.
PUBLIC_TLS_POLL_SECONDS = 5.0


class PublicTls:
    """The public listeners' server context, with the chain and key of two
    PEM files (cert-manager's ``tls.crt``/``tls.key``). :meth:`reload` loads
    them again when either changed: new handshakes get the new certificate,
    open connections keep theirs. A pair caught half-written (the key of
    another certificate) is refused by OpenSSL and tried again next time."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file, self.key_file = cert_file, key_file
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2  # external clients
        self.context.set_alpn_protocols(["http/1.1"])
        self._stamp = self._stat()
        self.context.load_cert_chain(cert_file, key_file)

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        stats = [os.stat(path) for path in (self.cert_file, self.key_file)]
        return tuple((st.st_ino, st.st_mtime_ns, st.st_size) for st in stats)

    def reload(self) -> bool:
        """Load the files again if they changed; True if the certificate changed."""
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return False
            self.context.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as error:
            _log.error("public_tls_reload_failed", error=type(error).__name__)
            return False
        self._stamp = stamp
        _log.info("public_tls_reloaded", cert_file=str(self.cert_file))
        return True


def public_tls(settings: Settings, process: str) -> PublicTls | None:
    """The public listener's TLS, from the settings' certificate files; None
    (plain HTTP) only in development mode on a loopback host, logged as such.

    Raises :class:`PlainPublicHttpRefused` otherwise: a process reachable from
    other machines, or a production one, never serves tokens in clear."""
    if settings.public_tls_cert_file is not None and settings.public_tls_key_file is not None:
        tls = PublicTls(settings.public_tls_cert_file, settings.public_tls_key_file)
        _log.info(
            "public_transport_tls", process=process, cert_file=str(settings.public_tls_cert_file)
        )
        return tls
    if not (settings.dev_mode and is_loopback_host(settings.api_host)):
        raise PlainPublicHttpRefused(
            f"the {process}'s public listener on {settings.api_host} needs TLS: set "
            "BASTION_PUBLIC_TLS_CERT_FILE and BASTION_PUBLIC_TLS_KEY_FILE (plain HTTP "
            "only with BASTION_DEV_MODE=1 on a loopback host)"
        )
    _log.warning(
        "public_transport_plain_http",
        process=process,
        host=settings.api_host,
        reason="development mode on loopback",
    )
    return None


async def _reloading(tls: PublicTls | None, server: uvicorn.Server) -> None:
    while tls is not None and not server.should_exit:
        await asyncio.sleep(PUBLIC_TLS_POLL_SECONDS)
        tls.reload()


def _public_options(tls: PublicTls | None) -> dict[str, Any]:
    if tls is None:
        return {}
    context = tls.context
    return {"ssl_context_factory": lambda _config, _default: context}


def server_options() -> dict[str, Any]:
    """Return the uvicorn options every Bastion server runs with (the tests' too)."""
    return {
        "loop": "uvloop",
        "http": "httptools",
        # A failing startup (database unreachable, ...) must stop the process;
        # "auto" would carry on without the lifespan.
        "lifespan": "on",
        "log_config": None,  # keep the configuration of bastion.logs
        "access_log": False,  # the request-id middleware logs each request with its id
        "server_header": False,  # do not advertise the server software
        "date_header": True,
        # uvicorn would believe X-Forwarded-For from 127.0.0.1 by default (any
        # local process, a sidecar, an SSRF). The app decides instead, from
        # settings.trusted_proxies (bastion.api.middleware.ClientAddressMiddleware).
        "proxy_headers": False,
    }


def serve(
    app: ASGIApp, host: str, port: int, log_level: str = "info", tls: PublicTls | None = None
) -> None:
    """Serve ``app`` on ``host:port`` (HTTPS with ``tls``) until SIGINT/SIGTERM;
    return after shutdown.

    Logging must already be configured (:func:`bastion.logs.configure_logging`):
    uvicorn's records go through it. Exits the process (status 3) if the server
    cannot start, e.g. when the port is taken.
    """
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, **server_options(), **_public_options(tls)
    )
    server = uvicorn.Server(config)

    async def run() -> None:
        watch = asyncio.ensure_future(_reloading(tls, server))
        try:
            await server.serve()
        finally:
            watch.cancel()

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(run())
    if not server.started:
        raise SystemExit(3)


class _FollowerServer(uvicorn.Server):
    """A second listener of the same process: it leaves the signals to the
    first one and stops when that one does."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def serve_with_internal(
    app: ASGIApp,
    host: str,
    port: int,
    internal: uvicorn.Config,
    log_level: str = "info",
    tls: PublicTls | None = None,
) -> None:
    """Serve ``app`` on ``host:port`` (it runs the lifespan) and, once it has
    started, the ``internal`` listener (an mTLS one, :func:`tls_config`) in the
    same event loop; SIGINT/SIGTERM stop both. Exits like :func:`serve` if
    either cannot start."""
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, **server_options(), **_public_options(tls)
    )
    public, inner = uvicorn.Server(config), _FollowerServer(internal)

    async def run() -> None:
        watch = asyncio.ensure_future(_reloading(tls, public))
        first = asyncio.ensure_future(public.serve())
        while not public.started and not first.done():
            await asyncio.sleep(0.02)
        if first.done():  # it could not start
            watch.cancel()
            await first
            return
        second = asyncio.ensure_future(inner.serve())
        while not public.should_exit and not second.done():
            await asyncio.sleep(0.1)
        public.should_exit = inner.should_exit = True
        await asyncio.gather(first, second)
        watch.cancel()

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(run())


class CoalescingTransport(asyncio.Transport):
    """A transport that sends a response's head with the write after it.
    uvicorn writes a response's status line and headers, then its body,
    separately: over TLS that is two records (RFC 8446 section 5), two send(2)
    calls, and for the peer two records to take apart. A head (a write ending
    in the blank line that ends an HTTP head, RFC 9112 section 2.1) is held and
    goes out with the next write at once; a head with nothing after it in the
    same turn of the event loop (a response without a body, a stream's first
    chunk not ready) goes out at the turn's end, and before a close. Other
    writes go out as they come: waiting for the next turn cost each response
    a turn of a busy loop."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._pending:
            self._pending.append(bytes(data))
            self._flush()
        elif bytes(data[-4:]) == b"\r\n\r\n":
            self._loop.call_soon(self._flush)
            self._pending.append(bytes(data))
        elif not self._transport.is_closing():
            self._transport.write(data)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _flush(self) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if not self._transport.is_closing():
            self._transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending = []
        self._transport.abort()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)


class CoalescingHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol writing each response in one piece
    (:class:`CoalescingTransport`)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(CoalescingTransport(transport, self.loop))


class TlsHttpToolsProtocol(CoalescingHttpToolsProtocol):
    """uvicorn's httptools protocol (one write per response), plus the ASGI TLS
    extension: the peer's certificate and the path the handshake verified for
    it (``scope["extensions"]["tls"]["client_cert_chain"]``, PEM, leaf first),
    read once per connection after the handshake."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        # The path the handshake verified, leaf first (the gate checks that a
        # CA still trusted is on it); the leaf alone if it is not available.
        path = verified_chain(ssl_object) if der else []
        chain_der = (path if path[:1] == [der] else [der]) if der else []
        version = ssl_object.version() if ssl_object is not None else None
        self._tls = {
            "client_cert_chain": [ssl.DER_cert_to_PEM_cert(c) for c in chain_der],
            "tls_version": version,
            TLS_CHAIN_DER: tuple(chain_der),
        }

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {"tls": dict(self._tls)}  # type: ignore[dict-item]


def tls_config(app: ASGIApp, context: ssl.SSLContext, **options: Any) -> uvicorn.Config:
    """A uvicorn config serving ``app`` over ``context`` (an mTLS listener), with
    the peer's certificate in each request's scope; ``options`` add to or
    replace :func:`server_options`."""
    return uvicorn.Config(
        app,
        **{
            **server_options(),
            "http": TlsHttpToolsProtocol,
            # The context is built in memory (no key file): uvicorn takes it as is.
            "ssl_context_factory": lambda _config, _default: context,
            **options,
        },
    )
