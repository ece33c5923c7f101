-- Per-key controls and rate limits through the admin API (docs/rate-limits.md, docs/admin-api.md).
-- A key's name and its own rate limits (JSON {requests_per_minute, tokens_per_minute, max_concurrent}); its
-- expiry is expires_s, set when it is issued with one (a rotation sets it too).
ALTER TABLE admin_keys ADD COLUMN name TEXT NOT NULL DEFAULT '';
ALTER TABLE admin_keys ADD COLUMN rate_limits TEXT;

-- An API app's rate limits, per scope (app=<id>[,llm=<id>[,model=<name>]]).
CREATE TABLE admin_rate_limits (
    scope     TEXT PRIMARY KEY,
    app_id    TEXT NOT NULL REFERENCES admin_apps (id) ON DELETE CASCADE,
    settings  TEXT NOT NULL,                 -- JSON of RateLimitSettings
    updated_s DOUBLE PRECISION NOT NULL
);
