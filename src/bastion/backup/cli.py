"""``bastion db backup|backup-sync|restore|verify-backup``, ``bastion keys backup`` and
``bastion drill pitr|db-kill|revoke-keys|provider-outage|webhook-storm|worker-kill``.

Thin: parse, call :mod:`bastion.backup`, print. The drills against running
processes compose an api and a gateway in-process on a scratch server here
(the command line may import the composition root; the drills may not)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import psycopg
import typer
import uvicorn
from rich.console import Console
from rich.table import Table

from bastion.backup import BackupError, restore, take_base_backup, verify_backup
from bastion.backup.chart import write_chart
from bastion.backup.drills import (
    SCRATCH_PARENT,
    DrillResult,
    _scratch,
    db_kill_drill,
    pitr_drill,
)
from bastion.backup.live_drills import (
    Member,
    provider_outage_drill,
    revoke_keys_drill,
    webhook_storm_drill,
    worker_kill_drill,
)
from bastion.backup.s3 import (
    S3Location,
    downloaded,
    is_s3,
    s3_client,
    s3_errors,
    sync_wal,
    upload_backup,
)
from bastion.db.launcher import LauncherError
from bastion.db.pool import Database
from bastion.db.provision import DatabaseError
from bastion.secrets.protocols import KMS, Keystore
from bastion.serve import server_options
from bastion.settings import ModelRoute, Settings

drill_app = typer.Typer(
    help="Disaster drills on a scratch server: pitr, db-kill, revoke-keys, provider-outage, "
    "webhook-storm, worker-kill.",
    no_args_is_help=True,
)
out = Console()


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(1)


def _location(to: str | None, settings: Settings) -> Path:
    path = Path(to) if to else settings.backup_dir
    if path is None:
        _fail("no backup location: pass --to DIR or set BASTION_BACKUP_DIR")
    return path.absolute()


def backup_command(
    to: Annotated[
        str | None,
        typer.Option(
            "--to", help="backup directory (default BASTION_BACKUP_DIR) or s3://bucket/prefix"
        ),
    ] = None,
) -> None:
    """Take a base backup; with the embedded server, its WAL archive runs on
    continuously into the same place (point-in-time restore)."""
    from bastion.db.service import embedded_server, resolve_target

    settings = Settings()
    if to is not None and is_s3(to):
        _backup_to_s3(to, settings)
        return
    location = _location(to, settings)
    try:
        if settings.database_url:
            # An external server archives (or not) where its operator says: the
            # backup carries the WAL it needs to be restored on its own.
            conninfo = resolve_target(settings, start=False).admin_conninfo
            location.mkdir(parents=True, exist_ok=True, mode=0o700)
            made = take_base_backup(location, conninfo, stream_wal=True)
        else:
            if settings.backup_dir is None or settings.backup_dir.absolute() != location:
                _fail(
                    f"the embedded server archives its WAL to BASTION_BACKUP_DIR; set "
                    f"BASTION_BACKUP_DIR={location} and restart it (bastion db stop; "
                    "bastion db start) so the backup can be restored to any time"
                )
            info = embedded_server(settings).status()
            if info is None:
                _fail("the embedded PostgreSQL server is not running (bastion db start)")
            with psycopg.connect(info.conninfo()) as conn:
                row = conn.execute("SHOW archive_mode").fetchone()
            if row is None or row[0] != "on":
                _fail(
                    "WAL archiving is off: restart the server (bastion db stop; bastion db start)"
                )
            made = take_base_backup(location, info.conninfo())
    except (BackupError, LauncherError) as exc:
        _fail(str(exc))
    out.print(
        f"base backup {made.name} in {location / 'base' / made.name} "
        f"(WAL {made.start_lsn} to {made.end_lsn}, timeline {made.timeline})",
        highlight=False,
    )


def _s3(settings: Settings) -> Any:
    return s3_client(settings.backup_s3_endpoint_url, settings.backup_s3_region)


def _backup_to_s3(to: str, settings: Settings) -> None:
    """Take the base backup into a temporary directory, upload it, the WAL
    archive (embedded server) and, last, its record."""
    from bastion.db.service import embedded_server, resolve_target

    try:
        dest = S3Location.parse(to)
        client = _s3(settings)
        with s3_errors(dest):
            client.head_bucket(Bucket=dest.bucket)  # refused before any work
        with tempfile.TemporaryDirectory(prefix="bastion-s3-backup-") as scratch:
            local = Path(scratch)
            wal: Path | None = None
            if settings.database_url:
                conninfo = resolve_target(settings, start=False).admin_conninfo
                # The copy is uploaded, not kept: flushing it to disk buys nothing.
                made = take_base_backup(local, conninfo, stream_wal=True, sync=False)
            else:
                if settings.backup_dir is None:
                    _fail(
                        "the embedded server archives its WAL to BASTION_BACKUP_DIR, which "
                        "is uploaded with the backup: set it and restart the server"
                    )
                info = embedded_server(settings).status()
                if info is None:
                    _fail("the embedded PostgreSQL server is not running (bastion db start)")
                wal = settings.backup_dir.absolute() / "wal"
                made = take_base_backup(local, info.conninfo(), sync=False)
            written = upload_backup(client, dest, local, made, wal)
    except (BackupError, LauncherError) as exc:
        _fail(str(exc))
    out.print(
        f"base backup {made.name} uploaded to {dest} ({written} objects; WAL "
        f"{made.start_lsn} to {made.end_lsn}, timeline {made.timeline})",
        highlight=False,
    )


def backup_sync_command(
    to: Annotated[str, typer.Option("--to", help="s3://bucket/prefix")],
) -> None:
    """Upload the WAL segments archived since the last sync (run it from a
    timer: the RPO of the bucket alone is this interval)."""
    settings = Settings()
    if settings.backup_dir is None:
        _fail("no WAL archive to sync: BASTION_BACKUP_DIR is not set")
    try:
        dest = S3Location.parse(to)
        written = sync_wal(_s3(settings), dest, settings.backup_dir.absolute() / "wal")
    except BackupError as exc:
        _fail(str(exc))
    out.print(f"{written} new WAL file(s) uploaded to {dest}", highlight=False)


def restore_command(
    from_: Annotated[str, typer.Option("--from", help="backup directory or s3://bucket/prefix")],
    to_time: Annotated[
        str, typer.Option("--to-time", help="ISO 8601 with a time zone, e.g. 2026-01-31T12:00:00Z")
    ],
    into: Annotated[Path, typer.Option("--into", help="a new, empty directory for the server")],
) -> None:
    """Point-in-time restore into a new server directory; refuses a target
    outside the backup's range (nothing is written then)."""
    settings = Settings()
    try:
        target = datetime.fromisoformat(to_time)
    except ValueError:
        _fail("--to-time is not an ISO 8601 time (e.g. 2026-01-31T12:00:00Z)")
    password_file = settings.postgres_dir / "superuser.password"
    if not password_file.exists():
        _fail(
            f"{password_file} is missing: put back the copy made by `bastion keys backup` "
            "(the data backup holds no password)"
        )
    try:
        if is_s3(from_):
            src = S3Location.parse(from_)
            with downloaded(_s3(settings), src, target) as local:
                restore(
                    local,
                    target,
                    into.absolute(),
                    password=password_file.read_text(),
                    own_archive=True,
                )
        else:
            restore(
                Path(from_).absolute(), target, into.absolute(), password=password_file.read_text()
            )
    except (BackupError, LauncherError) as exc:
        _fail(str(exc))
    out.print(
        f"restored to {target.isoformat()} in {into}; run it with BASTION_HOME pointing at "
        f"a home whose postgres/ is {into}",
        highlight=False,
    )


def verify_command(
    directory: Annotated[str, typer.Argument(help="backup directory or s3://bucket/prefix")],
) -> None:
    """Check the newest base backup against its manifest and the WAL chain after it."""
    try:
        if is_s3(directory):
            settings = Settings()
            with downloaded(_s3(settings), S3Location.parse(directory)) as local:
                report = verify_backup(local)
        else:
            report = verify_backup(Path(directory).absolute())
    except BackupError as exc:
        _fail(str(exc))
    reach = (
        f"restorable from {report.backup.end_time.isoformat()} to {report.last_commit.isoformat()}"
        if report.last_commit
        else "no commit archived since the backup yet"
    )
    out.print(
        f"backup {report.backup.name} verified; WAL {report.first_segment} to "
        f"{report.last_segment} ({report.segments} segments, no gap); {reach}",
        highlight=False,
    )


def keys_backup_command(
    to: Annotated[Path, typer.Option("--to", help="a directory apart from the data backups")],
) -> None:
    """Copy the key material (keystore, master key, database superuser password)
    to a place of its own: never into a data backup or the home."""
    settings = Settings()
    target = to.absolute()
    for data in (settings.home, settings.backup_dir):
        if data is not None and target.is_relative_to(data.absolute()):
            _fail(f"{target} is inside {data}: key material must be kept apart from the data")
    sources = [
        settings.resolved_keystore_file,
        settings.resolved_master_key_file,
        settings.postgres_dir / "superuser.password",
    ]
    target.mkdir(parents=True, exist_ok=True, mode=0o700)
    target.chmod(0o700)
    copied = []
    for source in sources:
        if source.exists():
            dest = target / source.name
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as fh, source.open("rb") as src:
                shutil.copyfileobj(src, fh)
                fh.flush()
                os.fsync(fh.fileno())
            copied.append(source.name)
    out.print(f"copied {', '.join(copied) or 'nothing'} to {target}", highlight=False)


PngFile = Annotated[
    Path | None,
    typer.Option(
        "--png",
        help="write a PNG chart of the load and error rate here (default: the --out file "
        "with a .png suffix)",
    ),
]


def _chart_path(out_file: Path | None, png_file: Path | None) -> Path | None:
    """``--png``, else beside ``--out`` (never over it: a .png --out gets no chart)."""
    if png_file is not None or out_file is None:
        return png_file
    beside = out_file.with_suffix(".png")
    return None if beside == out_file else beside


def _write_chart(result: DrillResult, path: Path, as_json: bool) -> None:
    say = sys.stderr if as_json else sys.stdout  # keep --json's stdout one JSON document
    try:
        write_chart(result, path)
    except ImportError:
        print("no PNG chart: matplotlib is not installed", file=sys.stderr)
    except OSError as exc:
        print(f"no PNG chart: cannot write {path}: {exc.strerror}", file=sys.stderr)
    else:
        print(f"chart: {path}", file=say)


def _report(
    name: str,
    result: DrillResult,
    as_json: bool,
    out_file: Path | None,
    png_file: Path | None = None,
) -> None:
    document = result.as_json()
    if out_file is not None:
        out_file.write_text(json.dumps(document, indent=1) + "\n")
    chart = _chart_path(out_file, png_file)
    if chart is not None:
        _write_chart(result, chart, as_json)
    if as_json:
        print(json.dumps(document, indent=1))
    elif result.interrupted:
        out.print(f"drill {name}: INTERRUPTED", highlight=False)
    else:
        table = Table("figure", "result", "target", title=f"drill {name}")
        for key, value in result.figures.items():
            table.add_row(key, str(value), result.targets.get(key, ""))
        out.print(table)
        _print_error_rate(result.timeline)
        out.print("PASSED" if result.passed else "FAILED", highlight=False)
    if result.interrupted:
        print(result.note, file=sys.stderr)
        raise typer.Exit(130)
    if not result.passed:
        raise typer.Exit(1)


def _print_error_rate(timeline: list[dict[str, float | int]]) -> None:
    """The timeline per second: requests (or writes) ok, refused as expected, failed."""
    seconds: dict[int, dict[str, int]] = {}
    for slot in timeline:
        row = seconds.setdefault(int(slot["t"]), {"ok": 0, "refused": 0, "failed": 0})
        for key in row:
            row[key] += int(slot.get(key, 0))
    table = Table("second", "ok", "refused", "failed", "error rate", title="over time")
    for second, row in sorted(seconds.items()):
        total = sum(row.values())
        rate = f"{100 * row['failed'] / total:.1f} %" if total else "-"
        table.add_row(str(second), str(row["ok"]), str(row["refused"]), str(row["failed"]), rate)
    out.print(table)


@drill_app.command("pitr")
def drill_pitr(
    seconds: Annotated[float, typer.Option(help="seconds of steady writes")] = 3.0,
    archive_timeout: Annotated[int, typer.Option(help="archive_timeout of the scratch server")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    out_file: Annotated[Path | None, typer.Option("--out", help="write the JSON here")] = None,
    png_file: PngFile = None,
) -> None:
    """Write rows with WAL archiving on, restore to the last commit: RPO <= 1 s."""
    try:
        result = pitr_drill(seconds=seconds, archive_timeout=archive_timeout)
    except (BackupError, LauncherError) as exc:
        _fail(str(exc))
    except psycopg.Error as exc:  # the scratch server answered badly: say so in one line
        _fail(f"the drill's database failed: {type(exc).__name__}")
    _report("pitr", result, as_json, out_file, png_file)


@drill_app.command("db-kill")
def drill_db_kill(
    before: Annotated[float, typer.Option(help="seconds of writes before the kill")] = 1.5,
    after: Annotated[float, typer.Option(help="seconds of writes after the restart")] = 1.5,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    out_file: Annotated[Path | None, typer.Option("--out", help="write the JSON here")] = None,
    png_file: PngFile = None,
) -> None:
    """kill -9 the postmaster under steady writes, restart: RTO <= 10 s, 0 rows lost."""
    try:
        result = db_kill_drill(before=before, after=after)
    except (BackupError, LauncherError) as exc:
        _fail(str(exc))
    except psycopg.Error as exc:  # the scratch server answered badly: say so in one line
        _fail(f"the drill's database failed: {type(exc).__name__}")
    _report("db-kill", result, as_json, out_file, png_file)


# -- drills against running processes (bastion.backup.live_drills) ------------------------

DRILL_MODEL = "drill-upstream"
DRILL_PROVIDER_KEY = "providers/drill-upstream"


class _ProviderDouble:
    """An OpenAI-compatible chat endpoint on loopback that the drill takes down
    (503) and brings back; raw ASGI (no framework below the HTTP edge)."""

    def __init__(self, api_key: str) -> None:
        self.api_key = api_key
        self.down = False
        self.calls = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = dict(scope["headers"])
        answer: dict[str, Any]
        if self.down:
            status, answer = 503, {"error": {"message": "provider down (drill)"}}
        elif headers.get(b"authorization") != f"Bearer {self.api_key}".encode():
            status, answer = 401, {"error": {"message": "invalid api key"}}
        else:
            self.calls += 1
            model = json.loads(body or b"{}").get("model", DRILL_MODEL)
            status, answer = (
                200,
                {
                    "id": f"chatcmpl-drill-{self.calls}",
                    "object": "chat.completion",
                    "created": 0,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "A drill's answer."},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15},
                },
            )
        payload = json.dumps(answer).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": payload})


@dataclass
class _ScratchStack:
    api_url: str
    gateway_url: str
    settings: Settings
    keystore: Keystore
    kms: KMS
    upstream: _ProviderDouble | None
    webhook_secret: str


def _scratch_env(settings: Settings) -> dict[str, str]:
    """A ``bastion serve`` process's environment on the scratch home: none of the
    installation's BASTION_* settings or DATABASE_URL (its database, its keys)."""
    inherited = {
        k: v for k, v in os.environ.items() if not k.startswith("BASTION_") and k != "DATABASE_URL"
    }
    return {
        **inherited,
        "BASTION_HOME": str(settings.home),
        "BASTION_SECRETS_BACKEND": "local",
        "BASTION_EMBEDDER": "hashing",
        "BASTION_INTERNAL_MTLS": "0",
        "BASTION_DEV_MODE": "1",
        "BASTION_LOG_LEVEL": "warning",
        "BASTION_WORKER_PORT": str(_bound().getsockname()[1]),
        "BASTION_STRIPE_WEBHOOK_SECRET_REF": settings.stripe_webhook_secret_ref,
    }


@contextlib.contextmanager
def _worker_process(settings: Settings) -> Iterator[None]:
    """``bastion serve worker`` on the scratch home (a real process: the webhook
    storm's events are applied by it); stopped with SIGTERM, SIGKILL after 10 s."""
    env = _scratch_env(settings)
    process = subprocess.Popen(
        [sys.executable, "-m", "bastion", "serve", "worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ready = f"http://127.0.0.1:{env['BASTION_WORKER_PORT']}/readyz"
        deadline = time.monotonic() + 60
        while process.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(ready, timeout=1).status_code == 200:
                    break
            time.sleep(0.1)
        else:
            raise LauncherError("the drill's worker did not become ready")
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _bound() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def _served(app: Any, sock: socket.socket) -> Iterator[None]:
    """``app`` on uvicorn in a thread on ``sock`` (the production server options)."""
    server = uvicorn.Server(uvicorn.Config(app, **server_options()))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise LauncherError("a drill server did not start")
            time.sleep(0.01)
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def _scratch_stack(with_upstream: bool, with_worker: bool = False) -> Iterator[_ScratchStack]:
    """An api and a gateway composed in-process on a scratch embedded server and
    a scratch key ring: the installation's database and keys are never touched."""
    from bastion.compose import Overrides, build_api, build_gateway
    from bastion.db.service import app_database, embedded_server
    from bastion.secrets.backends import open_key_ring

    with _scratch(SCRATCH_PARENT) as root:
        settings = Settings(
            home=root / "home",
            database_url=None,
            secrets_backend="local",
            keystore_file=None,
            master_key_file=None,
            master_key_ref=None,
            backup_dir=None,
            stripe_webhook_secret_ref="local://billing/drill-webhook-secret",  # noqa: S106 - a ref
            embedder="hashing",
            internal_mtls=False,  # plain HTTP on loopback, as in development
            dev_mode=True,
            gateway_incident_ttl_seconds=1.0,
        )
        try:
            ring = open_key_ring(settings)
            webhook_secret = f"whsec_{secrets.token_urlsafe(24)}"
            ring.keystore.set("billing/drill-webhook-secret", webhook_secret.encode())
            app_database(settings, migrate=True, max_size=1)  # initdb, provision, migrate
            socks = {"api": _bound(), "gateway": _bound(), "upstream": _bound()}
            urls = {k: f"http://127.0.0.1:{s.getsockname()[1]}" for k, s in socks.items()}
            upstream = None
            models = []
            if with_upstream:
                key = secrets.token_urlsafe(24)
                ring.keystore.set(DRILL_PROVIDER_KEY, key.encode())
                upstream = _ProviderDouble(key)
                models = [
                    ModelRoute(
                        name=DRILL_MODEL,
                        provider="openai_compatible",
                        base_url=f"{urls['upstream']}/v1",
                        api_key_ref=f"local://{DRILL_PROVIDER_KEY}",
                        timeout_seconds=2,
                    )
                ]
            settings = settings.model_copy(
                update={
                    "issuer": urls["api"],
                    "gateway_public_url": urls["gateway"],
                    "gateway_models": models,
                }
            )

            def overrides() -> Overrides:
                return Overrides(
                    database=app_database(settings, max_size=4),
                    keystore=ring.keystore,
                    kms=ring.kms,
                    # The drill's tenant has no subscription: every model at any rate.
                    without_plan_gate=True,
                )

            api = build_api(settings, overrides()).app
            gateway = build_gateway(settings, overrides()).app
            with contextlib.ExitStack() as running:
                if with_worker:
                    running.enter_context(_worker_process(settings))
                if upstream is not None:
                    running.enter_context(_served(upstream, socks["upstream"]))
                running.enter_context(_served(api, socks["api"]))
                running.enter_context(_served(gateway, socks["gateway"]))
                yield _ScratchStack(
                    urls["api"],
                    urls["gateway"],
                    settings,
                    ring.keystore,
                    ring.kms,
                    upstream,
                    webhook_secret,
                )
        finally:
            with contextlib.suppress(LauncherError):
                embedded_server(settings).stop()


async def _drill_member(db: Database) -> Member:
    """A tenant and a contributor of it, with a budget, for the drill's load."""
    from bastion.billing.budgets import BudgetService
    from bastion.tenants.service import TenantService

    tenants = TenantService(db)
    tenant = (await tenants.create_tenant(f"drill-{secrets.token_hex(4)}", "drill")).id
    user = await tenants.add_member(tenant, "drill@drill.invalid", "contributor")
    start = datetime.now(UTC) - timedelta(minutes=1)
    await BudgetService(db).set_budget(
        tenant,
        period_start=start,
        period_end=start + timedelta(hours=1),
        call_limit=1_000_000,
        token_limit=10**10,
    )
    return Member(tenant, user)


def _live_drill(
    with_upstream: bool,
    run: Callable[[_ScratchStack, Database, Member], Awaitable[DrillResult]],
    *,
    with_worker: bool = False,
) -> DrillResult:
    from bastion.db.service import app_database

    async def main(stack: _ScratchStack) -> DrillResult:
        async with app_database(stack.settings, max_size=2) as db:
            return await run(stack, db, await _drill_member(db))

    try:
        with _scratch_stack(with_upstream, with_worker) as stack:
            return asyncio.run(main(stack))
    except KeyboardInterrupt:  # before the load began: nothing was switched yet
        print(
            "interrupted: the scratch processes and server stopped, the scratch directory "
            "removed; the installation was never touched",
            file=sys.stderr,
        )
        raise typer.Exit(130) from None
    except (BackupError, LauncherError, DatabaseError) as exc:
        _fail(str(exc))
    except psycopg.Error as exc:
        _fail(f"the drill's database failed: {type(exc).__name__}")


@drill_app.command("revoke-keys")
def drill_revoke_keys(
    before: Annotated[float, typer.Option(help="seconds of load before the revocation")] = 1.0,
    after: Annotated[float, typer.Option(help="seconds of load after it")] = 2.5,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    out_file: Annotated[Path | None, typer.Option("--out", help="write the JSON here")] = None,
    png_file: PngFile = None,
) -> None:
    """Revoke the signing keys under load: every process refuses old tokens <= 2 s."""
    from bastion.incident.service import IncidentService

    async def run(stack: _ScratchStack, db: Database, member: Member) -> DrillResult:
        return await revoke_keys_drill(
            api_url=stack.api_url,
            gateway_url=stack.gateway_url,
            issuer=stack.api_url,
            member=member,
            keystore=stack.keystore,
            incident=IncidentService(db, stack.settings, stack.keystore, stack.kms),
            before=before,
            after=after,
        )

    _report("revoke-keys", _live_drill(False, run), as_json, out_file, png_file)


@drill_app.command("provider-outage")
def drill_provider_outage(
    before: Annotated[float, typer.Option(help="seconds of load before the outage")] = 1.0,
    outage: Annotated[float, typer.Option(help="seconds the provider is down")] = 3.0,
    recover_within: Annotated[
        float, typer.Option(help="seconds to wait for a live answer once it is back")
    ] = 40.0,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    out_file: Annotated[Path | None, typer.Option("--out", help="write the JSON here")] = None,
    png_file: PngFile = None,
) -> None:
    """The provider goes down under load: cached answers, marked, within 1 s; then recovery."""

    async def run(stack: _ScratchStack, _db: Database, member: Member) -> DrillResult:
        upstream = stack.upstream
        assert upstream is not None

        async def provider_down(down: bool) -> None:
            upstream.down = down

        return await provider_outage_drill(
            gateway_url=stack.gateway_url,
            model=DRILL_MODEL,
            issuer=stack.api_url,
            member=member,
            keystore=stack.keystore,
            provider_down=provider_down,
            before=before,
            outage=outage,
            recover_within=recover_within,
        )

    _report("provider-outage", _live_drill(True, run), as_json, out_file, png_file)


@drill_app.command("webhook-storm")
def drill_webhook_storm(
    tenants: Annotated[int, typer.Option(help="tenants, each with its Stripe customer")] = 10,
    invoices: Annotated[int, typer.Option(help="paid invoices per tenant")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    out_file: Annotated[Path | None, typer.Option("--out", help="write the JSON here")] = None,
    png_file: PngFile = None,
) -> None:
    """Webhooks paused during a storm of duplicated, shuffled events; resumed: 0 lost, once."""
    from bastion.billing.service import BillingService
    from bastion.billing.webhooks import EventCipher

    async def run(stack: _ScratchStack, db: Database, _member: Member) -> DrillResult:
        return await webhook_storm_drill(
            api_url=stack.api_url,
            secret=stack.webhook_secret,
            db=db,
            billing=BillingService(db, EventCipher(stack.keystore)),
            tenants=tenants,
            invoices=invoices,
        )

    _report("webhook-storm", _live_drill(False, run, with_worker=True), as_json, out_file, png_file)


class _ScratchWorker:
    """``bastion serve worker`` processes on the scratch home, one at a time."""

    def __init__(self, settings: Settings) -> None:
        self.env = _scratch_env(settings)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bastion", "serve", "worker"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()  # SIGKILL: no shutdown, jobs left in 'doing'
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@drill_app.command("worker-kill")
def drill_worker_kill(
    documents: Annotated[int, typer.Option(help="documents to ingest")] = 8,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    out_file: Annotated[Path | None, typer.Option("--out", help="write the JSON here")] = None,
    png_file: PngFile = None,
) -> None:
    """kill -9 the worker mid-ingestion, start another: every document indexed once."""
    from bastion.knowledge.service import Actor, KnowledgeService
    from bastion.secrets.tenant_keys import TenantKeys
    from bastion.tenants.service import TenantService

    async def run(stack: _ScratchStack, db: Database, member: Member) -> DrillResult:
        owner = await TenantService(db).add_member(member.tenant, "owner@drill.invalid", "owner")
        kb = KnowledgeService(db, TenantKeys(stack.kms), default_embedder="hashing")
        worker = _ScratchWorker(stack.settings)
        try:
            return await worker_kill_drill(
                kb=kb,
                owner=Actor(member.tenant, owner, "owner"),
                writer=Actor(member.tenant, member.user, "contributor"),
                worker=worker,
                documents=documents,
            )
        finally:
            worker.stop()

    _report("worker-kill", _live_drill(False, run), as_json, out_file, png_file)
