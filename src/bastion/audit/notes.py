"""Free text a person writes into an audit event, sealed under the tenant's data key.

The trail is append-only and outlives ``tenant shred``; what a member typed
into it — the reason for revealing personal data, which may well name the
customer — must not (issue 23, B9). Such a note is sealed with AES-256-GCM
(NIST SP 800-38D) under the tenant's current data key
(:func:`bastion.secrets.tenant_keys.seal`), bound to the tenant and to a
fresh note id: :func:`open_note` reads it while the tenant's keys exist, and
nobody can once they are shredded. Identifiers, counts and slugs stay in the
clear.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any
from uuid import UUID, uuid4

from bastion.secrets.tenant_keys import Conn, DecryptionFailed, TenantKeys, open_sealed, seal

PURPOSE = "audit-note"


async def sealed_note(tx: Conn, keys: TenantKeys, tenant_id: UUID, text: str) -> dict[str, Any]:
    """``text`` sealed for an event's ``details``, in a transaction of the tenant
    whose role may read (or create the first of) its data keys."""
    version, key = await keys.current(tx, tenant_id)
    note_id = uuid4()
    blob = seal(key, PURPOSE, tenant_id, note_id, text.encode())
    return {"sealed": base64.b64encode(blob).decode(), "key_version": version, "id": str(note_id)}


async def open_note(tx: Conn, keys: TenantKeys, tenant_id: UUID, note: Mapping[str, Any]) -> str:
    """The text of a :func:`sealed_note`; raises
    :class:`~bastion.secrets.tenant_keys.KeyUnavailable` once the tenant is
    shredded and :class:`~bastion.secrets.tenant_keys.DecryptionFailed` for a
    note altered, malformed or moved from another tenant or event."""
    try:
        note_id = UUID(str(note["id"]))
        blob = base64.b64decode(str(note["sealed"]), validate=True)
        version = int(note["key_version"])
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise DecryptionFailed("not a sealed audit note") from None
    key = await keys.get(tx, tenant_id, version)
    return open_sealed(key, PURPOSE, tenant_id, note_id, blob).decode()


__all__ = ["PURPOSE", "open_note", "sealed_note"]
