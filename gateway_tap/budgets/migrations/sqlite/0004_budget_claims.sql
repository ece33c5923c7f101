-- Version 4: 3 is the admin state's plugins (gateway_tap.admin), which may land after this one; a database migrated
-- without 3 gets it later (missing versions are applied in order).
-- Claims of hard budgets across taps (docs/budgets.md, "Across taps"): per tap worker (holder) and
-- app x LLM x UTC day, what it may spend or has spent that the ledger does not show yet: its unused lease,
-- the estimates of its requests in flight and the usage of its finished requests not yet recorded.
-- A lease is granted only when the ledger's totals plus every holder's claims stay within the budgets.
CREATE TABLE budget_claims (
    holder      TEXT NOT NULL,
    app_id      TEXT NOT NULL,
    llm_id      TEXT NOT NULL,
    day         TEXT NOT NULL,
    cost_micros INTEGER NOT NULL,
    tokens      INTEGER NOT NULL,
    expires_s   REAL NOT NULL,  -- Unix seconds: a holder that stopped renewing is ignored after it
    PRIMARY KEY (app_id, holder, llm_id, day)
) WITHOUT ROWID;
