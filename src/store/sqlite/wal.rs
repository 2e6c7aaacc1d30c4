//! The WAL checkpoint thread: copies the write-ahead log back into the database file so
//! commits never wait for it, and asks the writer to restart the log when it grows long.

use std::sync::atomic::{AtomicBool, Ordering};

use rusqlite::Connection;

/// How often the checkpoint thread copies the WAL back into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// WAL frames (pages) after which the log is restarted from its beginning.
const WAL_RESTART_FRAMES: i64 = 16_384;

/// Checkpoints the WAL until `stop` is dropped, then truncates it.
///
/// `PASSIVE` never blocks the writer or readers; it copies what it can and the next round
/// takes the rest. But SQLite only starts the WAL file over when a write transaction begins
/// with every frame already copied, which never happens while the writer keeps appending
/// behind this thread: under steady load the file would grow without end (measured: 637 MB
/// after 100,000 messages), and every page lookup walks its index. So when the log is longer
/// than `WAL_RESTART_FRAMES`, this thread raises `restart`; the writer then runs a `PASSIVE`
/// checkpoint itself between two batches, which copies only the frames written since this
/// thread's, and its next transaction rewinds the log.
pub(super) fn checkpoint_loop(
    conn: &Connection,
    stop: &std::sync::mpsc::Receiver<()>,
    restart: &AtomicBool,
) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY)
    {
        if let Some((log, _)) = checkpoint(conn, "PASSIVE")
            && log > WAL_RESTART_FRAMES
        {
            restart.store(true, Ordering::Relaxed);
        }
    }
    checkpoint(conn, "TRUNCATE");
}

/// Runs a checkpoint; returns the WAL's frames and how many of them are in the database.
pub(super) fn checkpoint(conn: &Connection, mode: &str) -> Option<(i64, i64)> {
    match conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    }) {
        Ok(frames) => Some(frames),
        Err(e) => {
            tracing::warn!(error = %e, mode, "WAL checkpoint failed");
            None
        }
    }
}
