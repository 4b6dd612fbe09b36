"""``bastion policy``: check the Cedar policies and print the permission matrix."""

from __future__ import annotations

import sys
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
