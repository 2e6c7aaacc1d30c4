//! [`Guided`] on PostgreSQL: straight on the pool (a session's changes need no place in the
//! message writer's order), each multi-statement change in a transaction, every call under
//! the store's deadline.
//!
//! What several nodes could do at once is settled by the database: the unique index on the
//! in-progress session of a (domain, user, template) makes concurrent opens meet on one
//! row, and a change's `WHERE version = …` re-checked under the row's lock lets one of two
//! changes made from one read through and refuses the other.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::Row;
use sqlx::postgres::PgRow;

use super::{PostgresStore, count, from_ms, limit_param, refuse_nul, store_error, to_ms};
use crate::config::WebhookEvent;
use crate::store::StoreError;
use crate::store::guided::{
    GeneratedDocument, Guided, GuidedSession, NewDocument, NewSession, Pending, SessionQuery,
    SessionStatus, Speaker, Step, StoredTemplate, Turn,
};
use crate::store::webhooks::Partition;
use crate::store::webhooks::session_payload;

/// Columns matching [`session_at`].
const SESSION_COLUMNS: &str = "id, domain_id, user_id, template_id, status, template, \
     pending_id, pending_text, state, document_id, version, turn_count, created_at, \
     updated_at, completed_at";

/// Columns matching [`document_at`] but the content, which comes last.
const DOCUMENT_COLUMNS: &str =
    "id, domain_id, user_id, session_id, template_id, title, format, bytes, created_at";

/// How often an open retries when the session it met ended before it could be read.
const OPEN_ATTEMPTS: usize = 3;

/// A stored value the store cannot read as what it stands for.
fn corrupt(column: &str, why: String) -> sqlx::Error {
    sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source: why.into(),
    }
}

/// A session from [`SESSION_COLUMNS`], without its turns.
fn session_at(row: &PgRow) -> Result<GuidedSession, sqlx::Error> {
    let status: String = row.try_get(4)?;
    let status = SessionStatus::parse(&status)
        .ok_or_else(|| corrupt("status", format!("unknown session status {status:?}")))?;
    let pending_id: Option<String> = row.try_get(6)?;
    let pending_text: Option<String> = row.try_get(7)?;
    let turn_count: i32 = row.try_get(11)?;
    Ok(GuidedSession {
        id: row.try_get(0)?,
        domain_id: row.try_get(1)?,
        user_id: row.try_get(2)?,
        template_id: row.try_get(3)?,
        status,
        template: row.try_get(5)?,
        pending: pending_id.map(|id| Pending {
            id,
            text: pending_text.unwrap_or_default(),
        }),
        state: row.try_get(8)?,
        document_id: row.try_get(9)?,
        version: count(row.try_get(10)?),
        turn_count: u32::try_from(turn_count).unwrap_or(0),
        turns: Vec::new(),
        created_at: from_ms(row.try_get(12)?),
        updated_at: from_ms(row.try_get(13)?),
        completed_at: row.try_get::<Option<i64>, _>(14)?.map(from_ms),
    })
}

fn turn_at(row: &PgRow) -> Result<Turn, sqlx::Error> {
    let n: i32 = row.try_get(0)?;
    let speaker: String = row.try_get(1)?;
    Ok(Turn {
        n: u32::try_from(n).unwrap_or(0),
        speaker: Speaker::parse(&speaker)
            .ok_or_else(|| corrupt("speaker", format!("unknown speaker {speaker:?}")))?,
        question_id: row.try_get(2)?,
        text: row.try_get(3)?,
        at: from_ms(row.try_get(4)?),
    })
}

/// A document from [`DOCUMENT_COLUMNS`] followed by its content (or `NULL`).
fn document_at(row: &PgRow) -> Result<GeneratedDocument, sqlx::Error> {
    Ok(GeneratedDocument {
        id: row.try_get(0)?,
        domain_id: row.try_get(1)?,
        user_id: row.try_get(2)?,
        session_id: row.try_get(3)?,
        template_id: row.try_get(4)?,
        title: row.try_get(5)?,
        format: row.try_get(6)?,
        bytes: count(row.try_get(7)?),
        created_at: from_ms(row.try_get(8)?),
        content: row.try_get(9)?,
    })
}

fn template_at(row: &PgRow) -> Result<StoredTemplate, sqlx::Error> {
    Ok(StoredTemplate {
        domain_id: row.try_get(0)?,
        id: row.try_get(1)?,
        spec: row.try_get(2)?,
        updated_at: from_ms(row.try_get(3)?),
    })
}

/// Refuses text of `step` (and `document`) that PostgreSQL cannot store.
fn refuse_nul_in(step: &Step, document: Option<&NewDocument>) -> Result<(), StoreError> {
    let mut fields: Vec<&str> = vec![&step.state];
    for turn in &step.turns {
        fields.push(&turn.text);
        fields.extend(turn.question_id.as_deref());
    }
    if let Some(pending) = &step.pending {
        fields.extend([pending.id.as_str(), pending.text.as_str()]);
    }
    if let Some(document) = document {
        fields.extend([document.id.as_str(), &document.title, &document.format]);
        fields.extend(document.content.as_deref());
    }
    refuse_nul(&fields)
}

impl PostgresStore {
    /// `session` with its turns. Only the first `turn_count` are read: turns are appended,
    /// never rewritten, so those are the ones the session row counted, whatever a change
    /// committed since.
    async fn with_turns(&self, mut session: GuidedSession) -> Result<GuidedSession, StoreError> {
        let rows = self
            .read(
                "a guided session read",
                sqlx::query(
                    "SELECT n, speaker, question_id, text, at FROM guided_turns
                     WHERE session_id = $1 AND n <= $2 ORDER BY n",
                )
                .bind(&session.id)
                .bind(i32::try_from(session.turn_count).unwrap_or(i32::MAX))
                .fetch_all(&self.pool),
            )
            .await?;
        session.turns = rows
            .iter()
            .map(turn_at)
            .collect::<Result<_, _>>()
            .map_err(store_error)?;
        Ok(session)
    }

    /// Applies `step` to the in-progress session `id` at `version`, completing it with
    /// `document` when one is given: its new version, or `None` (nothing written) when the
    /// session is gone, complete or at another version.
    async fn apply_step(
        &self,
        id: &str,
        version: u64,
        step: Step,
        document: Option<NewDocument>,
    ) -> Result<Option<u64>, StoreError> {
        refuse_nul_in(&step, document.as_ref())?;
        let Ok(read_at) = i64::try_from(version) else {
            return Ok(None);
        };
        let now = to_ms(Utc::now());
        let added = i32::try_from(step.turns.len()).unwrap_or(i32::MAX);
        let (pending_id, pending_text) = match &step.pending {
            Some(p) => (Some(p.id.as_str()), Some(p.text.as_str())),
            None => (None, None),
        };
        self.read("a guided session change", async {
            let mut tx = self.pool.begin().await?;
            // Under the row's lock a concurrent change that committed first is seen, and its
            // version no longer matches.
            let changed: Option<(i32, String, String, String)> = match &document {
                None => {
                    sqlx::query_as(
                        "UPDATE guided_sessions SET version = version + 1,
                           turn_count = turn_count + $3, pending_id = $4, pending_text = $5,
                           state = $6, updated_at = $7
                         WHERE id = $1 AND status = 'in_progress' AND version = $2
                         RETURNING turn_count, domain_id, user_id, template_id",
                    )
                    .bind(id)
                    .bind(read_at)
                    .bind(added)
                    .bind(pending_id)
                    .bind(pending_text)
                    .bind(&step.state)
                    .bind(now)
                    .fetch_optional(&mut *tx)
                    .await?
                }
                Some(document) => {
                    sqlx::query_as(
                        "UPDATE guided_sessions SET version = version + 1,
                           turn_count = turn_count + $3, pending_id = NULL,
                           pending_text = NULL, state = $4, updated_at = $5,
                           status = 'complete', document_id = $6, completed_at = $5
                         WHERE id = $1 AND status = 'in_progress' AND version = $2
                         RETURNING turn_count, domain_id, user_id, template_id",
                    )
                    .bind(id)
                    .bind(read_at)
                    .bind(added)
                    .bind(&step.state)
                    .bind(now)
                    .bind(&document.id)
                    .fetch_optional(&mut *tx)
                    .await?
                }
            };
            let Some((turn_count, domain, user, template)) = changed else {
                tx.rollback().await?;
                return Ok(None);
            };
            if !step.turns.is_empty() {
                let speakers: Vec<&str> = step.turns.iter().map(|t| t.speaker.as_str()).collect();
                let questions: Vec<Option<&str>> = step
                    .turns
                    .iter()
                    .map(|t| t.question_id.as_deref())
                    .collect();
                let texts: Vec<&str> = step.turns.iter().map(|t| t.text.as_str()).collect();
                sqlx::query(
                    "INSERT INTO guided_turns (session_id, n, speaker, question_id, text, at)
                     SELECT $1, $2 + t.i, t.speaker, t.question_id, t.text, $6
                     FROM unnest($3::text[], $4::text[], $5::text[])
                       WITH ORDINALITY AS t (speaker, question_id, text, i)",
                )
                .bind(id)
                .bind(turn_count - added)
                .bind(&speakers)
                .bind(&questions)
                .bind(&texts)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            if let Some(document) = &document {
                let bytes = document.content.as_ref().map_or(0, String::len);
                sqlx::query(
                    "INSERT INTO generated_documents (id, domain_id, user_id, session_id,
                       template_id, title, format, content, bytes, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                     ON CONFLICT (domain_id, id) DO NOTHING",
                )
                .bind(&document.id)
                .bind(&domain)
                .bind(&user)
                .bind(id)
                .bind(&template)
                .bind(&document.title)
                .bind(&document.format)
                .bind(&document.content)
                .bind(i64::try_from(bytes).unwrap_or(i64::MAX))
                .bind(now)
                .execute(&mut *tx)
                .await?;
                let events = self.subscriptions.rows(
                    &domain,
                    WebhookEvent::SessionCompleted,
                    Partition::Session(id),
                    || session_payload(id, &user, &template, document, from_ms(now)),
                );
                super::webhooks::insert_outbox(&mut tx, &events).await?;
            }
            tx.commit().await?;
            Ok(Some(version + 1))
        })
        .await
    }
}

#[async_trait]
impl Guided for PostgresStore {
    async fn open_session(&self, new: NewSession) -> Result<(GuidedSession, bool), StoreError> {
        refuse_nul(&[
            &new.id,
            &new.domain_id,
            &new.user_id,
            &new.template_id,
            &new.template,
            &new.state,
        ])?;
        for _ in 0..OPEN_ATTEMPTS {
            // A concurrent open's uncommitted row makes this insert wait for it; once it
            // commits, the insert does nothing and the read below (a statement of its own,
            // so a snapshot taken after that commit) finds it.
            let created = self
                .read(
                    "a guided session write",
                    sqlx::query(&format!(
                        "INSERT INTO guided_sessions (id, domain_id, user_id, template_id,
                           status, template, state, version, turn_count, created_at,
                           updated_at)
                         VALUES ($1, $2, $3, $4, 'in_progress', $5, $6, 1, 0, $7, $7)
                         ON CONFLICT (domain_id, user_id, template_id)
                           WHERE status = 'in_progress' DO NOTHING
                         RETURNING {SESSION_COLUMNS}"
                    ))
                    .bind(&new.id)
                    .bind(&new.domain_id)
                    .bind(&new.user_id)
                    .bind(&new.template_id)
                    .bind(&new.template)
                    .bind(&new.state)
                    .bind(to_ms(Utc::now()))
                    .fetch_optional(&self.pool),
                )
                .await?;
            if let Some(row) = created {
                return Ok((session_at(&row).map_err(store_error)?, true));
            }
            let open = self
                .read(
                    "a guided session read",
                    sqlx::query(&format!(
                        "SELECT {SESSION_COLUMNS} FROM guided_sessions
                         WHERE domain_id = $1 AND user_id = $2 AND template_id = $3
                           AND status = 'in_progress'"
                    ))
                    .bind(&new.domain_id)
                    .bind(&new.user_id)
                    .bind(&new.template_id)
                    .fetch_optional(&self.pool),
                )
                .await?;
            // None: the session met was completed or removed in between; try again.
            if let Some(row) = open {
                let session = session_at(&row).map_err(store_error)?;
                return Ok((self.with_turns(session).await?, false));
            }
        }
        Err(StoreError::Unavailable(
            "the session kept ending while it was opened".into(),
        ))
    }

    async fn guided_session(&self, id: &str) -> Result<Option<GuidedSession>, StoreError> {
        let row = self
            .read(
                "a guided session read",
                sqlx::query(&format!(
                    "SELECT {SESSION_COLUMNS} FROM guided_sessions WHERE id = $1"
                ))
                .bind(id)
                .fetch_optional(&self.pool),
            )
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let session = session_at(&row).map_err(store_error)?;
        self.with_turns(session).await.map(Some)
    }

    async fn guided_sessions(&self, query: SessionQuery) -> Result<Vec<GuidedSession>, StoreError> {
        // Only the filters given are written into the statement, so the (domain, user,
        // updated) index serves a user's list; every parameter is bound either way, with
        // its type, so the numbering stays the same.
        let mut sql = format!("SELECT {SESSION_COLUMNS} FROM guided_sessions WHERE domain_id = $1");
        if query.user_id.is_some() {
            sql.push_str(" AND user_id = $2");
        }
        if query.template_id.is_some() {
            sql.push_str(" AND template_id = $3");
        }
        if query.status.is_some() {
            sql.push_str(" AND status = $4");
        }
        sql.push_str(" ORDER BY updated_at DESC, id COLLATE \"C\" DESC LIMIT $5");
        let rows = self
            .read(
                "a guided session read",
                sqlx::query(&sql)
                    .bind(&query.domain_id)
                    .bind(&query.user_id)
                    .bind(&query.template_id)
                    .bind(query.status.map(SessionStatus::as_str))
                    .bind(limit_param(query.limit))
                    .fetch_all(&self.pool),
            )
            .await?;
        rows.iter()
            .map(session_at)
            .collect::<Result<_, _>>()
            .map_err(store_error)
    }

    async fn advance_session(
        &self,
        id: &str,
        version: u64,
        step: Step,
    ) -> Result<Option<u64>, StoreError> {
        self.apply_step(id, version, step, None).await
    }

    async fn complete_session(
        &self,
        id: &str,
        version: u64,
        step: Step,
        document: NewDocument,
    ) -> Result<Option<u64>, StoreError> {
        self.apply_step(id, version, step, Some(document)).await
    }

    async fn delete_guided_session(&self, id: &str) -> Result<bool, StoreError> {
        // The turns go with the session (ON DELETE CASCADE); its document stays.
        let done = self
            .read(
                "a guided session removal",
                sqlx::query("DELETE FROM guided_sessions WHERE id = $1")
                    .bind(id)
                    .execute(&self.pool),
            )
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn expire_sessions(
        &self,
        before: DateTime<Utc>,
        completed_before: Option<DateTime<Utc>>,
    ) -> Result<u64, StoreError> {
        // One statement: turns go with their sessions (ON DELETE CASCADE), and a document
        // with the complete session that stored it (not with another that named the same
        // id). A complete session's last change is its completion, so `updated_at` is its
        // completion time here. `updated_at < NULL` holds for no row.
        let gone: i64 = self
            .read(
                "a guided session expiry",
                sqlx::query_scalar(
                    "WITH gone AS (
                       DELETE FROM guided_sessions
                       WHERE (status = 'in_progress' AND updated_at < $1)
                          OR (status = 'complete' AND updated_at < $2)
                       RETURNING id, document_id
                     ), documents AS (
                       DELETE FROM generated_documents d USING gone
                       WHERE d.id = gone.document_id AND d.session_id = gone.id
                     ), orphans AS (
                       DELETE FROM generated_documents d
                       WHERE d.created_at < $2
                         AND NOT EXISTS (SELECT 1 FROM guided_sessions s WHERE s.id = d.session_id)
                     )
                     SELECT count(*) FROM gone",
                )
                .bind(to_ms(before))
                .bind(completed_before.map(to_ms))
                .fetch_one(&self.pool),
            )
            .await?;
        Ok(count(gone))
    }

    async fn generated_document(
        &self,
        domain_id: &str,
        id: &str,
    ) -> Result<Option<GeneratedDocument>, StoreError> {
        let row = self
            .read(
                "a document read",
                sqlx::query(&format!(
                    "SELECT {DOCUMENT_COLUMNS}, content FROM generated_documents
                     WHERE domain_id = $1 AND id = $2"
                ))
                .bind(domain_id)
                .bind(id)
                .fetch_optional(&self.pool),
            )
            .await?;
        row.as_ref()
            .map(document_at)
            .transpose()
            .map_err(store_error)
    }

    async fn generated_documents(
        &self,
        domain_id: &str,
        user_id: &str,
        limit: usize,
    ) -> Result<Vec<GeneratedDocument>, StoreError> {
        let rows = self
            .read(
                "a document read",
                sqlx::query(&format!(
                    "SELECT {DOCUMENT_COLUMNS}, NULL::text FROM generated_documents
                     WHERE domain_id = $1 AND user_id = $2
                     ORDER BY created_at DESC, id COLLATE \"C\" DESC LIMIT $3"
                ))
                .bind(domain_id)
                .bind(user_id)
                .bind(limit_param(limit))
                .fetch_all(&self.pool),
            )
            .await?;
        rows.iter()
            .map(document_at)
            .collect::<Result<_, _>>()
            .map_err(store_error)
    }

    async fn put_template(&self, template: StoredTemplate) -> Result<bool, StoreError> {
        refuse_nul(&[&template.domain_id, &template.id, &template.spec])?;
        // `xmax` is 0 on a row version this statement inserted, and set on one it updated.
        self.read(
            "a template write",
            sqlx::query_scalar(
                "INSERT INTO guided_templates (domain_id, id, spec, updated_at)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (domain_id, id) DO UPDATE SET
                   spec = excluded.spec, updated_at = excluded.updated_at
                 RETURNING xmax = 0",
            )
            .bind(&template.domain_id)
            .bind(&template.id)
            .bind(&template.spec)
            .bind(to_ms(template.updated_at))
            .fetch_one(&self.pool),
        )
        .await
    }

    async fn stored_template(
        &self,
        domain_id: &str,
        id: &str,
    ) -> Result<Option<StoredTemplate>, StoreError> {
        let row = self
            .read(
                "a template read",
                sqlx::query(
                    "SELECT domain_id, id, spec, updated_at FROM guided_templates
                     WHERE domain_id = $1 AND id = $2",
                )
                .bind(domain_id)
                .bind(id)
                .fetch_optional(&self.pool),
            )
            .await?;
        row.as_ref()
            .map(template_at)
            .transpose()
            .map_err(store_error)
    }

    async fn stored_templates(&self, domain_id: &str) -> Result<Vec<StoredTemplate>, StoreError> {
        let rows = self
            .read(
                "a template read",
                sqlx::query(
                    "SELECT domain_id, id, spec, updated_at FROM guided_templates
                     WHERE domain_id = $1 ORDER BY id COLLATE \"C\"",
                )
                .bind(domain_id)
                .fetch_all(&self.pool),
            )
            .await?;
        rows.iter()
            .map(template_at)
            .collect::<Result<_, _>>()
            .map_err(store_error)
    }

    async fn delete_template(&self, domain_id: &str, id: &str) -> Result<bool, StoreError> {
        let done = self
            .read(
                "a template removal",
                sqlx::query("DELETE FROM guided_templates WHERE domain_id = $1 AND id = $2")
                    .bind(domain_id)
                    .bind(id)
                    .execute(&self.pool),
            )
            .await?;
        Ok(done.rows_affected() > 0)
    }

    async fn take_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        // Times on the database's clock, so nodes whose clocks disagree still agree on when
        // a lease ends. The update's condition leaves a lease held by another, unexpired,
        // untouched: then no row changes.
        let ttl = i64::try_from(ttl.as_millis())
            .unwrap_or(i64::MAX)
            .min(i64::MAX / 2);
        let done = self
            .read(
                "a lease write",
                sqlx::query(
                    "INSERT INTO leases (name, holder, expires_at)
                     VALUES ($1, $2, (extract(epoch FROM now()) * 1000)::bigint + $3)
                     ON CONFLICT (name) DO UPDATE SET
                       holder = excluded.holder, expires_at = excluded.expires_at
                     WHERE leases.expires_at < (extract(epoch FROM now()) * 1000)::bigint
                        OR leases.holder = excluded.holder",
                )
                .bind(name)
                .bind(holder)
                .bind(ttl)
                .execute(&self.pool),
            )
            .await?;
        Ok(done.rows_affected() > 0)
    }
}
