-- Parlor schema, version 3 (PostgreSQL): where a visitor was when they last opened the
-- widget (page, title, referrer, language, time zone, browser), shown to agents beside the
-- conversation (docs/handoff.md, "Visitor context"). JSON, written by the server.

ALTER TABLE customers ADD COLUMN context TEXT;
