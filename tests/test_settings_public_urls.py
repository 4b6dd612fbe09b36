"""Public URLs are never derived from a bind address (issues 18/21).

A wildcard bind (0.0.0.0, ::) is where a pod listens, not a URL a client
names: outside development mode the issuer (tokens' ``iss``, DPoP ``htu`` at
the api) and the gateway's public URL must be configured, or the process
refuses to start, with one line naming the settings to set.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.settings import PublicUrlUnset, Settings

API, GATEWAY = "https://api.example.com", "https://gateway.example.com"
WILDCARDS = ["0.0.0.0", "::"]  # noqa: S104 - bind addresses under test


@pytest.mark.parametrize("bind", WILDCARDS)
def test_wildcard_bind_without_public_urls_is_refused_outside_dev_mode(bind: str) -> None:
    with pytest.raises(PublicUrlUnset) as both:
        Settings(api_host=bind)
    assert "BASTION_ISSUER and BASTION_GATEWAY_PUBLIC_URL" in str(both.value)
    with pytest.raises(PublicUrlUnset) as gateway_only:
        Settings(api_host=bind, issuer=API)
    assert "BASTION_GATEWAY_PUBLIC_URL" in str(gateway_only.value)
    assert "BASTION_ISSUER" not in str(gateway_only.value)
    with pytest.raises(PublicUrlUnset, match="set BASTION_ISSUER to"):
        Settings(api_host=bind, gateway_public_url=GATEWAY)

    configured = Settings(api_host=bind, issuer=API + "/", gateway_public_url=GATEWAY)
    assert configured.resolved_issuer == API
    assert configured.gateway_url == GATEWAY


def test_dev_mode_and_named_binds_keep_deriving_their_urls() -> None:
    """Development mode derives loopback for a wildcard bind (a URL a browser on
    this machine can use, IPv6 in brackets); a named bind is its own URL."""
    v4 = Settings(dev_mode=True, api_host="0.0.0.0")  # noqa: S104 - under test
    assert (v4.resolved_issuer, v4.gateway_url) == (
        "http://127.0.0.1:8700",
        "http://127.0.0.1:8701",
    )
    v6 = Settings(dev_mode=True, api_host="::")
    assert (v6.resolved_issuer, v6.gateway_url) == ("http://[::1]:8700", "http://[::1]:8701")
    assert Settings().resolved_issuer == "http://127.0.0.1:8700"  # the default bind
    assert Settings(api_host="::1").resolved_issuer == "http://[::1]:8700"
    assert Settings(api_host="10.1.2.3").gateway_url == "http://10.1.2.3:8701"


def test_bastion_serve_on_a_wildcard_without_issuer_stops_with_one_line(tmp_path: Path) -> None:
    """``bastion serve api`` bound to 0.0.0.0 with TLS files configured but no
    public URL: it stops before reading the files, opening the database or
    binding, with one line naming both settings (no traceback)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")}
    env.pop("DATABASE_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "bastion", "serve", "api"],
        env={
            **env,
            "BASTION_HOME": str(tmp_path / "home"),
            "BASTION_API_HOST": "0.0.0.0",  # noqa: S104 - the bind under test
            "BASTION_API_PORT": str(port),
            "BASTION_PUBLIC_TLS_CERT_FILE": str(tmp_path / "tls.crt"),
            "BASTION_PUBLIC_TLS_KEY_FILE": str(tmp_path / "tls.key"),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: api_host 0.0.0.0 is a bind address, not a public URL")
    assert "BASTION_ISSUER and BASTION_GATEWAY_PUBLIC_URL" in line
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
    assert not (tmp_path / "home" / "postgres").exists()  # refused before the database
