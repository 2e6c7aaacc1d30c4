-- Parlor schema, version 8 (PostgreSQL): uploaded files' descriptions (src/store/files.rs).
-- Their bytes live in the object store, under the domain and the file's id.

CREATE TABLE files (
    domain_id     TEXT NOT NULL,
    id            TEXT NOT NULL,            -- UUID v7, the object's key
    room_id       TEXT NOT NULL,
    uploader_id   TEXT NOT NULL,
    name          TEXT NOT NULL,
    size          BIGINT NOT NULL,          -- bytes
    content_type  TEXT NOT NULL,            -- decided from the bytes
    sha256        TEXT NOT NULL,            -- lowercase hex
    created_at    BIGINT NOT NULL,          -- unix milliseconds
    PRIMARY KEY (domain_id, id)
);
-- A room's files: its listing, its count and its deletion.
CREATE INDEX files_room ON files (domain_id, room_id, created_at);
