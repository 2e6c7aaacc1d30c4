//! [`Files`] on PostgreSQL: each call is one statement on the pool.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::PgRow;

use super::{PostgresStore, count, from_ms, limit_param, refuse_nul, store_error, to_ms};
use crate::store::StoreError;
use crate::store::files::{Files, StoredFile};

/// Columns matching [`file_at`].
const COLUMNS: &str =
    "id, domain_id, room_id, uploader_id, name, size, content_type, sha256, created_at";

/// A file from [`COLUMNS`].
fn file_at(row: &PgRow) -> Result<StoredFile, StoreError> {
    let get = |e: sqlx::Error| store_error(e);
    Ok(StoredFile {
        id: row.try_get(0).map_err(get)?,
        domain_id: row.try_get(1).map_err(get)?,
        room_id: row.try_get(2).map_err(get)?,
        uploader_id: row.try_get(3).map_err(get)?,
        name: row.try_get(4).map_err(get)?,
        size: count(row.try_get(5).map_err(get)?),
        content_type: row.try_get(6).map_err(get)?,
        sha256: row.try_get(7).map_err(get)?,
        created_at: from_ms(row.try_get(8).map_err(get)?),
    })
}

#[async_trait]
impl Files for PostgresStore {
    async fn add_file(&self, file: StoredFile) -> Result<(), StoreError> {
        refuse_nul(&[
            &file.domain_id,
            &file.id,
            &file.room_id,
            &file.uploader_id,
            &file.name,
            &file.content_type,
            &file.sha256,
        ])?;
        let size = i64::try_from(file.size)
            .map_err(|_| StoreError::Invalid("the file is too large to record".into()))?;
        let added = self
            .read(
                "a file write",
                sqlx::query(
                    "INSERT INTO files (domain_id, id, room_id, uploader_id, name, size,
                       content_type, sha256, created_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                     ON CONFLICT (domain_id, id) DO NOTHING",
                )
                .bind(&file.domain_id)
                .bind(&file.id)
                .bind(&file.room_id)
                .bind(&file.uploader_id)
                .bind(&file.name)
                .bind(size)
                .bind(&file.content_type)
                .bind(&file.sha256)
                .bind(to_ms(file.created_at))
                .execute(&self.pool),
            )
            .await?
            .rows_affected();
        if added == 0 {
            return Err(StoreError::Invalid(format!(
                "file {} is stored already",
                file.id
            )));
        }
        Ok(())
    }

    async fn file(&self, domain_id: &str, id: &str) -> Result<Option<StoredFile>, StoreError> {
        let row = self
            .read(
                "a file",
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM files WHERE domain_id = $1 AND id = $2"
                ))
                .bind(domain_id)
                .bind(id)
                .fetch_optional(&self.pool),
            )
            .await?;
        row.as_ref().map(file_at).transpose()
    }

    async fn files(&self, domain_id: &str, ids: &[String]) -> Result<Vec<StoredFile>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows = self
            .read(
                "files",
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM files WHERE domain_id = $1 AND id = ANY($2)"
                ))
                .bind(domain_id)
                .bind(ids)
                .fetch_all(&self.pool),
            )
            .await?;
        rows.iter().map(file_at).collect()
    }

    async fn room_files(
        &self,
        domain_id: &str,
        room_id: &str,
        limit: usize,
    ) -> Result<Vec<StoredFile>, StoreError> {
        let rows = self
            .read(
                "a room's files",
                sqlx::query(&format!(
                    "SELECT {COLUMNS} FROM files WHERE domain_id = $1 AND room_id = $2
                     ORDER BY created_at, id LIMIT $3"
                ))
                .bind(domain_id)
                .bind(room_id)
                .bind(limit_param(limit))
                .fetch_all(&self.pool),
            )
            .await?;
        rows.iter().map(file_at).collect()
    }

    async fn count_room_files(&self, domain_id: &str, room_id: &str) -> Result<u64, StoreError> {
        let n: i64 = self
            .read(
                "a room's file count",
                sqlx::query_scalar(
                    "SELECT COUNT(*) FROM files WHERE domain_id = $1 AND room_id = $2",
                )
                .bind(domain_id)
                .bind(room_id)
                .fetch_one(&self.pool),
            )
            .await?;
        Ok(count(n))
    }

    async fn remove_file(&self, domain_id: &str, id: &str) -> Result<bool, StoreError> {
        let removed = self
            .read(
                "a file removal",
                sqlx::query("DELETE FROM files WHERE domain_id = $1 AND id = $2")
                    .bind(domain_id)
                    .bind(id)
                    .execute(&self.pool),
            )
            .await?
            .rows_affected();
        Ok(removed > 0)
    }
}
