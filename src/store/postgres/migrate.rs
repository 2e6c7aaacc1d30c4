//! The PostgreSQL schema: the SQL files of `src/store/migrations/postgres/`, compiled in and
//! applied at connect by sqlx's migrator, which records each in `_sqlx_migrations` (with a
//! checksum of its SQL).
//!
//! Databases migrated by Parlor's earlier runner record their versions in
//! `parlor_schema_migrations` instead. Such a database is adopted once, before the migrator
//! runs: its versions are written to `_sqlx_migrations` with the checksums of the files here
//! (the files have not changed since), and the old table is dropped, in one transaction.
//!
//! A database with a migration this Parlor does not know was written by a newer Parlor and is
//! refused, untouched. Everything happens under an advisory lock, so nodes starting together
//! migrate one after the other and each sees the other's work.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;

use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};
use sqlx_core::migrate::{
    Migrate, MigrateError, Migration, MigrationSource, MigrationType, Migrator,
};

use crate::store::StoreError;

/// Schema migrations as `(file name, SQL)`; the name gives the version and description, as
/// sqlx reads a migrations folder. A file, once released, never changes: add a new one.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_init.sql",
        include_str!("../migrations/postgres/0001_init.sql"),
    ),
    (
        "0002_accounts.sql",
        include_str!("../migrations/postgres/0002_accounts.sql"),
    ),
    (
        "0003_customer_context.sql",
        include_str!("../migrations/postgres/0003_customer_context.sql"),
    ),
    (
        "0004_guided.sql",
        include_str!("../migrations/postgres/0004_guided.sql"),
    ),
    (
        "0005_notifications.sql",
        include_str!("../migrations/postgres/0005_notifications.sql"),
    ),
    (
        "0006_visitors.sql",
        include_str!("../migrations/postgres/0006_visitors.sql"),
    ),
    (
        "0007_stats.sql",
        include_str!("../migrations/postgres/0007_stats.sql"),
    ),
    (
        "0008_files.sql",
        include_str!("../migrations/postgres/0008_files.sql"),
    ),
    (
        "0009_webhooks.sql",
        include_str!("../migrations/postgres/0009_webhooks.sql"),
    ),
];

/// Key of the advisory lock held while migrating, so nodes starting together migrate one
/// after the other ("parlor_m"). Parlor's earlier runner took the same lock, so a node of
/// each kind starting together cannot interleave either.
const MIGRATION_LOCK: i64 = 0x7061_726c_6f72_5f6d;

/// The migrations compiled into this binary, for sqlx's [`Migrator`].
#[derive(Debug)]
struct Embedded;

impl MigrationSource<'static> for Embedded {
    fn resolve(
        self,
    ) -> Pin<
        Box<
            dyn Future<Output = Result<Vec<Migration>, Box<dyn std::error::Error + Send + Sync>>>
                + Send,
        >,
    > {
        Box::pin(async { migrations().map_err(Into::into) })
    }
}

/// [`MIGRATIONS`] as sqlx's migrations: `0003_customer_context.sql` is version 3,
/// "customer context".
fn migrations() -> Result<Vec<Migration>, String> {
    MIGRATIONS
        .iter()
        .map(|(file, sql)| {
            let name = file.strip_suffix(".sql").unwrap_or(file);
            let (version, description) = name
                .split_once('_')
                .ok_or_else(|| format!("migration file {file} has no version"))?;
            let version: i64 = version
                .parse()
                .map_err(|_| format!("migration file {file} has no version"))?;
            Ok(Migration::new(
                version,
                Cow::Owned(description.replace('_', " ")),
                MigrationType::Simple,
                Cow::Borrowed(*sql),
                false,
            ))
        })
        .collect()
}

/// The newest version this Parlor knows: the last migration's number (numbers need not be
/// contiguous).
fn latest() -> i64 {
    MIGRATIONS
        .last()
        .and_then(|(file, _)| file.split_once('_'))
        .and_then(|(version, _)| version.parse().ok())
        .unwrap_or(i64::MAX)
}

fn newer(version: i64) -> StoreError {
    StoreError::Unavailable(format!(
        "database schema version {version} is newer than this Parlor ({}); upgrade Parlor",
        latest()
    ))
}

fn migration_failed(step: &str, e: &dyn std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("PostgreSQL migration failed ({step}): {e}"))
}

/// Applies the pending migrations under the advisory lock.
///
/// Boxed: sqlx's migrator is generic over the connection, and with its future inside an
/// unboxed `async fn`, the compiler could not prove `parlor::run`'s future `Send` for
/// `tokio::spawn` ("implementation of `Send` is not general enough").
pub(super) fn migrate(
    conn: &mut PgConnection,
) -> Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + '_>> {
    Box::pin(migrate_under_lock(conn))
}

async fn migrate_under_lock(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await
        .map_err(|e| migration_failed("lock", &e))?;
    let result = migrate_locked(conn).await;
    // Closing the connection would release the lock too; unlock so the order is plain.
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await;
    result
}

/// [`migrate`], once the lock is held.
async fn migrate_locked(conn: &mut PgConnection) -> Result<(), StoreError> {
    let migrator = Migrator::new(Embedded)
        .await
        .map_err(|e| migration_failed("embedded migrations", &e))?;
    adopt(conn, &migrator).await?;
    let before = applied(conn).await?;
    migrator.run_direct(&mut *conn).await.map_err(|e| match e {
        MigrateError::VersionMissing(version) => newer(version),
        e => migration_failed("migrate", &e),
    })?;
    let after = applied(conn).await?;
    if after > before {
        tracing::info!(from = before, to = after, "applied PostgreSQL migrations");
    }
    Ok(())
}

/// The newest version recorded in `_sqlx_migrations` (creating the table if needed).
async fn applied(conn: &mut PgConnection) -> Result<i64, StoreError> {
    conn.ensure_migrations_table()
        .await
        .map_err(|e| migration_failed("bookkeeping table", &e))?;
    Ok(conn
        .list_applied_migrations()
        .await
        .map_err(|e| migration_failed("read versions", &e))?
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0))
}

/// Moves the versions recorded by Parlor's earlier runner (`parlor_schema_migrations`) into
/// `_sqlx_migrations`, once; does nothing for a database without that table.
async fn adopt(conn: &mut PgConnection, migrator: &Migrator) -> Result<(), StoreError> {
    let exists: bool =
        sqlx::query_scalar("SELECT to_regclass('parlor_schema_migrations') IS NOT NULL")
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| migration_failed("find earlier versions", &e))?;
    if !exists {
        return Ok(());
    }
    let versions: Vec<i64> =
        sqlx::query("SELECT version FROM parlor_schema_migrations ORDER BY version")
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| migration_failed("read earlier versions", &e))?
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(|e| migration_failed("read earlier versions", &e))?;
    if let Some(&version) = versions.iter().find(|&&v| !migrator.version_exists(v)) {
        return Err(newer(version));
    }
    conn.ensure_migrations_table()
        .await
        .map_err(|e| migration_failed("bookkeeping table", &e))?;
    let adopted = async {
        let mut tx = conn.begin().await?;
        for migration in migrator.iter().filter(|m| versions.contains(&m.version)) {
            // execution_time -1: the migration ran under the earlier runner, untimed.
            sqlx::query(
                "INSERT INTO _sqlx_migrations (version, description, success, checksum,
                   execution_time)
                 VALUES ($1, $2, TRUE, $3, -1) ON CONFLICT (version) DO NOTHING",
            )
            .bind(migration.version)
            .bind(&*migration.description)
            .bind(&*migration.checksum)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("DROP TABLE parlor_schema_migrations")
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    };
    adopted
        .await
        .map_err(|e| migration_failed("adopt earlier versions", &e))?;
    tracing::info!(
        versions = ?versions,
        "recorded the earlier runner's PostgreSQL migrations in _sqlx_migrations"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_give_versions_in_order_and_descriptions() {
        let migrations = migrations().expect("migrations");
        let versions: Vec<i64> = migrations.iter().map(|m| m.version).collect();
        assert_eq!(versions, (1..=latest()).collect::<Vec<_>>());
        assert_eq!(migrations[2].description, "customer context");
    }
}
