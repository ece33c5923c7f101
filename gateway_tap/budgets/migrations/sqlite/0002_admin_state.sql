-- Admin API state (gateway_tap.admin): apps, keys, budgets and plugin configs managed through the API,
-- applied by every tap on top of its YAML file. Times are Unix seconds; JSON columns hold text.

-- One row: bumped in the transaction of every change; taps poll it to know when to reload the state.
CREATE TABLE admin_state (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    version INTEGER NOT NULL
);
INSERT INTO admin_state (id, version) VALUES (1, 0);

CREATE TABLE admin_apps (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    allowed_llms TEXT NOT NULL,              -- JSON list
    metadata     TEXT NOT NULL,              -- JSON object
    enabled      INTEGER NOT NULL,
    created_s    REAL NOT NULL,
    updated_s    REAL NOT NULL
) WITHOUT ROWID;

-- Keys are stored as their sha256 only; prefix identifies a key to people.
CREATE TABLE admin_keys (
    id          TEXT PRIMARY KEY,
    app_id      TEXT NOT NULL REFERENCES admin_apps (id) ON DELETE CASCADE,
    key_hash    TEXT NOT NULL UNIQUE,
    prefix      TEXT NOT NULL,
    created_s   REAL NOT NULL,
    expires_s   REAL,                        -- set by a rotation: valid until then (the overlap window)
    revoked_s   REAL,
    last_used_s REAL
) WITHOUT ROWID;
CREATE INDEX admin_keys_app ON admin_keys (app_id);

-- llm_id '' is the app-wide budget.
CREATE TABLE admin_budgets (
    app_id    TEXT NOT NULL REFERENCES admin_apps (id) ON DELETE CASCADE,
    llm_id    TEXT NOT NULL,
    period    TEXT NOT NULL,
    settings  TEXT NOT NULL,                 -- JSON of BudgetSettings
    updated_s REAL NOT NULL,
    PRIMARY KEY (app_id, llm_id, period)
) WITHOUT ROWID;

CREATE TABLE admin_plugin_configs (
    name      TEXT PRIMARY KEY,
    config    TEXT NOT NULL,                 -- JSON object replacing plugins[name].config
    updated_s REAL NOT NULL
) WITHOUT ROWID;

-- What each tap worker runs: written when it applies a version, and as a heartbeat.
CREATE TABLE admin_taps (
    gateway_id TEXT NOT NULL,
    worker     INTEGER NOT NULL,
    pid        INTEGER NOT NULL,
    version    INTEGER NOT NULL,
    seen_s     REAL NOT NULL,
    PRIMARY KEY (gateway_id, worker)
) WITHOUT ROWID;
