//! The SQLite schema: the SQL files of `src/store/migrations/sqlite/`, applied at open by
//! `rusqlite_migration`, which counts the migrations that ran in `PRAGMA user_version`.
//!
//! Parlor has always counted them there, so every database it ever created is read as it
//! is: a database at version 5 gets migrations 6 and on. A database with a version above the
//! last migration here was written by a newer Parlor and is refused, untouched.

use rusqlite::Connection;
use rusqlite_migration::{M, Migrations, SchemaVersion};

use super::unavailable;
use crate::store::StoreError;

/// Schema migrations, applied in order; migration `n` (from 1) brings the database to
/// version `n`. A file, once released, never changes: add a new one.
const MIGRATIONS: &[M<'static>] = &[
    M::up(include_str!("../migrations/sqlite/0001_init.sql")),
    M::up(include_str!(
        "../migrations/sqlite/0002_compact_room_keys.sql"
    )),
    M::up(include_str!("../migrations/sqlite/0003_domain_admin.sql")),
    M::up(include_str!("../migrations/sqlite/0004_ai.sql")),
    M::up(include_str!("../migrations/sqlite/0005_handoff.sql")),
    M::up(include_str!("../migrations/sqlite/0006_accounts.sql")),
    M::up(include_str!(
        "../migrations/sqlite/0007_customer_context.sql"
    )),
    M::up(include_str!("../migrations/sqlite/0008_guided.sql")),
    M::up(include_str!("../migrations/sqlite/0009_notifications.sql")),
    M::up(include_str!("../migrations/sqlite/0010_visitors.sql")),
    M::up(include_str!("../migrations/sqlite/0011_stats.sql")),
    M::up(include_str!("../migrations/sqlite/0012_files.sql")),
    M::up(include_str!("../migrations/sqlite/0013_webhooks.sql")),
];

/// Brings the database to the latest version, in one transaction.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let migrations = Migrations::from_slice(MIGRATIONS);
    let current = migrations.current_version(conn).map_err(unavailable)?;
    if let SchemaVersion::Outside(newer) = current {
        return Err(StoreError::Unavailable(format!(
            "database schema version {newer} is newer than this Parlor ({}); upgrade Parlor",
            MIGRATIONS.len()
        )));
    }
    let from: usize = current.into();
    migrations
        .to_latest(conn)
        .map_err(|e| unavailable(format!("database migration failed: {e}")))?;
    if from < MIGRATIONS.len() {
        tracing::info!(from, to = MIGRATIONS.len(), "applied database migrations");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_migrations_are_valid() {
        Migrations::from_slice(MIGRATIONS)
            .validate()
            .expect("valid migrations");
    }
}
