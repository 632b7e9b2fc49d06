-- Per-tenant policy: limits, token and thinking caps, defaults (JSON).
ALTER TABLE tenants ADD COLUMN policy TEXT NOT NULL DEFAULT '{}';
