"""Cedar policies (CHECKLIST R1): deny by default, tenant isolation, MFA, roles."""

from __future__ import annotations

import functools
import os
import shutil
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from bastion.access import ACTIONS, ADMIN_ACTIONS, ROLES, Authorizer, PolicyError, Resource, Subject
from bastion.access.authorize import DEFAULT_POLICY_DIR, DEFAULT_SCHEMA_PATH
from bastion.access.cli import policy_app
from bastion.access.matrix import (
    MFA,
    NO,
    YES,
    load_decision_table,
    matrix_cells,
    permission_matrix,
    run_decision_table,
    sample_resource,
    sample_subject,
)

ACCOUNT_ACTIONS = (
    "account:read",
    "account:mfa",
    "account:password",
    "account:sessions",
    "account:sampling",
)


@pytest.fixture(scope="module")
def authorizer() -> Authorizer:
    return Authorizer()


@pytest.fixture(scope="module")
def raw_authorizer() -> Authorizer:
    """Every decision straight from Cedar (no memoised decisions)."""
    return Authorizer(decision_cache=False)


@pytest.fixture
def policy_copy(tmp_path: Path) -> tuple[Path, Path]:
    """A writable copy of the packaged policies and schema."""
    policy_dir = tmp_path / "policies"
    shutil.copytree(DEFAULT_POLICY_DIR, policy_dir)
    schema = tmp_path / "schema.cedarschema"
    shutil.copy(DEFAULT_SCHEMA_PATH, schema)
    return policy_dir, schema


def _subject(*roles: str, mfa: bool = True) -> Subject:
    return Subject(uuid.uuid4(), uuid.uuid4(), frozenset(roles), mfa)


def _resource(authorizer: Authorizer, subject: Subject, action: str) -> Resource:
    """A resource ``action`` applies to, in the subject's tenant (their own account)."""
    kind = authorizer.resource_types(action)[0]
    owner = subject.user_id if authorizer.has_owner(kind) else None
    return Resource(kind, str(uuid.uuid4()), subject.tenant_id, owner)


def _touch(path: Path, text: str) -> None:
    """Write ``text`` and move the mtime on, so a reload sees the change."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(text)
    os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))


# --------------------------------------------------------------------------- schema


def test_schema_declares_exactly_the_actions(authorizer: Authorizer) -> None:
    assert authorizer.actions == ACTIONS
    assert len(set(ACTIONS)) == 32
    assert authorizer.resource_types("account:read") == ("Account",)
    assert authorizer.has_owner("Account")
    assert not authorizer.has_owner("Document")
    assert authorizer.policy_count >= 9


# --------------------------------------------------------------------------- decisions


@pytest.mark.parametrize("which", ["authorizer", "raw_authorizer"])
def test_decision_table_passes(which: str, request: pytest.FixtureRequest) -> None:
    authz: Authorizer = request.getfixturevalue(which)
    rows = load_decision_table()
    assert len(rows) >= len(ROLES) * len(ACTIONS) * 2
    mismatches = run_decision_table(authz, rows)
    assert [row.describe() for row in mismatches] == []


def test_decision_table_covers_every_role_and_action() -> None:
    rows = load_decision_table()
    own = {(next(iter(r.roles)), r.action) for r in rows if len(r.roles) == 1 and r.same_tenant}
    cross = {next(iter(r.roles)) for r in rows if len(r.roles) == 1 and not r.same_tenant}
    no_mfa = {r.action for r in rows if not r.mfa and r.action in ADMIN_ACTIONS}
    assert own >= {(role, action) for role in ROLES for action in ACTIONS}
    assert cross >= set(ROLES)
    assert no_mfa == ADMIN_ACTIONS


def test_every_role_and_action_matches_the_matrix(authorizer: Authorizer) -> None:
    cells = matrix_cells(authorizer)
    for action in ACTIONS:
        for role in ROLES:
            resource = sample_resource(authorizer, action)
            plain = authorizer.authorize(sample_subject([role], False), action, resource)
            strong = authorizer.authorize(sample_subject([role], True), action, resource)
            expected = YES if plain else MFA if strong else NO
            assert cells[action][role] == expected, (action, role)
    # The rules, read off the matrix.
    assert all(cells[action]["owner"] in (YES, MFA) for action in ACTIONS)
    assert {a for a in ACTIONS if cells[a]["viewer"] == YES} == {
        "document:read",
        "question:ask",
        "member:list",
        *ACCOUNT_ACTIONS,
    }
    auditor = {a for a in ACTIONS if cells[a]["auditor"] != NO}
    assert auditor == {
        "document:read",
        "member:list",
        "audit:read",
        "usage:read",
        "billing:read",
        "sampling:read",
        "egress:read",
        "safety:read",
        *ACCOUNT_ACTIONS,
    }
    assert not auditor & {"document:write", "document:delete", "billing:manage", "plan:change"}
    text = permission_matrix(authorizer)
    assert text.startswith("| action | owner | billing-admin | auditor | contributor | viewer |")
    assert "| `key:rotate` | MFA | — | — | — | — |" in text


@pytest.mark.parametrize("action", ACTIONS)
def test_owner_is_denied_on_every_action_cross_tenant(
    authorizer: Authorizer, raw_authorizer: Authorizer, action: str
) -> None:
    owner = _subject("owner", *ROLES, mfa=True)
    same = _resource(authorizer, owner, action)
    assert authorizer.authorize(owner, action, same)
    other = Resource(same.type, same.id, uuid.uuid4(), same.owner)
    assert not authorizer.authorize(owner, action, other)
    assert not raw_authorizer.authorize(owner, action, other)
    assert authorizer.filter(owner, action, [other, same, other]) == [same]


@pytest.mark.parametrize("action", sorted(ADMIN_ACTIONS))
def test_admin_actions_need_mfa(authorizer: Authorizer, action: str) -> None:
    for role in ROLES:
        subject = _subject(role, mfa=False)
        resource = _resource(authorizer, subject, action)
        assert not authorizer.authorize(subject, action, resource), role
    owner = _subject("owner", mfa=True)
    assert authorizer.authorize(owner, action, _resource(authorizer, owner, action))


@pytest.mark.parametrize("action", ACCOUNT_ACTIONS)
def test_account_actions_only_on_own_account(
    authorizer: Authorizer, raw_authorizer: Authorizer, action: str
) -> None:
    for role in ROLES:
        me = _subject(role, mfa=False)
        mine = Resource("Account", str(me.user_id), me.tenant_id, me.user_id)
        theirs = Resource("Account", str(uuid.uuid4()), me.tenant_id, uuid.uuid4())
        ownerless = Resource("Account", "x", me.tenant_id)
        for authz in (authorizer, raw_authorizer):
            assert authz.authorize(me, action, mine), role
            assert not authz.authorize(me, action, theirs), role
            assert not authz.authorize(me, action, ownerless), role
    nobody = _subject(mfa=True)
    assert not authorizer.authorize(
        nobody, action, Resource("Account", "a", nobody.tenant_id, nobody.user_id)
    )


def test_unknown_action_and_wrong_resource_type_are_denied(authorizer: Authorizer) -> None:
    owner = _subject("owner")
    document = Resource("Document", "d", owner.tenant_id)
    assert authorizer.authorize(owner, "document:read", document)
    assert not authorizer.authorize(owner, "document:publish", document)
    assert not authorizer.authorize(owner, "", document)
    assert not authorizer.authorize(owner, "Document:read", document)
    assert not authorizer.authorize(owner, "key:rotate", document)  # Key, not Document
    assert not authorizer.authorize(
        owner, "document:read", Resource("Secret", "s", owner.tenant_id)
    )
    assert authorizer.filter(owner, "document:publish", [document]) == []


def test_context_is_checked_against_the_schema(authorizer: Authorizer) -> None:
    owner = _subject("owner")
    document = Resource("Document", "d", owner.tenant_id)
    assert authorizer.authorize(owner, "document:read", document, context={})
    # No action declares context attributes: an undeclared one fails closed.
    assert not authorizer.authorize(owner, "document:read", document, context={"ip": "1.2.3.4"})


def test_filter_keeps_order_and_handles_clashing_ids(authorizer: Authorizer) -> None:
    viewer = _subject("viewer", mfa=False)
    mine = [Resource("Document", f"d{i}", viewer.tenant_id) for i in range(5)]
    foreign = Resource("Document", "d2", uuid.uuid4())  # same id as mine[2], other tenant
    wrong = Resource("Key", "k", viewer.tenant_id)
    resources = [*mine[:3], foreign, wrong, *mine[3:]]
    assert authorizer.filter(viewer, "document:read", resources) == mine
    assert authorizer.filter(viewer, "document:write", resources) == []
    raw = Authorizer(decision_cache=False)
    assert raw.filter(viewer, "document:read", resources) == mine


def test_memo_agrees_with_cedar_on_loosely_typed_ids(raw_authorizer: Authorizer) -> None:
    memo = Authorizer()
    viewer = Subject(uuid.uuid4(), uuid.uuid4(), {"viewer"}, False)  # type: ignore[arg-type]
    as_text = Resource("Document", "d", str(viewer.tenant_id))  # type: ignore[arg-type]
    expected = raw_authorizer.authorize(viewer, "document:read", as_text)
    assert memo.authorize(viewer, "document:read", as_text) == expected
    # Whatever was memoised above, another tenant stays denied.
    elsewhere = Resource("Document", "d", uuid.uuid4())
    assert not memo.authorize(viewer, "document:read", elsewhere)
    assert memo.authorize(viewer, "document:read", Resource("Document", "e", viewer.tenant_id))


# --------------------------------------------------------------------------- property

_tenants = st.sampled_from([uuid.UUID(int=n) for n in range(1, 4)])
_users = st.sampled_from([uuid.UUID(int=n) for n in range(10, 14)])
_roles = st.frozensets(st.sampled_from([*ROLES, "admin", "root", ""]), max_size=7)


@settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    user=_users,
    tenant=_tenants,
    roles=_roles,
    mfa=st.booleans(),
    action=st.sampled_from([*ACTIONS, "document:publish"]),
    kind=st.sampled_from(["Document", "Account", "Key", "Member", "Approval", "AuditLog"]),
    resource_tenant=_tenants,
    owner=st.one_of(st.none(), _users),
    rid=st.text(min_size=1, max_size=8),
)
def test_never_allow_across_tenants(
    user: uuid.UUID,
    tenant: uuid.UUID,
    roles: frozenset[str],
    mfa: bool,
    action: str,
    kind: str,
    resource_tenant: uuid.UUID,
    owner: uuid.UUID | None,
    rid: str,
) -> None:
    memo, raw = _property_authorizers()
    subject = Subject(user, tenant, roles, mfa)
    resource = Resource(kind, rid, resource_tenant, owner)
    allowed = raw.authorize(subject, action, resource)
    if tenant != resource_tenant:
        assert not allowed
        assert not memo.authorize(subject, action, resource)
        assert memo.filter(subject, action, [resource]) == []
    # The memoised decisions are Cedar's decisions.
    assert memo.authorize(subject, action, resource) == allowed
    assert (memo.filter(subject, action, [resource]) == [resource]) == allowed


@functools.cache
def _property_authorizers() -> tuple[Authorizer, Authorizer]:
    return Authorizer(), Authorizer(decision_cache=False)


# --------------------------------------------------------------------------- loading


def test_syntax_error_names_file_and_line(policy_copy: tuple[Path, Path]) -> None:
    policy_dir, schema = policy_copy
    broken = policy_dir / "roles.cedar"
    lines = broken.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if 'contains("viewer")' in line)
    lines[index] = lines[index].replace('contains("viewer")', 'contains("viewer") ==')
    broken.write_text("\n".join(lines) + "\n")
    with pytest.raises(PolicyError) as caught:
        Authorizer(policy_dir, schema)
    assert caught.value.file == str(broken)
    assert caught.value.line == index + 1
    assert str(caught.value).startswith(f"{broken}:{index + 1}: ")
    assert "unexpected token" in caught.value.message


def test_schema_error_names_the_policy_line(policy_copy: tuple[Path, Path]) -> None:
    policy_dir, schema = policy_copy
    broken = policy_dir / "admin.cedar"
    text = broken.read_text().replace("principal.mfa", "principal.mfa_done")
    broken.write_text(text)
    line = next(n for n, t in enumerate(text.splitlines(), 1) if "mfa_done" in t)
    with pytest.raises(PolicyError) as caught:
        Authorizer(policy_dir, schema)
    assert (caught.value.file, caught.value.line) == (str(broken), line)
    assert "mfa_done" in caught.value.message


def test_broken_schema_and_empty_dir_refuse_to_start(
    policy_copy: tuple[Path, Path], tmp_path: Path
) -> None:
    policy_dir, schema = policy_copy
    schema.write_text(
        schema.read_text().replace("entity Plan = { tenant: Tenant };", "entity Plan")
    )
    with pytest.raises(PolicyError) as caught:
        Authorizer(policy_dir, schema)
    assert caught.value.file == str(schema)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PolicyError, match=r"no \*\.cedar"):
        Authorizer(empty, DEFAULT_SCHEMA_PATH)


def test_entity_literals_disable_the_memo(policy_copy: tuple[Path, Path]) -> None:
    policy_dir, schema = policy_copy
    (policy_dir / "pinned.cedar").write_text(
        'forbid (principal, action, resource == Bastion::Document::"pinned");\n'
    )
    authz = Authorizer(policy_dir, schema)
    owner = _subject("owner")
    assert authz.authorize(owner, "document:read", Resource("Document", "free", owner.tenant_id))
    assert not authz.authorize(
        owner, "document:read", Resource("Document", "pinned", owner.tenant_id)
    )


def test_broken_reload_keeps_the_old_policies(policy_copy: tuple[Path, Path]) -> None:
    policy_dir, schema = policy_copy
    authz = Authorizer(policy_dir, schema, reload_interval=0)
    viewer = _subject("viewer", mfa=False)
    document = Resource("Document", "d", viewer.tenant_id)
    assert authz.authorize(viewer, "document:read", document)
    _touch(policy_dir / "roles.cedar", "permit (principal, action, resource")
    assert authz.reload_if_changed() is False
    assert authz.last_error is not None
    assert authz.last_error.file == str(policy_dir / "roles.cedar")
    assert authz.authorize(viewer, "document:read", document)
    assert not authz.authorize(viewer, "document:write", document)
    # Unchanged broken files are not re-parsed; still the old policies.
    assert authz.reload_if_changed() is False
    assert authz.authorize(viewer, "document:read", document)


def test_reload_picks_up_a_valid_change(policy_copy: tuple[Path, Path]) -> None:
    policy_dir, schema = policy_copy
    authz = Authorizer(policy_dir, schema, reload_interval=0)
    viewer = _subject("viewer", mfa=False)
    document = Resource("Document", "d", viewer.tenant_id)
    assert not authz.authorize(viewer, "document:write", document)
    assert authz.reload_if_changed() is False  # nothing changed
    _touch(
        policy_dir / "extra.cedar",
        'permit (principal, action == Bastion::Action::"document:write", resource)\n'
        'when { principal.roles.contains("viewer") };\n',
    )
    assert authz.reload_if_changed() is True
    assert authz.last_error is None
    assert authz.authorize(viewer, "document:write", document)
    # The forbids still win over the new permit.
    elsewhere = Resource("Document", "d", uuid.uuid4())
    assert not authz.authorize(viewer, "document:write", elsewhere)


def test_reload_is_throttled(policy_copy: tuple[Path, Path]) -> None:
    policy_dir, schema = policy_copy
    authz = Authorizer(policy_dir, schema)  # default: at most once a second
    _touch(policy_dir / "extra.cedar", "")
    assert authz.reload_if_changed() is False


# --------------------------------------------------------------------------- CLI


def test_policy_check_cli(policy_copy: tuple[Path, Path]) -> None:
    runner = CliRunner()
    result = runner.invoke(policy_app, ["check"])
    assert result.exit_code == 0, result.output
    assert "rows as expected" in result.output

    policy_dir, schema = policy_copy
    args = ["check", "--policy-dir", str(policy_dir), "--schema", str(schema)]
    assert runner.invoke(policy_app, args).exit_code == 0
    roles = policy_dir / "roles.cedar"
    roles.write_text(roles.read_text() + "\npermit (principal, action, resource) when {")
    result = runner.invoke(policy_app, args)
    assert result.exit_code == 1
    assert f"{roles}:" in result.output


def test_policy_check_cli_reports_a_mismatch(policy_copy: tuple[Path, Path]) -> None:
    policy_dir, schema = policy_copy
    (policy_dir / "loose.cedar").write_text(
        'permit (principal, action == Bastion::Action::"tool:run", resource)\n'
        'when { principal.roles.contains("viewer") };\n'
    )
    args = ["check", "--policy-dir", str(policy_dir), "--schema", str(schema)]
    result = CliRunner().invoke(policy_app, args)
    assert result.exit_code == 1
    assert "mismatch: row" in result.output
    assert "tool:run" in result.output


def test_policy_matrix_cli() -> None:
    result = CliRunner().invoke(policy_app, ["matrix"])
    assert result.exit_code == 0, result.output
    assert "| `document:read` | yes | — | yes | yes | yes |" in result.output


def test_readme_permission_matrix_is_current() -> None:
    """docs/access.md's matrix is the one the policies generate (bastion policy matrix)."""
    from bastion.access.authorize import Authorizer
    from bastion.access.matrix import permission_matrix

    readme = (Path(__file__).parent.parent / "docs" / "access.md").read_text()
    start = readme.index("<!-- permission-matrix:start -->\n") + len(
        "<!-- permission-matrix:start -->\n"
    )
    end = readme.index("\n<!-- permission-matrix:end -->")
    assert readme[start:end].strip() == permission_matrix(Authorizer()).strip(), (
        "docs/access.md matrix is stale: paste the output of `bastion policy matrix`"
    )
