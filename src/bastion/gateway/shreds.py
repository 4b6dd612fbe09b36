"""The gateway forgets a shredded tenant's answers and keys the moment the shred commits.

The answer cache keeps answers that may quote the tenant's documents for up
to 24 hours (stale fallback), and the vault keeps the tenant's unwrapped
keys; the gateway process runs :class:`bastion.knowledge.shreds.ShredListener`
over both (see there: it fails closed, dropping everything whenever it is not
listening).
"""

from __future__ import annotations

from bastion.knowledge.shreds import CHANNEL, ShredListener

__all__ = ["CHANNEL", "ShredListener"]
