//! Faults injected at named places, for tests of what the node does when a part of it
//! breaks (a store writer that panics, a store that stalls). Debug builds only: in a
//! release build [`hit`] is an empty function and the variable is not read.
//!
//! `PARLOR_FAILPOINTS` lists `name=action` pairs separated by `;`:
//!
//! - `panic` — panic at every hit; `panic@N` — at the Nth hit only (counted from 1);
//! - `sleep:MS` — block the calling thread for MS milliseconds at every hit (at a place in
//!   a task, [`pause`]: the task waits, its thread goes on).
//!
//! Places: `sqlite-writer` and `postgres-writer` (before each group commit), `dispatcher`
//! (before each committed message is published), `observer` (a task: before each committed
//! message is observed).

/// Runs the fault configured for `name`, if any.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn hit(_name: &str) {}

/// Runs the fault configured for `name`, if any.
#[cfg(debug_assertions)]
pub fn hit(name: &str) {
    imp::hit(name);
}

/// [`hit`] for a place in an async task: a `sleep:MS` fault makes the task wait instead of
/// blocking its thread.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub async fn pause(_name: &str) {}

/// [`hit`] for a place in an async task: a `sleep:MS` fault makes the task wait instead of
/// blocking its thread.
#[cfg(debug_assertions)]
pub async fn pause(name: &str) {
    if let Some(d) = imp::fire(name) {
        tokio::time::sleep(d).await;
    }
}

#[cfg(debug_assertions)]
mod imp {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    #[derive(Debug)]
    enum Action {
        Panic(Option<u64>),
        Sleep(Duration),
    }

    #[derive(Debug)]
    struct Point {
        name: String,
        action: Action,
        hits: AtomicU64,
    }

    fn points() -> &'static [Point] {
        static POINTS: OnceLock<Vec<Point>> = OnceLock::new();
        POINTS.get_or_init(|| {
            std::env::var("PARLOR_FAILPOINTS")
                .map(|spec| parse(&spec))
                .unwrap_or_default()
        })
    }

    fn parse(spec: &str) -> Vec<Point> {
        spec.split(';')
            .filter(|s| !s.trim().is_empty())
            .map(|entry| {
                let (name, action) = entry
                    .split_once('=')
                    .unwrap_or_else(|| panic!("PARLOR_FAILPOINTS: `{entry}` is not name=action"));
                let action = if let Some(ms) = action.strip_prefix("sleep:") {
                    Action::Sleep(Duration::from_millis(ms.parse().unwrap_or_else(|_| {
                        panic!("PARLOR_FAILPOINTS: `{action}`: milliseconds expected")
                    })))
                } else if action == "panic" {
                    Action::Panic(None)
                } else if let Some(n) = action.strip_prefix("panic@") {
                    Action::Panic(Some(n.parse().unwrap_or_else(|_| {
                        panic!("PARLOR_FAILPOINTS: `{action}`: a hit number expected")
                    })))
                } else {
                    panic!("PARLOR_FAILPOINTS: unknown action `{action}`")
                };
                Point {
                    name: name.trim().to_owned(),
                    action,
                    hits: AtomicU64::new(0),
                }
            })
            .collect()
    }

    pub(super) fn hit(name: &str) {
        if let Some(d) = fire(name) {
            std::thread::sleep(d);
        }
    }

    /// Counts a hit of `name`, panics when a fault says so, and returns how long to sleep.
    pub(super) fn fire(name: &str) -> Option<Duration> {
        let mut sleep = None;
        for point in points().iter().filter(|p| p.name == name) {
            let n = point.hits.fetch_add(1, Ordering::Relaxed) + 1;
            match point.action {
                Action::Panic(None) => panic!("failpoint {name}"),
                Action::Panic(Some(at)) if at == n => panic!("failpoint {name} at hit {n}"),
                Action::Panic(Some(_)) => {}
                Action::Sleep(d) => sleep = Some(d),
            }
        }
        sleep
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn specs_parse() {
            let points = parse("a=panic@3; b=sleep:25;c=panic");
            assert!(matches!(points[0].action, Action::Panic(Some(3))));
            assert!(matches!(points[1].action, Action::Sleep(d) if d == Duration::from_millis(25)));
            assert_eq!(points[1].name, "b");
            assert!(matches!(points[2].action, Action::Panic(None)));
        }
    }
}
