"""Errors of the knowledge base, answered as problem+json (RFC 9457) by the api."""

from __future__ import annotations

from bastion.errors import BastionError, Kind


class NamespaceNotFound(BastionError):
    # Also what another tenant's namespace looks like: its existence is not confirmed.
    slug = "namespace-not-found"
    title = "No such namespace"
    kind = Kind.NOT_FOUND


class NamespaceExists(BastionError):
    slug = "namespace-exists"
    title = "A namespace with that name exists"
    kind = Kind.CONFLICT


class DocumentNotFound(BastionError):
    slug = "document-not-found"
    title = "No such document"
    kind = Kind.NOT_FOUND


class UploadRefused(BastionError):
    """The body cannot become a document; ``reason`` is a stable slug
    (empty, binary, encoding, unsupported-type, too-large, too-complex, ...)."""

    slug = "upload-refused"
    title = "The upload cannot be indexed"
    kind = Kind.UNPROCESSABLE


class ParsingBusy(BastionError):
    """The tenant already has its share of the parser processes busy and its
    queue full (bastion.offload): retry after ``Retry-After`` seconds. Other
    tenants are not affected."""

    slug = "busy"
    title = "Too many documents of this tenant are being parsed"
    kind = Kind.RATE_LIMITED


class IdempotencyKeyReused(BastionError):
    slug = "idempotency-key-reused"
    title = "The idempotency key was used for a different upload"
    kind = Kind.CONFLICT


class EmbeddingMismatch(BastionError):
    slug = "embedding-mismatch"
    title = "The embedding does not fit this namespace"
    kind = Kind.UNPROCESSABLE


class DocumentTextUnavailable(BastionError):
    """The stored document yields no text to show (``reason``: a failed PDF's
    extraction slug, or ``pii-scan-refused``); its original is not shown instead."""

    slug = "document-text-unavailable"
    title = "The document's text cannot be shown"
    kind = Kind.CONFLICT


class RevealReasonRequired(BastionError):
    slug = "reveal-reason-required"
    title = "Reading an original needs a reason"
    kind = Kind.UNPROCESSABLE
