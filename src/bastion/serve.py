"""Running an ASGI app under uvicorn (uvloop, httptools) with Bastion's logging."""

from __future__ import annotations

from typing import Any

import uvicorn
from starlette.types import ASGIApp


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
