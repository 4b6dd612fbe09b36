"""What an owner's undo of a firing can be refused with (mapped to HTTP at the edge)."""

from __future__ import annotations

from bastion.errors import BastionError, Kind


class FiringNotFound(BastionError):
    """No such firing in the caller's tenant (another tenant's is not confirmed)."""

    slug = "detector-firing-not-found"
    title = "No such detector firing"
    kind = Kind.NOT_FOUND


class FiringNamesYou(BastionError):
    """The firing is about the caller: an operator, or another owner, undoes it."""

    slug = "detector-firing-names-you"
    title = "This firing is about you"
    kind = Kind.FORBIDDEN
