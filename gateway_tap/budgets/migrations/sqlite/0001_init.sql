-- Ledger: one row per budget_usage event; the primary key makes recording idempotent.
CREATE TABLE budget_ledger (
    event_id          TEXT PRIMARY KEY,
    app_id            TEXT NOT NULL,
    llm_id            TEXT NOT NULL,
    day               TEXT NOT NULL,          -- UTC date, YYYY-MM-DD
    cost_micros       INTEGER NOT NULL,       -- micro-USD
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    total_tokens      INTEGER NOT NULL,
    requests          INTEGER NOT NULL,
    recorded_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) WITHOUT ROWID;

-- Totals per app x LLM x UTC day, updated only for newly inserted ledger rows.
CREATE TABLE budget_totals (
    app_id            TEXT NOT NULL,
    llm_id            TEXT NOT NULL,
    day               TEXT NOT NULL,
    cost_micros       INTEGER NOT NULL DEFAULT 0,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens      INTEGER NOT NULL DEFAULT 0,
    requests          INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (app_id, day, llm_id)
) WITHOUT ROWID;

-- Alerts already raised: once per budget, period and threshold.
CREATE TABLE budget_alerts (
    budget_key   TEXT NOT NULL,
    period_start TEXT NOT NULL,
    threshold    TEXT NOT NULL,
    cost_micros  INTEGER NOT NULL,
    total_tokens INTEGER NOT NULL,
    fired_at     TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (budget_key, period_start, threshold)
) WITHOUT ROWID;
