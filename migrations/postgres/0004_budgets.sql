-- Spending budgets per tenant (optionally per key), by calendar period in UTC.
CREATE TABLE budgets (
    id            TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL REFERENCES tenants (id),
    key_id        TEXT,
    period        TEXT NOT NULL CHECK (period IN ('daily', 'weekly', 'monthly', 'lifetime')),
    amount_micros BIGINT NOT NULL,
    hard          INTEGER NOT NULL,
    thresholds    TEXT NOT NULL DEFAULT '[50,80,100]',
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);
CREATE INDEX budgets_by_tenant ON budgets (tenant_id);
