"""Errors of the sandbox: it refuses to run rather than run with less isolation."""

from __future__ import annotations


class SandboxError(Exception):
    """Base class of the sandbox's errors."""


class SandboxUnavailable(SandboxError):
    """No backend meeting the configured minimum isolation can run here (fail closed)."""


class SandboxConfigError(SandboxError):
    """A backend's configuration is invalid (e.g. Firecracker's kernel image is missing)."""
