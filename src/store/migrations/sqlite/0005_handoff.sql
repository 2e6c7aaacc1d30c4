-- Parlor schema, version 5 (SQLite): hand-off from the bot to human agents.
--
-- A support room gets a conversation row the first time its hand-off state changes; a room
-- without one is with the bot. Every change also appends a system message to the room, in
-- the same transaction (see `Store::transition`).

CREATE TABLE conversations (
    room               INTEGER PRIMARY KEY REFERENCES rooms (rid),
    domain_id          TEXT NOT NULL,
    status             TEXT NOT NULL,          -- bot | waiting | assigned | resolved
    assignee_id        TEXT,
    assignee_name      TEXT,
    waiting_since      INTEGER,                -- unix milliseconds
    assigned_at        INTEGER,
    first_response_at  INTEGER,
    resolved_at        INTEGER,
    updated_at         INTEGER NOT NULL,
    version            INTEGER NOT NULL,       -- +1 per change
    status_seq         INTEGER NOT NULL DEFAULT 0  -- seq of the message recording the change
);
CREATE INDEX conversations_domain_status ON conversations (domain_id, status);

-- Agent-only notes: not part of the room's stream, so a visitor's seq has no holes.
CREATE TABLE notes (
    id           TEXT PRIMARY KEY,
    room         INTEGER NOT NULL REFERENCES rooms (rid),
    author_id    TEXT NOT NULL,
    author_name  TEXT NOT NULL,
    text         TEXT NOT NULL,
    created_at   INTEGER NOT NULL
);
CREATE INDEX notes_room ON notes (room, created_at);
