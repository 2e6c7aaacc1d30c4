-- Parlor schema, version 8 (SQLite): guided sessions (docs/sessions.md): sessions with
-- their turns, the documents they end in, templates added through the admin API, and the
-- leases that let one node at a time run periodic work (the clean-up of stale sessions).

CREATE TABLE guided_sessions (
    id            TEXT PRIMARY KEY,          -- UUID
    domain_id     TEXT NOT NULL,
    user_id       TEXT NOT NULL,
    template_id   TEXT NOT NULL,
    status        TEXT NOT NULL,             -- in_progress | complete
    template      TEXT NOT NULL,             -- the template's JSON as the session began
    pending_id    TEXT,                      -- the question waited on; NULL: none
    pending_text  TEXT,
    state         TEXT NOT NULL,             -- the guide's state (JSON)
    document_id   TEXT,                      -- set on completion
    version       INTEGER NOT NULL,          -- raised by every change
    turn_count    INTEGER NOT NULL,          -- the largest n of its turns
    created_at    INTEGER NOT NULL,          -- unix milliseconds
    updated_at    INTEGER NOT NULL,          -- a complete session's is its completed_at
    completed_at  INTEGER
);
-- One session in progress per user and template: two opens at once meet here.
CREATE UNIQUE INDEX guided_sessions_open ON guided_sessions (domain_id, user_id, template_id)
    WHERE status = 'in_progress';
CREATE INDEX guided_sessions_user ON guided_sessions (domain_id, user_id, updated_at);
CREATE INDEX guided_sessions_expiry ON guided_sessions (status, updated_at);

-- Appended, never rewritten; n counts from 1 without gaps.
CREATE TABLE guided_turns (
    session_id   TEXT NOT NULL REFERENCES guided_sessions (id) ON DELETE CASCADE,
    n            INTEGER NOT NULL,
    speaker      TEXT NOT NULL,              -- assistant | user
    question_id  TEXT,
    text         TEXT NOT NULL,
    at           INTEGER NOT NULL,
    PRIMARY KEY (session_id, n)
) WITHOUT ROWID;

-- A document stays when its session is removed, and goes when its session expires.
CREATE TABLE generated_documents (
    id           TEXT NOT NULL,              -- UUID, or the AI service's id
    domain_id    TEXT NOT NULL,
    user_id      TEXT NOT NULL,              -- the only reader
    session_id   TEXT NOT NULL,
    template_id  TEXT NOT NULL,
    title        TEXT NOT NULL,
    format       TEXT NOT NULL,              -- markdown | html | text
    content      TEXT,                       -- NULL when the AI service keeps the document
    bytes        INTEGER NOT NULL,           -- length of content (0 when NULL)
    created_at   INTEGER NOT NULL,
    -- Ids are per domain: one domain's AI service cannot take another's ids.
    PRIMARY KEY (domain_id, id)
);
CREATE INDEX generated_documents_user ON generated_documents (domain_id, user_id, created_at);

-- Templates added through the admin API (those of the config file are not stored).
CREATE TABLE guided_templates (
    domain_id   TEXT NOT NULL,
    id          TEXT NOT NULL,
    spec        TEXT NOT NULL,               -- JSON, checked by the sessions service
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (domain_id, id)
);

-- Who runs a periodic job until when; free once expired.
CREATE TABLE leases (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    expires_at  INTEGER NOT NULL
);
