"""Bastion: a self-hostable, secure-by-default backend for multi-tenant AI applications."""

__version__ = "0.1.0"
