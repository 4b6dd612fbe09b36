"""Running an ASGI app under uvicorn (uvloop, httptools) with Bastion's logging."""

from __future__ import annotations

import uvicorn
from starlette.types import ASGIApp


def serve(app: ASGIApp, host: str, port: int, log_level: str = "info") -> None:
    """Serve ``app`` on ``host:port`` until SIGINT/SIGTERM."""
    uvicorn.run(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        log_config=None,  # logging is configured by bastion.logs
        log_level=log_level,
        access_log=False,  # the request middleware logs each request with its id
        server_header=False,
        proxy_headers=False,
    )
