"""Append-only audit trail (hash chain and verification come with the audit issue)."""

from bastion.audit.log import recent, record

__all__ = ["recent", "record"]
