"""Tool declarations' parameter schemas, and the arguments a model proposes under them.

A request declares its tools (OpenAI's ``tools``: ``{"type": "function",
"function": {"name", "parameters"}}``), where ``parameters`` is a JSON Schema.
The gateway signs a proposed call only if its arguments validate against that
schema, and the worker checks again before it runs anything. Both the schema
(the requester's) and the arguments (the model's, which a prompt injection
steers) are hostile input, so:

- **One dialect.** JSON Schema Draft 2020-12 only (``$schema`` absent or
  naming it); the schema must be valid against the 2020-12 meta-schema,
  including its ``format: regex`` check of every ``pattern``
  (:meth:`jsonschema.Draft202012Validator.check_schema`). Absent
  ``parameters`` means the function takes none: ``{}`` only.
- **Bounded.** At most :data:`MAX_SCHEMA_BYTES` of RFC 8785 canonical JSON
  (:mod:`bastion.jcs`, so NaN and lone surrogates are refused), nested at most
  :data:`MAX_SCHEMA_DEPTH` deep.
- **Nothing outside the declaration.** A ``$ref`` is a JSON pointer into the
  declaration itself (``#`` or ``#/…``) that must resolve; ``$id``,
  ``$dynamicRef``, ``$dynamicAnchor``, ``$anchor`` and a nested ``$schema``
  (which move or name other resources) are refused. The validator's registry
  retrieves nothing either (:func:`_never_retrieve`): jsonschema's default
  one fetches any remote ``$ref`` with ``urlopen`` — a server-side request
  forgery, ``file://`` included.
- **Arguments are I-JSON** (RFC 7493, :func:`bastion.jsonsafe.loads_i_json`):
  one value however they are read — no member name twice, no NaN, no number a
  double cannot hold, bounded depth — and a JSON object.
- **Formats are annotations** (JSON Schema Validation 2020-12, section
  7.2.1, the default): no format checker runs over the arguments.
- **Bounded time, off the event loop.** A ``pattern`` is a Python regular
  expression, and ``^(a+)+$`` against ``"aaaa…b"`` backtracks for ever; a
  ``$ref`` chain of ``allOf``\\s doubles the work at each step, within the size
  bound. Rather than a partial list of what is slow, every argument check runs
  in the process pool :func:`bastion.offload.shared_pool` (``"screens"``),
  within the tenant's share of it, and a check past :data:`CHECK_SECONDS`
  has its process killed: the call is refused (``arguments-unchecked``), and
  no event loop — the gateway's or a worker's — waits on it. Declarations
  are checked when a request arrives: small ones on the loop (the meta-schema
  check runs in linear time, ~2.5 ms per KiB), larger ones in the pool too.

Reasons are stable slugs, and never carry a value of the arguments.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import referencing
import referencing.exceptions
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from referencing.jsonschema import DRAFT202012

from bastion import jsonsafe
from bastion.jcs import canonicalize
from bastion.offload import JobFailed, JobTimedOut, PoolBusy, shared_pool

__all__ = [
    "CHECK_SECONDS",
    "DIALECT",
    "INLINE_MEMBERS",
    "MAX_ARGUMENTS_CHARS",
    "MAX_SCHEMA_BYTES",
    "MAX_SCHEMA_DEPTH",
    "DeclarationInvalid",
    "Refusal",
    "check_arguments",
    "check_declaration",
    "check_declarations",
    "parameters_of",
    "refusal_for",
    "shape_of",
]

DIALECT = "https://json-schema.org/draft/2020-12/schema"
MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 32
MAX_ARGUMENTS_CHARS = 64 * 1024
MAX_ARGUMENTS_DEPTH = 32
# Declared parameters up to this many members and items (about 2 KiB) are
# checked on the event loop: a few milliseconds. Larger ones in the pool.
INLINE_MEMBERS = 256
# One call's check, process start and import included; far above a real one (ms).
CHECK_SECONDS = 2.0
# "parameters" absent: the function takes no parameters (OpenAI's reading).
NO_PARAMETERS: Mapping[str, Any] = {
    "type": "object",
    "properties": {},
    "additionalProperties": False,
}
# Keywords that name or move to another resource than the declaration.
_REFUSED_KEYWORDS = frozenset({"$id", "$dynamicRef", "$dynamicAnchor", "$anchor", "$schema"})
# Keywords whose values are data, not schemas: never read as keywords.
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})


class DeclarationInvalid(ValueError):
    """A tool declaration whose parameters are not a schema this module accepts;
    ``reason`` is a stable slug: ``not-json``, ``too-large``, ``too-deep``,
    ``not-an-object-schema``, ``unsupported-dialect``, ``unsupported-keyword``,
    ``remote-reference``, ``unresolvable-reference``, ``not-a-schema``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Refusal:
    """Why a proposed call's arguments were not accepted (no value of them).

    ``reason``: ``bad-arguments`` (``check``: ``too-large``, ``not-i-json``,
    ``not-an-object``, ``schema-mismatch`` with the failing schema ``keyword``),
    ``bad-declaration`` (``check``: a :class:`DeclarationInvalid` reason) or
    ``arguments-unchecked`` (``check``: ``timed-out``, ``busy``, ``failed``).
    """

    reason: str
    check: str
    keyword: str | None = None

    def details(self) -> dict[str, str]:
        """For an audit event or a log line."""
        out = {"reason": self.reason, "check": self.check}
        if self.keyword is not None:
            out["keyword"] = self.keyword
        return out


# -- declarations ---------------------------------------------------------------------


def parameters_of(declaration: Mapping[str, Any]) -> Any:
    """The declaration's ``function.parameters``, or :data:`NO_PARAMETERS`."""
    function = declaration.get("function")
    if not isinstance(function, Mapping):
        raise DeclarationInvalid("not-an-object-schema")
    return function.get("parameters", NO_PARAMETERS)


def check_declaration(parameters: Any) -> None:
    """Return if ``parameters`` is a schema this module accepts (see the module);
    else raise :class:`DeclarationInvalid`."""
    if not isinstance(parameters, Mapping):
        raise DeclarationInvalid("not-an-object-schema")  # OpenAI's too; and no `true`
    try:
        canonical = canonicalize(dict(parameters))
    except (ValueError, RecursionError):
        raise DeclarationInvalid("not-json") from None
    if len(canonical) > MAX_SCHEMA_BYTES:
        raise DeclarationInvalid("too-large")
    if jsonsafe.nesting_exceeds(canonical, MAX_SCHEMA_DEPTH):
        raise DeclarationInvalid("too-deep")
    if parameters.get("$schema", DIALECT) != DIALECT:
        raise DeclarationInvalid("unsupported-dialect")
    references = _references({k: v for k, v in parameters.items() if k != "$schema"})
    try:
        Draft202012Validator.check_schema(parameters)
    except SchemaError:
        raise DeclarationInvalid("not-a-schema") from None
    except RecursionError:  # not reached within the depth bound; never let it escape
        raise DeclarationInvalid("too-deep") from None
    resolver = _registry().resolver_with_root(DRAFT202012.create_resource(parameters))
    for reference in references:
        try:
            resolver.lookup(reference)
        except referencing.exceptions.Unresolvable:
            raise DeclarationInvalid("unresolvable-reference") from None


def _references(schema: Any) -> list[str]:
    """Every ``$ref`` in ``schema``; raise :class:`DeclarationInvalid` for one that
    leaves the declaration, or a keyword that names another resource. Walks
    every member but data keywords' values (a conservative reading: a member
    called ``$ref`` anywhere else is taken as the keyword)."""
    found, pending = [], [schema]
    while pending:
        item = pending.pop()
        if isinstance(item, list):
            pending.extend(item)
        elif isinstance(item, Mapping):
            for name, value in item.items():
                if name in _DATA_KEYWORDS:
                    continue
                if name in _REFUSED_KEYWORDS and not isinstance(value, Mapping):
                    raise DeclarationInvalid("unsupported-keyword")
                if name == "$ref" and isinstance(value, str):
                    if value != "#" and not value.startswith("#/"):
                        raise DeclarationInvalid("remote-reference")
                    found.append(value)
                pending.append(value)
    return found


def shape_of(tools: Sequence[Any] | None) -> tuple[tuple[int, str] | None, bool]:
    """A cheap first look at the declared parameters, fit for the event loop:
    ``(index, "too-deep")`` of the first nested deeper than
    :data:`MAX_SCHEMA_DEPTH` (else None), and whether all of them together are
    small enough (:data:`INLINE_MEMBERS`) to check on the loop. Stops at the
    first too-deep one, or once they are too large to check there."""
    members = 0
    for index, tool in enumerate(tools or ()):
        if not _is_function(tool) or not isinstance(tool.get("function"), Mapping):
            continue
        pending: list[tuple[Any, int]] = [(tool["function"].get("parameters"), 1)]
        while pending:
            item, depth = pending.pop()
            members += 1
            if members > INLINE_MEMBERS:
                return None, False
            if isinstance(item, Mapping | list):
                if depth > MAX_SCHEMA_DEPTH:
                    return (index, "too-deep"), True
                values = item.values() if isinstance(item, Mapping) else item
                pending.extend((value, depth + 1) for value in values)
    return None, True


def check_declarations(tools: Sequence[Any] | None) -> tuple[int, str] | None:
    """None if every function the request declares has acceptable parameters,
    else ``(index, reason)`` of the first that does not (``reason`` as
    :class:`DeclarationInvalid`'s). A pool job: module-level, picklable."""
    for index, tool in enumerate(tools or ()):
        if not _is_function(tool):
            continue
        try:
            check_declaration(parameters_of(tool))
        except DeclarationInvalid as invalid:
            return index, invalid.reason
    return None


def _is_function(tool: Any) -> bool:
    return isinstance(tool, Mapping) and tool.get("type") == "function"


# -- arguments ------------------------------------------------------------------------


def _never_retrieve(uri: str) -> referencing.Resource[Any]:
    """The registry's retriever: nothing outside the declaration is ever fetched."""
    raise referencing.exceptions.NoSuchResource(ref=uri)  # type: ignore[call-arg]  # attrs


def _registry() -> referencing.Registry[Any]:
    return referencing.Registry(retrieve=_never_retrieve)  # type: ignore[call-arg]


def check_arguments(parameters: Any, arguments: str) -> Refusal | None:
    """None if ``arguments`` (the model's JSON text) are an I-JSON object valid
    against ``parameters``; else the :class:`Refusal`. Catastrophic schemas
    run for ever here: call it through :func:`refusal_for`, which bounds it.
    A pool job: module-level, picklable arguments and result."""
    try:
        check_declaration(parameters)
    except DeclarationInvalid as invalid:
        return Refusal("bad-declaration", invalid.reason)
    if len(arguments) > MAX_ARGUMENTS_CHARS:
        return Refusal("bad-arguments", "too-large")
    try:
        value = jsonsafe.loads_i_json(arguments, max_depth=MAX_ARGUMENTS_DEPTH)
    except ValueError:
        return Refusal("bad-arguments", "not-i-json")
    if not isinstance(value, dict):
        return Refusal("bad-arguments", "not-an-object")
    validator = Draft202012Validator(parameters, registry=_registry())  # no format checker
    try:
        error = next(validator.iter_errors(value), None)  # the first one only: no more work
    except referencing.exceptions.Unresolvable:
        return Refusal("bad-declaration", "unresolvable-reference")
    except RecursionError:  # {"$ref": "#"} under itself
        return Refusal("bad-declaration", "recursive-reference")
    if error is None:
        return None
    keyword = error.validator if isinstance(error.validator, str) else None
    return Refusal("bad-arguments", "schema-mismatch", keyword[:40] if keyword else None)


async def refusal_for(
    tenant: Hashable, declaration: Mapping[str, Any], arguments: str
) -> Refusal | None:
    """:func:`check_arguments` for the call's declaration, in the screening
    processes within ``tenant``'s share, killed past :data:`CHECK_SECONDS`:
    None if the call may go on, else why not. A check that could not finish is
    a refusal (fail closed)."""
    try:
        canonicalize(dict(declaration))  # what the signature binds must be JSON
        parameters = parameters_of(declaration)
    except (ValueError, RecursionError):
        return Refusal("bad-declaration", "not-json")
    except DeclarationInvalid as invalid:
        return Refusal("bad-declaration", invalid.reason)
    pool = shared_pool("screens")
    try:
        return await pool.run(
            tenant, check_arguments, parameters, arguments, time_limit=CHECK_SECONDS
        )
    except JobTimedOut:
        return Refusal("arguments-unchecked", "timed-out")
    except PoolBusy:
        return Refusal("arguments-unchecked", "busy")
    except JobFailed:
        return Refusal("arguments-unchecked", "failed")
    except RecursionError:  # too deep to be sent to the pool at all
        return Refusal("bad-declaration", "too-deep")
