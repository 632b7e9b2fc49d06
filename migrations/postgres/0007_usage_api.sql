-- Which API a request used (openai, gemini, anthropic), and the prompt
-- tokens written to the provider's cache (priced apart from reads).
ALTER TABLE usage_events ADD COLUMN api TEXT NOT NULL DEFAULT 'openai';
ALTER TABLE usage_events ADD COLUMN cache_write_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_daily ADD COLUMN cache_write_tokens BIGINT NOT NULL DEFAULT 0;
