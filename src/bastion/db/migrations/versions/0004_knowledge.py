"""Knowledge base: namespaces, encrypted documents and chunks, the job queue (CHECKLIST R3).

* ``namespaces``: one per tenant knowledge base, recording the embedder, its
  model id and the vector dimension; mixing is refused by the partition's CHECK.
* ``chunks`` is partitioned by LIST (namespace_id): every namespace gets its
  own partition and its own HNSW graph, so no index, merge or maintenance job
  ever spans tenants, a query for one namespace is pruned to one partition, and
  an insert updates one small graph. The alternative, one table with a partial
  HNSW index per namespace, was measured (bench/vector_search.py): the planner
  only uses a partial index when it sees the literal namespace id, and every
  insert and every plan pays for all the indexes of all tenants.
* Document bodies and chunk text are stored only as AES-256-GCM ciphertext
  under a per-tenant data key (``data_keys`` holds it wrapped by the tenant's
  key-encryption key, which lives in the key ring, outside the database).
* The procrastinate queue lives in its own ``procrastinate`` schema, reached by
  the worker as ``bastion_queue``; ``bastion_app`` has no grant on it and
  enqueues an ingestion only through :func:`bastion.enqueue_ingest`, in the same
  transaction as the document row (no document without its job, no job without
  its document). Job arguments carry identifiers only, never content.

Revision ID: 0004
Revises: 0003
"""

from importlib.resources import files

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TENANT = "tenant_id = (SELECT bastion.app_tenant_id())"
WRITERS = "(SELECT bastion.app_role()) IN ('owner', 'contributor', 'system')"
ADMIN = "(SELECT bastion.app_role()) IN ('owner', 'system')"

KNOWLEDGE = f"""
CREATE TABLE bastion.namespaces (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id  uuid NOT NULL DEFAULT bastion.app_tenant_id()
               REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    name       text NOT NULL CHECK (name ~ '^[a-z0-9][a-z0-9_-]{{0,62}}$'),
    embedder   text NOT NULL,
    model_id   text NOT NULL,
    dim        integer NOT NULL CHECK (dim BETWEEN 1 AND 2000),
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, name),
    UNIQUE (tenant_id, id)
);

-- Per-tenant data keys, wrapped under the tenant's KEK (kept in the key ring).
CREATE TABLE bastion.data_keys (
    tenant_id  uuid NOT NULL DEFAULT bastion.app_tenant_id()
               REFERENCES bastion.tenants (id) ON DELETE CASCADE,
    version    integer NOT NULL CHECK (version > 0),
    wrapped    bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, version)
);

-- Documents now hold their body only as ciphertext.
ALTER TABLE bastion.documents DROP COLUMN body;
ALTER TABLE bastion.documents
    ADD COLUMN namespace_id    uuid,
    ADD COLUMN content_type    text,
    ADD COLUMN byte_size       integer,
    ADD COLUMN sha256          bytea,
    ADD COLUMN body_ciphertext bytea,
    ADD COLUMN key_version     integer,
    ADD COLUMN idempotency_key text,
    ADD COLUMN status          text NOT NULL DEFAULT 'pending'
               CHECK (status IN ('pending', 'indexed', 'failed')),
    ADD COLUMN failure_reason  text,
    ADD COLUMN chunk_count     integer,
    ADD COLUMN redactions      jsonb,
    ADD COLUMN indexed_at      timestamptz,
    ADD CONSTRAINT documents_tenant_id_id UNIQUE (tenant_id, id),
    ADD CONSTRAINT documents_namespace FOREIGN KEY (tenant_id, namespace_id)
        REFERENCES bastion.namespaces (tenant_id, id) ON DELETE CASCADE,
    ADD CONSTRAINT documents_idempotency UNIQUE (tenant_id, idempotency_key);
CREATE INDEX documents_namespace_idx ON bastion.documents (namespace_id, created_at);

-- Partitioned by namespace: each partition is created with its own HNSW index
-- by bastion.create_namespace. The parent has no vector index on purpose.
CREATE TABLE bastion.chunks (
    tenant_id    uuid NOT NULL DEFAULT bastion.app_tenant_id(),
    namespace_id uuid NOT NULL,
    id           uuid NOT NULL DEFAULT gen_random_uuid(),
    document_id  uuid NOT NULL,
    ordinal      integer NOT NULL CHECK (ordinal >= 0),
    token_count  integer NOT NULL,
    embedding    vector NOT NULL,
    ciphertext   bytea NOT NULL,
    key_version  integer NOT NULL,
    PRIMARY KEY (namespace_id, id),
    UNIQUE (namespace_id, document_id, ordinal),
    FOREIGN KEY (tenant_id, namespace_id)
        REFERENCES bastion.namespaces (tenant_id, id) ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, document_id)
        REFERENCES bastion.documents (tenant_id, id) ON DELETE CASCADE
) PARTITION BY LIST (namespace_id);

-- Embeddings of a document being ingested, kept between batches so a worker
-- killed mid-document resumes without embedding again; consumed on success.
CREATE TABLE bastion.embedding_cache (
    tenant_id   uuid NOT NULL DEFAULT bastion.app_tenant_id(),
    document_id uuid NOT NULL,
    chunk_hash  bytea NOT NULL,
    embedding   vector NOT NULL,
    PRIMARY KEY (document_id, chunk_hash),
    FOREIGN KEY (tenant_id, document_id)
        REFERENCES bastion.documents (tenant_id, id) ON DELETE CASCADE
);

ALTER TABLE bastion.namespaces ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.namespaces FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.data_keys ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.data_keys FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.chunks ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.chunks FORCE ROW LEVEL SECURITY;
ALTER TABLE bastion.embedding_cache ENABLE ROW LEVEL SECURITY;
ALTER TABLE bastion.embedding_cache FORCE ROW LEVEL SECURITY;

CREATE POLICY namespace_read ON bastion.namespaces FOR SELECT USING ({TENANT});
CREATE POLICY namespace_write ON bastion.namespaces FOR ALL
    USING ({TENANT} AND {ADMIN}) WITH CHECK ({TENANT} AND {ADMIN});
CREATE POLICY data_key_read ON bastion.data_keys FOR SELECT USING ({TENANT});
CREATE POLICY data_key_write ON bastion.data_keys FOR ALL
    USING ({TENANT} AND {WRITERS}) WITH CHECK ({TENANT} AND {WRITERS});
CREATE POLICY chunk_read ON bastion.chunks FOR SELECT USING ({TENANT});
CREATE POLICY chunk_write ON bastion.chunks FOR ALL
    USING ({TENANT} AND {WRITERS}) WITH CHECK ({TENANT} AND {WRITERS});
CREATE POLICY embedding_cache_all ON bastion.embedding_cache FOR ALL
    USING ({TENANT} AND {WRITERS}) WITH CHECK ({TENANT} AND {WRITERS});

-- A namespace and its partition (with its own HNSW index) are made together.
-- DDL needs the owner, hence SECURITY DEFINER; the signed context still
-- decides the tenant and whether the caller may create one.
CREATE FUNCTION bastion.create_namespace(p_name text, p_embedder text, p_model_id text,
                                         p_dim integer) RETURNS uuid
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    ns uuid;
    part text;
    -- pgvector's schema, named explicitly: a definer's search_path stays minimal.
    vec text := (SELECT n.nspname FROM pg_extension e
                 JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector');
BEGIN
    IF bastion.app_tenant_id() IS NULL OR bastion.app_role() NOT IN ('owner', 'system') THEN
        RAISE EXCEPTION 'creating a namespace needs the owner role'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    INSERT INTO bastion.namespaces (name, embedder, model_id, dim)
        VALUES (p_name, p_embedder, p_model_id, p_dim) RETURNING id INTO ns;
    part := 'chunks_' || replace(ns::text, '-', '');
    EXECUTE format('CREATE TABLE bastion.%I PARTITION OF bastion.chunks FOR VALUES IN (%L)',
                   part, ns);
    EXECUTE format('ALTER TABLE bastion.%I ADD CHECK (%I.vector_dims(embedding) = %s)',
                   part, vec, p_dim);
    EXECUTE format('CREATE INDEX ON bastion.%I USING hnsw ((embedding::%I.vector(%s)) '
                   '%I.vector_cosine_ops)', part, vec, p_dim, vec);
    -- Reached only through the parent (whose policies apply); RLS here too so
    -- that no grant added later could expose a partition directly.
    EXECUTE format('ALTER TABLE bastion.%I ENABLE ROW LEVEL SECURITY', part);
    EXECUTE format('ALTER TABLE bastion.%I FORCE ROW LEVEL SECURITY', part);
    EXECUTE format('CREATE POLICY chunk_partition ON bastion.%I USING '
                   '(tenant_id = (SELECT bastion.app_tenant_id()))', part);
    RETURN ns;
END;
$$;

-- Enqueue the ingestion of a document of the caller's tenant, in the caller's
-- transaction. The lock (the document id) keeps two runs of one document apart.
CREATE FUNCTION bastion.enqueue_ingest(p_document uuid) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = procrastinate, pg_catalog, pg_temp AS $$
DECLARE
    job bigint;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM bastion.documents d
                   WHERE d.id = p_document AND d.tenant_id = bastion.app_tenant_id()
                     AND d.status = 'pending'
                     AND bastion.app_role() IN ('owner', 'contributor', 'system')) THEN
        RAISE EXCEPTION 'no pending document % in this tenant', p_document
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    INSERT INTO procrastinate_jobs (queue_name, task_name, priority, lock, args)
        VALUES ('ingest', 'knowledge.ingest', 0, p_document::text,
                jsonb_build_object('tenant_id', bastion.app_tenant_id(),
                                   'document_id', p_document,
                                   'user_id', bastion.app_user_id()))
        RETURNING id INTO job;
    RETURN job;
END;
$$;

REVOKE EXECUTE ON FUNCTION bastion.create_namespace(text, text, text, integer),
    bastion.enqueue_ingest(uuid) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION bastion.create_namespace(text, text, text, integer),
    bastion.enqueue_ingest(uuid) TO bastion_app;
GRANT SELECT ON bastion.namespaces TO bastion_app;
GRANT SELECT, INSERT, DELETE ON bastion.data_keys, bastion.chunks,
    bastion.embedding_cache TO bastion_app;
"""

QUEUE_GRANTS = """
REVOKE ALL ON SCHEMA procrastinate FROM PUBLIC;
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA procrastinate FROM PUBLIC;
GRANT USAGE ON SCHEMA procrastinate TO bastion_queue;
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA procrastinate TO bastion_queue;
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA procrastinate TO bastion_queue;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA procrastinate TO bastion_queue;
"""


def upgrade() -> None:
    # psycopg itself, in the migration's transaction: without parameters it
    # sends the text verbatim, so the '%' of PL/pgSQL format() strings stays.
    conn = op.get_bind().connection.driver_connection
    assert conn is not None
    # Procrastinate's own schema file, installed into its own schema.
    procrastinate_sql = (files("procrastinate") / "sql" / "schema.sql").read_text()
    conn.execute("CREATE SCHEMA procrastinate")
    conn.execute("SET LOCAL search_path = procrastinate, pg_catalog")
    conn.execute(procrastinate_sql)
    conn.execute("RESET search_path")
    conn.execute(QUEUE_GRANTS)
    conn.execute(KNOWLEDGE)


def downgrade() -> None:
    op.execute("DROP SCHEMA procrastinate CASCADE")
    op.execute(
        "DROP TABLE bastion.embedding_cache, bastion.chunks, bastion.data_keys CASCADE; "
        "DROP FUNCTION bastion.create_namespace(text, text, text, integer), "
        "bastion.enqueue_ingest(uuid); "
        "ALTER TABLE bastion.documents DROP CONSTRAINT documents_namespace; "
        "DROP TABLE bastion.namespaces; "
        "ALTER TABLE bastion.documents ADD COLUMN body text NOT NULL DEFAULT ''"
    )
