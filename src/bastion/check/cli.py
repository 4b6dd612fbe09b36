"""``bastion check``: the audit any team can run on its own project, for CI.

Exit status: 0 when nothing at ``--fail-on`` or worse is open, 1 when
something is, 2 when the check could not run (unreachable database, bad
accepted-findings file). Output as text, JSON or SARIF 2.1.0.
"""

from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Literal

import psycopg
import typer
from psycopg.conninfo import conninfo_to_dict

from bastion.check import manifests as manifest_checks
from bastion.check import repo as repo_checks
from bastion.check.db import RULES, Scope, check_database
from bastion.check.findings import (
    AcceptedFileError,
    Finding,
    Level,
    Rule,
    apply_accepted,
    as_json,
    as_sarif,
    as_text,
    dumps,
    failing,
    read_accepted,
)

check_app = typer.Typer(
    help="Security checks of a database, a repository, Kubernetes manifests (text, JSON, SARIF).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

Format = Literal["text", "json", "sarif"]


def _stop(message: str) -> typer.Exit:
    print(f"error: {message}", file=sys.stderr)
    return typer.Exit(2)


def _report(
    findings: list[Finding],
    rules: list[Rule],
    *,
    tool: str,
    fmt: Format,
    out: Path | None,
    fail_on: Level,
) -> None:
    if fmt == "sarif":
        text = dumps(as_sarif(findings, rules, tool=tool, version=version("bastion")))
    elif fmt == "json":
        text = dumps(as_json(findings))
    else:
        text = as_text(findings) + "\n" if findings else ""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    open_ = failing(findings, fail_on)
    print(
        f"{len(findings)} findings, {len(open_)} open at {fail_on} or worse",
        file=sys.stderr,
    )
    if open_:
        raise typer.Exit(1)


@check_app.command("db")
def check_db(
    url: Annotated[str, typer.Argument(help="libpq URL or conninfo, without a password")],
    schema: Annotated[
        list[str] | None, typer.Option(help="schema to check (repeat); default: all")
    ] = None,
    app_role: Annotated[
        list[str] | None,
        typer.Option(help="role the app connects as (repeat); default: inferred from grants"),
    ] = None,
    anon_role: Annotated[
        list[str] | None, typer.Option(help="anonymous role (repeat); default: anon")
    ] = None,
    accept: Annotated[
        Path | None, typer.Option(help="accepted findings: 'RULE SUBJECT  # reason' per line")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="text, json or sarif")] = "text",
    out: Annotated[Path | None, typer.Option(help="write the report here")] = None,
    fail_on: Annotated[str, typer.Option(help="error, warning or note")] = "warning",
) -> None:
    """Lint a PostgreSQL database's row-level security, functions, roles and grants."""
    if fmt not in ("text", "json", "sarif") or fail_on not in ("error", "warning", "note"):
        raise _stop("--format is text, json or sarif; --fail-on is error, warning or note")
    try:
        if conninfo_to_dict(url).get("password"):
            # A URL on the command line lands in shell history, ps and CI logs.
            raise _stop("put the password in PGPASSWORD or ~/.pgpass, not in the URL")
    except psycopg.ProgrammingError:
        raise _stop("the URL is not a libpq URL or conninfo string") from None
    scope = Scope(tuple(schema or ()), tuple(app_role or ()), tuple(anon_role or ("anon",)))
    try:
        accepted = read_accepted(accept) if accept else {}
        findings = check_database(url, scope)
    except (AcceptedFileError, OSError) as error:
        raise _stop(str(error)) from None
    except psycopg.Error as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise _stop(f"cannot check the database: {first}") from None
    findings = apply_accepted(findings, accepted)
    _report(
        findings,
        list(RULES.values()),
        tool="bastion check db",
        fmt=fmt,  # type: ignore[arg-type]
        out=out,
        fail_on=fail_on,  # type: ignore[arg-type]
    )


@check_app.command("repo")
def check_repo(
    path: Annotated[Path, typer.Argument(help="the project's directory")] = Path("."),
    history: Annotated[bool, typer.Option(help="also scan the git history for secrets")] = True,
    accept: Annotated[
        Path | None, typer.Option(help="accepted findings: 'RULE SUBJECT  # reason' per line")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="text, json or sarif")] = "text",
    out: Annotated[Path | None, typer.Option(help="write the report here")] = None,
    fail_on: Annotated[str, typer.Option(help="error, warning or note")] = "warning",
) -> None:
    """Secrets, committed .env files, secrets shipped to the browser, dangerous
    defaults and weak GitHub Actions workflows."""
    if fmt not in ("text", "json", "sarif") or fail_on not in ("error", "warning", "note"):
        raise _stop("--format is text, json or sarif; --fail-on is error, warning or note")
    if not path.is_dir():
        raise _stop(f"{path} is not a directory")
    try:
        accepted = read_accepted(accept) if accept else {}
        findings = repo_checks.check_repository(path, history=history)
    except (AcceptedFileError, ValueError, OSError) as error:
        raise _stop(str(error)) from None
    _report(
        apply_accepted(findings, accepted),
        list(repo_checks.RULES.values()),
        tool="bastion check repo",
        fmt=fmt,  # type: ignore[arg-type]
        out=out,
        fail_on=fail_on,  # type: ignore[arg-type]
    )


@check_app.command("manifests")
def check_manifests(
    path: Annotated[Path, typer.Argument(help="a directory of YAML manifests, or one file")],
    accept: Annotated[
        Path | None, typer.Option(help="accepted findings: 'RULE SUBJECT  # reason' per line")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="text, json or sarif")] = "text",
    out: Annotated[Path | None, typer.Option(help="write the report here")] = None,
    fail_on: Annotated[str, typer.Option(help="error, warning or note")] = "warning",
) -> None:
    """Validate Kubernetes manifests offline against their schemas and lint pod
    security, resources, probes, images, literal secrets and default-deny policies."""
    if fmt not in ("text", "json", "sarif") or fail_on not in ("error", "warning", "note"):
        raise _stop("--format is text, json or sarif; --fail-on is error, warning or note")
    if not path.exists():
        raise _stop(f"{path} does not exist")
    try:
        accepted = read_accepted(accept) if accept else {}
        findings = manifest_checks.check_manifests(path)
    except (AcceptedFileError, OSError, UnicodeDecodeError) as error:
        raise _stop(str(error)) from None
    _report(
        apply_accepted(findings, accepted),
        list(manifest_checks.RULES.values()),
        tool="bastion check manifests",
        fmt=fmt,  # type: ignore[arg-type]
        out=out,
        fail_on=fail_on,  # type: ignore[arg-type]
    )
