"""Errors of the tenants domain."""

from __future__ import annotations


class TenantError(Exception):
    """Base class of tenant errors."""


class TenantExists(TenantError):
    """A tenant with that slug already exists."""


class UnknownRole(TenantError):
    """The role is not one of Bastion's roles."""
