//! Faults injected at named places, for tests of what the node does when a part of it
//! breaks (a store writer that panics, a store that stalls). Debug builds only: in a
//! release build [`hit`] is an empty function and the variable is not read.
//!
//! `PARLOR_FAILPOINTS` lists `name=action` pairs separated by `;`:
//!
//! - `panic` — panic at every hit; `panic@N` — at the Nth hit only (counted from 1);
//! - `sleep:MS` — block the calling thread for MS milliseconds at every hit (at a place in
//!   a task, [`pause`]: the task waits, its thread goes on);
//! - `skip@N` — at a place asked with [`skip`], leave out what it does at the Nth hit.
//!
//! Places: `sqlite-writer` and `postgres-writer` (before each group commit), `dispatcher`
//! (before each committed message is published), `observer` (a task: before each committed
//! message is observed), `hub-push` ([`skip`]: a stored message queued for one connection,
//! so that the connection receives the next one ahead of its position).

/// Runs the fault configured for `name`, if any.
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn hit(_name: &str) {}

/// Runs the fault configured for `name`, if any.
#[cfg(debug_assertions)]
pub fn hit(name: &str) {
    imp::hit(name);
}

/// Whether a `skip@N` fault leaves out this hit of `name` (always false in a release build).
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn skip(_name: &str) -> bool {
    false
}

/// Whether a `skip@N` fault leaves out this hit of `name` (always false in a release build).
#[cfg(debug_assertions)]
pub fn skip(name: &str) -> bool {
    imp::fire(name).skip
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
    if let Some(d) = imp::fire(name).sleep {
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
        Skip(u64),
    }

    /// What the faults at one hit of a place ask for.
    #[derive(Debug, Default)]
    pub(super) struct Fault {
        pub(super) sleep: Option<Duration>,
        pub(super) skip: bool,
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
                } else if let Some(n) = action.strip_prefix("skip@") {
                    Action::Skip(n.parse().unwrap_or_else(|_| {
                        panic!("PARLOR_FAILPOINTS: `{action}`: a hit number expected")
                    }))
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
        if let Some(d) = fire(name).sleep {
            std::thread::sleep(d);
        }
    }

    /// Counts a hit of `name`, panics when a fault says so, and returns what else the
    /// faults ask for.
    pub(super) fn fire(name: &str) -> Fault {
        let mut fault = Fault::default();
        for point in points().iter().filter(|p| p.name == name) {
            let n = point.hits.fetch_add(1, Ordering::Relaxed) + 1;
            match point.action {
                Action::Panic(None) => panic!("failpoint {name}"),
                Action::Panic(Some(at)) if at == n => panic!("failpoint {name} at hit {n}"),
                Action::Panic(Some(_)) => {}
                Action::Sleep(d) => fault.sleep = Some(d),
                Action::Skip(at) => fault.skip |= at == n,
            }
        }
        fault
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn specs_parse() {
            let points = parse("a=panic@3; b=sleep:25;c=panic;d=skip@2");
            assert!(matches!(points[0].action, Action::Panic(Some(3))));
            assert!(matches!(points[1].action, Action::Sleep(d) if d == Duration::from_millis(25)));
            assert_eq!(points[1].name, "b");
            assert!(matches!(points[2].action, Action::Panic(None)));
            assert!(matches!(points[3].action, Action::Skip(2)));
        }
    }
}
