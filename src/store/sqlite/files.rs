//! [`Files`] on SQLite: reads on the reader pool, writes as jobs of the writer thread.

use async_trait::async_trait;
use rusqlite::{OptionalExtension, params, params_from_iter};

use super::{SqliteStore, from_ms, limit_param, to_ms, unavailable};
use crate::store::StoreError;
use crate::store::files::{Files, StoredFile};

/// Columns matching [`file_at`].
const COLUMNS: &str =
    "id, domain_id, room_id, uploader_id, name, size, content_type, sha256, created_at";

/// A file from [`COLUMNS`].
fn file_at(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredFile> {
    let size: i64 = row.get(5)?;
    Ok(StoredFile {
        id: row.get(0)?,
        domain_id: row.get(1)?,
        room_id: row.get(2)?,
        uploader_id: row.get(3)?,
        name: row.get(4)?,
        size: u64::try_from(size).unwrap_or(0),
        content_type: row.get(6)?,
        sha256: row.get(7)?,
        created_at: from_ms(row.get(8)?),
    })
}

#[async_trait]
impl Files for SqliteStore {
    async fn add_file(&self, file: StoredFile) -> Result<(), StoreError> {
        let size = i64::try_from(file.size)
            .map_err(|_| StoreError::Invalid("the file is too large to record".into()))?;
        self.run(move |conn| {
            let added = conn
                .prepare_cached(
                    "INSERT INTO files (domain_id, id, room_id, uploader_id, name, size,
                       content_type, sha256, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                     ON CONFLICT (domain_id, id) DO NOTHING",
                )
                .and_then(|mut insert| {
                    insert.execute(params![
                        file.domain_id,
                        file.id,
                        file.room_id,
                        file.uploader_id,
                        file.name,
                        size,
                        file.content_type,
                        file.sha256,
                        to_ms(file.created_at)
                    ])
                })
                .map_err(unavailable)?;
            if added == 0 {
                return Err(StoreError::Invalid(format!(
                    "file {} is stored already",
                    file.id
                )));
            }
            Ok(())
        })
        .await
    }

    async fn file(&self, domain_id: &str, id: &str) -> Result<Option<StoredFile>, StoreError> {
        let (domain, id) = (domain_id.to_owned(), id.to_owned());
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM files WHERE domain_id = ?1 AND id = ?2"
            ))?
            .query_row(params![domain, id], file_at)
            .optional()
        })
        .await
    }

    async fn files(&self, domain_id: &str, ids: &[String]) -> Result<Vec<StoredFile>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut values = Vec::with_capacity(ids.len() + 1);
        values.push(domain_id.to_owned());
        values.extend(ids.iter().cloned());
        self.read(move |c| {
            let marks = (2..=values.len())
                .map(|i| format!("?{i}"))
                .collect::<Vec<_>>()
                .join(", ");
            c.prepare(&format!(
                "SELECT {COLUMNS} FROM files WHERE domain_id = ?1 AND id IN ({marks})"
            ))?
            .query_map(params_from_iter(values.iter()), file_at)?
            .collect()
        })
        .await
    }

    async fn room_files(
        &self,
        domain_id: &str,
        room_id: &str,
        limit: usize,
    ) -> Result<Vec<StoredFile>, StoreError> {
        let (domain, room) = (domain_id.to_owned(), room_id.to_owned());
        self.read(move |c| {
            c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM files WHERE domain_id = ?1 AND room_id = ?2
                 ORDER BY created_at, id LIMIT ?3"
            ))?
            .query_map(params![domain, room, limit_param(limit)], file_at)?
            .collect()
        })
        .await
    }

    async fn count_room_files(&self, domain_id: &str, room_id: &str) -> Result<u64, StoreError> {
        let (domain, room) = (domain_id.to_owned(), room_id.to_owned());
        let n: i64 = self
            .read(move |c| {
                c.prepare_cached(
                    "SELECT COUNT(*) FROM files WHERE domain_id = ?1 AND room_id = ?2",
                )?
                .query_row(params![domain, room], |row| row.get(0))
            })
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    async fn remove_file(&self, domain_id: &str, id: &str) -> Result<bool, StoreError> {
        let (domain, id) = (domain_id.to_owned(), id.to_owned());
        self.run(move |conn| {
            conn.prepare_cached("DELETE FROM files WHERE domain_id = ?1 AND id = ?2")
                .and_then(|mut delete| delete.execute(params![domain, id]))
                .map(|n| n > 0)
                .map_err(unavailable)
        })
        .await
    }
}
