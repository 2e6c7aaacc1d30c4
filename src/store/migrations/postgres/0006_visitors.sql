-- Parlor schema, version 6 (PostgreSQL): a domain's visitors and their hourly and daily
-- rollups (src/store/visitors.rs).

CREATE TABLE visitors (
    domain_id   TEXT NOT NULL,
    visitor_id  TEXT NOT NULL,
    first_seen  BIGINT NOT NULL,            -- unix milliseconds
    last_seen   BIGINT NOT NULL,
    visits      BIGINT NOT NULL,
    page        TEXT,
    referrer    TEXT,
    user_agent  TEXT,
    data        TEXT,                       -- JSON text, as written
    PRIMARY KEY (domain_id, visitor_id)
);
-- "Seen in the last N days" and the latest visitors.
CREATE INDEX visitors_seen ON visitors (domain_id, last_seen);

-- Per hour and per UTC day: distinct visitors seen, visits started.
CREATE TABLE visitor_hours (
    domain_id   TEXT NOT NULL,
    at          BIGINT NOT NULL,            -- the hour's start, unix milliseconds
    visitors    BIGINT NOT NULL,
    visits      BIGINT NOT NULL,
    PRIMARY KEY (domain_id, at)
);
CREATE TABLE visitor_days (
    domain_id   TEXT NOT NULL,
    at          BIGINT NOT NULL,            -- the day's start (UTC), unix milliseconds
    visitors    BIGINT NOT NULL,
    visits      BIGINT NOT NULL,
    PRIMARY KEY (domain_id, at)
);
