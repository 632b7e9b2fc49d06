-- What served each request: the route, its target (variant), the upstream,
-- and how many attempts it took (retries and fallbacks).
ALTER TABLE usage_events ADD COLUMN route TEXT;
ALTER TABLE usage_events ADD COLUMN target TEXT;
ALTER TABLE usage_events ADD COLUMN upstream TEXT;
ALTER TABLE usage_events ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1;
