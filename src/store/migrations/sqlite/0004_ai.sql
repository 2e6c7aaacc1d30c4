-- Parlor schema, version 4 (SQLite): the AI layer. One row per AI provider call, for
-- usage reports and budgets; and uploaded knowledge-base documents.

CREATE TABLE ai_usage (
    id                 INTEGER PRIMARY KEY,
    domain_id          TEXT NOT NULL,
    room_id            TEXT,                  -- the room answered in, if any
    user_id            TEXT,                  -- who asked, if known
    provider           TEXT NOT NULL,         -- the configured provider name, or 'kb'
    model              TEXT NOT NULL,
    prompt_tokens      INTEGER NOT NULL,
    completion_tokens  INTEGER NOT NULL,
    latency_ms         INTEGER NOT NULL,      -- from the call to its end
    outcome            TEXT NOT NULL,         -- 'ok', 'cancelled' or an error label
    created_at         INTEGER NOT NULL       -- unix milliseconds
);
CREATE INDEX ai_usage_domain_time ON ai_usage (domain_id, created_at);

-- Knowledge-base documents uploaded through the admin API (a domain's folder, if it has
-- one, is read from disk and not copied here).
CREATE TABLE knowledge_documents (
    domain_id   TEXT NOT NULL,
    name        TEXT NOT NULL,
    text        TEXT NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (domain_id, name)
) WITHOUT ROWID;
