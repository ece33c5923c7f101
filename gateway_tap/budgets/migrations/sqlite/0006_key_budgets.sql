-- Per-key budgets (docs/budgets.md, "Per-key budgets"). Events name the key that authenticated a request by its
-- id (budget_usage.key_id, contract revision 1.4); the ledger keeps it, and the spend of each key is totalled
-- apart from the app's, so an app's refresh never reads one row per key.
ALTER TABLE budget_ledger ADD COLUMN key_id TEXT NOT NULL DEFAULT '';

-- Totals per app x key x UTC day x LLM, updated only for newly inserted ledger rows that name a key.
CREATE TABLE budget_key_totals (
    app_id            TEXT NOT NULL,
    key_id            TEXT NOT NULL,
    day               TEXT NOT NULL,
    llm_id            TEXT NOT NULL,
    cost_micros       INTEGER NOT NULL DEFAULT 0,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    total_tokens      INTEGER NOT NULL DEFAULT 0,
    requests          INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (app_id, key_id, day, llm_id)
) WITHOUT ROWID;

-- Claims of hard key budgets across taps: key_id '' is a claim on the app's budgets, a key id one on that key's.
-- (SQLite cannot change a primary key: the table is rebuilt; claims are rewritten by every worker anyway.)
CREATE TABLE budget_claims_v6 (
    holder      TEXT NOT NULL,
    app_id      TEXT NOT NULL,
    llm_id      TEXT NOT NULL,
    day         TEXT NOT NULL,
    cost_micros INTEGER NOT NULL,
    tokens      INTEGER NOT NULL,
    expires_s   REAL NOT NULL,
    key_id      TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (app_id, holder, key_id, llm_id, day)
) WITHOUT ROWID;
INSERT INTO budget_claims_v6 (holder, app_id, llm_id, day, cost_micros, tokens, expires_s)
    SELECT holder, app_id, llm_id, day, cost_micros, tokens, expires_s FROM budget_claims;
DROP TABLE budget_claims;
ALTER TABLE budget_claims_v6 RENAME TO budget_claims;

-- Admin API: a key's budgets follow its lineage (the id of the first key of its rotation chain, NULL: its own id),
-- so a rotated key's successor keeps the budgets and the spend.
ALTER TABLE admin_keys ADD COLUMN lineage_id TEXT;

CREATE TABLE admin_key_budgets (
    app_id    TEXT NOT NULL REFERENCES admin_apps (id) ON DELETE CASCADE,
    key_id    TEXT NOT NULL,                 -- the key's lineage id
    llm_id    TEXT NOT NULL,                 -- '' for all the key's LLMs
    period    TEXT NOT NULL,
    settings  TEXT NOT NULL,                 -- JSON of BudgetSettings (key_id set)
    updated_s REAL NOT NULL,
    PRIMARY KEY (app_id, key_id, llm_id, period)
) WITHOUT ROWID;
