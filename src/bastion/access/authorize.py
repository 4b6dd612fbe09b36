"""Cedar policy-as-code authorization: deny by default.

The policies live in ``policies/*.cedar`` and are validated against
``schema.cedarschema`` when an :class:`Authorizer` is built; a policy that does
not parse or does not type-check raises :class:`PolicyError` naming the file,
the line and Cedar's message, so the service refuses to start.

A decision is Allow only when Cedar says Allow *and* reports no error. Cedar
skips a policy whose evaluation errors, which would silently disarm a
``forbid``; any error, unknown action, resource type the action does not apply
to, or exception from cedarpy is therefore a Deny (fail closed). Requests are
checked against the schema by Cedar itself (entity shapes, action ``appliesTo``,
the context record).

Decision cache. Cedar has no way to read an entity's id as data: a policy can
only compare ids for equality (``principal.tenant != resource.tenant``,
``resource.owner == principal``) or name one as a literal. So when no policy
names a non-action entity literal (checked at load), a decision depends only on
the roles, the MFA flag, the action, the resource type, and which of the ids
are equal: whether the tenants match and whether the resource's owner is the
caller. Decisions are memoised on exactly that key, per loaded policy set, so
the hot path is a dict lookup and Cedar runs once per distinct key. Requests
with a context, and policy sets with entity literals, always go to Cedar.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import cedarpy

from bastion.logs import get_logger

NAMESPACE = "Bastion"
PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_POLICY_DIR = PACKAGE_DIR / "policies"
DEFAULT_SCHEMA_PATH = PACKAGE_DIR / "schema.cedarschema"

ROLES: tuple[str, ...] = ("owner", "billing-admin", "auditor", "contributor", "viewer")
# The admin-grade roles: granting one waits for a second owner's approval, and
# holding one requires a second factor.
ADMIN_ROLES = frozenset({"owner", "billing-admin", "auditor"})

ACTIONS: tuple[str, ...] = (
    "document:read",
    "document:write",
    "document:delete",
    "namespace:manage",
    "question:ask",
    "tool:run",
    "model:invoke",
    "pii:reveal",
    "member:list",
    "member:grant",
    "member:approve",
    "member:requests",
    "member:cancel",
    "member:revoke",
    "audit:read",
    "billing:read",
    "billing:manage",
    "plan:change",
    "usage:read",
    "key:rotate",
    "incident:manage",
    "account:read",
    "account:mfa",
    "account:password",
    "account:sessions",
    "account:sampling",
    "sampling:read",
    "sampling:configure",
    "egress:read",
    "egress:configure",
    "safety:read",
    "safety:configure",
)

# Admin-grade actions: admin.cedar forbids them without MFA.
ADMIN_ACTIONS: frozenset[str] = frozenset(
    {
        "member:grant",
        "member:approve",
        "member:requests",
        "member:cancel",
        "member:revoke",
        "audit:read",
        "billing:manage",
        "plan:change",
        "key:rotate",
        "incident:manage",
        # Undoes redaction for a whole tenant's personal data.
        "pii:reveal",
        # Puts consenting users' prompts into the gateway's logs (sampling.cedar).
        "sampling:configure",
        # Decides where tool calls may send retrieved text and secrets (egress.cedar).
        "egress:configure",
        # Loosens the injection screen or keeps personal data in clear (safety.cedar).
        "safety:configure",
    }
)

RELOAD_INTERVAL = 1.0  # seconds between two looks at the files
_CACHE_LIMIT = 65_536  # decisions memoised per policy set before the memo is reset

_log = get_logger("bastion.access")


@dataclass(frozen=True)
class Subject:
    """The caller: a user of ONE tenant, roles and MFA from a verified token."""

    user_id: UUID
    tenant_id: UUID
    roles: frozenset[str]
    mfa: bool


@dataclass(frozen=True)
class Resource:
    """What is acted on. ``type`` is a schema entity type without namespace."""

    type: str
    id: str
    tenant_id: UUID
    owner: UUID | None = None


class PolicyError(Exception):
    """A policy or the schema does not parse or does not validate."""

    def __init__(self, file: Path | str, line: int, message: str) -> None:
        self.file = str(file)
        self.line = line
        self.message = message
        super().__init__(f"{self.file}:{line}: {message}")


# --------------------------------------------------------------------------- loading


def _code_lines(text: str) -> list[str]:
    """``text``'s lines with ``//`` comments blanked (string literals respected)."""
    out: list[str] = []
    for line in text.splitlines():
        in_string = escaped = False
        cut = len(line)
        for i, char in enumerate(line):
            if in_string:
                if escaped:
                    escaped = False
                elif char == "\\":
                    escaped = True
                elif char == '"':
                    in_string = False
            elif char == '"':
                in_string = True
            elif line.startswith("//", i):
                cut = i
                break
        out.append(line[:cut])
    return out


def _statements(text: str) -> tuple[list[tuple[int, int]], int | None]:
    """The (first, last) lines of each ``...;`` statement, and where an unterminated one starts."""
    spans: list[tuple[int, int]] = []
    start: int | None = None
    in_string = escaped = False
    for number, line in enumerate(_code_lines(text), start=1):
        for char in line:
            if start is None and not char.isspace():
                start = number
            if in_string:
                if escaped:
                    escaped = False
                elif char == "\\":
                    escaped = True
                elif char == '"':
                    in_string = False
            elif char == '"':
                in_string = True
            elif char == ";" and start is not None:
                spans.append((start, number))
                start = None
    return spans, start


def _error_line(text: str, message: str, parse: Callable[[str], object]) -> int:
    """Locate a parse error Cedar reports without a position.

    Cedar's message names the offending token but not where it is: the first
    prefix of ``text`` (whole lines) that fails with the *same* message ends on
    the offending line (shorter prefixes fail with "unexpected end of input").
    An error only the whole text shows (a missing ``;`` at the end, an unknown
    type) is placed where the unterminated statement starts or where the name
    the message quotes appears.
    """
    lines = text.splitlines()
    if "end of input" in message:
        _, unterminated = _statements(text)
        if unterminated is not None:
            return unterminated
    for count in range(1, len(lines) + 1):
        try:
            parse("\n".join(lines[:count]))
        except ValueError as exc:
            if str(exc) == message:
                if count < len(lines) or "token" in message:
                    return count
                break
    return _mentioned_line(text, message) or max(len(lines), 1)


def _mentioned_line(text: str, message: str, first: int = 1, last: int | None = None) -> int:
    """The first code line in ``first..last`` naming what ``message`` quotes; else 0."""
    names = re.findall(r"`([^`]+)`", message) or re.findall(r":\s*(\S+)\s*$", message)
    lines = _code_lines(text)[first - 1 : last]
    for name in names:
        candidates = [name, name.rsplit("::", 1)[-1]]
        for candidate in candidates:
            bare = candidate.strip()
            if not bare or re.fullmatch(r"policy\d+", bare):
                continue
            pattern = re.compile(r"(?<![\w:])" + re.escape(bare) + r"(?![\w])")
            for number, line in enumerate(lines, start=first):
                if pattern.search(line):
                    return number
    return 0


def _parse_policies(text: str) -> Any:
    return cedarpy.PolicySet.from_str(text)


def _parse_schema(text: str) -> Any:
    return cedarpy.Schema.from_str(text)


# ``action "x" appliesTo { principal: [User], resource: [A, B], context: {} };``
# in the normalised rendering ``str(Schema)`` produces.
_ACTION_RE = re.compile(
    r'action\s+"([^"]+)"(?:\s+in\s+\[[^\]]*\])?\s+appliesTo\s*\{(.*?)\};', re.DOTALL
)
_APPLIES_RESOURCE_RE = re.compile(r"resource:\s*\[([^\]]*)\]")
_ENTITY_RE = re.compile(r"entity\s+(\w+)(?:\s+in\s+\[[^\]]*\])?\s*(?:=\s*\{(.*?)\})?;", re.DOTALL)
_ATTR_RE = re.compile(r"^\s*\"?(\w+)\"?\??\s*:", re.MULTILINE)
# An entity literal: ``Type::"id"`` (whitespace allowed around ``::``).
_ENTITY_LITERAL_RE = re.compile(r'((?:[A-Za-z_]\w*\s*::\s*)+)"')


def _schema_shape(schema: Any) -> tuple[dict[str, tuple[str, ...]], dict[str, frozenset[str]]]:
    """(action -> resource types, entity type -> attribute names) from a parsed schema."""
    rendered = str(schema)
    actions: dict[str, tuple[str, ...]] = {}
    for name, body in _ACTION_RE.findall(rendered):
        match = _APPLIES_RESOURCE_RE.search(body)
        types = [t.strip().rsplit("::", 1)[-1] for t in match.group(1).split(",")] if match else []
        actions[name] = tuple(t for t in types if t)
    entities: dict[str, frozenset[str]] = {
        name: frozenset(_ATTR_RE.findall(body or "")) for name, body in _ENTITY_RE.findall(rendered)
    }
    return actions, entities


def _cacheable(text: str) -> bool:
    """True when no policy names an entity other than an action (see module doc)."""
    if "?principal" in text or "?resource" in text:
        return False
    for path in _ENTITY_LITERAL_RE.findall(text):
        if re.sub(r"\s+", "", path).rsplit("::", 2)[-2] != "Action":
            return False
    return True


@dataclass
class _State:
    """One loaded, validated generation of policies (swapped whole on reload)."""

    policies: Any
    schema: Any
    policy_count: int
    files: tuple[Path, ...]
    action_types: dict[str, tuple[str, ...]]
    entity_attrs: dict[str, frozenset[str]]
    cacheable: bool
    fingerprint: tuple[tuple[str, int, int], ...]
    cache: dict[tuple[Any, ...], bool] = field(default_factory=dict)


def _fingerprint(policy_dir: Path, schema_path: Path) -> tuple[tuple[str, int, int], ...]:
    """(path, mtime_ns, size) of the schema and every ``*.cedar`` file."""
    entries: list[tuple[str, int, int]] = []
    for path in [schema_path, *sorted(policy_dir.glob("*.cedar"))]:
        try:
            stat = path.stat()
        except OSError:
            entries.append((str(path), -1, -1))
        else:
            entries.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(entries)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(path, 0, f"cannot read: {exc}") from exc


def _load(policy_dir: Path, schema_path: Path) -> _State:
    """Parse and validate everything; raise :class:`PolicyError` on the first problem."""
    fingerprint = _fingerprint(policy_dir, schema_path)
    schema_text = _read(schema_path)
    try:
        schema = _parse_schema(schema_text)
    except ValueError as exc:
        message = str(exc)
        raise PolicyError(
            schema_path, _error_line(schema_text, message, _parse_schema), message
        ) from exc
    if not policy_dir.is_dir():
        raise PolicyError(policy_dir, 0, "policy directory not found")
    files = tuple(sorted(policy_dir.glob("*.cedar")))
    if not files:
        raise PolicyError(policy_dir, 0, "no *.cedar policy files")
    texts: list[str] = []
    for path in files:
        text = _read(path)
        try:
            parsed = _parse_policies(text)
        except ValueError as exc:
            message = str(exc)
            raise PolicyError(path, _error_line(text, message, _parse_policies), message) from exc
        result = cedarpy.validate_policies(text, schema)
        if not result.validation_passed:
            error = result.errors[0]
            spans, _ = _statements(text)
            first, last = 1, None
            found = re.fullmatch(r"policy(\d+)", error.policy_id or "")
            if found and len(spans) == len(parsed) and int(found.group(1)) < len(spans):
                first, last = spans[int(found.group(1))]
            line = _mentioned_line(text, error.error, first, last) or first
            annotation = result.id_annotations_by_policy_id.get(error.policy_id)
            where = f" (@id {annotation!r})" if annotation else ""
            more = len(result.errors) - 1
            also = f" (and {more} more)" if more else ""
            raise PolicyError(path, line, f"{error.error}{where}{also}")
        texts.append(text)
    combined = "\n".join(texts)
    try:
        policies = _parse_policies(combined)
    except ValueError as exc:  # pragma: no cover - each file parsed on its own above
        raise PolicyError(policy_dir, 0, str(exc)) from exc
    action_types, entity_attrs = _schema_shape(schema)
    if not action_types:
        raise PolicyError(schema_path, 1, "the schema declares no actions")
    return _State(
        policies=policies,
        schema=schema,
        policy_count=len(policies),
        files=files,
        action_types=action_types,
        entity_attrs=entity_attrs,
        cacheable=_cacheable(combined),
        fingerprint=fingerprint,
    )


# --------------------------------------------------------------------------- deciding


def _same(left: object, right: object) -> bool:
    """Whether two ids are the same *as Cedar sees them* (their strings).

    Plain UUIDs compare directly (same answer, faster); anything else (a
    caller passing a ``str``) by its string, so a memo key never disagrees
    with the entities Cedar was given.
    """
    if type(left) is UUID and type(right) is UUID:
        return left == right
    return str(left) == str(right)


def _uid(entity_type: str, entity_id: str) -> dict[str, str]:
    return {"type": f"{NAMESPACE}::{entity_type}", "id": entity_id}


class Authorizer:
    """Cedar decisions over the validated policy set (deny by default).

    Thread-safe: a reload swaps the whole loaded state in one assignment.
    """

    def __init__(
        self,
        policy_dir: Path = DEFAULT_POLICY_DIR,
        schema_path: Path = DEFAULT_SCHEMA_PATH,
        *,
        reload_interval: float = RELOAD_INTERVAL,
        decision_cache: bool = True,
    ) -> None:
        self.policy_dir = Path(policy_dir)
        self.schema_path = Path(schema_path)
        self.reload_interval = reload_interval
        self.decision_cache = decision_cache
        self.last_error: PolicyError | None = None
        self._state = _load(self.policy_dir, self.schema_path)
        self._failed_fingerprint: tuple[tuple[str, int, int], ...] | None = None
        self._checked_at = time.monotonic()
        self._reload_lock = threading.Lock()

    # ------------------------------------------------------------------ introspection

    @property
    def actions(self) -> tuple[str, ...]:
        """Every action id the loaded schema declares (in :data:`ACTIONS` order first)."""
        declared = self._state.action_types
        known = [name for name in ACTIONS if name in declared]
        return (*known, *sorted(set(declared) - set(known)))

    @property
    def policy_count(self) -> int:
        return self._state.policy_count

    @property
    def files(self) -> tuple[Path, ...]:
        """The policy files in force."""
        return self._state.files

    def resource_types(self, action: str) -> tuple[str, ...]:
        """The resource types ``action`` applies to (empty for an unknown action)."""
        return self._state.action_types.get(action, ())

    def has_owner(self, resource_type: str) -> bool:
        """True when entities of ``resource_type`` carry an ``owner`` (e.g. ``Account``)."""
        return "owner" in self._state.entity_attrs.get(resource_type, frozenset())

    # ------------------------------------------------------------------ reload

    def reload_if_changed(self) -> bool:
        """Re-parse the files if they changed; True when new policies took effect.

        Looks at the files' mtimes and sizes at most once per ``reload_interval``.
        New files that fail to parse or validate leave the old policies in
        force: the error is kept in :attr:`last_error` and logged, never raised.
        """
        now = time.monotonic()
        if now - self._checked_at < self.reload_interval:
            return False
        if not self._reload_lock.acquire(blocking=False):
            return False  # another thread is already looking
        try:
            self._checked_at = now
            fingerprint = _fingerprint(self.policy_dir, self.schema_path)
            if fingerprint in (self._state.fingerprint, self._failed_fingerprint):
                return False
            try:
                state = _load(self.policy_dir, self.schema_path)
            except PolicyError as exc:
                self._failed_fingerprint = fingerprint
                self.last_error = exc
                _log.warning("policy_reload_failed", error=str(exc))
                return False
            except Exception as exc:  # fail safe: keep the policies in force
                self._failed_fingerprint = fingerprint
                self.last_error = PolicyError(self.policy_dir, 0, f"reload failed: {exc!r}")
                _log.warning("policy_reload_failed", error=str(self.last_error))
                return False
            self._state = state
            self._failed_fingerprint = None
            self.last_error = None
            _log.info("policy_reloaded", policies=state.policy_count, files=len(state.files))
            return True
        finally:
            self._reload_lock.release()

    # ------------------------------------------------------------------ decisions

    def authorize(
        self,
        subject: Subject,
        action: str,
        resource: Resource,
        context: Mapping[str, Any] | None = None,
    ) -> bool:
        """True only when the policies allow ``subject`` to do ``action`` on ``resource``."""
        state = self._state
        key = self._key(state, subject, action, resource) if not context else None
        if key is not None:
            cached = state.cache.get(key)
            if cached is not None:
                return cached
        if resource.type not in state.action_types.get(action, ()):
            return False  # unknown action, or a resource type it does not apply to
        decision = self._evaluate(state, subject, action, [resource], context)[0]
        if key is not None and decision is not None:
            self._remember(state, key, decision)
        return decision is True

    def filter(
        self, subject: Subject, action: str, resources: Sequence[Resource]
    ) -> list[Resource]:
        """The ``resources`` that ``subject`` may ``action``, in their order.

        One ``is_authorized_batch`` call evaluates every resource whose
        decision is not memoised (one representative per decision key).
        """
        state = self._state
        applies = state.action_types.get(action)
        if not applies:
            return []
        decisions: list[bool | None] = []
        keys: list[tuple[Any, ...] | None] = []
        pending: dict[tuple[Any, ...] | int, Resource] = {}
        for index, resource in enumerate(resources):
            if resource.type not in applies:
                decisions.append(False)
                keys.append(None)
                continue
            key = self._key(state, subject, action, resource)
            cached = state.cache.get(key) if key is not None else None
            decisions.append(cached)
            keys.append(key)
            if cached is None:
                pending.setdefault(key if key is not None else index, resource)
        if pending:
            slots = list(pending)
            results = self._evaluate(state, subject, action, list(pending.values()), None)
            outcome = dict(zip(slots, results, strict=True))
            for slot, answer in outcome.items():
                if answer is not None and not isinstance(slot, int):
                    self._remember(state, slot, answer)
            for index, decision in enumerate(decisions):
                if decision is None:
                    key = keys[index]
                    decisions[index] = outcome[key if key is not None else index] is True
        return [resource for resource, ok in zip(resources, decisions, strict=True) if ok]

    def _key(
        self, state: _State, subject: Subject, action: str, resource: Resource
    ) -> tuple[Any, ...] | None:
        """The memo key of a context-free decision (None: not memoisable)."""
        if not (self.decision_cache and state.cacheable):
            return None
        try:
            # 0: no owner; 1: the caller owns it; 2: someone else does.
            owner = (
                0 if resource.owner is None else 1 if _same(resource.owner, subject.user_id) else 2
            )
            roles = subject.roles
            key = (
                roles if type(roles) is frozenset else frozenset(roles),
                subject.mfa is True,
                action,
                resource.type,
                _same(subject.tenant_id, resource.tenant_id),
                owner,
            )
            hash(key)
        except TypeError:  # not what the types say: straight to Cedar (which will deny)
            return None
        return key

    @staticmethod
    def _remember(state: _State, key: tuple[Any, ...], decision: bool) -> None:
        if len(state.cache) >= _CACHE_LIMIT:
            state.cache.clear()
        state.cache[key] = decision

    @staticmethod
    def _entities(state: _State, resource: Resource) -> list[dict[str, Any]]:
        """Cedar JSON entities for one resource (its tenant and owner as references)."""
        attrs: dict[str, Any] = {"tenant": {"__entity": _uid("Tenant", str(resource.tenant_id))}}
        if resource.owner is not None and "owner" in state.entity_attrs.get(
            resource.type, frozenset()
        ):
            attrs["owner"] = {"__entity": _uid("User", str(resource.owner))}
        return [
            {"uid": _uid(resource.type, resource.id), "attrs": attrs, "parents": []},
            {"uid": _uid("Tenant", str(resource.tenant_id)), "attrs": {}, "parents": []},
        ]

    def _evaluate(
        self,
        state: _State,
        subject: Subject,
        action: str,
        resources: Sequence[Resource],
        context: Mapping[str, Any] | None,
    ) -> list[bool | None]:
        """Ask Cedar, in as few batches as the entity ids allow.

        Each answer is True (Allow with no error), False (anything else), or
        None when something raised: a Deny for the caller that is not memoised.
        """
        try:
            return self._ask_cedar(state, subject, action, resources, context)
        except Exception as exc:  # fail closed on anything unexpected
            _log.warning("authorize_error", action=action, error=repr(exc))
            return [None] * len(resources)

    def _ask_cedar(
        self,
        state: _State,
        subject: Subject,
        action: str,
        resources: Sequence[Resource],
        context: Mapping[str, Any] | None,
    ) -> list[bool | None]:
        principal = _uid("User", str(subject.user_id))
        base: list[dict[str, Any]] = [
            {
                "uid": principal,
                "attrs": {
                    "tenant": {"__entity": _uid("Tenant", str(subject.tenant_id))},
                    "roles": sorted(subject.roles),
                    "mfa": subject.mfa is True,
                },
                "parents": [],
            },
            {"uid": _uid("Tenant", str(subject.tenant_id)), "attrs": {}, "parents": []},
        ]
        # Group into batches whose entities do not clash (same uid, other attributes).
        batches: list[tuple[dict[tuple[str, str], dict[str, Any]], list[int]]] = []
        for index, resource in enumerate(resources):
            extra = {(e["uid"]["type"], e["uid"]["id"]): e for e in self._entities(state, resource)}
            batch = next(
                (
                    candidate
                    for candidate in batches
                    if all(candidate[0].get(uid, e) == e for uid, e in extra.items())
                ),
                None,
            )
            if batch is None:
                batch = ({(e["uid"]["type"], e["uid"]["id"]): e for e in base}, [])
                batches.append(batch)
            batch[0].update(extra)
            batch[1].append(index)
        action_uid = _uid("Action", action)
        results: list[bool | None] = [None] * len(resources)
        for entities, members in batches:
            requests: list[dict[str, Any]] = []
            for index in members:
                request: dict[str, Any] = {
                    "principal": principal,
                    "action": action_uid,
                    "resource": _uid(resources[index].type, resources[index].id),
                }
                if context:
                    request["context"] = dict(context)
                requests.append(request)
            try:
                answers = cedarpy.is_authorized_batch(
                    requests, state.policies, list(entities.values()), state.schema
                )
            except Exception as exc:  # fail closed on anything cedarpy raises
                _log.warning("authorize_error", action=action, error=repr(exc))
                continue
            for index, answer in zip(members, answers, strict=True):
                try:
                    errors = answer.diagnostics.errors
                    allowed = bool(answer.allowed) and not errors
                except Exception:  # malformed answer: deny, do not memoise
                    _log.warning("authorize_error", action=action, error="malformed answer")
                    continue
                if errors:
                    shown = [str(error)[:300] for error in list(errors)[:3]]
                    _log.warning("authorize_error", action=action, errors=shown)
                results[index] = allowed
        return results
