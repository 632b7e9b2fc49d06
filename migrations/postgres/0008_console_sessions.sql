-- Browser sessions of the admin console. `id` is the keyed hash of the
-- session secret held in the browser's cookie (never the secret itself).
-- A session ends at `expires_at`, at sign-out (`ended_at`), or when the
-- admin token it was opened with is revoked; `credential` ties a session
-- opened with the bootstrap token to that token's hash, so changing the
-- bootstrap token ends those sessions too.
CREATE TABLE console_sessions (
    id             TEXT PRIMARY KEY,
    actor          TEXT NOT NULL,
    admin_token_id TEXT,
    credential     TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL,
    ended_at       BIGINT
);

CREATE INDEX console_sessions_by_expiry ON console_sessions (expires_at);
