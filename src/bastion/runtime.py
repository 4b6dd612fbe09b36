"""Wiring shared by the CLI commands: the key ring and the app database."""

from __future__ import annotations

from bastion.db.pool import Database
from bastion.db.provision import app_credentials, provision
from bastion.db.service import resolve_target
from bastion.knowledge.service import KnowledgeService
from bastion.limited_process import ProcessLimits
from bastion.secrets.backends import open_key_ring
from bastion.secrets.protocols import KMS, Keystore
from bastion.secrets.tenant_keys import TenantKeys
from bastion.settings import Settings


def open_keystore(settings: Settings) -> Keystore:
    """Return the named secrets of the key ring ``settings`` configure."""
    return open_key_ring(settings).keystore


def app_database(settings: Settings, *, migrate: bool = False, max_size: int = 10) -> Database:
    """Return the app role's (unopened) pool.

    With ``migrate`` the embedded server is started if needed and the database
    provisioned and migrated first; without it the database must be ready.
    Raises :class:`bastion.db.provision.DatabaseError` with a one-line reason.
    """
    keystore = open_keystore(settings)
    target = resolve_target(settings, start=migrate)
    credentials = provision(target, keystore) if migrate else app_credentials(target, keystore)
    return Database(credentials.conninfo, credentials.context_key, max_size=max_size)


def queue_conninfo(settings: Settings) -> str:
    """Return the job queue role's conninfo (the database must be provisioned)."""
    keystore = open_keystore(settings)
    return app_credentials(resolve_target(settings, start=False), keystore).queue_conninfo


def knowledge_service(settings: Settings, db: Database, kms: KMS) -> KnowledgeService:
    """Return the knowledge base on ``db``, the tenants' keys wrapped by ``kms``."""
    return KnowledgeService(
        db,
        TenantKeys(kms),
        default_embedder=settings.embedder,
        max_upload_bytes=settings.max_upload_bytes,
        extract_limits=ProcessLimits(
            cpu_seconds=settings.extract_cpu_seconds, wall_seconds=settings.extract_wall_seconds
        ),
    )
