-- The usage ledger: one row per proxied request. `id` is the gateway's event
-- id (unique per request even when clients reuse request ids). SQLite keeps
-- one table; retention deletes old rows.

CREATE TABLE usage_events (
    id                   TEXT NOT NULL,
    at                   BIGINT NOT NULL,
    day                  TEXT NOT NULL,
    request_id           TEXT NOT NULL,
    tenant_id            TEXT NOT NULL,
    key_id               TEXT NOT NULL,
    endpoint             TEXT NOT NULL,
    requested_model      TEXT NOT NULL,
    upstream_model       TEXT,
    stream               INTEGER NOT NULL,
    prompt_tokens        BIGINT NOT NULL,
    completion_tokens    BIGINT NOT NULL,
    reasoning_tokens     BIGINT NOT NULL,
    cached_tokens        BIGINT NOT NULL,
    total_tokens         BIGINT NOT NULL,
    billed_output_tokens BIGINT NOT NULL,
    cost_micros          BIGINT NOT NULL,
    estimated            INTEGER NOT NULL,
    unpriced             INTEGER NOT NULL,
    modified             INTEGER NOT NULL,
    status               INTEGER NOT NULL,
    error_class          TEXT,
    latency_ms           BIGINT NOT NULL,
    ttft_ms              BIGINT,
    PRIMARY KEY (id)
);

CREATE INDEX usage_events_by_tenant ON usage_events (tenant_id, at);
CREATE INDEX usage_events_by_key ON usage_events (key_id, at);

-- Daily totals per tenant, key and model, kept in step with the ledger (in
-- the same statement as each insert) for fast reports.
CREATE TABLE usage_daily (
    day                  TEXT NOT NULL,
    tenant_id            TEXT NOT NULL,
    key_id               TEXT NOT NULL,
    model                TEXT NOT NULL,
    requests             BIGINT NOT NULL,
    errors               BIGINT NOT NULL,
    estimated_requests   BIGINT NOT NULL,
    prompt_tokens        BIGINT NOT NULL,
    completion_tokens    BIGINT NOT NULL,
    reasoning_tokens     BIGINT NOT NULL,
    cached_tokens        BIGINT NOT NULL,
    billed_output_tokens BIGINT NOT NULL,
    cost_micros          BIGINT NOT NULL,
    PRIMARY KEY (day, tenant_id, key_id, model)
);
