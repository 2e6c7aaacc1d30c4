-- Parlor schema, version 2 (SQLite): rooms get a compact integer key, messages are stored in
-- arrival order.
--
-- Why: a commit of a busy server holds one message each for many rooms. Version 1 kept
-- messages clustered by (domain_id, room_id, seq), so every message dirtied a page of its own
-- room in the table and another in the idempotency index, and every index entry repeated the
-- two text keys. Measured with 100 senders in 100 rooms: 4.8 WAL pages per message, 92 % of
-- them index pages. Now the table is appended to in commit order (a batch's messages share
-- its last pages) and both indexes start with a small integer, so their entries are a few
-- bytes and their pages split rarely.
--
-- Rooms keep (domain_id, id) as their unique public key: the integer never leaves the store.

ALTER TABLE messages RENAME TO messages_v1;
DROP INDEX messages_client_message_id;
ALTER TABLE rooms RENAME TO rooms_v1;

CREATE TABLE rooms (
    rid         INTEGER PRIMARY KEY,       -- store-internal key
    domain_id   TEXT NOT NULL,
    id          TEXT NOT NULL,
    kind        TEXT NOT NULL DEFAULT 'support',
    created_by  TEXT,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    UNIQUE (domain_id, id)
);

CREATE TABLE messages (
    room               INTEGER NOT NULL REFERENCES rooms (rid),
    seq                INTEGER NOT NULL,        -- 1, 2, 3… per room, no gaps
    id                 TEXT NOT NULL,           -- UUID v7: unique by construction
    author_id          TEXT NOT NULL,
    author_name        TEXT NOT NULL,
    author_role        TEXT NOT NULL,
    kind               TEXT NOT NULL,
    content            TEXT NOT NULL,
    data               TEXT,                    -- JSON extras
    client_message_id  TEXT,
    created_at         INTEGER NOT NULL         -- unix milliseconds
);

INSERT INTO rooms (domain_id, id, kind, created_by, created_at, updated_at)
    SELECT domain_id, id, kind, created_by, created_at, updated_at FROM rooms_v1;

-- Version 1 created a room before its first message; a database written by hand may not
-- have, and no message may be lost here.
INSERT INTO rooms (domain_id, id, created_by, created_at, updated_at)
    SELECT m.domain_id, m.room_id, MIN(m.author_id), MIN(m.created_at), MAX(m.created_at)
    FROM messages_v1 m
    WHERE NOT EXISTS (SELECT 1 FROM rooms r WHERE r.domain_id = m.domain_id AND r.id = m.room_id)
    GROUP BY m.domain_id, m.room_id;

INSERT INTO messages (room, seq, id, author_id, author_name, author_role, kind, content, data,
                      client_message_id, created_at)
    SELECT r.rid, m.seq, m.id, m.author_id, m.author_name, m.author_role, m.kind, m.content,
           m.data, m.client_message_id, m.created_at
    FROM messages_v1 m JOIN rooms r ON r.domain_id = m.domain_id AND r.id = m.room_id
    ORDER BY m.created_at, m.domain_id, m.room_id, m.seq;

DROP TABLE messages_v1;
DROP TABLE rooms_v1;

-- A room's messages by seq; a room's last seq is its largest entry.
CREATE UNIQUE INDEX messages_room_seq ON messages (room, seq);

-- Idempotency keys are per author: two users who both number their messages "msg-1" must
-- not swallow each other's.
CREATE UNIQUE INDEX messages_client_message_id
    ON messages (room, author_id, client_message_id)
    WHERE client_message_id IS NOT NULL;
