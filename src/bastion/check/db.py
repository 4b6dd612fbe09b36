"""``bastion check db``: security lints for any PostgreSQL, read from its catalogue.

They cover the security lints of Supabase's splinter and what a generated
app's schema most often gets wrong. Only the catalogue is read (``pg_class``,
``pg_policy``, ``pg_proc``, ``pg_roles``…): no table's rows, no writes.

*App roles* are the roles the application connects as: given with
``app_roles``, or else every role that holds a privilege on a checked table it
does not own. *Anonymous roles* are ``anon_roles`` (default ``anon``, where it
exists) and PUBLIC. A table is *reachable* when a role other than its owner
(or PUBLIC) holds a privilege on it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import psycopg

from bastion.check.findings import Finding, Rule

SYSTEM_SCHEMAS = ("pg_catalog", "information_schema")
SENSITIVE_COLUMN = re.compile(
    r"pass(word|wd|_?hash)|secret|token|api_?key|private_?key|ssn|social_security"
    r"|card_?(number|no)|cvv|cvc|iban|totp|mfa_|recovery_code",
    re.IGNORECASE,
)

RULES = {
    r.id: r
    for r in (
        Rule(
            "rls-disabled",
            "error",
            "A table other roles can reach has row-level security disabled",
            "ALTER TABLE … ENABLE ROW LEVEL SECURITY and FORCE it; add policies on the tenant.",
        ),
        Rule(
            "rls-not-forced",
            "warning",
            "Row-level security is enabled but not FORCEd, so the table's owner bypasses it",
            "ALTER TABLE … FORCE ROW LEVEL SECURITY.",
        ),
        Rule(
            "rls-enabled-no-policy",
            "note",
            "Row-level security is enabled with no policy: every non-owner sees no rows",
            "Add the policies the table needs, or drop the grants.",
        ),
        Rule(
            "policy-exists-rls-disabled",
            "error",
            "Policies exist but row-level security is disabled, so none of them applies",
            "ALTER TABLE … ENABLE ROW LEVEL SECURITY.",
        ),
        Rule(
            "permissive-write-policy",
            "error",
            "A write policy is USING (true) or WITH CHECK (true) for a role other than the owner",
            "Restrict the policy's USING and WITH CHECK to the caller's tenant or rows.",
        ),
        Rule(
            "security-definer-search-path",
            "error",
            "A SECURITY DEFINER function does not pin search_path",
            "ALTER FUNCTION … SET search_path = pg_catalog, pg_temp (schema-qualify the rest).",
        ),
        Rule(
            "security-definer-public-execute",
            "error",
            "PUBLIC may execute a SECURITY DEFINER function",
            "REVOKE EXECUTE ON FUNCTION … FROM PUBLIC; GRANT it to the roles that need it.",
        ),
        Rule(
            "security-definer-view",
            "error",
            "A view over a row-level-secured table runs with its owner's rights",
            "ALTER VIEW … SET (security_invoker = true).",
        ),
        Rule(
            "app-role-superuser",
            "error",
            "An app role is a superuser, so no row-level security applies to it",
            "Connect the app as a role without SUPERUSER.",
        ),
        Rule(
            "app-role-bypassrls",
            "error",
            "An app role has BYPASSRLS",
            "ALTER ROLE … NOBYPASSRLS.",
        ),
        Rule(
            "app-role-owns-tables",
            "error",
            "An app role owns tables, so row-level security that is not FORCEd skips it",
            "Give the tables to a separate owner role the app never connects as.",
        ),
        Rule(
            "schema-create-public",
            "error",
            "PUBLIC may create objects in a schema (search_path hijacking)",
            "REVOKE CREATE ON SCHEMA … FROM PUBLIC.",
        ),
        Rule(
            "extension-in-public",
            "warning",
            "An extension is installed in the public schema",
            "Install extensions in their own schema (ALTER EXTENSION … SET SCHEMA extensions).",
        ),
        Rule(
            "sensitive-column-exposed",
            "error",
            "A column that looks secret or personal is readable by an anonymous role",
            "REVOKE SELECT on the table or column from the anonymous role and PUBLIC.",
        ),
    )
}


@dataclass(frozen=True)
class Scope:
    """Which schemas to check and whose eyes to check them with."""

    schemas: Sequence[str] = ()  # empty: every schema but the system ones
    app_roles: Sequence[str] = ()  # empty: inferred (see the module docstring)
    anon_roles: Sequence[str] = ("anon",)


# Tables and partitioned tables of the checked schemas, not owned by an extension.
_TABLES = """
SELECT c.oid, n.nspname, c.relname, c.relrowsecurity, c.relforcerowsecurity,
       pg_get_userbyid(c.relowner) AS owner,
       EXISTS (SELECT 1 FROM aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) a
               WHERE a.grantee <> c.relowner) AS reachable,
       (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid) AS policies
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname <> ALL(%(system)s)
  AND n.nspname NOT LIKE 'pg\\_%%'
  AND (cardinality(%(schemas)s::text[]) = 0 OR n.nspname = ANY(%(schemas)s))
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass
                  AND d.objid = c.oid AND d.deptype = 'e')
ORDER BY 2, 3
"""

_WRITE_POLICIES = """
SELECT n.nspname, c.relname, p.polname,
       ARRAY(SELECT CASE WHEN r = 0 THEN 'public' ELSE pg_get_userbyid(r) END
             FROM unnest(p.polroles) r) AS roles,
       pg_get_userbyid(c.relowner) AS owner,
       pg_get_expr(p.polqual, p.polrelid) AS qual,
       pg_get_expr(p.polwithcheck, p.polrelid) AS with_check
FROM pg_policy p JOIN pg_class c ON c.oid = p.polrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE p.polcmd IN ('a', 'w', 'd', '*') AND p.polpermissive
  AND n.nspname = ANY(%(checked)s)
ORDER BY 1, 2, 3
"""

_DEFINERS = """
SELECT p.oid::regprocedure::text AS name, n.nspname,
       coalesce(array_to_string(p.proconfig, ','), '') LIKE '%%search_path=%%' AS pinned,
       EXISTS (SELECT 1 FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a
               WHERE a.grantee = 0 AND a.privilege_type = 'EXECUTE') AS public_execute
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE p.prosecdef AND n.nspname = ANY(%(checked)s)
  AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
                  AND d.objid = p.oid AND d.deptype = 'e')
ORDER BY 1
"""

# Views that read a row-level-secured table and do not run as the invoker.
_DEFINER_VIEWS = """
SELECT DISTINCT n.nspname, v.relname
FROM pg_class v JOIN pg_namespace n ON n.oid = v.relnamespace
JOIN pg_rewrite w ON w.ev_class = v.oid
JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = w.oid
JOIN pg_class t ON t.oid = d.refobjid AND t.relrowsecurity
WHERE v.relkind = 'v' AND n.nspname = ANY(%(checked)s)
  AND NOT coalesce(v.reloptions::text[] && ARRAY['security_invoker=true',
      'security_invoker=on', 'security_invoker=1'], false)
ORDER BY 1, 2
"""

_ROLES = """
SELECT r.rolname, r.rolsuper, r.rolbypassrls,
       ARRAY(SELECT n.nspname || '.' || c.relname FROM pg_class c
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE c.relowner = r.oid AND c.relkind IN ('r', 'p')
               AND n.nspname = ANY(%(checked)s) ORDER BY 1) AS owns
FROM pg_roles r WHERE r.rolname = ANY(%(roles)s) ORDER BY 1
"""

# Roles granted anything on a checked table they do not own (PUBLIC excluded).
_GRANTEES = """
SELECT DISTINCT pg_get_userbyid(a.grantee)
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
     aclexplode(c.relacl) a
WHERE c.relkind IN ('r', 'p', 'v', 'm') AND n.nspname = ANY(%(checked)s)
  AND a.grantee <> 0 AND a.grantee <> c.relowner
"""

_PUBLIC_CREATE = """
SELECT n.nspname FROM pg_namespace n, aclexplode(coalesce(n.nspacl, acldefault('n', n.nspowner))) a
WHERE n.nspname = ANY(%(checked)s) AND a.grantee = 0 AND a.privilege_type = 'CREATE'
ORDER BY 1
"""

_PUBLIC_EXTENSIONS = """
SELECT e.extname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
WHERE n.nspname = 'public' ORDER BY 1
"""

_COLUMNS = """
SELECT n.nspname, c.relname, a.attname,
       EXISTS (SELECT 1 FROM aclexplode(coalesce(c.relacl, acldefault('r', c.relowner))) g
               WHERE g.grantee = 0 AND g.privilege_type = 'SELECT')
       OR EXISTS (SELECT 1 FROM aclexplode(a.attacl) g
                  WHERE g.grantee = 0 AND g.privilege_type = 'SELECT') AS public_select,
       ARRAY(SELECT r FROM unnest(%(anon)s::text[]) r
             WHERE EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r)
               AND has_column_privilege(r, c.oid, a.attnum, 'SELECT')) AS anon_select
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm') AND a.attnum > 0 AND NOT a.attisdropped
  AND n.nspname = ANY(%(checked)s) AND a.attname ~* %(pattern)s
ORDER BY 1, 2, 3
"""


def _schemas(conn: psycopg.Connection, scope: Scope) -> list[str]:
    if scope.schemas:
        return list(scope.schemas)
    rows = conn.execute(
        "SELECT nspname FROM pg_namespace WHERE nspname <> ALL(%s) "
        "AND nspname NOT LIKE 'pg\\_%%' ORDER BY 1",
        [list(SYSTEM_SCHEMAS)],
    ).fetchall()
    return [r[0] for r in rows]


def _finding(rule: str, subject: str, message: str) -> Finding:
    return Finding(RULES[rule], subject, message)


def _table_findings(conn: psycopg.Connection, params: dict[str, object]) -> Iterable[Finding]:
    for _oid, schema, table, rls, forced, _owner, reachable, policies in conn.execute(
        _TABLES, params
    ):
        name = f"{schema}.{table}"
        if not rls and policies:
            yield _finding(
                "policy-exists-rls-disabled", name, f"{policies} policies, none enforced"
            )
        elif not rls and reachable:
            yield _finding("rls-disabled", name, "other roles can reach it with no row filter")
        elif rls and not forced:
            yield _finding("rls-not-forced", name, "its owner is not subject to the policies")
        if rls and not policies:
            yield _finding("rls-enabled-no-policy", name, "no policy: non-owners see no rows")


def _policy_findings(conn: psycopg.Connection, params: dict[str, object]) -> Iterable[Finding]:
    for schema, table, policy, roles, owner, qual, check in conn.execute(_WRITE_POLICIES, params):
        others = [r for r in roles if r != owner]
        if others and ("true" in (qual, check)):
            yield _finding(
                "permissive-write-policy",
                f"{schema}.{table}.{policy}",
                f"allows any row to {', '.join(others)}",
            )


def _function_findings(conn: psycopg.Connection, params: dict[str, object]) -> Iterable[Finding]:
    for name, _schema, pinned, public_execute in conn.execute(_DEFINERS, params):
        if not pinned:
            yield _finding("security-definer-search-path", name, "search_path is the caller's")
        if public_execute:
            yield _finding("security-definer-public-execute", name, "any role may call it")
    for schema, view in conn.execute(_DEFINER_VIEWS, params):
        yield _finding("security-definer-view", f"{schema}.{view}", "bypasses the table's policies")


def _role_findings(
    conn: psycopg.Connection, params: dict[str, object], scope: Scope
) -> Iterable[Finding]:
    roles = list(scope.app_roles) or [r[0] for r in conn.execute(_GRANTEES, params)]
    for name, superuser, bypass, owns in conn.execute(_ROLES, {**params, "roles": roles}):
        if superuser:
            yield _finding("app-role-superuser", name, "superuser")
        if bypass:
            yield _finding("app-role-bypassrls", name, "has BYPASSRLS")
        if owns:
            yield _finding("app-role-owns-tables", name, f"owns {len(owns)} tables, e.g. {owns[0]}")


def _schema_findings(conn: psycopg.Connection, params: dict[str, object]) -> Iterable[Finding]:
    for (schema,) in conn.execute(_PUBLIC_CREATE, params):
        yield _finding("schema-create-public", schema, "PUBLIC has CREATE")
    for (extension,) in conn.execute(_PUBLIC_EXTENSIONS):
        yield _finding("extension-in-public", extension, "installed in schema public")
    for schema, table, column, public, anon in conn.execute(_COLUMNS, params):
        readers = (["PUBLIC"] if public else []) + list(anon)
        if readers:
            yield _finding(
                "sensitive-column-exposed",
                f"{schema}.{table}.{column}",
                f"readable by {', '.join(readers)}",
            )


def check_database(conninfo: str, scope: Scope = Scope()) -> list[Finding]:
    """Return every finding of the lints in :data:`RULES` on the database.

    Raises :class:`psycopg.OperationalError` when it cannot connect. Runs in a
    read-only transaction, so a check can never change what it checks.
    """
    with psycopg.connect(conninfo, autocommit=False) as conn:
        conn.read_only = True
        checked = _schemas(conn, scope)
        params: dict[str, object] = {
            "system": list(SYSTEM_SCHEMAS),
            "schemas": list(scope.schemas),
            "checked": checked,
            "anon": list(scope.anon_roles),
            "pattern": SENSITIVE_COLUMN.pattern,
        }
        findings = [
            *_table_findings(conn, params),
            *_policy_findings(conn, params),
            *_function_findings(conn, params),
            *_role_findings(conn, params, scope),
            *_schema_findings(conn, params),
        ]
        conn.rollback()
    return findings
