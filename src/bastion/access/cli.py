"""``bastion policy``: check the Cedar policies and print the permission matrix."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from bastion.access.authorize import (
    DEFAULT_POLICY_DIR,
    DEFAULT_SCHEMA_PATH,
    Authorizer,
    PolicyError,
)
from bastion.access.matrix import (
    DEFAULT_TABLE_PATH,
    TableError,
    load_decision_table,
    permission_changes,
    permission_matrix,
    run_decision_table,
)

policy_app = typer.Typer(
    help="Cedar policies: validate them, test them, show who may do what.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

PolicyDir = Annotated[Path, typer.Option("--policy-dir", help="Directory of *.cedar policy files.")]
SchemaPath = Annotated[Path, typer.Option("--schema", help="The Cedar schema file.")]


def _load(policy_dir: Path, schema: Path) -> Authorizer:
    try:
        return Authorizer(policy_dir, schema)
    except PolicyError as exc:
        # Plain print: file:line: message on one line, never re-wrapped.
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None


@policy_app.command()
def check(
    policy_dir: PolicyDir = DEFAULT_POLICY_DIR,
    schema: SchemaPath = DEFAULT_SCHEMA_PATH,
    table: Annotated[
        Path, typer.Option("--table", help="The expected-decision table (JSON).")
    ] = DEFAULT_TABLE_PATH,
) -> None:
    """Validate the policies against the schema and run the decision table."""
    authorizer = _load(policy_dir, schema)
    print(
        f"policies: {authorizer.policy_count} in {len(authorizer.files)} files, "
        f"valid against {schema.name} ({len(authorizer.actions)} actions)"
    )
    try:
        rows = load_decision_table(table)
    except TableError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(1) from None
    mismatches = run_decision_table(authorizer, rows)
    for row in mismatches:
        print(f"mismatch: {row.describe()}", file=sys.stderr)
    passed = len(rows) - len(mismatches)
    print(f"decision table: {passed}/{len(rows)} rows as expected")
    if mismatches:
        raise typer.Exit(1)


@policy_app.command()
def matrix(
    policy_dir: PolicyDir = DEFAULT_POLICY_DIR,
    schema: SchemaPath = DEFAULT_SCHEMA_PATH,
) -> None:
    """Print the permission matrix (Markdown), computed from the policies."""
    print(permission_matrix(_load(policy_dir, schema)), end="")


def _policies_at(
    repo: Path, revision: str, policy_dir: Path, schema: Path, into: Path
) -> Authorizer:
    """The Authorizer of the policies and schema as they were at ``revision``."""
    (into / "policies").mkdir(parents=True)

    def show(path: Path) -> bytes:
        return subprocess.run(
            ["git", "-C", str(repo), "show", f"{revision}:{path.as_posix()}"],
            check=True,
            capture_output=True,
        ).stdout

    try:
        listing = subprocess.run(
            [
                "git",
                "-C",
                str(repo),
                "ls-tree",
                "--name-only",
                f"{revision}:{policy_dir.as_posix()}",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        for name in (n for n in listing if n.endswith(".cedar")):
            (into / "policies" / name).write_bytes(show(policy_dir / name))
        (into / "schema.cedarschema").write_bytes(show(schema))
    except subprocess.CalledProcessError as exc:
        reason = exc.stderr if isinstance(exc.stderr, str) else exc.stderr.decode(errors="replace")
        print(f"error: {revision}: {reason.strip()}", file=sys.stderr)
        raise typer.Exit(2) from None
    return _load(into / "policies", into / "schema.cedarschema")


@policy_app.command()
def diff(
    base: Annotated[str, typer.Argument(help="git revision before the change, e.g. origin/main")],
    head: Annotated[str, typer.Argument(help="git revision after the change")] = "HEAD",
    repo: Annotated[Path, typer.Option(help="the git repository")] = Path("."),
    policy_dir: Annotated[
        Path, typer.Option("--policy-dir", help="policy directory, relative to the repo")
    ] = Path("src/bastion/access/policies"),
    schema: Annotated[
        Path, typer.Option("--schema", help="schema file, relative to the repo")
    ] = Path("src/bastion/access/schema.cedarschema"),
    fail_on_gain: Annotated[
        bool, typer.Option(help="exit 1 when any role gains a permission (a review gate)")
    ] = False,
) -> None:
    """Print who gains or loses which permission between two revisions, for a reviewer."""
    with tempfile.TemporaryDirectory() as scratch:
        before = _policies_at(repo, base, policy_dir, schema, Path(scratch) / "base")
        after = _policies_at(repo, head, policy_dir, schema, Path(scratch) / "head")
        changes = permission_changes(before, after)
    for change in changes:
        print(change.describe())
    gained = sum(c.gained for c in changes)
    print(f"{len(changes)} permission changes ({gained} gained) from {base} to {head}")
    if fail_on_gain and gained:
        raise typer.Exit(1)
