-- Ledger: one row per budget_usage event; the primary key makes recording idempotent.
CREATE TABLE budget_ledger (
    event_id          TEXT PRIMARY KEY,
    app_id            TEXT NOT NULL,
    llm_id            TEXT NOT NULL,
    day               DATE NOT NULL,          -- UTC
    cost_micros       BIGINT NOT NULL,        -- micro-USD
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    total_tokens      BIGINT NOT NULL,
    requests          INTEGER NOT NULL,
    recorded_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Totals per app x LLM x UTC day, updated only for newly inserted ledger rows.
CREATE TABLE budget_totals (
    app_id            TEXT NOT NULL,
    llm_id            TEXT NOT NULL,
    day               DATE NOT NULL,
    cost_micros       BIGINT NOT NULL DEFAULT 0,
    prompt_tokens     BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    total_tokens      BIGINT NOT NULL DEFAULT 0,
    requests          BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (app_id, day, llm_id)
);

-- Alerts already raised: once per budget, period and threshold.
CREATE TABLE budget_alerts (
    budget_key   TEXT NOT NULL,
    period_start DATE NOT NULL,
    threshold    TEXT NOT NULL,
    cost_micros  BIGINT NOT NULL,
    total_tokens BIGINT NOT NULL,
    fired_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (budget_key, period_start, threshold)
);
