-- Parlor schema, version 2 (PostgreSQL): agent accounts and sign-in sessions
-- (docs/accounts.md). Secrets are kept only as hashes: passwords as argon2id strings,
-- invite and session tokens as SHA-256 hex digests.

CREATE TABLE accounts (
    id             TEXT PRIMARY KEY,          -- UUID; the user id of its tokens
    domain_id      TEXT NOT NULL,
    email          TEXT NOT NULL,             -- lower case
    name           TEXT NOT NULL,
    role           TEXT NOT NULL,             -- agent | admin
    password_hash  TEXT,                      -- NULL until the invite is used
    created_at     BIGINT NOT NULL,           -- unix milliseconds
    UNIQUE (domain_id, email)
);
CREATE INDEX accounts_email ON accounts (email);

-- One invite per account at most.
CREATE TABLE account_invites (
    token_hash  TEXT PRIMARY KEY,
    account_id  TEXT NOT NULL UNIQUE REFERENCES accounts (id) ON DELETE CASCADE,
    expires_at  BIGINT NOT NULL
);

CREATE TABLE sessions (
    id_hash     TEXT PRIMARY KEY,
    email       TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);
CREATE TABLE session_accounts (
    session     TEXT NOT NULL REFERENCES sessions (id_hash) ON DELETE CASCADE,
    account_id  TEXT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    PRIMARY KEY (session, account_id)
);
CREATE INDEX session_accounts_account ON session_accounts (account_id);

-- Failed sign-ins per e-mail address (known or not), for the lock-out.
CREATE TABLE sign_in_failures (
    email         TEXT PRIMARY KEY,
    failures      INTEGER NOT NULL,
    window_start  BIGINT NOT NULL,
    locked_until  BIGINT
);
