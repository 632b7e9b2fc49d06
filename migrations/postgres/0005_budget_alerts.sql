-- Budget alerts: an outbox delivered at least once to the configured
-- webhooks. The unique key makes each threshold fire once per period, on
-- however many replicas.
CREATE TABLE budget_alerts (
    id              TEXT PRIMARY KEY,
    budget_id       TEXT NOT NULL,
    tenant_id       TEXT NOT NULL,
    period_start    TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('threshold', 'forecast')),
    threshold       INTEGER NOT NULL,
    spent_micros    BIGINT NOT NULL,
    amount_micros   BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    delivered_at    BIGINT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_error      TEXT,
    UNIQUE (budget_id, period_start, kind, threshold)
);
CREATE INDEX budget_alerts_pending ON budget_alerts (next_attempt_at);
