"""``bastion check db``: every lint fires on a crafted bad schema, and Bastion's own
database passes (its accepted findings each carry a reason).

The bad schema lives in a database of its own on the test server; the check
runs in-process through the Typer app (one test runs it as a real process),
with the password in PGPASSWORD.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from typer.testing import CliRunner, Result

from bastion.check.db import RULES
from bastion.cli import app
from tests.conftest import DbHandles

SARIF_SCHEMA = json.loads((Path(__file__).parent / "data" / "sarif-2.1.0.json").read_text())
ACCEPTED = Path(__file__).parents[1] / "src" / "bastion" / "check" / "bastion-db-accepted.txt"

# One object per lint, each wrong in exactly one way.
BAD_SCHEMA = """
CREATE ROLE chk_app LOGIN BYPASSRLS;
CREATE ROLE chk_super LOGIN SUPERUSER;
CREATE ROLE anon NOLOGIN;
CREATE SCHEMA app;
CREATE SCHEMA scratch;
GRANT CREATE ON SCHEMA scratch TO PUBLIC;
GRANT USAGE ON SCHEMA app TO chk_app, chk_super, anon;

CREATE TABLE app.open_notes (id int, tenant_id uuid);
GRANT SELECT ON app.open_notes TO chk_app;

CREATE TABLE app.unforced (id int, tenant_id uuid);
ALTER TABLE app.unforced ENABLE ROW LEVEL SECURITY;
CREATE POLICY unforced_read ON app.unforced FOR SELECT TO chk_app USING (tenant_id IS NOT NULL);
GRANT SELECT ON app.unforced TO chk_app;

CREATE TABLE app.no_policy (id int);
ALTER TABLE app.no_policy ENABLE ROW LEVEL SECURITY;
ALTER TABLE app.no_policy FORCE ROW LEVEL SECURITY;

CREATE TABLE app.policy_off (id int, tenant_id uuid);
CREATE POLICY policy_off_read ON app.policy_off FOR SELECT USING (tenant_id IS NOT NULL);

CREATE TABLE app.orders (id int, tenant_id uuid);
ALTER TABLE app.orders ENABLE ROW LEVEL SECURITY;
ALTER TABLE app.orders FORCE ROW LEVEL SECURITY;
CREATE POLICY orders_read ON app.orders FOR SELECT TO chk_app USING (tenant_id IS NOT NULL);
CREATE POLICY orders_write ON app.orders FOR UPDATE TO chk_app USING (true);
GRANT SELECT, UPDATE ON app.orders TO chk_app;

CREATE VIEW app.orders_view AS SELECT id FROM app.orders;
GRANT SELECT ON app.orders_view TO chk_app;

CREATE FUNCTION app.definer_open() RETURNS int LANGUAGE sql SECURITY DEFINER AS 'SELECT 1';
CREATE FUNCTION app.definer_pinned() RETURNS int LANGUAGE sql SECURITY DEFINER
    SET search_path = pg_catalog, pg_temp AS 'SELECT 1';
REVOKE EXECUTE ON FUNCTION app.definer_open() FROM PUBLIC;

CREATE TABLE app.owned_by_app (id int);
ALTER TABLE app.owned_by_app OWNER TO chk_app;
ALTER TABLE app.owned_by_app ENABLE ROW LEVEL SECURITY;
ALTER TABLE app.owned_by_app FORCE ROW LEVEL SECURITY;
CREATE POLICY owned_read ON app.owned_by_app FOR SELECT USING (true);

CREATE TABLE app.accounts (id int, password_hash text);
ALTER TABLE app.accounts ENABLE ROW LEVEL SECURITY;
ALTER TABLE app.accounts FORCE ROW LEVEL SECURITY;
CREATE POLICY accounts_read ON app.accounts FOR SELECT USING (true);
GRANT SELECT ON app.accounts TO anon, chk_super;

CREATE EXTENSION IF NOT EXISTS citext SCHEMA public;
"""

# Each lint, and the subject it must name on the bad schema.
EXPECTED = {
    ("rls-disabled", "app.open_notes"),
    ("rls-not-forced", "app.unforced"),
    ("rls-enabled-no-policy", "app.no_policy"),
    ("policy-exists-rls-disabled", "app.policy_off"),
    ("permissive-write-policy", "app.orders.orders_write"),
    ("security-definer-view", "app.orders_view"),
    ("security-definer-search-path", "app.definer_open()"),
    ("security-definer-public-execute", "app.definer_pinned()"),
    ("app-role-bypassrls", "chk_app"),
    ("app-role-owns-tables", "chk_app"),
    ("app-role-superuser", "chk_super"),
    ("schema-create-public", "scratch"),
    ("extension-in-public", "citext"),
    ("sensitive-column-exposed", "app.accounts.password_hash"),
}


def _run(url: str, password: str, *args: str) -> Result:
    """``bastion check db URL ARGS`` in this process, the password in PGPASSWORD."""
    return CliRunner().invoke(app, ["check", "db", url, *args], env={"PGPASSWORD": password})


def _split(conninfo: str, dbname: str | None = None) -> tuple[str, str]:
    params = conninfo_to_dict(conninfo)
    password = str(params.pop("password"))
    if dbname:
        params["dbname"] = dbname
    return make_conninfo(**{k: str(v) for k, v in params.items()}), password


@pytest.fixture(scope="module")
def bad_database(database: DbHandles) -> Iterator[tuple[str, str]]:
    name = f"{database.dbname}_bad"
    with psycopg.connect(database.superuser, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url, password = _split(database.superuser, name)
    try:
        with psycopg.connect(url, password=password, autocommit=True) as conn:
            conn.execute(BAD_SCHEMA)
        yield url, password
    finally:
        with psycopg.connect(database.superuser, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            for role in ("chk_app", "chk_super", "anon"):
                admin.execute(f"DROP ROLE IF EXISTS {role}")


def _found(result: Result) -> set[tuple[str, str]]:
    return {(f["rule"], f["subject"]) for f in json.loads(result.stdout)}


def test_every_lint_fires_on_a_crafted_bad_schema(bad_database: tuple[str, str]) -> None:
    url, password = bad_database
    result = _run(url, password, "--format", "json", "--schema", "app", "--schema", "scratch")
    assert result.exit_code == 1, result.stderr
    found = _found(result)
    assert found == EXPECTED, (found - EXPECTED, EXPECTED - found)
    assert {rule for rule, _ in EXPECTED} == set(RULES)  # no lint left untested


def test_the_sarif_log_is_valid_sarif_2_1_0(bad_database: tuple[str, str], tmp_path: Path) -> None:
    url, password = bad_database
    out = tmp_path / "db.sarif"
    result = _run(url, password, "--format", "sarif", "--out", str(out), "--schema", "app")
    assert result.exit_code == 1, result.stderr
    log = json.loads(out.read_text())
    jsonschema.Draft202012Validator(SARIF_SCHEMA).validate(log)
    results = log["runs"][0]["results"]
    assert {r["ruleId"] for r in results} >= {"rls-disabled", "permissive-write-policy"}
    names = [r["id"] for r in log["runs"][0]["tool"]["driver"]["rules"]]
    assert all(names[r["ruleIndex"]] == r["ruleId"] for r in results)


def test_bastions_own_database_passes(database: DbHandles) -> None:
    url, password = _split(database.superuser)
    result = _run(url, password, "--format", "json", "--accept", str(ACCEPTED))
    assert result.exit_code == 0, result.stdout + result.stderr
    findings = json.loads(result.stdout)
    # What is accepted is listed with its reason, never silently dropped.
    assert all(f["accepted"] for f in findings), [f for f in findings if not f.get("accepted")]


def test_an_accepted_line_without_a_reason_is_refused(database: DbHandles, tmp_path: Path) -> None:
    url, password = _split(database.superuser)
    accept = tmp_path / "accepted.txt"
    accept.write_text("rls-disabled procrastinate.procrastinate_jobs\n")
    result = _run(url, password, "--accept", str(accept))
    assert result.exit_code == 2
    assert "expected 'RULE SUBJECT  # reason'" in result.stderr


def test_a_password_in_the_url_is_refused_and_not_echoed(database: DbHandles) -> None:
    url, password = _split(database.superuser)
    with_password = f"{url} password={password}"
    # A real process: what a user (or a CI log) would see.
    result = subprocess.run(
        [sys.executable, "-m", "bastion", "check", "db", with_password],
        env=os.environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "PGPASSWORD" in result.stderr
    assert password not in result.stdout + result.stderr


def test_an_unreachable_database_is_a_clear_error(database: DbHandles) -> None:
    result = _run("host=127.0.0.1 port=1 dbname=x user=x connect_timeout=2", "nope")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: cannot check the database:")
    assert "Traceback" not in result.stderr
