"""Unwrapped data keys kept in memory for a backend's cache time.

OpenBao transit and AWS KMS unwrap over the network; a key is kept for
``seconds`` after its unwrap, keyed by the exact (context, blob) pair, so a
blob under another context never matches. When the backend is down, what is
cached keeps serving until it expires, then callers fail closed. ``seconds``
of 0 keeps nothing.
"""

from __future__ import annotations

import hashlib
import threading
import time
from uuid import UUID

from bastion.secrets.protocols import KeyContext


class DataKeyCache:
    """Thread-safe: the gateway unwraps from its scan and offload threads too."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._entries: dict[tuple[bytes, bytes], tuple[float, UUID, bytes]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _key(context: KeyContext, blob: bytes) -> tuple[bytes, bytes]:
        return context.encode(), hashlib.sha256(blob).digest()

    def remember(self, context: KeyContext, blob: bytes, data_key: bytes) -> None:
        """Keep ``data_key`` (unwrapped from ``blob`` under ``context``); drop expired keys."""
        if self.seconds <= 0:
            return
        now = time.monotonic()
        with self._lock:
            for entry in [k for k, v in self._entries.items() if now - v[0] >= self.seconds]:
                del self._entries[entry]
            self._entries[self._key(context, blob)] = (now, context.tenant_id, data_key)

    def get(self, context: KeyContext, blob: bytes) -> bytes | None:
        """The data key ``blob`` unwrapped to under ``context``, if still fresh."""
        entry = self._entries.get(self._key(context, blob))
        if entry is None or time.monotonic() - entry[0] >= self.seconds:
            return None
        return entry[2]

    def forget_tenant(self, tenant_id: UUID) -> None:
        """Drop every key of ``tenant_id`` (its KEK was destroyed)."""
        with self._lock:
            for entry in [k for k, v in self._entries.items() if v[1] == tenant_id]:
                del self._entries[entry]
