-- Tenants, API keys, admin tokens and the admin audit log.
-- Times are integer milliseconds since the Unix epoch (UTC), as in the
-- SQLite schema, so both backends share one query layer.

CREATE TABLE tenants (
    id           TEXT PRIMARY KEY,
    display_name TEXT NOT NULL,
    status       TEXT NOT NULL CHECK (status IN ('active', 'suspended', 'deleted')),
    metadata     TEXT NOT NULL DEFAULT '{}',
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);

CREATE TABLE api_keys (
    id             TEXT PRIMARY KEY,
    tenant_id      TEXT NOT NULL REFERENCES tenants (id),
    name           TEXT NOT NULL,
    secret_hash    TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    last_used_at   BIGINT,
    expires_at     BIGINT,
    revoked_at     BIGINT,
    allowed_models TEXT NOT NULL DEFAULT '[]',
    limits         TEXT NOT NULL DEFAULT '{}',
    rotated_from   TEXT,
    rotated_to     TEXT
);
CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id, id);

CREATE TABLE admin_tokens (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);

CREATE TABLE audit_log (
    id          BIGSERIAL PRIMARY KEY,
    at          BIGINT NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    target_type TEXT NOT NULL,
    target_id   TEXT NOT NULL,
    details     TEXT NOT NULL DEFAULT '{}'
);

-- Process-wide settings shared by every replica (e.g. the generated key
-- hashing secret when none is configured).
CREATE TABLE settings (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
