-- Per-key budgets (docs/budgets.md, "Per-key budgets"). Events name the key that authenticated a request by its
-- id (budget_usage.key_id, contract revision 1.4); the ledger keeps it, and the spend of each key is totalled
-- apart from the app's, so an app's refresh never reads one row per key.
ALTER TABLE budget_ledger ADD COLUMN key_id TEXT NOT NULL DEFAULT '';

-- Totals per app x key x UTC day x LLM, updated only for newly inserted ledger rows that name a key.
CREATE TABLE budget_key_totals (
    app_id            TEXT NOT NULL,
    key_id            TEXT NOT NULL,
    day               DATE NOT NULL,
    llm_id            TEXT NOT NULL,
    cost_micros       BIGINT NOT NULL DEFAULT 0,
    prompt_tokens     BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    total_tokens      BIGINT NOT NULL DEFAULT 0,
    requests          BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (app_id, key_id, day, llm_id)
);

-- Claims of hard key budgets across taps: key_id '' is a claim on the app's budgets, a key id one on that key's.
ALTER TABLE budget_claims ADD COLUMN key_id TEXT NOT NULL DEFAULT '';
ALTER TABLE budget_claims DROP CONSTRAINT budget_claims_pkey;
ALTER TABLE budget_claims ADD PRIMARY KEY (app_id, holder, key_id, llm_id, day);

-- Admin API: a key's budgets follow its lineage (the id of the first key of its rotation chain, NULL: its own id),
-- so a rotated key's successor keeps the budgets and the spend.
ALTER TABLE admin_keys ADD COLUMN lineage_id TEXT;

CREATE TABLE admin_key_budgets (
    app_id    TEXT NOT NULL REFERENCES admin_apps (id) ON DELETE CASCADE,
    key_id    TEXT NOT NULL,                 -- the key's lineage id
    llm_id    TEXT NOT NULL,                 -- '' for all the key's LLMs
    period    TEXT NOT NULL,
    settings  TEXT NOT NULL,                 -- JSON of BudgetSettings (key_id set)
    updated_s DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (app_id, key_id, llm_id, period)
);
