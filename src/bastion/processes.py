"""Running Bastion's processes: one in the foreground (``bastion serve``) or the
whole stack on one machine (``bastion up``). What each process runs is built by
:mod:`bastion.compose`; this module only supervises."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from bastion.api.mtls import handshake_observer
from bastion.compose import PROCESSES, build_app, build_process
from bastion.db.service import app_database, embedded_server
from bastion.identity.workload import WorkloadCA, WorkloadTls, spiffe_id
from bastion.logs import configure_logging, get_logger
from bastion.safety import pii_names
from bastion.safety.injection import classifier
from bastion.secrets.backends import open_keystore
from bastion.serve import PublicTls, public_tls, serve, serve_with_internal, tls_config
from bastion.settings import Settings, peer_host, url_host

_log = get_logger("bastion.processes")
# The workload name of ``bastion up`` itself when it checks readiness.
SUPERVISOR = "scraper"


def _port(settings: Settings, process: str) -> int:
    return {
        "api": settings.api_port,
        "gateway": settings.gateway_port,
        "worker": settings.worker_port,
    }[process]


def internal_port(settings: Settings, process: str) -> int:
    """The port of ``process``'s internal (mTLS) listener."""
    return {
        "api": settings.api_internal_port,
        "gateway": settings.gateway_internal_port,
        "worker": settings.worker_internal_port,
    }[process]


def settings_env(settings: Settings) -> dict[str, str]:
    """Return environment variables that give a child process these settings."""
    env = {
        "BASTION_HOME": str(settings.home),
        "BASTION_DATABASE_NAME": settings.database_name,
        "BASTION_API_HOST": settings.api_host,
        "BASTION_API_PORT": str(settings.api_port),
        "BASTION_GATEWAY_PORT": str(settings.gateway_port),
        "BASTION_WORKER_PORT": str(settings.worker_port),
        "BASTION_LOG_LEVEL": settings.log_level,
        "BASTION_EMBEDDER": settings.embedder,
        "BASTION_MAX_UPLOAD_BYTES": str(settings.max_upload_bytes),
        "BASTION_GATEWAY_MODELS": json.dumps(
            [route.model_dump(exclude_defaults=True) for route in settings.gateway_models]
        ),
        "BASTION_GATEWAY_CACHE_TTL_SECONDS": str(settings.gateway_cache_ttl_seconds),
        # Every process of a stack shares one replay store or none does.
        "BASTION_REPLAY_STORE": settings.replay_store,
        "BASTION_TRUSTED_PROXIES": json.dumps([str(net) for net in settings.trusted_proxies]),
        "BASTION_LOGIN_MAX_DELAY_SECONDS": str(settings.login_max_delay_seconds),
        # Workload identity (issue 18): one choice of transport for the stack.
        "BASTION_INTERNAL_MTLS": "1" if settings.internal_mtls else "0",
        "BASTION_GATEWAY_INTERNAL_PORT": str(settings.gateway_internal_port),
        "BASTION_API_INTERNAL_PORT": str(settings.api_internal_port),
        "BASTION_WORKER_INTERNAL_PORT": str(settings.worker_internal_port),
        "BASTION_METRICS_ENABLED": "1" if settings.metrics_enabled else "0",
        "BASTION_METRICS_SCRAPER_ID": settings.resolved_metrics_scraper_id,
        "BASTION_WORKLOAD_TRUST_DOMAIN": settings.workload_trust_domain,
        "BASTION_WORKLOAD_SCRAPERS": json.dumps(settings.workload_scrapers),
    }
    if settings.dev_mode:
        env["BASTION_DEV_MODE"] = "1"
    for name, value in (
        ("BASTION_KEYS_DIR", settings.keys_dir),
        ("BASTION_MASTER_KEY_FILE", settings.master_key_file),
        ("BASTION_KEYSTORE_FILE", settings.keystore_file),
        ("BASTION_PG_PORT", settings.pg_port),
        ("BASTION_ISSUER", settings.issuer),
        ("BASTION_GATEWAY_PUBLIC_URL", settings.gateway_public_url),
        ("BASTION_PUBLIC_TLS_CERT_FILE", settings.public_tls_cert_file),
        ("BASTION_PUBLIC_TLS_KEY_FILE", settings.public_tls_key_file),
        ("BASTION_WORKLOAD_SVID_DIR", settings.workload_svid_dir),
        ("BASTION_GATEWAY_INTERNAL_HOST", settings.gateway_internal_host),
    ):
        if value is not None:
            env[name] = str(value)
    return env


def run_process(process: str, settings: Settings, *, port: int | None = None) -> None:
    """Serve ``process`` in the foreground until interrupted; with mTLS on, each
    process also serves its internal listener (:func:`internal_port`: the
    gateway's envelope routes, and every process's ``/metrics`` and health)."""
    configure_logging(settings.log_level, json=settings.log_json)
    # The public listener: HTTPS, or plain HTTP in development on loopback only
    # (raises PlainPublicHttpRefused before anything is built or bound).
    public = _public_tls(settings, process)
    log_internal_transport(settings, process)
    if process in PROCESSES and settings.internal_mtls:
        classifier.model()  # fail closed at start-up, as build_app does
        built = build_process(process, settings)
        assert built.internal is not None and built.tls is not None
        observer = handshake_observer(process, built.internal.record)
        internal = tls_config(
            built.internal,
            built.tls.server_context(observer),
            host=settings.api_host,
            port=internal_port(settings, process),
            log_level=settings.log_level,
            lifespan="off",  # the public listener runs the app's lifespan
        )
        _freeze_start_up_heap(process)
        serve_with_internal(
            built.app,
            settings.api_host,
            port or _port(settings, process),
            internal,
            settings.log_level,
            public,
        )
        return
    app = build_app(process, settings)
    _freeze_start_up_heap(process)
    serve(app, settings.api_host, port or _port(settings, process), settings.log_level, public)


def _public_tls(settings: Settings, process: str) -> PublicTls | None:
    """The api's and the gateway's public listener TLS (:func:`bastion.serve.public_tls`).
    The worker's public port serves its health only (no credential crosses
    it); it takes the same certificate when one is configured."""
    if process == "worker" and settings.public_tls_cert_file is None:
        return None
    return public_tls(settings, process)


def _freeze_start_up_heap(process: str) -> None:
    """Load what every model call uses (the gateway's name tagger; the injection
    classifier is loaded by the build), then leave all that start-up made to
    reference counting alone (:func:`gc.freeze`): the models' hundreds of
    thousands of objects live as long as the process, and each full collection
    walked them again — about 0.1 ms per gateway request, amortised."""
    if process == "gateway":
        pii_names.load()
    gc.freeze()


def log_internal_transport(settings: Settings, process: str) -> None:
    """Say at start-up how this process talks to the others (issue 18): mTLS,
    or — development on loopback only, which the settings enforce — plain HTTP."""
    if settings.internal_mtls:
        _log.info(
            "internal_transport_mtls",
            process=process,
            trust_domain=settings.workload_trust_domain,
            gateway_internal=settings.gateway_internal_url,
        )
    else:
        _log.warning(
            "internal_transport_plain_http",
            process=process,
            host=settings.api_host,
            reason="internal_mtls off in development mode on loopback",
        )


def init_workload_ca(settings: Settings) -> bool:
    """Create the workload CA in the key ring unless it exists (``bastion up``
    and the demo do this before starting the processes, so that the three
    never race to create it); True if it was created."""
    ca = WorkloadCA(open_keystore(settings), settings.workload_trust_domain)
    created = ca.init()
    if created:
        _log.info("workload_ca_initialised", trust_domain=settings.workload_trust_domain)
    return created


def supervisor_tls(settings: Settings) -> WorkloadTls:
    """The SVID ``bastion up`` checks the internal listeners' readiness with
    (a scraper's: the gate admits it to the health routes only)."""
    return WorkloadTls(
        WorkloadCA(open_keystore(settings), settings.workload_trust_domain), SUPERVISOR
    )


@contextlib.contextmanager
def stack(
    settings: Settings, *, wait: float = 30.0, log_dir: Path | None = None
) -> Iterator[dict[str, str]]:
    """Start the database (if embedded) and the three processes; stop them on exit.

    Yields the base URL of each process once all answer ``/readyz``. Their logs
    go to ``log_dir/<process>.log`` when given, else to this terminal. The
    embedded server is stopped at the end only if this call started it.
    """
    public_tls(settings, "stack")  # refuse plain HTTP before starting anything
    server = None if settings.database_url else embedded_server(settings)
    was_running = server is not None and server.status() is not None
    app_database(settings, migrate=True)  # starts the embedded server, migrates
    tls = None
    # The public listeners' certificate: the system's trust, and the workload
    # root for a development certificate of `bastion ca issue --server`.
    verify: ssl.SSLContext | bool = True
    if settings.internal_mtls:
        init_workload_ca(settings)
        tls = supervisor_tls(settings)
        if settings.public_tls_cert_file is not None:
            verify = ssl.create_default_context()
            verify.load_verify_locations(cadata=tls.ca.root_pem())
        supervisor = spiffe_id(settings.workload_trust_domain, SUPERVISOR)
        if supervisor not in settings.workload_scrapers:
            scrapers = [*settings.workload_scrapers, supervisor]
            settings = settings.model_copy(update={"workload_scrapers": scrapers})
    children: dict[str, subprocess.Popen[bytes]] = {}
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        for process in PROCESSES:
            log = None if log_dir is None else open(log_dir / f"{process}.log", "ab")  # noqa: SIM115
            children[process] = subprocess.Popen(
                [sys.executable, "-m", "bastion", "serve", process],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # One BLAS thread: the embedder shares the cores with PostgreSQL
                # and the api, and spinning BLAS threads collapse under that.
                env={"OPENBLAS_NUM_THREADS": "1", **os.environ, **settings_env(settings)},
            )
            if log is not None:
                log.close()  # the child holds its own descriptor
        # The children on this machine, at their bind's address (loopback for a
        # wildcard bind), not at the public URLs a proxy may front.
        host = url_host(peer_host(settings.api_host))
        urls = {p: f"http://{host}:{_port(settings, p)}" for p in PROCESSES}
        for p in ("api", "gateway"):
            urls[p] = f"{settings.public_scheme}://{host}:{_port(settings, p)}"
        _wait_ready({p: urls[p] for p in ("api", "gateway")}, children, wait, verify=verify)
        _wait_ready({"worker": urls["worker"]}, children, wait)
        if tls is not None:
            for process in PROCESSES:
                name = f"{process}_internal"
                urls[name] = f"https://{host}:{internal_port(settings, process)}"
                _wait_ready(
                    {name: urls[name]},
                    {name: children[process]},
                    wait,
                    # Pinned: readiness is this process's, not another workload's.
                    verify=tls.client_context(
                        expect=[spiffe_id(settings.workload_trust_domain, process)]
                    ),
                )
        yield urls
    finally:
        for child in children.values():
            child.send_signal(signal.SIGTERM)
        for child in children.values():
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
        if server is not None and not was_running:
            server.stop()


def _wait_ready(
    urls: dict[str, str],
    children: dict[str, subprocess.Popen[bytes]],
    wait: float,
    *,
    verify: ssl.SSLContext | bool = True,
) -> None:
    deadline = time.monotonic() + wait
    pending = dict(urls)
    with httpx.Client(timeout=1.0, verify=verify) as client:
        while pending:
            for process, url in list(pending.items()):
                if children[process].poll() is not None:
                    raise RuntimeError(f"the {process} process exited while starting")
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{url}/readyz").status_code == 200:
                        del pending[process]
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"not ready after {wait:.0f} s: {', '.join(pending)}")
            time.sleep(0.05)


def run_stack(settings: Settings, console: Console) -> None:
    """``bastion up``: start everything, print where it listens, wait for Ctrl-C."""
    with stack(settings) as urls:
        table = Table(title="Bastion is up")
        table.add_column("process")
        table.add_column("url")
        for process, url in urls.items():
            table.add_row(process, url)
        console.print(table)
        console.print("Ctrl-C stops everything.")
        stop_signals = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        signal.sigwait(stop_signals)
