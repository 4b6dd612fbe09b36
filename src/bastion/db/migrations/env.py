"""Alembic environment: migrations run on a connection handed in by
:func:`bastion.db.provision.migrate`, as the schema owner role."""

from __future__ import annotations

from alembic import context

connection = context.config.attributes["connection"]
# Alembic's version table lives here, so the schema must exist before it.
connection.exec_driver_sql("CREATE SCHEMA IF NOT EXISTS bastion_private")
connection.exec_driver_sql("REVOKE ALL ON SCHEMA bastion_private FROM PUBLIC")
context.configure(
    connection=connection,
    version_table="alembic_version",
    # Kept out of the app schema so the app role never sees or changes it.
    version_table_schema="bastion_private",
    transaction_per_migration=False,
)
with context.begin_transaction():
    context.run_migrations()
