-- Parlor schema, version 7 (PostgreSQL): a domain's activity per hour, the first-response
-- times, and when each room first had an AI reply and first reached a human
-- (src/store/stats.rs). Existing history is counted once here.

-- Per hour, counters of what happened (`metric`: `messages.<role>`, `conversations`,
-- `escalated`…). `writer` is the node's store writer that counted, so the writers of
-- several nodes never wait on each other's rows; reads sum over it.
CREATE TABLE activity_hours (
    domain_id   TEXT NOT NULL,
    at          BIGINT NOT NULL,            -- the hour's start, unix milliseconds
    metric      TEXT NOT NULL,
    writer      TEXT NOT NULL DEFAULT '',
    n           BIGINT NOT NULL,
    PRIMARY KEY (domain_id, at, metric, writer)
);

-- One row per first response of an agent to a conversation that left the bot.
CREATE TABLE first_responses (
    domain_id   TEXT NOT NULL,
    at          BIGINT NOT NULL,            -- when the agent first wrote, unix milliseconds
    ms          BIGINT NOT NULL,            -- from the start of the wait (or assignment)
    room        BIGINT NOT NULL
);
CREATE INDEX first_responses_domain_at ON first_responses (domain_id, at);

ALTER TABLE rooms ADD COLUMN ai_replied_at BIGINT;     -- first `assistant` message
ALTER TABLE rooms ADD COLUMN handed_over_at BIGINT;    -- first escalation or assignment

-- The history written before this version, counted once.
UPDATE rooms SET ai_replied_at = (
    SELECT MIN(created_at) FROM messages m WHERE m.room = rooms.rid AND m.author_role = 'assistant');
UPDATE rooms SET handed_over_at = (
    SELECT MIN(created_at) FROM messages m
    WHERE m.room = rooms.rid AND m.kind = 'status'
      AND m.data::jsonb ->> 'action' IN ('escalate', 'assign'));

INSERT INTO activity_hours (domain_id, at, metric, n)
SELECT r.domain_id, (m.created_at / 3600000) * 3600000, 'messages.' || m.author_role, COUNT(*)
FROM messages m JOIN rooms r ON r.rid = m.room
WHERE r.id NOT LIKE '#%'
GROUP BY 1, 2, 3;

INSERT INTO activity_hours (domain_id, at, metric, n)
SELECT domain_id, (created_at / 3600000) * 3600000, 'conversations', COUNT(*)
FROM rooms WHERE id NOT LIKE '#%' GROUP BY 1, 2;

INSERT INTO activity_hours (domain_id, at, metric, n)
SELECT domain_id, (created_at / 3600000) * 3600000, 'conversations.ai', COUNT(*)
FROM rooms WHERE ai_replied_at IS NOT NULL GROUP BY 1, 2;

INSERT INTO activity_hours (domain_id, at, metric, n)
SELECT domain_id, (created_at / 3600000) * 3600000, 'conversations.ai_only', COUNT(*)
FROM rooms WHERE ai_replied_at IS NOT NULL AND handed_over_at IS NULL GROUP BY 1, 2;

INSERT INTO activity_hours (domain_id, at, metric, n)
SELECT r.domain_id, (m.created_at / 3600000) * 3600000,
       CASE m.data::jsonb ->> 'action'
           WHEN 'escalate' THEN 'escalated' WHEN 'assign' THEN 'assigned'
           WHEN 'transfer' THEN 'transferred' ELSE 'resolved' END,
       COUNT(*)
FROM messages m JOIN rooms r ON r.rid = m.room
WHERE m.kind = 'status' AND m.data IS NOT NULL
  AND m.data::jsonb ->> 'action' IN ('escalate', 'assign', 'transfer', 'resolve')
GROUP BY 1, 2, 3;

INSERT INTO first_responses (domain_id, at, ms, room)
SELECT domain_id, first_response_at,
       GREATEST(0, first_response_at - COALESCE(waiting_since, assigned_at)), room
FROM conversations
WHERE first_response_at IS NOT NULL AND COALESCE(waiting_since, assigned_at) IS NOT NULL;
