"""What every scene of the demo shares: the report, the seeded tenants, the stand-in model."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from uuid import UUID

import httpx
import psycopg

from bastion.knowledge.answers import AskService
from bastion.knowledge.service import KnowledgeService
from bastion.safety.signing import EnvelopeSigner
from bastion.secrets.protocols import Keystore

# The stand-in hosted model the outage scene stops, and its key in the key ring.
STANDIN_MODEL = "support-gpt"
STANDIN_KEY = "providers/demo-standin"


@dataclass
class Report:
    """Checks in the order they ran: (section, what, passed, detail)."""

    rows: list[tuple[str, str, bool, str]] = field(default_factory=list)

    def check(self, section: str, what: str, passed: bool, detail: str = "") -> None:
        self.rows.append((section, what, passed, detail))

    @property
    def ok(self) -> bool:
        return all(passed for _s, _w, passed, _d in self.rows)


@dataclass
class DemoTenant:
    id: UUID
    slug: str
    name: str
    users: dict[str, UUID]
    tickets: list[UUID]


async def refused(action: Callable[[], Awaitable[object]]) -> str | None:
    """Run ``action``; return the refusal's error class name, or None if it passed."""
    try:
        await action()
    except psycopg.errors.InsufficientPrivilege as exc:
        return type(exc).__name__
    return None


@dataclass(frozen=True)
class GatewayLink:
    """How the demo reaches the gateway in the api's place (its asks and tool
    calls): the internal mTLS listener, with an api SVID, talking only to the
    gateway's SPIFFE ID — or the public URL when mTLS is off (development)."""

    url: str
    context: ssl.SSLContext | None = None
    gateway_id: str | None = None

    def client(self, timeout: float = 60.0) -> httpx.AsyncClient:
        return httpx.AsyncClient(verify=self.context or True, timeout=timeout)

    def ask(self, kb: KnowledgeService, keystore: Keystore) -> AskService:
        return AskService(
            kb,
            EnvelopeSigner(keystore),
            self.url,
            http=self.client(),
            gateway_id=self.gateway_id,
        )
