-- Parlor schema, version 3 (SQLite): domains managed at run time.
-- A domain created through the admin API keeps its settings here as JSON (the same fields
-- as a `[[domains]]` table of the config file); a domain declared in the config file has
-- `settings` NULL and is read from the file.

ALTER TABLE domains ADD COLUMN settings TEXT;
ALTER TABLE domains ADD COLUMN updated_at INTEGER;

-- Secrets added at run time, for any domain. `secret` holds `sha256:HEX` for a server API
-- key (only ever verified) and the secret itself for a Pusher key pair (it signs). A key
-- with `expires_at` stops working then: the grace period of a rotation.
CREATE TABLE domain_keys (
    id          TEXT PRIMARY KEY NOT NULL,
    domain_id   TEXT NOT NULL REFERENCES domains (id),
    kind        TEXT NOT NULL,            -- 'server' | 'pusher'
    public_id   TEXT,                     -- the Pusher app key
    secret      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,         -- unix milliseconds
    expires_at  INTEGER
);
CREATE UNIQUE INDEX domain_keys_public_id ON domain_keys (kind, public_id)
    WHERE public_id IS NOT NULL;

-- Values the server generates once and keeps, e.g. the secret that signs visitor tokens
-- when `auth.jwt_secret` is not configured.
CREATE TABLE server_settings (
    name   TEXT PRIMARY KEY NOT NULL,
    value  TEXT NOT NULL
);
