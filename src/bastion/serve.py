"""Running an ASGI app under uvicorn (uvloop, httptools) with Bastion's logging."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


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


def serve(app: ASGIApp, host: str, port: int, log_level: str = "info") -> None:
    """Serve ``app`` on ``host:port`` until SIGINT/SIGTERM; return after shutdown.

    Logging must already be configured (:func:`bastion.logs.configure_logging`):
    uvicorn's records go through it. Exits the process (status 3) if the server
    cannot start, e.g. when the port is taken.
    """
    uvicorn.run(app, host=host, port=port, log_level=log_level, **server_options())


class _FollowerServer(uvicorn.Server):
    """A second listener of the same process: it leaves the signals to the
    first one and stops when that one does."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def serve_with_internal(
    app: ASGIApp, host: str, port: int, internal: uvicorn.Config, log_level: str = "info"
) -> None:
    """Serve ``app`` on ``host:port`` (it runs the lifespan) and, once it has
    started, the ``internal`` listener (an mTLS one, :func:`tls_config`) in the
    same event loop; SIGINT/SIGTERM stop both. Exits like :func:`serve` if
    either cannot start."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, **server_options())
    public, inner = uvicorn.Server(config), _FollowerServer(internal)

    async def run() -> None:
        first = asyncio.ensure_future(public.serve())
        while not public.started and not first.done():
            await asyncio.sleep(0.02)
        if first.done():  # it could not start
            await first
            return
        second = asyncio.ensure_future(inner.serve())
        while not public.should_exit and not second.done():
            await asyncio.sleep(0.1)
        public.should_exit = inner.should_exit = True
        await asyncio.gather(first, second)

    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(run())


class TlsHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, plus the ASGI TLS extension: the peer's
    certificate (``scope["extensions"]["tls"]["client_cert_chain"]``, PEM),
    read once per connection after the handshake."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []
        version = ssl_object.version() if ssl_object is not None else None
        self._tls = {"client_cert_chain": chain, "tls_version": version}

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
