-- Admin API: plugins created through the API (a whole plugins[] entry each), and what each tap worker could not
-- apply of the state (reported by GET /v1/status).

CREATE TABLE admin_plugins (
    name      TEXT PRIMARY KEY,
    settings  TEXT NOT NULL,                 -- JSON of PluginConfig
    created_s REAL NOT NULL,
    updated_s REAL NOT NULL
) WITHOUT ROWID;

-- JSON list of {"entry": "plugins/guard", "error": "..."}: the entries this worker left out.
ALTER TABLE admin_taps ADD COLUMN rejected TEXT NOT NULL DEFAULT '[]';
