//! The PostgreSQL schema: migrations applied in order at connect, under an advisory lock.

use sqlx::postgres::PgConnection;
use sqlx::{Connection, Executor};

use super::to_ms;
use crate::model::now_ms;
use crate::store::StoreError;

/// Schema migrations, applied in order; the table `parlor_schema_migrations` records which
/// ran.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/postgres/0001_init.sql"),
    include_str!("../migrations/postgres/0002_accounts.sql"),
    include_str!("../migrations/postgres/0003_customer_context.sql"),
    include_str!("../migrations/postgres/0004_guided.sql"),
];

/// Key of the advisory lock held while migrating, so nodes starting together migrate one
/// after the other ("parlor_m").
const MIGRATION_LOCK: i64 = 0x7061_726c_6f72_5f6d;

/// Applies the pending migrations under an advisory lock, so that nodes starting together
/// migrate one after the other and each sees the other's work.
pub(super) async fn migrate(conn: &mut PgConnection) -> Result<(), StoreError> {
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

fn migration_failed(step: &str, e: &sqlx::Error) -> StoreError {
    StoreError::Unavailable(format!("PostgreSQL migration failed ({step}): {e}"))
}

/// [`migrate`], once the lock is held.
async fn migrate_locked(conn: &mut PgConnection) -> Result<(), StoreError> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS parlor_schema_migrations (
             version     BIGINT PRIMARY KEY,
             applied_at  BIGINT NOT NULL
         )",
    )
    .execute(&mut *conn)
    .await
    .map_err(|e| migration_failed("bookkeeping table", &e))?;
    let applied: i64 =
        sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM parlor_schema_migrations")
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| migration_failed("read version", &e))?;
    let applied = usize::try_from(applied).unwrap_or(0);
    if applied > MIGRATIONS.len() {
        return Err(StoreError::Unavailable(format!(
            "database schema version {applied} is newer than this Parlor ({}); upgrade Parlor",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let version = i64::try_from(i + 1).unwrap_or(i64::MAX);
        apply_migration(conn, version, sql)
            .await
            .map_err(|e| migration_failed(&format!("version {version}"), &e))?;
        tracing::info!(version, "applied PostgreSQL migration");
    }
    Ok(())
}

/// Runs one migration and records it, in one transaction.
async fn apply_migration(
    conn: &mut PgConnection,
    version: i64,
    sql: &'static str,
) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    // A string without arguments goes as a simple query, which may hold many statements.
    tx.execute(sql).await?;
    sqlx::query("INSERT INTO parlor_schema_migrations (version, applied_at) VALUES ($1, $2)")
        .bind(version)
        .bind(to_ms(now_ms()))
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}
