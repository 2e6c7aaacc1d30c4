//! [`Guided`] on SQLite: reads on the reader pool, writes as jobs of the writer thread,
//! group-committed with everything else. The writer runs one job at a time, so a job's
//! check of a session's version and its change are one step, and two opens of one session
//! cannot interleave.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

use super::{SqliteStore, from_ms, to_ms, unavailable};
use crate::config::WebhookEvent;
use crate::store::StoreError;
use crate::store::guided::{
    GeneratedDocument, Guided, GuidedSession, NewDocument, NewSession, Pending, SessionQuery,
    SessionStatus, Speaker, Step, StoredTemplate, Turn,
};
use crate::store::webhooks::Partition;
use crate::store::webhooks::{Subscriptions, session_payload};

/// Columns matching [`session_at`] (unqualified: an `INSERT … RETURNING` reads them too).
const SESSION_COLUMNS: &str = "id, domain_id, user_id, template_id, status, template, \
     pending_id, pending_text, state, document_id, version, turn_count, created_at, \
     updated_at, completed_at";

/// Columns matching [`document_at`] but the content, which comes last.
const DOCUMENT_COLUMNS: &str =
    "id, domain_id, user_id, session_id, template_id, title, format, bytes, created_at";

/// A stored value the store cannot read as what it stands for.
fn corrupt(column: usize, why: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, why.into())
}

/// A session from [`SESSION_COLUMNS`], without its turns.
fn session_at(row: &rusqlite::Row<'_>) -> rusqlite::Result<GuidedSession> {
    let status: String = row.get(4)?;
    let status = SessionStatus::parse(&status)
        .ok_or_else(|| corrupt(4, format!("unknown session status {status:?}")))?;
    let pending_id: Option<String> = row.get(6)?;
    let pending_text: Option<String> = row.get(7)?;
    let version: i64 = row.get(10)?;
    let turn_count: i64 = row.get(11)?;
    Ok(GuidedSession {
        id: row.get(0)?,
        domain_id: row.get(1)?,
        user_id: row.get(2)?,
        template_id: row.get(3)?,
        status,
        template: row.get(5)?,
        pending: pending_id.map(|id| Pending {
            id,
            text: pending_text.unwrap_or_default(),
        }),
        state: row.get(8)?,
        document_id: row.get(9)?,
        version: u64::try_from(version).unwrap_or(0),
        turn_count: u32::try_from(turn_count).unwrap_or(0),
        turns: Vec::new(),
        created_at: from_ms(row.get(12)?),
        updated_at: from_ms(row.get(13)?),
        completed_at: row.get::<_, Option<i64>>(14)?.map(from_ms),
    })
}

/// A document from [`DOCUMENT_COLUMNS`] followed by its content (or `NULL`).
fn document_at(row: &rusqlite::Row<'_>) -> rusqlite::Result<GeneratedDocument> {
    let bytes: i64 = row.get(7)?;
    Ok(GeneratedDocument {
        id: row.get(0)?,
        domain_id: row.get(1)?,
        user_id: row.get(2)?,
        session_id: row.get(3)?,
        template_id: row.get(4)?,
        title: row.get(5)?,
        format: row.get(6)?,
        bytes: u64::try_from(bytes).unwrap_or(0),
        created_at: from_ms(row.get(8)?),
        content: row.get(9)?,
    })
}

fn template_at(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredTemplate> {
    Ok(StoredTemplate {
        domain_id: row.get(0)?,
        id: row.get(1)?,
        spec: row.get(2)?,
        updated_at: from_ms(row.get(3)?),
    })
}

/// `session` with its turns. Only the first `turn_count` are read: turns are appended,
/// never rewritten, so those are the ones the session row counted, whatever a writer
/// appended since.
fn with_turns(conn: &Connection, mut session: GuidedSession) -> rusqlite::Result<GuidedSession> {
    let mut stmt = conn.prepare_cached(
        "SELECT n, speaker, question_id, text, at FROM guided_turns
         WHERE session_id = ?1 AND n <= ?2 ORDER BY n",
    )?;
    let rows = stmt.query_map(params![session.id, session.turn_count], |row| {
        let n: i64 = row.get(0)?;
        let speaker: String = row.get(1)?;
        Ok(Turn {
            n: u32::try_from(n).unwrap_or(0),
            speaker: Speaker::parse(&speaker)
                .ok_or_else(|| corrupt(1, format!("unknown speaker {speaker:?}")))?,
            question_id: row.get(2)?,
            text: row.get(3)?,
            at: from_ms(row.get(4)?),
        })
    })?;
    session.turns = rows.collect::<rusqlite::Result<_>>()?;
    Ok(session)
}

/// Applies `step` to the in-progress session `id` at `version`, completing it with
/// `document` when one is given: its new version, or `None` (nothing written) when the
/// session is gone, complete or at another version.
fn apply_step(
    conn: &Connection,
    id: &str,
    version: u64,
    step: &Step,
    document: Option<(&NewDocument, &Subscriptions)>,
) -> rusqlite::Result<Option<u64>> {
    let Ok(version) = i64::try_from(version) else {
        return Ok(None);
    };
    let now = to_ms(Utc::now());
    let added = i64::try_from(step.turns.len()).unwrap_or(i64::MAX);
    let (pending_id, pending_text) = match &step.pending {
        Some(p) => (Some(p.id.as_str()), Some(p.text.as_str())),
        None => (None, None),
    };
    let returning = |row: &rusqlite::Row<'_>| -> rusqlite::Result<(i64, String, String, String)> {
        Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
    };
    let changed = match document.map(|(d, _)| d) {
        None => conn
            .prepare_cached(
                "UPDATE guided_sessions SET version = version + 1,
                   turn_count = turn_count + ?3, pending_id = ?4, pending_text = ?5,
                   state = ?6, updated_at = ?7
                 WHERE id = ?1 AND status = 'in_progress' AND version = ?2
                 RETURNING turn_count, domain_id, user_id, template_id",
            )?
            .query_row(
                params![
                    id,
                    version,
                    added,
                    pending_id,
                    pending_text,
                    step.state,
                    now
                ],
                returning,
            )
            .optional()?,
        Some(document) => conn
            .prepare_cached(
                "UPDATE guided_sessions SET version = version + 1,
                   turn_count = turn_count + ?3, pending_id = NULL, pending_text = NULL,
                   state = ?4, updated_at = ?5, status = 'complete', document_id = ?6,
                   completed_at = ?5
                 WHERE id = ?1 AND status = 'in_progress' AND version = ?2
                 RETURNING turn_count, domain_id, user_id, template_id",
            )?
            .query_row(
                params![id, version, added, step.state, now, document.id],
                returning,
            )
            .optional()?,
    };
    let Some((turn_count, domain, user, template)) = changed else {
        return Ok(None);
    };
    let mut insert = conn.prepare_cached(
        "INSERT INTO guided_turns (session_id, n, speaker, question_id, text, at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for (n, turn) in (turn_count - added + 1..).zip(&step.turns) {
        insert.execute(params![
            id,
            n,
            turn.speaker.as_str(),
            turn.question_id,
            turn.text,
            now
        ])?;
    }
    if let Some((document, subscriptions)) = document {
        let bytes = document.content.as_ref().map_or(0, String::len);
        conn.prepare_cached(
            "INSERT INTO generated_documents (id, domain_id, user_id, session_id, template_id,
               title, format, content, bytes, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10) ON CONFLICT (domain_id, id) DO NOTHING",
        )?
        .execute(params![
            document.id,
            domain,
            user,
            id,
            template,
            document.title,
            document.format,
            document.content,
            i64::try_from(bytes).unwrap_or(i64::MAX),
            now
        ])?;
        let events = subscriptions.rows(
            &domain,
            WebhookEvent::SessionCompleted,
            Partition::Session(id),
            || session_payload(id, &user, &template, document, from_ms(now)),
        );
        super::webhooks::insert_outbox(conn, &events)?;
    }
    Ok(Some(u64::try_from(version).unwrap_or(0) + 1))
}

fn limit_param(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX)
}

#[async_trait]
impl Guided for SqliteStore {
    async fn open_session(&self, new: NewSession) -> Result<(GuidedSession, bool), StoreError> {
        self.run(move |conn| {
            let now = to_ms(Utc::now());
            let created = conn
                .prepare_cached(&format!(
                    "INSERT INTO guided_sessions (id, domain_id, user_id, template_id,
                       status, template, state, version, turn_count, created_at, updated_at)
                     VALUES (?1, ?2, ?3, ?4, 'in_progress', ?5, ?6, 1, 0, ?7, ?7)
                     ON CONFLICT (domain_id, user_id, template_id) WHERE status = 'in_progress'
                       DO NOTHING
                     RETURNING {SESSION_COLUMNS}"
                ))
                .and_then(|mut s| {
                    s.query_row(
                        params![
                            new.id,
                            new.domain_id,
                            new.user_id,
                            new.template_id,
                            new.template,
                            new.state,
                            now
                        ],
                        session_at,
                    )
                    .optional()
                })
                .map_err(unavailable)?;
            if let Some(session) = created {
                return Ok((session, true));
            }
            let open = conn
                .prepare_cached(&format!(
                    "SELECT {SESSION_COLUMNS} FROM guided_sessions
                     WHERE domain_id = ?1 AND user_id = ?2 AND template_id = ?3
                       AND status = 'in_progress'"
                ))
                .and_then(|mut s| {
                    s.query_row(
                        params![new.domain_id, new.user_id, new.template_id],
                        session_at,
                    )
                    .optional()
                })
                .map_err(unavailable)?
                .ok_or_else(|| {
                    StoreError::Corrupt("an open session conflicts with no stored one".into())
                })?;
            Ok((with_turns(conn, open).map_err(unavailable)?, false))
        })
        .await
    }

    async fn guided_session(&self, id: &str) -> Result<Option<GuidedSession>, StoreError> {
        let id = id.to_owned();
        self.read(move |c| {
            let session = c
                .prepare_cached(&format!(
                    "SELECT {SESSION_COLUMNS} FROM guided_sessions WHERE id = ?1"
                ))?
                .query_row(params![id], session_at)
                .optional()?;
            session.map(|s| with_turns(c, s)).transpose()
        })
        .await
    }

    async fn guided_sessions(&self, query: SessionQuery) -> Result<Vec<GuidedSession>, StoreError> {
        // Only the filters given are written into the statement, so the (domain, user,
        // updated) index serves a user's list; the numbered parameters stay the same.
        let mut sql = format!("SELECT {SESSION_COLUMNS} FROM guided_sessions WHERE domain_id = ?1");
        if query.user_id.is_some() {
            sql.push_str(" AND user_id = ?2");
        }
        if query.template_id.is_some() {
            sql.push_str(" AND template_id = ?3");
        }
        if query.status.is_some() {
            sql.push_str(" AND status = ?4");
        }
        sql.push_str(" ORDER BY updated_at DESC, id DESC LIMIT ?5");
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&sql)?;
            let rows = stmt.query_map(
                params![
                    query.domain_id,
                    query.user_id,
                    query.template_id,
                    query.status.map(SessionStatus::as_str),
                    limit_param(query.limit)
                ],
                session_at,
            )?;
            rows.collect()
        })
        .await
    }

    async fn advance_session(
        &self,
        id: &str,
        version: u64,
        step: Step,
    ) -> Result<Option<u64>, StoreError> {
        let id = id.to_owned();
        self.run(move |conn| apply_step(conn, &id, version, &step, None).map_err(unavailable))
            .await
    }

    async fn complete_session(
        &self,
        id: &str,
        version: u64,
        step: Step,
        document: NewDocument,
    ) -> Result<Option<u64>, StoreError> {
        let id = id.to_owned();
        let subscriptions = std::sync::Arc::clone(&self.subscriptions);
        self.run(move |conn| {
            apply_step(conn, &id, version, &step, Some((&document, &subscriptions)))
                .map_err(unavailable)
        })
        .await
    }

    async fn delete_guided_session(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.run(move |conn| {
            // The turns go with the session (ON DELETE CASCADE); its document stays.
            conn.prepare_cached("DELETE FROM guided_sessions WHERE id = ?1")
                .and_then(|mut s| s.execute(params![id]))
                .map(|n| n > 0)
                .map_err(unavailable)
        })
        .await
    }

    async fn expire_sessions(
        &self,
        before: DateTime<Utc>,
        completed_before: Option<DateTime<Utc>>,
    ) -> Result<u64, StoreError> {
        self.run(move |conn| {
            // Turns go with their sessions (ON DELETE CASCADE). A complete session's last
            // change is its completion, so `updated_at` is its completion time here.
            let mut gone = conn
                .prepare_cached(
                    "DELETE FROM guided_sessions
                     WHERE status = 'in_progress' AND updated_at < ?1",
                )
                .and_then(|mut s| s.execute(params![to_ms(before)]))
                .map_err(unavailable)?;
            if let Some(done) = completed_before {
                // A document goes with the session that stored it, not with another that
                // named the same id.
                conn.prepare_cached(
                    "DELETE FROM generated_documents WHERE (id, session_id) IN
                       (SELECT document_id, id FROM guided_sessions
                        WHERE status = 'complete' AND updated_at < ?1)",
                )
                .and_then(|mut s| s.execute(params![to_ms(done)]))
                .map_err(unavailable)?;
                gone += conn
                    .prepare_cached(
                        "DELETE FROM guided_sessions
                         WHERE status = 'complete' AND updated_at < ?1",
                    )
                    .and_then(|mut s| s.execute(params![to_ms(done)]))
                    .map_err(unavailable)?;
                // Documents whose session was abandoned by hand go by their own age.
                conn.prepare_cached(
                    "DELETE FROM generated_documents WHERE created_at < ?1
                       AND session_id NOT IN (SELECT id FROM guided_sessions)",
                )
                .and_then(|mut s| s.execute(params![to_ms(done)]))
                .map_err(unavailable)?;
            }
            Ok(gone as u64)
        })
        .await
    }

    async fn generated_document(
        &self,
        domain_id: &str,
        id: &str,
    ) -> Result<Option<GeneratedDocument>, StoreError> {
        let (domain, id) = (domain_id.to_owned(), id.to_owned());
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {DOCUMENT_COLUMNS}, content FROM generated_documents
                 WHERE domain_id = ?1 AND id = ?2"
            ))?
            .query_row(params![domain, id], document_at)
            .optional()
        })
        .await
    }

    async fn generated_documents(
        &self,
        domain_id: &str,
        user_id: &str,
        limit: usize,
    ) -> Result<Vec<GeneratedDocument>, StoreError> {
        let (domain, user) = (domain_id.to_owned(), user_id.to_owned());
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!(
                "SELECT {DOCUMENT_COLUMNS}, NULL FROM generated_documents
                 WHERE domain_id = ?1 AND user_id = ?2
                 ORDER BY created_at DESC, id DESC LIMIT ?3"
            ))?;
            let rows = stmt.query_map(params![domain, user, limit_param(limit)], document_at)?;
            rows.collect()
        })
        .await
    }

    async fn put_template(&self, template: StoredTemplate) -> Result<bool, StoreError> {
        self.run(move |conn| {
            let existed = conn
                .prepare_cached("SELECT 1 FROM guided_templates WHERE domain_id = ?1 AND id = ?2")
                .and_then(|mut s| s.exists(params![template.domain_id, template.id]))
                .map_err(unavailable)?;
            conn.prepare_cached(
                "INSERT INTO guided_templates (domain_id, id, spec, updated_at)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (domain_id, id) DO UPDATE SET
                   spec = excluded.spec, updated_at = excluded.updated_at",
            )
            .and_then(|mut s| {
                s.execute(params![
                    template.domain_id,
                    template.id,
                    template.spec,
                    to_ms(template.updated_at)
                ])
            })
            .map_err(unavailable)?;
            Ok(!existed)
        })
        .await
    }

    async fn stored_template(
        &self,
        domain_id: &str,
        id: &str,
    ) -> Result<Option<StoredTemplate>, StoreError> {
        let (domain, id) = (domain_id.to_owned(), id.to_owned());
        self.read(move |c| {
            c.prepare_cached(
                "SELECT domain_id, id, spec, updated_at FROM guided_templates
                 WHERE domain_id = ?1 AND id = ?2",
            )?
            .query_row(params![domain, id], template_at)
            .optional()
        })
        .await
    }

    async fn stored_templates(&self, domain_id: &str) -> Result<Vec<StoredTemplate>, StoreError> {
        let domain = domain_id.to_owned();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT domain_id, id, spec, updated_at FROM guided_templates
                 WHERE domain_id = ?1 ORDER BY id",
            )?;
            let rows = stmt.query_map(params![domain], template_at)?;
            rows.collect()
        })
        .await
    }

    async fn delete_template(&self, domain_id: &str, id: &str) -> Result<bool, StoreError> {
        let (domain, id) = (domain_id.to_owned(), id.to_owned());
        self.run(move |conn| {
            conn.prepare_cached("DELETE FROM guided_templates WHERE domain_id = ?1 AND id = ?2")
                .and_then(|mut s| s.execute(params![domain, id]))
                .map(|n| n > 0)
                .map_err(unavailable)
        })
        .await
    }

    async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let (name, holder) = (name.to_owned(), holder.to_owned());
        let ttl = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        self.run(move |conn| {
            let now = to_ms(Utc::now());
            // The update's condition leaves a lease held by another, unexpired, untouched:
            // then no row changes.
            conn.prepare_cached(
                "INSERT INTO leases (name, holder, expires_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET
                   holder = excluded.holder, expires_at = excluded.expires_at
                 WHERE leases.expires_at < ?4 OR leases.holder = excluded.holder",
            )
            .and_then(|mut s| s.execute(params![name, holder, now.saturating_add(ttl), now]))
            .map(|n| n > 0)
            .map_err(unavailable)
        })
        .await
    }
}
