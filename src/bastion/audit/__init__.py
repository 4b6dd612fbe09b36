"""Append-only audit trail (hash chain and verification come with the audit issue)."""

from bastion.audit.log import record

__all__ = ["record"]
