-- Parlor schema, version 5 (PostgreSQL): notifications (docs/notifications.md): typed messages
-- to one user of a domain, with unread state, numbered per user by a counter.

CREATE TABLE notifications (
    domain_id   TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    seq         BIGINT NOT NULL,            -- 1, 2, 3… per user, in commit order
    id          TEXT NOT NULL UNIQUE,       -- UUID
    org_id      TEXT,
    task_id     TEXT,
    type        TEXT NOT NULL,              -- SCHEDULING_UPDATE, CONFIRMATION…
    content     TEXT NOT NULL,
    data        TEXT,                       -- JSON text, as written
    read        BOOLEAN NOT NULL DEFAULT FALSE,
    created_at  BIGINT NOT NULL,            -- unix milliseconds
    PRIMARY KEY (domain_id, user_id, seq)
);
-- The seed's indexes: a user's notifications in creation order (the primary key), a task's,
-- and the unread ones (partial: only what is unread is indexed).
CREATE INDEX notifications_task ON notifications (domain_id, user_id, task_id, seq)
    WHERE task_id IS NOT NULL;
CREATE INDEX notifications_unread ON notifications (domain_id, user_id, seq) WHERE NOT read;
CREATE INDEX notifications_created ON notifications (created_at);

-- Each user's last seq. Never removed: a user's numbers go on after old notifications expire.
CREATE TABLE notification_users (
    domain_id   TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    last_seq    BIGINT NOT NULL,
    PRIMARY KEY (domain_id, user_id)
);
