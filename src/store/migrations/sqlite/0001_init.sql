-- Parlor schema, version 1 (SQLite).
-- Rooms are keyed by (domain_id, id): the same room id in two domains is two rooms, so no
-- query can cross a tenant boundary by guessing an id.
-- A room's last seq is MAX(messages.seq), one seek into the messages primary key.

CREATE TABLE domains (
    id          TEXT PRIMARY KEY NOT NULL,
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE customers (
    domain_id   TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    name        TEXT,
    data        TEXT,            -- JSON profile from join-room's customerData
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (domain_id, user_id)
) WITHOUT ROWID;

CREATE TABLE rooms (
    domain_id   TEXT NOT NULL,
    id          TEXT NOT NULL,
    kind        TEXT NOT NULL DEFAULT 'support',
    created_by  TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (domain_id, id)
) WITHOUT ROWID;

CREATE TABLE messages (
    domain_id          TEXT NOT NULL,
    room_id            TEXT NOT NULL,
    seq                INTEGER NOT NULL,        -- 1, 2, 3… per room, no gaps
    id                 TEXT NOT NULL,           -- UUID v7: unique by construction
    author_id          TEXT NOT NULL,
    author_name        TEXT NOT NULL,
    author_role        TEXT NOT NULL,
    kind               TEXT NOT NULL,
    content            TEXT NOT NULL,
    data               TEXT,                    -- JSON extras
    client_message_id  TEXT,
    created_at         INTEGER NOT NULL,        -- unix milliseconds
    PRIMARY KEY (domain_id, room_id, seq)
) WITHOUT ROWID;

-- Idempotency keys are per author: two users who both number their messages "msg-1" must
-- not swallow each other's.
CREATE UNIQUE INDEX messages_client_message_id
    ON messages (domain_id, room_id, author_id, client_message_id)
    WHERE client_message_id IS NOT NULL;

CREATE TABLE read_states (
    domain_id   TEXT NOT NULL,
    room_id     TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    seq         INTEGER NOT NULL,              -- highest seq this user has read
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (domain_id, room_id, user_id)
) WITHOUT ROWID;
