"""Backups made before a shred hold neither recognisable vectors nor clear titles (issue 23, B9).

A shred destroys the tenant's keys, but a backup, a base backup or a replica
made before it kept two things in clear: the chunks' embedding vectors (a
hashing embedder's invert to a bag of words; anyone holding a candidate text
recognises it by embedding it and comparing) and the documents' titles
(tokenised for personal data, the rest of the words as typed).

- ``namespaces.vector_transform``: ``orthogonal-v1`` for a namespace whose
  vectors (chunks and the embedding cache) are stored rotated by the tenant's
  secret orthogonal matrix (:mod:`bastion.secrets.vector_transform`), the default
  for every namespace created from now on; NULL for the namespaces that exist
  now, whose plain vectors a migration cannot rotate without the tenants'
  keys. ``bastion knowledge reencode`` rotates them, one namespace per
  transaction, and flips the flag; search reads the flag, so a namespace is
  searched correctly before and after.
- ``documents.title_ciphertext``: the title under AES-256-GCM with the
  tenant's data key (``key_version``), bound to tenant, table, column and row;
  ``documents.title_digest``: its HMAC under a key derived from data key 1, for
  the exact-title filter of search. ``title`` is NULL for new knowledge
  documents; existing ones keep theirs until ``bastion knowledge reencode``
  seals them. (Rows without a namespace, the plain records of the access
  demo, keep a clear ``title``.)
- ``bastion_app`` may update only the columns that re-encoding writes
  (``chunks.embedding``, ``namespaces.vector_transform``); row security (the
  tenant's writers; owner or system for namespaces) applies as for every write.

Rotating in place leaves the plain vectors in dead tuples and index pages
until the partition is vacuumed: after a re-encode, ``VACUUM`` the partitions
it names (the database owner's job; the app role cannot).

Revision ID: 0025
Revises: 0024
"""

from alembic import op

revision = "0025"
down_revision = "0024"
branch_labels = None
depends_on = None

UPGRADE = """
ALTER TABLE bastion.namespaces
    ADD COLUMN vector_transform text CHECK (vector_transform IN ('orthogonal-v1'));
ALTER TABLE bastion.namespaces ALTER COLUMN vector_transform SET DEFAULT 'orthogonal-v1';

ALTER TABLE bastion.documents
    ALTER COLUMN title DROP NOT NULL,
    ADD COLUMN title_ciphertext bytea,
    ADD COLUMN title_digest bytea CHECK (length(title_digest) = 32),
    ADD CONSTRAINT documents_title_given
        CHECK (title IS NOT NULL OR (title_ciphertext IS NOT NULL AND title_digest IS NOT NULL));

GRANT UPDATE (embedding) ON bastion.chunks TO bastion_app;
GRANT UPDATE (vector_transform) ON bastion.namespaces TO bastion_app;
"""

DOWNGRADE = """
-- Sealed titles cannot come back without the keys: refused while any exists.
ALTER TABLE bastion.documents ALTER COLUMN title SET NOT NULL;
REVOKE UPDATE (vector_transform) ON bastion.namespaces FROM bastion_app;
REVOKE UPDATE (embedding) ON bastion.chunks FROM bastion_app;
ALTER TABLE bastion.documents
    DROP CONSTRAINT documents_title_given,
    DROP COLUMN title_digest,
    DROP COLUMN title_ciphertext;
ALTER TABLE bastion.namespaces DROP COLUMN vector_transform;
"""


def upgrade() -> None:
    op.execute(UPGRADE)


def downgrade() -> None:
    op.execute(DOWNGRADE)
