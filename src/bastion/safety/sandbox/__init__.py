"""Running untrusted code and tool calls in isolation (CHECKLIST M2).

``Sandbox.probe()`` picks the strongest backend that works on this host and
``Sandbox.run(spec)`` runs a :class:`RunSpec` in it, returning a
:class:`Result` whose :class:`Outcome` is the same whatever the backend.
"""

from bastion.safety.sandbox.errors import SandboxConfigError, SandboxError, SandboxUnavailable
from bastion.safety.sandbox.service import BackendStatus, Sandbox, SandboxConfig
from bastion.safety.sandbox.spec import Isolation, Limits, Outcome, Result, RunSpec

__all__ = [
    "BackendStatus",
    "Isolation",
    "Limits",
    "Outcome",
    "Result",
    "RunSpec",
    "Sandbox",
    "SandboxConfig",
    "SandboxConfigError",
    "SandboxError",
    "SandboxUnavailable",
]
