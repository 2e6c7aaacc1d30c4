-- Parlor schema, version 10 (SQLite): a domain's visitors and their hourly and daily
-- rollups (src/store/visitors.rs).

CREATE TABLE visitors (
    domain_id   TEXT NOT NULL,
    visitor_id  TEXT NOT NULL,
    first_seen  INTEGER NOT NULL,           -- unix milliseconds
    last_seen   INTEGER NOT NULL,
    visits      INTEGER NOT NULL,
    page        TEXT,
    referrer    TEXT,
    user_agent  TEXT,
    data        TEXT,                       -- JSON
    PRIMARY KEY (domain_id, visitor_id)
) WITHOUT ROWID;
-- "Seen in the last N days" and the latest visitors.
CREATE INDEX visitors_seen ON visitors (domain_id, last_seen);

-- Per hour and per UTC day: distinct visitors seen, visits started.
CREATE TABLE visitor_hours (
    domain_id   TEXT NOT NULL,
    at          INTEGER NOT NULL,           -- the hour's start, unix milliseconds
    visitors    INTEGER NOT NULL,
    visits      INTEGER NOT NULL,
    PRIMARY KEY (domain_id, at)
) WITHOUT ROWID;
CREATE TABLE visitor_days (
    domain_id   TEXT NOT NULL,
    at          INTEGER NOT NULL,           -- the day's start (UTC), unix milliseconds
    visitors    INTEGER NOT NULL,
    visits      INTEGER NOT NULL,
    PRIMARY KEY (domain_id, at)
) WITHOUT ROWID;
