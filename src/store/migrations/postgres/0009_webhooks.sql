-- Parlor schema, version 9 (PostgreSQL): the outbox of the domains' webhooks
-- (src/store/webhooks.rs). A row is written in the transaction of the change it reports
-- and delivered in `seq` order within its partition (domain, endpoint, partition_key).

CREATE TABLE webhook_outbox (
    seq             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, -- write order; never reused
    id              TEXT NOT NULL UNIQUE,               -- the event id (X-Parlor-Webhook-Id)
    domain_id       TEXT NOT NULL,
    endpoint        TEXT NOT NULL,                      -- the webhook's URL
    partition_key   TEXT NOT NULL,                      -- room:ID, user:ID, visitor:ID, session:ID
    event           TEXT NOT NULL,                      -- message.created, …
    payload         TEXT NOT NULL,                      -- the body's data, JSON text
    created_at      BIGINT NOT NULL,                   -- unix milliseconds
    status          TEXT NOT NULL DEFAULT 'pending',    -- pending, delivered, dead
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT,                             -- NULL: waiting behind its partition's head
    claimed_by      TEXT,
    claimed_until   BIGINT,
    last_attempt_at BIGINT,
    last_status     BIGINT,
    last_error      TEXT,
    finished_at     BIGINT
);
-- A partition's head: its oldest pending row.
CREATE INDEX webhook_outbox_partitions ON webhook_outbox (domain_id, endpoint, partition_key, seq)
    WHERE status = 'pending';
-- Due rows, oldest first: only a partition's head is ever due (the others wait with a
-- NULL next_attempt_at until the head ends), so a claim never reads a backlog.
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at) WHERE status = 'pending';
-- A domain's delivery log, newest first.
CREATE INDEX webhook_outbox_log ON webhook_outbox (domain_id, seq);
-- Rows that ended, for pruning.
CREATE INDEX webhook_outbox_finished ON webhook_outbox (finished_at) WHERE status <> 'pending';
