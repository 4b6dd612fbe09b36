"""A real uvicorn server on 127.0.0.1 in a background thread, for HTTP tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator

import uvicorn
from starlette.types import ASGIApp

from bastion.serve import server_options

START_TIMEOUT = 10.0


def running_server(app: ASGIApp) -> contextlib.AbstractContextManager[str]:
    """Serve ``app`` on a free loopback port; yield its base URL; shut it down."""
    return serving(lambda _url: app)


def bound_socket() -> socket.socket:
    """A listening-to-be socket on a free loopback port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def serving(build: Callable[[str], ASGIApp], sock: socket.socket | None = None) -> Iterator[str]:
    """Serve the app ``build(base_url)`` returns; yield the URL; shut it down.

    The app learns its own URL before it starts (an issuer must know it).

    Uses the production stack and options (:func:`bastion.serve.server_options`:
    uvloop, httptools, no server header, no proxy headers believed). The
    socket is bound here, so the port is known before the server starts and
    cannot be taken by another test in between (``sock``: one the caller bound
    already, for two servers that must know each other's URL). Raises :class:`RuntimeError`
    if the server does not start within ``START_TIMEOUT`` seconds.
    """
    sock = sock or bound_socket()
    port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    config = uvicorn.Config(build(url), **server_options())
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="test-uvicorn", daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("test server did not start")
            time.sleep(0.005)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        if thread.is_alive():  # a request still hanging: stop waiting for it
            server.force_exit = True
            thread.join(timeout=5)
        sock.close()
