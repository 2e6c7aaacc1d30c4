-- Parlor schema, version 1 (PostgreSQL): the same tables as the SQLite schema after its
-- fifth migration, in one step.
--
-- Times are unix milliseconds in BIGINT columns, as in SQLite, so both stores return the
-- same values (model::now_ms precision). JSON documents are TEXT: they are stored and read
-- back byte for byte, never queried. Identifiers and names that are sorted use the "C"
-- collation, so every listing has SQLite's byte order whatever the database's locale.

CREATE TABLE domains (
    id          TEXT COLLATE "C" PRIMARY KEY,
    name        TEXT NOT NULL,
    settings    TEXT,                     -- JSON; NULL for a domain of the config file
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT
);

CREATE TABLE customers (
    domain_id   TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    name        TEXT,
    data        TEXT,                     -- JSON profile from join-room's customerData
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (domain_id, user_id)
);

-- A room's row is also its sequence counter: `last_seq` is raised in the transaction that
-- stores each message, under the row lock that every write to the room takes first, so
-- rooms are numbered 1, 2, 3… without gaps however many nodes write.
CREATE TABLE rooms (
    rid         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- store-internal key
    domain_id   TEXT NOT NULL,
    id          TEXT NOT NULL,
    kind        TEXT NOT NULL DEFAULT 'support',
    created_by  TEXT,
    created_at  BIGINT NOT NULL,
    updated_at  BIGINT NOT NULL,
    last_seq    BIGINT NOT NULL DEFAULT 0,
    UNIQUE (domain_id, id)
);

CREATE TABLE messages (
    room               BIGINT NOT NULL REFERENCES rooms (rid),
    seq                BIGINT NOT NULL,     -- 1, 2, 3… per room, no gaps
    id                 TEXT NOT NULL,       -- UUID v7: unique by construction
    author_id          TEXT NOT NULL,
    author_name        TEXT NOT NULL,
    author_role        TEXT NOT NULL,
    kind               TEXT NOT NULL,
    content            TEXT NOT NULL,
    data               TEXT,                -- JSON extras
    client_message_id  TEXT,
    created_at         BIGINT NOT NULL,     -- unix milliseconds
    PRIMARY KEY (room, seq)
);

-- Idempotency keys are per author: two users who both number their messages "msg-1" must
-- not swallow each other's.
CREATE UNIQUE INDEX messages_client_message_id
    ON messages (room, author_id, client_message_id)
    WHERE client_message_id IS NOT NULL;

CREATE TABLE read_states (
    domain_id   TEXT NOT NULL,
    room_id     TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    seq         BIGINT NOT NULL,            -- highest seq this user has read
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (domain_id, room_id, user_id)
);

-- Secrets added at run time (see the SQLite schema, version 3).
CREATE TABLE domain_keys (
    id          TEXT COLLATE "C" PRIMARY KEY,
    domain_id   TEXT NOT NULL REFERENCES domains (id),
    kind        TEXT NOT NULL,              -- 'server' | 'pusher'
    public_id   TEXT,                       -- the Pusher app key
    secret      TEXT NOT NULL,
    created_at  BIGINT NOT NULL,            -- unix milliseconds
    expires_at  BIGINT
);
CREATE UNIQUE INDEX domain_keys_public_id ON domain_keys (kind, public_id)
    WHERE public_id IS NOT NULL;

CREATE TABLE server_settings (
    name   TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);

-- One row per AI provider call.
CREATE TABLE ai_usage (
    id                 BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    domain_id          TEXT NOT NULL,
    room_id            TEXT,
    user_id            TEXT,
    provider           TEXT COLLATE "C" NOT NULL,
    model              TEXT COLLATE "C" NOT NULL,
    prompt_tokens      BIGINT NOT NULL,
    completion_tokens  BIGINT NOT NULL,
    latency_ms         BIGINT NOT NULL,
    outcome            TEXT NOT NULL,
    created_at         BIGINT NOT NULL
);
CREATE INDEX ai_usage_domain_time ON ai_usage (domain_id, created_at);

CREATE TABLE knowledge_documents (
    domain_id   TEXT NOT NULL,
    name        TEXT COLLATE "C" NOT NULL,
    text        TEXT NOT NULL,
    updated_at  BIGINT NOT NULL,
    PRIMARY KEY (domain_id, name)
);

-- Hand-off state; a room without a row is with the bot.
CREATE TABLE conversations (
    room               BIGINT PRIMARY KEY REFERENCES rooms (rid),
    domain_id          TEXT NOT NULL,
    status             TEXT NOT NULL,       -- bot | waiting | assigned | resolved
    assignee_id        TEXT,
    assignee_name      TEXT,
    waiting_since      BIGINT,
    assigned_at        BIGINT,
    first_response_at  BIGINT,
    resolved_at        BIGINT,
    updated_at         BIGINT NOT NULL,
    version            BIGINT NOT NULL,     -- +1 per change
    status_seq         BIGINT NOT NULL DEFAULT 0  -- seq of the message recording the change
);
CREATE INDEX conversations_domain_status ON conversations (domain_id, status);

-- Agent-only notes: not part of the room's stream.
CREATE TABLE notes (
    id           TEXT COLLATE "C" PRIMARY KEY,
    room         BIGINT NOT NULL REFERENCES rooms (rid),
    author_id    TEXT NOT NULL,
    author_name  TEXT NOT NULL,
    text         TEXT NOT NULL,
    created_at   BIGINT NOT NULL
);
CREATE INDEX notes_room ON notes (room, created_at);
