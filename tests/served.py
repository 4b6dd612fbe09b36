"""A Bastion process (``bastion serve api|gateway|worker``) on a test module's database,
started as in production, for tests that need the real process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from bastion.secrets import LocalKeystore
from tests.conftest import DbHandles


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def serving_process(
    process: str,
    database: DbHandles,
    keystore: LocalKeystore,
    home: Path,
    extra: dict[str, str] | None = None,
    *,
    wait_ready: bool = True,
    port: int | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Run ``bastion serve <process>`` on ``port`` (a free one if not given); yield it
    and its URL (ready, unless told not to wait); stop it with SIGTERM (SIGKILL
    after 15 s) if it still runs."""
    if port is None:
        port = free_port()
    env = {
        **os.environ,
        "BASTION_HOME": str(home),
        **database.superuser_env(keystore),
        "BASTION_KEYSTORE_FILE": str(keystore.path),
        "BASTION_MASTER_KEY_FILE": str(keystore.master_key_file),
        "BASTION_API_PORT": str(port),
        "BASTION_WORKER_PORT": str(port),
        "BASTION_GATEWAY_PORT": str(port),
        "BASTION_EMBEDDER": "hashing",
        "BASTION_LOG_LEVEL": "warning",
        # Plain HTTP between processes (development on loopback): these tests
        # run one process; the mTLS listener is tested in test_workload_identity.
        "BASTION_INTERNAL_MTLS": "0",
        "BASTION_DEV_MODE": "1",
        **(extra or {}),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "bastion", "serve", process],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=None if os.environ.get("SERVED_DEBUG") else subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while wait_ready:
            assert proc.poll() is None, f"the {process} exited while starting"
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"the {process} did not become ready"
            time.sleep(0.1)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
