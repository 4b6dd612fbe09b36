"""Append-only audit trail (hash chain and verification come with the audit issue)."""

from bastion.audit.log import events, recent, record

__all__ = ["events", "recent", "record"]
