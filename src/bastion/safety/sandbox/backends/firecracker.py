"""Firecracker microVMs: a guest kernel of its own under KVM, the strongest
isolation the sandbox knows. Its configuration is validated here and the
backend refuses to start — it never degrades silently — where the binary,
the kernel image, the root filesystem or a usable ``/dev/kvm`` is missing.

Booting a guest per run (kernel + rootfs holding python3, a vsock agent
receiving the spec) is left to deployments with KVM; on hosts without it the
probe moves on to the next backend, or fails closed under a minimum of MICROVM.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from bastion.safety.sandbox.backends.base import Backend, RunContext
from bastion.safety.sandbox.errors import SandboxConfigError, SandboxUnavailable
from bastion.safety.sandbox.runner import Launch
from bastion.safety.sandbox.spec import Isolation, RunSpec

_KVM_GET_API_VERSION = 0xAE00
_KVM_API_VERSION = 12  # stable since Linux 2.6.22


@dataclass(frozen=True)
class FirecrackerConfig:
    binary: str = "firecracker"
    kernel_image: Path | None = None  # an uncompressed vmlinux
    rootfs: Path | None = None  # ext4 image with /usr/bin/python3 and the agent
    vcpus: int = 1
    memory_mib: int = 256
    kvm_device: Path = Path("/dev/kvm")

    def problems(self) -> list[str]:
        """Every reason this configuration cannot boot a microVM here (empty if it can)."""
        found = []
        if not 1 <= self.vcpus <= 32:
            found.append("vcpus must be 1..32")
        if not 128 <= self.memory_mib <= 32768:
            found.append("memory_mib must be 128..32768")
        if shutil.which(self.binary) is None:
            found.append(f"{self.binary} binary not found")
        for label, path in (("kernel image", self.kernel_image), ("rootfs", self.rootfs)):
            if path is None:
                found.append(f"no {label} configured")
            elif not path.is_file():
                found.append(f"{label} {path} not found")
        found.extend(_kvm_problems(self.kvm_device))
        return found

    def validate(self) -> None:
        """Raise :class:`SandboxConfigError` for values that are wrong anywhere."""
        if not 1 <= self.vcpus <= 32 or not 128 <= self.memory_mib <= 32768:
            raise SandboxConfigError("firecracker: vcpus 1..32 and memory_mib 128..32768")


def _kvm_problems(device: Path) -> list[str]:
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return [f"{device}: {exc.strerror}"]
    try:
        version = fcntl.ioctl(fd, _KVM_GET_API_VERSION)
    except OSError as exc:
        return [f"{device}: KVM_GET_API_VERSION {exc.strerror}"]
    finally:
        os.close(fd)
    return [] if version == _KVM_API_VERSION else [f"{device}: KVM API {version}"]


class FirecrackerBackend(Backend):
    name = "firecracker"
    isolation = Isolation.MICROVM

    def __init__(self, config: FirecrackerConfig) -> None:
        config.validate()
        self.config = config

    def unavailable(self) -> str | None:
        problems = self.config.problems()
        if problems:
            return "; ".join(problems)
        return "booting microVMs is not implemented in this release"

    def launch(self, spec: RunSpec, ctx: RunContext) -> Launch:
        raise SandboxUnavailable(f"firecracker cannot run here: {self.unavailable()}")
