"""Errors of the knowledge base, answered as problem+json (RFC 9457) by the api."""

from __future__ import annotations

from bastion.api.problems import Problem, problem_type


class NamespaceNotFound(Problem):
    # Also what another tenant's namespace looks like: its existence is not confirmed.
    type = problem_type("namespace-not-found")
    title = "No such namespace"
    status = 404


class NamespaceExists(Problem):
    type = problem_type("namespace-exists")
    title = "A namespace with that name exists"
    status = 409


class DocumentNotFound(Problem):
    type = problem_type("document-not-found")
    title = "No such document"
    status = 404


class UploadRefused(Problem):
    """The body cannot become a document; ``reason`` is a stable slug
    (empty, binary, encoding, unsupported-type, too-large, too-complex, ...)."""

    type = problem_type("upload-refused")
    title = "The upload cannot be indexed"
    status = 422


class ParsingBusy(Problem):
    """The tenant already has its share of the parser processes busy and its
    queue full (bastion.offload): retry after ``Retry-After`` seconds. Other
    tenants are not affected."""

    type = problem_type("busy")
    title = "Too many documents of this tenant are being parsed"
    status = 429


class IdempotencyKeyReused(Problem):
    type = problem_type("idempotency-key-reused")
    title = "The idempotency key was used for a different upload"
    status = 409


class EmbeddingMismatch(Problem):
    type = problem_type("embedding-mismatch")
    title = "The embedding does not fit this namespace"
    status = 422


class DocumentTextUnavailable(Problem):
    """The stored document yields no text to show (``reason``: a failed PDF's
    extraction slug, or ``pii-scan-refused``); its original is not shown instead."""

    type = problem_type("document-text-unavailable")
    title = "The document's text cannot be shown"
    status = 409


class RevealReasonRequired(Problem):
    type = problem_type("reveal-reason-required")
    title = "Reading an original needs a reason"
    status = 422
