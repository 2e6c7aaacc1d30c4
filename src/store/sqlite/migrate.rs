//! The SQLite schema: migrations applied in order at open, counted in `PRAGMA user_version`.

use rusqlite::Connection;

use super::unavailable;
use crate::store::StoreError;

/// Schema migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/sqlite/0001_init.sql"),
    include_str!("../migrations/sqlite/0002_compact_room_keys.sql"),
    include_str!("../migrations/sqlite/0003_domain_admin.sql"),
    include_str!("../migrations/sqlite/0004_ai.sql"),
    include_str!("../migrations/sqlite/0005_handoff.sql"),
    include_str!("../migrations/sqlite/0006_accounts.sql"),
    include_str!("../migrations/sqlite/0007_customer_context.sql"),
    include_str!("../migrations/sqlite/0008_guided.sql"),
];

pub(super) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let applied: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(unavailable)?;
    let applied = usize::try_from(applied).unwrap_or(0);
    if applied > MIGRATIONS.len() {
        return Err(StoreError::Unavailable(format!(
            "database schema version {applied} is newer than this Parlor ({}); upgrade Parlor",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(applied) {
        let tx = conn.transaction().map_err(unavailable)?;
        tx.execute_batch(sql)
            .map_err(|e| unavailable(format!("migration {}: {e}", i + 1)))?;
        tx.pragma_update(
            None,
            "user_version",
            i64::try_from(i + 1).unwrap_or(i64::MAX),
        )
        .map_err(unavailable)?;
        tx.commit().map_err(unavailable)?;
        tracing::info!(version = i + 1, "applied database migration");
    }
    Ok(())
}
