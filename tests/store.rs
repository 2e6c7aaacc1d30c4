//! The storage conformance suite: the one set of tests every [`Store`] implementation must
//! pass.
//!
//! Each story below is written once, against `&dyn Store` and the [`CommitSink`] receiver, with
//! no knowledge of the backend. [`conformance_suite!`] turns every story into a
//! `#[tokio::test]` inside a module named after a backend, so a run lists e.g.
//! `sqlite::concurrent_appends_to_one_room_get_gapless_seqs`, and
//! `cargo test --test store sqlite::` runs one backend only.
//!
//! Every test gets a database of its own and never shares state with another test.
//!
//! # Adding a backend
//!
//! 1. Implement [`TestDatabase`] for it: a fresh, empty database per value, and an `open` that
//!    can be called again after `close` to reopen the same data (the durability stories do).
//! 2. Write a factory `fn NAME() -> Option<Box<dyn TestDatabase>>` next to [`sqlite`]. It returns
//!    `None` only when the backend cannot run in this environment (for PostgreSQL: when
//!    `PARLOR_TEST_DATABASE_URL` is unset); the tests then pass without running, so CI must
//!    provide what the backend needs.
//! 3. Add one line `conformance_suite!(NAME);` at the place marked "Backends" below.
//!
//! A story that exposes a bug is not weakened: its entry in the story list gets an
//! `#[ignore = "bug: …"]` until the store is fixed.

#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use parlor::config::{DomainConfig, StoreConfig, WebhookConfig, WebhookEvent};
use parlor::model::{Author, Conversation, Message, NewMessage, RoomKey, RoomStatus, now_ms};
use parlor::store::accounts::{AccountRole, NewAccount};
use parlor::store::files::StoredFile;
use parlor::store::guided::{
    GeneratedDocument, GuidedSession, NewDocument, NewSession, NewTurn, Pending, SessionQuery,
    SessionStatus, Speaker, Step, StoredTemplate,
};
use parlor::store::notifications::{NewNotification, NotificationType, UnreadCount};
use parlor::store::postgres::PostgresStore;
use parlor::store::sqlite::SqliteStore;
use parlor::store::visitors::{Interval, Sighting};
use parlor::store::webhooks::{
    Attempt, Claim, ClaimedRow, DeliveryQuery, DeliveryStatus, Outcome, Partition,
};
use parlor::store::{
    Appended, CommitSink, CustomerProfile, Decide, InboxQuery, NewNote, Store, StoreError,
};
use serde_json::{Value, json};
use tokio::sync::mpsc::{self, UnboundedReceiver};

// ------------------------------------------------------------------------------------------
// Backends
// ------------------------------------------------------------------------------------------

conformance_suite!(sqlite);
conformance_suite!(sqlite_small_batches);
// PostgreSQL runs when PARLOR_TEST_DATABASE_URL names a server (any database on it that the
// user may connect to; every test creates and drops a database of its own).
conformance_suite!(postgres);
conformance_suite!(postgres_small_batches);

/// A future opening a store.
type Opening<'a> = Pin<Box<dyn Future<Output = Result<Arc<dyn Store>, StoreError>> + Send + 'a>>;

/// One test's private database.
trait TestDatabase: Send + Sync {
    /// Opens a store on this database, reporting commits to `sink`. Called again after
    /// `close` to reopen the same data.
    fn open(&self, sink: CommitSink) -> Opening<'_>;
}

/// A SQLite file in a temporary directory removed at the end of the test.
struct SqliteDatabase {
    dir: tempfile::TempDir,
    config: StoreConfig,
}

impl SqliteDatabase {
    fn boxed(config: StoreConfig) -> Option<Box<dyn TestDatabase>> {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        Some(Box::new(Self { dir, config }))
    }
}

impl TestDatabase for SqliteDatabase {
    fn open(&self, sink: CommitSink) -> Opening<'_> {
        let path = self.dir.path().join("parlor.db");
        Box::pin(async move {
            let store = SqliteStore::open(&path, &self.config, sink)?;
            Ok(Arc::new(store) as Arc<dyn Store>)
        })
    }
}

/// SQLite as configured by default (large group-commit batches).
fn sqlite() -> Option<Box<dyn TestDatabase>> {
    SqliteDatabase::boxed(StoreConfig::default())
}

/// SQLite with tiny batches and one pooled reader, so concurrent stories cross many batch
/// boundaries and readers contend.
fn sqlite_small_batches() -> Option<Box<dyn TestDatabase>> {
    SqliteDatabase::boxed(StoreConfig {
        max_batch: 2,
        read_pool: 1,
        ..StoreConfig::default()
    })
}

/// The PostgreSQL server the PostgreSQL stories use, from `PARLOR_TEST_DATABASE_URL`.
fn postgres_server() -> Option<String> {
    match std::env::var("PARLOR_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("skipped: set PARLOR_TEST_DATABASE_URL to run the PostgreSQL stories");
            None
        }
    }
}

/// `url` with its database (the path) replaced by `name`; the query string is kept.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let authority = base.find("://").map_or(0, |i| i + 3);
    let path = base[authority..]
        .find('/')
        .map_or(base.len(), |i| authority + i);
    let mut out = format!("{}/{name}", &base[..path]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// A database of its own on the test server: created on first open, dropped (with any
/// connection left to it) when the value is dropped, so tests run in parallel.
struct PostgresDatabase {
    /// The server, as `PARLOR_TEST_DATABASE_URL` names it.
    server: String,
    /// This test's database.
    name: String,
    config: StoreConfig,
    created: tokio::sync::OnceCell<()>,
}

impl PostgresDatabase {
    fn new(config: StoreConfig) -> Option<Self> {
        let server = postgres_server()?;
        Some(Self {
            server,
            name: format!("parlor_t_{}", uuid::Uuid::new_v4().simple()),
            config,
            created: tokio::sync::OnceCell::new(),
        })
    }

    fn boxed(config: StoreConfig) -> Option<Box<dyn TestDatabase>> {
        Some(Box::new(Self::new(config)?))
    }

    /// The URL of this test's database.
    fn url(&self) -> String {
        with_database(&self.server, &self.name)
    }

    async fn create(&self) {
        use sqlx::{Connection, Executor};
        self.created
            .get_or_init(|| async {
                let mut admin = sqlx::PgConnection::connect(&self.server)
                    .await
                    .expect("connect to PARLOR_TEST_DATABASE_URL");
                admin
                    .execute(&*format!("CREATE DATABASE {}", self.name))
                    .await
                    .expect("create the test database");
                admin.close().await.ok();
            })
            .await;
    }

    /// Opens a store on this database with `config` (another "node").
    async fn open_with(
        &self,
        config: &StoreConfig,
        sink: CommitSink,
    ) -> Result<PostgresStore, StoreError> {
        self.create().await;
        PostgresStore::open(&self.url(), config, sink).await
    }
}

impl TestDatabase for PostgresDatabase {
    fn open(&self, sink: CommitSink) -> Opening<'_> {
        Box::pin(async move {
            let store = self.open_with(&self.config, sink).await?;
            Ok(Arc::new(store) as Arc<dyn Store>)
        })
    }
}

impl Drop for PostgresDatabase {
    fn drop(&mut self) {
        if !self.created.initialized() {
            return;
        }
        let server = self.server.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime; the clean-up gets a runtime of its own.
        let dropped = std::thread::spawn(move || {
            use sqlx::{Connection, Executor};
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async {
                let mut admin = sqlx::PgConnection::connect(&server).await?;
                admin
                    .execute(&*format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await?;
                admin.close().await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}: {dropped:?}", self.name);
        }
    }
}

/// PostgreSQL as configured by default.
fn postgres() -> Option<Box<dyn TestDatabase>> {
    PostgresDatabase::boxed(StoreConfig::default())
}

/// PostgreSQL with tiny batches and a pool of two connections, so concurrent stories cross
/// many batch boundaries and reads wait for connections.
fn postgres_small_batches() -> Option<Box<dyn TestDatabase>> {
    PostgresDatabase::boxed(StoreConfig {
        max_batch: 2,
        postgres_pool: 2,
        ..StoreConfig::default()
    })
}

// ------------------------------------------------------------------------------------------
// The suite
// ------------------------------------------------------------------------------------------

/// Instantiates every story for one backend: `conformance_suite!(NAME)` needs a factory
/// `fn NAME() -> Option<Box<dyn TestDatabase>>` and creates `mod NAME` with one test per story.
/// `multi` stories run on the multi-threaded runtime because they test concurrency.
macro_rules! conformance_suite {
    ($backend:ident) => {
        conformance_suite!(@stories $backend;
            current append_numbers_each_room_from_one,
            current same_room_id_in_two_domains_is_two_rooms,
            current client_message_id_makes_append_idempotent,
            multi concurrent_duplicates_are_stored_once,
            multi concurrent_appends_to_one_room_get_gapless_seqs,
            multi concurrent_appends_across_rooms_stay_independent,
            current messages_after_pages_forward,
            current messages_before_returns_latest_page,
            current history_of_empty_and_unknown_rooms_is_empty,
            current last_seqs_of_many_rooms_come_in_one_call,
            current ensure_room_creates_once,
            current mark_read_only_moves_forward,
            current upserts_are_idempotent,
            current message_fields_round_trip,
            current messages_survive_reopen,
            multi close_finishes_queued_writes,
            current closed_store_refuses_writes,
            current append_works_without_commit_listener,
            multi failing_write_does_not_poison_neighbours,
            current
                accepted_data_reads_back,
            current domains_and_keys_round_trip,
            current transitions_are_stored_with_their_message,
            multi concurrent_transitions_are_decided_one_at_a_time,
            current inbox_lists_support_rooms_with_read_positions_and_notes,
            current inbox_searches_text_and_lists_one_visitors_rooms,
            current accounts_are_unique_per_domain_and_found_by_email,
            current invites_are_used_once_and_expire,
            current sessions_stand_for_their_accounts_until_they_end,
            multi failed_sign_ins_lock_an_address_for_a_while,
            multi guided_sessions_open_once_per_user_and_template,
            current guided_steps_append_turns_and_refuse_stale_versions,
            current guided_completion_stores_the_document,
            current guided_expiry_removes_only_what_is_due,
            current guided_templates_round_trip,
            current leases_go_to_one_holder_until_they_expire,
            current notifications_are_numbered_per_user_and_read_back,
            current marking_notifications_read_touches_only_the_users_own,
            multi concurrent_notifications_to_one_user_get_gapless_seqs,
            current notification_expiry_removes_only_what_is_due,
            current visitors_are_recorded_with_their_visits_and_last_page,
            current visitor_counts_and_series_match_the_sightings,
            multi concurrent_sightings_of_one_visitor_count_once,
            multi activity_counts_what_was_stored,
            current files_are_described_per_domain_and_room,
            current webhook_outbox_claims_in_order_with_leases,
            current webhook_claims_are_capped_per_url,
            current webhook_rows_behind_a_head_wait_until_it_ends,
            current webhook_events_of_notifications_visitors_and_sessions,
        );
    };
    (@stories $backend:ident; $($flavor:ident $(#[$attr:meta])* $story:ident),* $(,)?) => {
        mod $backend {
            $( crate::conformance_suite!(@test $flavor $backend $(#[$attr])* $story); )*
        }
    };
    (@test current $backend:ident $(#[$attr:meta])* $story:ident) => {
        #[tokio::test]
        $(#[$attr])*
        async fn $story() {
            super::run(super::$backend(), super::stories::$story).await;
        }
    };
    (@test multi $backend:ident $(#[$attr:meta])* $story:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        $(#[$attr])*
        async fn $story() {
            super::run(super::$backend(), super::stories::$story).await;
        }
    };
}
use conformance_suite;

/// What a story works with.
struct Ctx {
    /// The store under test.
    store: Arc<dyn Store>,
    /// Receives what the store reports to its [`CommitSink`].
    committed: UnboundedReceiver<Arc<Message>>,
    /// Where the data lives, for reopening.
    db: Box<dyn TestDatabase>,
}

impl Ctx {
    /// Closes the store and opens a new one on the same data, with a new commit receiver.
    async fn reopen(&mut self) {
        self.store.close().await;
        let (store, committed) = open(&*self.db).await;
        self.store = store;
        self.committed = committed;
    }
}

/// Longest a story may take; a hung store fails the test instead of hanging the run.
const STORY_TIMEOUT: Duration = Duration::from_secs(30);

async fn open(db: &dyn TestDatabase) -> (Arc<dyn Store>, UnboundedReceiver<Arc<Message>>) {
    let (sink, committed) = mpsc::unbounded_channel();
    let store = db.open(sink.into()).await.expect("open the store");
    (store, committed)
}

/// Runs one story on a fresh database of the backend, then closes the store.
async fn run(database: Option<Box<dyn TestDatabase>>, story: impl AsyncFnOnce(&mut Ctx)) {
    let Some(db) = database else {
        return;
    };
    let (store, committed) = open(&*db).await;
    let mut ctx = Ctx {
        store,
        committed,
        db,
    };
    tokio::time::timeout(STORY_TIMEOUT, story(&mut ctx))
        .await
        .expect("the story timed out: the store hung");
    ctx.store.close().await;
}

// ------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------

fn author(user_id: &str) -> Author {
    Author {
        user_id: user_id.to_owned(),
        name: format!("Name of {user_id}"),
        role: "visitor".to_owned(),
    }
}

/// A plain text message by `alice`, without a client message id.
fn text(key: &RoomKey, content: impl Into<String>) -> NewMessage {
    NewMessage {
        room: key.clone(),
        author: author("alice"),
        kind: "text".to_owned(),
        content: content.into(),
        data: None,
        client_message_id: None,
    }
}

/// A text message carrying a client message id.
fn keyed(key: &RoomKey, content: impl Into<String>, client_message_id: &str) -> NewMessage {
    NewMessage {
        client_message_id: Some(client_message_id.to_owned()),
        ..text(key, content)
    }
}

async fn append(store: &dyn Store, message: NewMessage) -> Appended {
    store.append(message).await.expect("append")
}

/// Appends `n` messages `"{prefix}{i}"`, `i` in `1..=n`, one after the other.
async fn append_n(store: &dyn Store, key: &RoomKey, prefix: &str, n: u64) -> Vec<Arc<Message>> {
    let mut out = Vec::new();
    for i in 1..=n {
        out.push(
            append(store, text(key, format!("{prefix}{i}")))
                .await
                .message,
        );
    }
    out
}

async fn after(store: &dyn Store, key: &RoomKey, after: u64, limit: usize) -> Vec<Message> {
    store
        .messages_after(key, after, limit)
        .await
        .expect("messages_after")
}

async fn before(store: &dyn Store, key: &RoomKey, before: u64, limit: usize) -> Vec<Message> {
    store
        .messages_before(key, before, limit)
        .await
        .expect("messages_before")
}

async fn last_seq(store: &dyn Store, key: &RoomKey) -> u64 {
    store
        .room(key)
        .await
        .expect("room")
        .unwrap_or_else(|| panic!("room {key} should exist"))
        .last_seq
}

fn seqs(messages: &[Message]) -> Vec<u64> {
    messages.iter().map(|m| m.seq).collect()
}

fn contents(messages: &[Message]) -> Vec<&str> {
    messages.iter().map(|m| m.content.as_str()).collect()
}

fn range(from: u64, to: u64) -> Vec<u64> {
    (from..=to).collect()
}

/// Waits for the next `n` messages reported to the commit sink.
async fn recv_committed(rx: &mut UnboundedReceiver<Arc<Message>>, n: usize) -> Vec<Arc<Message>> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(message)) => out.push(message),
            Ok(None) => panic!("commit sink closed after {} of {n} messages", out.len()),
            Err(_) => panic!("commit sink delivered only {} of {n} messages", out.len()),
        }
    }
    out
}

/// Checks that the commit sink reports nothing further (for a short while).
async fn assert_nothing_more_committed(rx: &mut UnboundedReceiver<Arc<Message>>) {
    if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_millis(50), rx.recv()).await {
        panic!("commit sink reported an unexpected message: {extra:?}");
    }
}

/// Everything the commit sink reports until it closes, which it must do once the store is
/// closed (the server's shutdown waits for that).
async fn drain_until_closed(rx: &mut UnboundedReceiver<Arc<Message>>) -> Vec<Arc<Message>> {
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            Ok(Some(message)) => out.push(message),
            Ok(None) => return out,
            Err(_) => panic!("commit sink still open 5 s after the store was closed"),
        }
    }
}

fn assert_closed<T: std::fmt::Debug>(result: &Result<T, StoreError>, operation: &str) {
    assert!(
        matches!(result, Err(StoreError::Closed)),
        "{operation} after close: expected Err(Closed), got {result:?}"
    );
}

/// A JSON value `depth` arrays deep.
fn nested(depth: usize) -> Value {
    let mut value = json!("bottom");
    for _ in 0..depth {
        value = Value::Array(vec![value]);
    }
    value
}

// ------------------------------------------------------------------------------------------
// Stories
// ------------------------------------------------------------------------------------------

/// A decision moving a room from the bot to `waiting`, declining otherwise.
fn waiting_decision() -> Decide {
    Arc::new(|current: &Conversation| {
        (current.status == RoomStatus::Bot).then(|| {
            let mut next = current.clone();
            next.status = RoomStatus::Waiting;
            next.waiting_since = Some(parlor::model::now_ms());
            let mut message = text(&current.room, "waiting for an agent");
            message.kind = "status".into();
            message.author.role = "system".into();
            (next, message)
        })
    })
}

mod stories {
    use super::*;

    fn new_account(id: &str, domain: &str, email: &str, role: AccountRole) -> NewAccount {
        NewAccount {
            id: id.into(),
            domain_id: domain.into(),
            email: email.into(),
            name: format!("Name of {id}"),
            role,
        }
    }

    /// An e-mail address has one account per domain at most, and is found in every domain;
    /// a password hash is kept and reported as set, never as part of an account.
    pub async fn accounts_are_unique_per_domain_and_found_by_email(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let ann = store
            .create_account(new_account(
                "a1",
                "shop",
                "ann@x.example",
                AccountRole::Agent,
            ))
            .await
            .expect("create")
            .expect("new");
        assert_eq!(
            (
                ann.domain_id.as_str(),
                ann.email.as_str(),
                ann.role,
                ann.has_password
            ),
            ("shop", "ann@x.example", AccountRole::Agent, false)
        );
        let again = store
            .create_account(new_account(
                "a2",
                "shop",
                "ann@x.example",
                AccountRole::Admin,
            ))
            .await
            .expect("create");
        assert_eq!(again, None, "one account per address and domain");
        store
            .create_account(new_account(
                "a3",
                "blog",
                "ann@x.example",
                AccountRole::Admin,
            ))
            .await
            .expect("create")
            .expect("another domain");
        store
            .create_account(new_account(
                "a4",
                "shop",
                "bob@x.example",
                AccountRole::Agent,
            ))
            .await
            .expect("create")
            .expect("new");
        let ids = |accounts: Vec<parlor::store::accounts::Account>| {
            accounts.into_iter().map(|a| a.id).collect::<Vec<_>>()
        };
        assert_eq!(
            ids(store.domain_accounts("shop").await.unwrap()),
            ["a1", "a4"]
        );
        assert_eq!(
            ids(store.domain_accounts("none").await.unwrap()),
            Vec::<String>::new()
        );
        let creds = store.credentials("ann@x.example").await.unwrap();
        assert_eq!(
            creds
                .iter()
                .map(|(a, h)| (a.id.as_str(), h.clone()))
                .collect::<Vec<_>>(),
            [("a1", None), ("a3", None)]
        );
        assert!(store.set_password("a1", "$argon2id$fake").await.unwrap());
        assert!(!store.set_password("nobody", "x").await.unwrap());
        let creds = store.credentials("ann@x.example").await.unwrap();
        assert_eq!(creds[0].1.as_deref(), Some("$argon2id$fake"));
        assert!(creds[0].0.has_password && !creds[1].0.has_password);
        assert_eq!(
            store.account("a3").await.unwrap().unwrap().role,
            AccountRole::Admin
        );
        assert!(store.delete_account("a3").await.unwrap());
        assert!(!store.delete_account("a3").await.unwrap());
        assert_eq!(store.account("a3").await.unwrap(), None);
        assert_eq!(store.credentials("nobody@x.example").await.unwrap(), vec![]);
    }

    /// An invite works once, not after it expires, and a new one voids the old.
    pub async fn invites_are_used_once_and_expire(ctx: &mut Ctx) {
        let store = &*ctx.store;
        store
            .create_account(new_account(
                "a1",
                "shop",
                "ann@x.example",
                AccountRole::Agent,
            ))
            .await
            .unwrap()
            .unwrap();
        let now = chrono::Utc::now();
        let later = now + chrono::Duration::days(7);
        store.replace_invite("a1", "h1", later).await.unwrap();
        store.replace_invite("a1", "h2", later).await.unwrap();
        assert_eq!(store.take_invite("h1", now).await.unwrap(), None, "voided");
        let taken = store.take_invite("h2", now).await.unwrap().expect("valid");
        assert_eq!(taken.id, "a1");
        assert_eq!(store.take_invite("h2", now).await.unwrap(), None, "used");
        store.replace_invite("a1", "h3", now).await.unwrap();
        assert_eq!(store.take_invite("h3", now).await.unwrap(), None, "expired");
        store.replace_invite("a1", "h4", later).await.unwrap();
        assert!(store.delete_account("a1").await.unwrap());
        assert_eq!(
            store.take_invite("h4", now).await.unwrap(),
            None,
            "account gone"
        );
    }

    /// A session stands for its accounts until it expires or ends, or loses its last
    /// account.
    pub async fn sessions_stand_for_their_accounts_until_they_end(ctx: &mut Ctx) {
        let store = &*ctx.store;
        for (id, domain) in [("a1", "shop"), ("a2", "blog")] {
            store
                .create_account(new_account(id, domain, "ann@x.example", AccountRole::Agent))
                .await
                .unwrap()
                .unwrap();
        }
        let now = chrono::Utc::now();
        let ends = now + chrono::Duration::days(7);
        let both = ["a1".to_owned(), "a2".to_owned()];
        store
            .create_session("s1", "ann@x.example", &both, ends)
            .await
            .unwrap();
        store
            .create_session("s2", "ann@x.example", &both[..1], ends)
            .await
            .unwrap();
        let s = store.session("s1", now).await.unwrap().expect("live");
        assert_eq!(s.email, "ann@x.example");
        assert_eq!(
            s.accounts.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
            ["a1", "a2"]
        );
        assert_eq!(
            store
                .session("s1", ends + chrono::Duration::seconds(1))
                .await
                .unwrap(),
            None,
            "expired"
        );
        assert_eq!(store.session("nope", now).await.unwrap(), None);
        // Removing an account leaves the sessions of the others; one left with none ends.
        assert!(store.delete_account("a1").await.unwrap());
        let s = store.session("s1", now).await.unwrap().expect("still a2");
        assert_eq!(s.accounts.len(), 1);
        assert_eq!(store.session("s2", now).await.unwrap(), None);
        store
            .create_session("s3", "ann@x.example", &both[1..], ends)
            .await
            .unwrap();
        assert_eq!(store.delete_sessions_of("a2").await.unwrap(), 2);
        assert_eq!(store.session("s1", now).await.unwrap(), None);
        assert_eq!(store.session("s3", now).await.unwrap(), None);
        store
            .create_session("s4", "ann@x.example", &both[1..], ends)
            .await
            .unwrap();
        store.delete_session("s4").await.unwrap();
        assert_eq!(store.session("s4", now).await.unwrap(), None);
    }

    /// The fifth failure within the window locks the address, even when failures come at
    /// once; a success forgets them.
    pub async fn failed_sign_ins_lock_an_address_for_a_while(ctx: &mut Ctx) {
        let store = Arc::clone(&ctx.store);
        let now = chrono::Utc::now();
        let window = chrono::Duration::minutes(15);
        let tries: Vec<_> = (0..4)
            .map(|_| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    store
                        .sign_in_failed("eve@x.example", now, window, 5, window)
                        .await
                        .unwrap()
                })
            })
            .collect();
        for t in tries {
            assert_eq!(t.await.unwrap(), None);
        }
        assert_eq!(
            store.sign_in_lock("eve@x.example", now).await.unwrap(),
            None
        );
        let locked = store
            .sign_in_failed("eve@x.example", now, window, 5, window)
            .await
            .unwrap()
            .expect("the fifth locks");
        assert_eq!(locked.timestamp_millis(), (now + window).timestamp_millis());
        assert_eq!(
            store
                .sign_in_lock("eve@x.example", now)
                .await
                .unwrap()
                .map(|l| l.timestamp_millis()),
            Some(locked.timestamp_millis())
        );
        assert_eq!(
            store
                .sign_in_lock("eve@x.example", now + window)
                .await
                .unwrap(),
            None,
            "over"
        );
        assert_eq!(
            store.sign_in_lock("other@x.example", now).await.unwrap(),
            None
        );
        store.sign_in_succeeded("eve@x.example").await.unwrap();
        assert_eq!(
            store
                .sign_in_failed("eve@x.example", now, window, 5, window)
                .await
                .unwrap(),
            None,
            "counting starts over"
        );
    }

    const SHOP: &str = "shop";

    /// A session of `user` on `template` in the shop, with an empty guide state.
    fn new_session(id: &str, user: &str, template: &str) -> NewSession {
        NewSession {
            id: id.into(),
            domain_id: SHOP.into(),
            user_id: user.into(),
            template_id: template.into(),
            template: json!({ "id": template, "questions": ["name", "date"] }).to_string(),
            state: "{}".into(),
        }
    }

    fn turn(speaker: Speaker, question_id: Option<&str>, text: &str) -> NewTurn {
        NewTurn {
            speaker,
            question_id: question_id.map(str::to_owned),
            text: text.into(),
        }
    }

    /// A question and its answer.
    fn answered(question: &str, asked: &str, answer: &str) -> Vec<NewTurn> {
        vec![
            turn(Speaker::Assistant, Some(question), asked),
            turn(Speaker::User, Some(question), answer),
        ]
    }

    fn step(turns: Vec<NewTurn>, pending: Option<(&str, &str)>, state: &Value) -> Step {
        Step {
            turns,
            pending: pending.map(|(id, text)| Pending {
                id: id.into(),
                text: text.into(),
            }),
            state: state.to_string(),
        }
    }

    fn document(id: &str, content: Option<&str>) -> NewDocument {
        NewDocument {
            id: id.into(),
            title: format!("Title of {id}"),
            format: "markdown".into(),
            content: content.map(str::to_owned),
        }
    }

    async fn session(store: &dyn Store, id: &str) -> GuidedSession {
        store
            .guided_session(id)
            .await
            .expect("read")
            .unwrap_or_else(|| panic!("session {id} should exist"))
    }

    /// The (speaker, question, text) of a session's turns, and whether they count 1, 2, 3…
    fn said(session: &GuidedSession) -> Vec<(Speaker, Option<&str>, &str)> {
        let numbers: Vec<u32> = session.turns.iter().map(|t| t.n).collect();
        assert_eq!(numbers, (1..=session.turn_count).collect::<Vec<_>>());
        session
            .turns
            .iter()
            .map(|t| (t.speaker, t.question_id.as_deref(), t.text.as_str()))
            .collect()
    }

    fn sessions_query(user: Option<&str>) -> SessionQuery {
        SessionQuery {
            domain_id: SHOP.into(),
            user_id: user.map(str::to_owned),
            template_id: None,
            status: None,
            limit: 100,
        }
    }

    /// A user has one session in progress per template: opening again returns it, even when
    /// many open at once; another user, template or domain gets a session of its own.
    pub async fn guided_sessions_open_once_per_user_and_template(ctx: &mut Ctx) {
        let store = Arc::clone(&ctx.store);
        let (opened, created) = store
            .open_session(new_session("s1", "ann", "intake"))
            .await
            .expect("open");
        assert!(created);
        assert_eq!(
            (
                opened.id.as_str(),
                opened.domain_id.as_str(),
                opened.user_id.as_str(),
                opened.template_id.as_str(),
                opened.status,
                opened.state.as_str(),
                opened.turn_count,
            ),
            (
                "s1",
                SHOP,
                "ann",
                "intake",
                SessionStatus::InProgress,
                "{}",
                0
            )
        );
        assert_eq!(opened.template, new_session("s1", "ann", "intake").template);
        assert_eq!(
            (opened.pending.clone(), opened.document_id.clone()),
            (None, None)
        );
        assert_eq!((opened.turns.len(), opened.completed_at), (0, None));
        assert_eq!(opened.created_at, opened.updated_at);
        assert_eq!(session(&*store, "s1").await, opened);

        let (again, created) = store
            .open_session(new_session("s2", "ann", "intake"))
            .await
            .expect("open again");
        assert!(!created);
        assert_eq!(again, opened, "the session in progress, unchanged");
        assert_eq!(store.guided_session("s2").await.expect("read"), None);

        for (id, user, template, domain) in [
            ("s3", "ann", "claim", SHOP),
            ("s4", "bob", "intake", SHOP),
            ("s5", "ann", "intake", "blog"),
        ] {
            let new = NewSession {
                domain_id: domain.into(),
                ..new_session(id, user, template)
            };
            let (other, created) = store.open_session(new).await.expect("open");
            assert!(created, "{id} is a session of its own");
            assert_eq!(other.id, id);
        }

        // Many opens at once: one session, created by one of them, returned to all.
        let tasks: Vec<_> = (0..12)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    store
                        .open_session(new_session(&format!("race-{i}"), "cat", "intake"))
                        .await
                        .expect("open")
                })
            })
            .collect();
        let mut ids = HashSet::new();
        let mut creators = 0;
        for task in tasks {
            let (session, created) = task.await.expect("task");
            ids.insert(session.id);
            creators += usize::from(created);
        }
        assert_eq!((ids.len(), creators), (1, 1));
        let listed = store
            .guided_sessions(sessions_query(Some("cat")))
            .await
            .expect("list");
        assert_eq!(
            listed.into_iter().map(|s| s.id).collect::<HashSet<_>>(),
            ids
        );
    }

    /// A step appends its turns after the existing ones and sets what the session waits
    /// on, if the session is still at the version it names; a step from a stale read writes
    /// nothing. Sessions list newest change first, without turns, and survive a reopen.
    pub async fn guided_steps_append_turns_and_refuse_stale_versions(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let (opened, _) = store
            .open_session(new_session("s1", "ann", "intake"))
            .await
            .expect("open");
        let v = opened.version;
        let first = step(
            answered("name", "Your name?", "Ann"),
            Some(("date", "When?")),
            &json!({ "asked": 2 }),
        );
        assert_eq!(
            store
                .advance_session("s1", v, first.clone())
                .await
                .expect("advance"),
            Some(v + 1)
        );
        let stale = step(
            vec![turn(Speaker::User, Some("name"), "Someone else")],
            None,
            &json!({ "stale": true }),
        );
        assert_eq!(
            store.advance_session("s1", v, stale).await.expect("stale"),
            None,
            "a stale version is refused"
        );
        let read = session(store, "s1").await;
        assert_eq!((read.version, read.turn_count), (v + 1, 2));
        assert_eq!(
            said(&read),
            [
                (Speaker::Assistant, Some("name"), "Your name?"),
                (Speaker::User, Some("name"), "Ann")
            ]
        );
        assert_eq!(
            read.pending,
            Some(Pending {
                id: "date".into(),
                text: "When?".into()
            })
        );
        assert_eq!(read.state, json!({ "asked": 2 }).to_string());
        assert!(read.updated_at >= read.created_at);

        // A turn without a question, then a step that only changes the state.
        let note = step(
            vec![turn(Speaker::Assistant, None, "Thanks, Ann.")],
            None,
            &json!({ "asked": 3 }),
        );
        assert_eq!(
            store.advance_session("s1", v + 1, note).await.unwrap(),
            Some(v + 2)
        );
        assert_eq!(
            store
                .advance_session("s1", v + 2, step(vec![], None, &json!({ "ai": "waiting" })))
                .await
                .unwrap(),
            Some(v + 3)
        );
        assert_eq!(
            store
                .advance_session("nope", 1, first.clone())
                .await
                .unwrap(),
            None
        );
        let read = session(store, "s1").await;
        assert_eq!(
            (read.version, read.turn_count, read.pending.clone()),
            (v + 3, 3, None)
        );
        assert_eq!(said(&read)[2], (Speaker::Assistant, None, "Thanks, Ann."));
        assert_eq!(read.state, json!({ "ai": "waiting" }).to_string());
        let (reopened, created) = store
            .open_session(new_session("s9", "ann", "intake"))
            .await
            .unwrap();
        assert!(!created);
        assert_eq!(
            reopened, read,
            "opening again returns the session with its turns"
        );

        // Lists: newest change first, without turns, filtered, limited.
        store
            .open_session(new_session("s2", "ann", "claim"))
            .await
            .unwrap();
        store
            .open_session(new_session("s3", "bob", "intake"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(
            store.advance_session("s1", v + 3, first).await.unwrap(),
            Some(v + 4)
        );
        let ids = |sessions: Vec<GuidedSession>| {
            assert!(
                sessions.iter().all(|s| s.turns.is_empty()),
                "lists hold no turns"
            );
            sessions.into_iter().map(|s| s.id).collect::<Vec<_>>()
        };
        let all = ids(store.guided_sessions(sessions_query(None)).await.unwrap());
        assert_eq!(all.len(), 3);
        assert_eq!(all[0], "s1", "the latest change first");
        assert_eq!(
            ids(store
                .guided_sessions(sessions_query(Some("ann")))
                .await
                .unwrap())
            .into_iter()
            .collect::<HashSet<_>>(),
            HashSet::from(["s1".to_owned(), "s2".to_owned()])
        );
        let mut query = sessions_query(None);
        query.template_id = Some("intake".into());
        query.limit = 1;
        assert_eq!(
            ids(store.guided_sessions(query.clone()).await.unwrap()),
            ["s1"]
        );
        query.status = Some(SessionStatus::Complete);
        assert_eq!(
            ids(store.guided_sessions(query).await.unwrap()),
            Vec::<String>::new()
        );
        let listed = store
            .guided_sessions(sessions_query(Some("ann")))
            .await
            .unwrap();
        let listed_s1 = listed.iter().find(|s| s.id == "s1").expect("listed");
        let read = session(store, "s1").await;
        assert_eq!(
            *listed_s1,
            GuidedSession {
                turns: vec![],
                ..read.clone()
            }
        );
        let elsewhere = SessionQuery {
            domain_id: "blog".into(),
            ..sessions_query(None)
        };
        assert_eq!(
            ids(store.guided_sessions(elsewhere).await.unwrap()),
            Vec::<String>::new()
        );

        ctx.reopen().await;
        assert_eq!(
            session(&*ctx.store, "s1").await,
            read,
            "kept across a reopen"
        );
        assert_eq!(
            ctx.store
                .advance_session("s1", read.version, step(vec![], None, &json!({})))
                .await
                .unwrap(),
            Some(read.version + 1),
            "and changed from where it was"
        );
    }

    /// Completion stores the last turns, the document and the session's end in one step;
    /// the document reads back whole, lists without its text, and outlives the session's
    /// removal; the user can then start the template again.
    pub async fn guided_completion_stores_the_document(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let (opened, _) = store
            .open_session(new_session("s1", "ann", "intake"))
            .await
            .unwrap();
        let v = opened.version;
        store
            .advance_session(
                "s1",
                v,
                step(vec![], Some(("name", "Your name?")), &json!({})),
            )
            .await
            .unwrap()
            .expect("advanced");
        let last = step(
            answered("name", "Your name?", "Ann"),
            Some(("ignored", "ignored")),
            &json!({ "done": true }),
        );
        assert_eq!(
            store
                .complete_session("s1", v, last.clone(), document("d1", Some("# Ann")))
                .await
                .unwrap(),
            None,
            "a stale version completes nothing"
        );
        assert_eq!(store.generated_document(SHOP, "d1").await.unwrap(), None);
        assert_eq!(
            store
                .complete_session("s1", v + 1, last.clone(), document("d1", Some("# Ann")))
                .await
                .unwrap(),
            Some(v + 2)
        );
        let done = session(store, "s1").await;
        assert_eq!(done.status, SessionStatus::Complete);
        assert_eq!(done.document_id.as_deref(), Some("d1"));
        assert_eq!((done.pending.clone(), done.version), (None, v + 2));
        assert_eq!(done.completed_at, Some(done.updated_at));
        assert_eq!(said(&done).len(), 2);
        assert_eq!(done.state, json!({ "done": true }).to_string());
        assert_eq!(
            store
                .advance_session("s1", v + 2, step(vec![], None, &json!({})))
                .await
                .unwrap(),
            None,
            "a complete session takes no more steps"
        );
        assert_eq!(
            store
                .complete_session("s1", v + 2, last.clone(), document("d2", Some("x")))
                .await
                .unwrap(),
            None
        );
        assert_eq!(store.generated_document(SHOP, "d2").await.unwrap(), None);

        let stored = store
            .generated_document(SHOP, "d1")
            .await
            .unwrap()
            .expect("stored");
        assert_eq!(
            stored,
            GeneratedDocument {
                id: "d1".into(),
                domain_id: SHOP.into(),
                user_id: "ann".into(),
                session_id: "s1".into(),
                template_id: "intake".into(),
                title: "Title of d1".into(),
                format: "markdown".into(),
                content: Some("# Ann".into()),
                bytes: 5,
                created_at: stored.created_at,
            }
        );
        assert_eq!(stored.created_at, done.updated_at);
        assert_eq!(
            store.generated_documents(SHOP, "ann", 10).await.unwrap(),
            [GeneratedDocument {
                content: None,
                ..stored.clone()
            }]
        );
        assert!(
            store
                .generated_documents(SHOP, "bob", 10)
                .await
                .unwrap()
                .is_empty()
        );

        // The template again: a new session. This one ends in a document the AI service
        // keeps, then a third names the first document again, which stays as it was.
        let (second, created) = store
            .open_session(new_session("s2", "ann", "intake"))
            .await
            .unwrap();
        assert!(created && second.id == "s2");
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(
            store
                .complete_session("s2", second.version, last.clone(), document("ext-1", None))
                .await
                .unwrap(),
            Some(second.version + 1)
        );
        let external = store
            .generated_document(SHOP, "ext-1")
            .await
            .unwrap()
            .expect("stored");
        assert_eq!((external.content, external.bytes), (None, 0));
        let (third, _) = store
            .open_session(new_session("s3", "ann", "intake"))
            .await
            .unwrap();
        assert!(
            store
                .complete_session("s3", third.version, last, document("d1", Some("other")))
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(
            session(store, "s3").await.document_id.as_deref(),
            Some("d1")
        );
        assert_eq!(
            store.generated_document(SHOP, "d1").await.unwrap(),
            Some(stored.clone()),
            "the first document of an id is kept"
        );
        // Another domain's service may use the same id: ids are per domain.
        let elsewhere = NewSession {
            domain_id: "elsewhere".into(),
            ..new_session("s4", "ann", "intake")
        };
        let (fourth, _) = store.open_session(elsewhere).await.unwrap();
        let theirs = vec![turn(Speaker::User, None, "theirs")];
        assert!(
            store
                .complete_session(
                    "s4",
                    fourth.version,
                    step(theirs, None, &json!({})),
                    document("d1", Some("theirs"))
                )
                .await
                .unwrap()
                .is_some()
        );
        let other = store
            .generated_document("elsewhere", "d1")
            .await
            .unwrap()
            .expect("the other domain's document");
        assert_eq!(
            (other.content.as_deref(), other.session_id.as_str()),
            (Some("theirs"), "s4")
        );
        assert_eq!(
            store.generated_document(SHOP, "d1").await.unwrap(),
            Some(stored.clone()),
            "each domain reads its own"
        );
        let listed = store.generated_documents(SHOP, "ann", 10).await.unwrap();
        assert_eq!(
            listed.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
            ["ext-1", "d1"],
            "newest first"
        );
        assert!(listed.iter().all(|d| d.content.is_none()));
        assert_eq!(
            store
                .generated_documents(SHOP, "ann", 1)
                .await
                .unwrap()
                .len(),
            1
        );

        // Removing a session takes its turns and leaves its document.
        assert!(store.delete_guided_session("s1").await.unwrap());
        assert!(!store.delete_guided_session("s1").await.unwrap());
        assert_eq!(store.guided_session("s1").await.unwrap(), None);
        assert!(
            store
                .generated_document(SHOP, "d1")
                .await
                .unwrap()
                .is_some()
        );
        let (reused, created) = store
            .open_session(new_session("s1", "ann", "intake"))
            .await
            .unwrap();
        assert!(created && reused.turns.is_empty());
        let one = vec![turn(Speaker::User, None, "fresh")];
        store
            .advance_session("s1", reused.version, step(one, None, &json!({})))
            .await
            .unwrap()
            .expect("numbered from 1 again: the old turns went");
        assert_eq!(
            said(&session(store, "s1").await),
            [(Speaker::User, None, "fresh")]
        );
    }

    /// Expiry removes in-progress sessions untouched since the cut-off with their turns,
    /// and complete ones with their documents only when asked to; everything newer stays.
    pub async fn guided_expiry_removes_only_what_is_due(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let open = async |id: &str, user: &str| {
            store
                .open_session(new_session(id, user, "intake"))
                .await
                .unwrap()
                .0
        };
        let stale = open("stale", "ann").await;
        store
            .advance_session(
                "stale",
                stale.version,
                step(answered("q", "Q?", "A"), None, &json!({})),
            )
            .await
            .unwrap()
            .expect("advanced");
        let done = open("done", "bob").await;
        store
            .complete_session(
                "done",
                done.version,
                step(vec![], None, &json!({})),
                document("doc-done", Some("x")),
            )
            .await
            .unwrap()
            .expect("completed");
        // A complete session abandoned by hand leaves its document behind.
        let orphan = open("orphan", "fay").await;
        store
            .complete_session(
                "orphan",
                orphan.version,
                step(vec![], None, &json!({})),
                document("doc-orphan", Some("z")),
            )
            .await
            .unwrap()
            .expect("completed");
        assert!(store.delete_guided_session("orphan").await.unwrap());
        tokio::time::sleep(Duration::from_millis(10)).await;
        let cut = chrono::Utc::now();
        tokio::time::sleep(Duration::from_millis(10)).await;
        open("fresh", "cat").await;
        let late = open("late", "dan").await;
        store
            .complete_session(
                "late",
                late.version,
                step(vec![], None, &json!({})),
                document("doc-late", Some("y")),
            )
            .await
            .unwrap()
            .expect("completed");

        assert_eq!(store.expire_sessions(cut, None).await.unwrap(), 1);
        assert_eq!(store.guided_session("stale").await.unwrap(), None);
        for kept in ["done", "fresh", "late"] {
            session(store, kept).await;
        }
        assert!(
            store
                .generated_document(SHOP, "doc-done")
                .await
                .unwrap()
                .is_some()
        );
        // Its turns went too: a session reusing the id numbers from 1.
        let reused = open("stale", "eve").await;
        store
            .advance_session(
                "stale",
                reused.version,
                step(answered("q", "Q?", "B"), None, &json!({})),
            )
            .await
            .unwrap()
            .expect("no turns left behind");

        assert!(
            store
                .generated_document(SHOP, "doc-orphan")
                .await
                .unwrap()
                .is_some(),
            "documents are kept without completed_before"
        );
        assert_eq!(store.expire_sessions(cut, Some(cut)).await.unwrap(), 1);
        assert_eq!(store.guided_session("done").await.unwrap(), None);
        assert_eq!(
            store.generated_document(SHOP, "doc-orphan").await.unwrap(),
            None,
            "a document whose session went by hand goes by its own age"
        );
        assert_eq!(
            store.generated_document(SHOP, "doc-done").await.unwrap(),
            None
        );
        for kept in ["stale", "fresh", "late"] {
            session(store, kept).await;
        }
        assert!(
            store
                .generated_document(SHOP, "doc-late")
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(store.expire_sessions(cut, Some(cut)).await.unwrap(), 0);
        let later = chrono::Utc::now() + chrono::Duration::seconds(1);
        assert_eq!(store.expire_sessions(later, None).await.unwrap(), 2);
        assert_eq!(
            store
                .guided_sessions(sessions_query(None))
                .await
                .unwrap()
                .into_iter()
                .map(|s| s.id)
                .collect::<Vec<_>>(),
            ["late"]
        );
    }

    /// Run-time templates are created, replaced, listed by id per domain and removed.
    pub async fn guided_templates_round_trip(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let at = |ms: i64| chrono::DateTime::from_timestamp_millis(1_700_000_000_000 + ms).unwrap();
        let template = |domain: &str, id: &str, spec: Value, ms: i64| StoredTemplate {
            domain_id: domain.into(),
            id: id.into(),
            spec: spec.to_string(),
            updated_at: at(ms),
        };
        assert!(
            store
                .put_template(template(SHOP, "t1", json!({ "v": 1 }), 1))
                .await
                .unwrap()
        );
        let replaced = template(SHOP, "t1", json!({ "v": 2 }), 2);
        assert!(
            !store.put_template(replaced.clone()).await.unwrap(),
            "replaced"
        );
        assert!(
            store
                .put_template(template(SHOP, "t0", json!({}), 3))
                .await
                .unwrap()
        );
        assert!(
            store
                .put_template(template("blog", "t1", json!({}), 4))
                .await
                .unwrap()
        );
        assert_eq!(
            store.stored_template(SHOP, "t1").await.unwrap(),
            Some(replaced.clone())
        );
        assert_eq!(store.stored_template(SHOP, "t9").await.unwrap(), None);
        assert_eq!(
            store.stored_templates(SHOP).await.unwrap(),
            [template(SHOP, "t0", json!({}), 3), replaced]
        );
        assert!(store.delete_template(SHOP, "t1").await.unwrap());
        assert!(!store.delete_template(SHOP, "t1").await.unwrap());
        assert_eq!(
            store
                .stored_templates(SHOP)
                .await
                .unwrap()
                .into_iter()
                .map(|t| t.id)
                .collect::<Vec<_>>(),
            ["t0"]
        );
        assert_eq!(store.stored_templates("blog").await.unwrap().len(), 1);
        assert!(store.stored_templates("none").await.unwrap().is_empty());
    }

    /// A notification as the service makes one.
    fn notice(domain: &str, user: &str, task: Option<&str>, content: &str) -> NewNotification {
        NewNotification {
            id: uuid::Uuid::now_v7().to_string(),
            domain_id: domain.into(),
            user_id: user.into(),
            org_id: None,
            task_id: task.map(str::to_owned),
            kind: NotificationType::Info,
            content: content.into(),
            data: None,
        }
    }

    /// Each user's notifications count from 1 in the order stored, per domain; they read
    /// back whole, unread newest first (paged with `before`), after a `seq`, and per task.
    pub async fn notifications_are_numbered_per_user_and_read_back(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let mut first = notice(SHOP, "ann", Some("t1"), "Processing your request…");
        first.kind = NotificationType::SchedulingUpdate;
        first.org_id = Some("org_abc".into());
        first.data = Some(json!({ "eventId": "event_789", "n": [1, 2] }).to_string());
        let stored = store
            .add_notifications(vec![
                first.clone(),
                notice(SHOP, "bob", None, "hello bob"),
                notice(SHOP, "ann", Some("t2"), "other task"),
                notice("blog", "ann", Some("t1"), "another domain"),
                notice(SHOP, "ann", Some("t1"), "Meeting scheduled!"),
            ])
            .await
            .unwrap();
        let seqs: Vec<(&str, &str, u64)> = stored
            .iter()
            .map(|n| (n.domain_id.as_str(), n.user_id.as_str(), n.seq))
            .collect();
        assert_eq!(
            seqs,
            [
                (SHOP, "ann", 1),
                (SHOP, "bob", 1),
                (SHOP, "ann", 2),
                ("blog", "ann", 1),
                (SHOP, "ann", 3)
            ]
        );
        let more = store
            .add_notifications(vec![notice(SHOP, "ann", None, "fourth")])
            .await
            .unwrap();
        assert_eq!(more[0].seq, 4, "the counter goes on across transactions");

        let unread = store
            .unread_notifications(SHOP, "ann", None, 10)
            .await
            .unwrap();
        let contents: Vec<&str> = unread.iter().map(|n| n.content.as_str()).collect();
        assert_eq!(
            contents,
            [
                "fourth",
                "Meeting scheduled!",
                "other task",
                "Processing your request…"
            ]
        );
        assert_eq!(unread[3], stored[0], "every field reads back as stored");
        assert_eq!(unread[3].org_id.as_deref(), Some("org_abc"));
        assert_eq!(
            serde_json::from_str::<Value>(unread[3].data.as_deref().unwrap()).unwrap(),
            json!({ "eventId": "event_789", "n": [1, 2] })
        );
        assert_eq!(unread[3].kind, NotificationType::SchedulingUpdate);
        assert!(!unread[3].read);
        let page = store
            .unread_notifications(SHOP, "ann", Some(3), 1)
            .await
            .unwrap();
        assert_eq!(page.iter().map(|n| n.seq).collect::<Vec<_>>(), [2]);
        assert_eq!(
            store.unread_count(SHOP, "ann").await.unwrap(),
            UnreadCount {
                unread: 4,
                last_seq: 4
            }
        );
        assert_eq!(
            store.unread_count(SHOP, "nobody").await.unwrap(),
            UnreadCount::default()
        );
        let after = store.notifications_after(SHOP, "ann", 2, 10).await.unwrap();
        assert_eq!(after.iter().map(|n| n.seq).collect::<Vec<_>>(), [3, 4]);
        let task = store
            .task_notifications(SHOP, "ann", "t1", 10)
            .await
            .unwrap();
        assert_eq!(
            task.iter().map(|n| n.content.as_str()).collect::<Vec<_>>(),
            ["Processing your request…", "Meeting scheduled!"],
            "a task's notifications, oldest first, of this domain only"
        );
        let latest = store
            .task_notifications(SHOP, "ann", "t1", 1)
            .await
            .unwrap();
        assert_eq!(latest[0].content, "Meeting scheduled!", "the latest ones");
        assert!(
            store
                .task_notifications(SHOP, "bob", "t1", 10)
                .await
                .unwrap()
                .is_empty(),
            "another user's task is not bob's"
        );
    }

    /// Marking read touches only the user's own unread notifications, and counts only them.
    pub async fn marking_notifications_read_touches_only_the_users_own(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let stored = store
            .add_notifications(vec![
                notice(SHOP, "ann", Some("t1"), "a1"),
                notice(SHOP, "ann", Some("t1"), "a2"),
                notice(SHOP, "bob", None, "b1"),
                notice("blog", "ann", None, "other domain"),
                notice(SHOP, "ann", None, "a3"),
            ])
            .await
            .unwrap();
        let ids: Vec<String> = stored.iter().map(|n| n.id.clone()).collect();
        let marked = store
            .mark_notifications_read(
                SHOP,
                "ann",
                vec![
                    ids[0].clone(),
                    ids[2].clone(),
                    ids[3].clone(),
                    "no-such-id".into(),
                ],
            )
            .await
            .unwrap();
        assert_eq!(marked, 1, "bob's and the other domain's are not counted");
        let again = store
            .mark_notifications_read(SHOP, "ann", vec![ids[0].clone()])
            .await
            .unwrap();
        assert_eq!(again, 0, "an already read one is not counted twice");
        assert_eq!(store.unread_count(SHOP, "bob").await.unwrap().unread, 1);
        assert_eq!(store.unread_count("blog", "ann").await.unwrap().unread, 1);
        assert_eq!(store.unread_count(SHOP, "ann").await.unwrap().unread, 2);
        let task = store
            .task_notifications(SHOP, "ann", "t1", 10)
            .await
            .unwrap();
        assert_eq!(
            task.iter().map(|n| n.read).collect::<Vec<_>>(),
            [true, false]
        );
        assert_eq!(
            store
                .mark_all_notifications_read(SHOP, "ann")
                .await
                .unwrap(),
            2
        );
        assert!(
            store
                .unread_notifications(SHOP, "ann", None, 10)
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.unread_count(SHOP, "bob").await.unwrap().unread, 1);
        assert_eq!(
            store
                .mark_notifications_read(SHOP, "ann", Vec::new())
                .await
                .unwrap(),
            0
        );
    }

    /// Sends to one user from many tasks at once get every `seq` once, without gaps.
    pub async fn concurrent_notifications_to_one_user_get_gapless_seqs(ctx: &mut Ctx) {
        let store = Arc::clone(&ctx.store);
        let sends = (0..16).map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .add_notifications(vec![
                        notice(SHOP, "ann", None, &format!("{i}a")),
                        notice(SHOP, "ann", None, &format!("{i}b")),
                    ])
                    .await
                    .unwrap()
            })
        });
        let mut seqs: Vec<u64> = Vec::new();
        for send in futures_util::future::join_all(sends).await {
            let batch = send.unwrap();
            assert_eq!(
                batch[1].seq,
                batch[0].seq + 1,
                "a batch is numbered together"
            );
            seqs.extend(batch.iter().map(|n| n.seq));
        }
        seqs.sort_unstable();
        assert_eq!(seqs, range(1, 32));
        let read: Vec<u64> = store
            .notifications_after(SHOP, "ann", 0, 100)
            .await
            .unwrap()
            .iter()
            .map(|n| n.seq)
            .collect();
        assert_eq!(read, range(1, 32));
    }

    /// Expiry removes notifications older than the limit, read or not, and the user's
    /// numbers go on after it.
    pub async fn notification_expiry_removes_only_what_is_due(ctx: &mut Ctx) {
        let store = &*ctx.store;
        store
            .add_notifications(vec![
                notice(SHOP, "ann", None, "old"),
                notice(SHOP, "bob", None, "old too"),
            ])
            .await
            .unwrap();
        store
            .mark_all_notifications_read(SHOP, "bob")
            .await
            .unwrap();
        let cut = chrono::Utc::now() + chrono::Duration::milliseconds(5);
        tokio::time::sleep(Duration::from_millis(20)).await;
        store
            .add_notifications(vec![notice(SHOP, "ann", None, "new")])
            .await
            .unwrap();
        assert_eq!(store.expire_notifications(cut).await.unwrap(), 2);
        let left = store.notifications_after(SHOP, "ann", 0, 10).await.unwrap();
        assert_eq!(
            left.iter()
                .map(|n| (n.seq, n.content.as_str()))
                .collect::<Vec<_>>(),
            [(2, "new")]
        );
        let next = store
            .add_notifications(vec![notice(SHOP, "ann", None, "newer")])
            .await
            .unwrap();
        assert_eq!(next[0].seq, 3);
        assert_eq!(store.expire_notifications(cut).await.unwrap(), 0);
    }

    /// A sighting of `visitor` of `domain` at `ms` (unix milliseconds) on `page`.
    fn sighting(domain: &str, visitor: &str, ms: i64, page: Option<&str>) -> Sighting {
        Sighting {
            domain_id: domain.into(),
            visitor_id: visitor.into(),
            at: chrono::DateTime::from_timestamp_millis(ms).unwrap(),
            page: page.map(str::to_owned),
            referrer: None,
            user_agent: None,
            data: None,
        }
    }

    /// A visitor's row keeps the first and last sighting, counts visits (sightings more
    /// than 30 minutes apart), and keeps what the latest sighting said; an older sighting
    /// arriving late changes only `first_seen`; domains are apart.
    pub async fn visitors_are_recorded_with_their_visits_and_last_page(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let t0 = 1_765_022_400_000; // 2025-12-06T12:00:00Z
        let minute = 60_000;
        let mut first = sighting(SHOP, "v1", t0, Some("/"));
        first.referrer = Some("https://search.example/".into());
        first.user_agent = Some("Mozilla/5.0".into());
        first.data = Some(json!({ "plan": "pro" }).to_string());
        let after = store
            .record_sightings(vec![
                first,
                sighting(SHOP, "v1", t0 + 5 * minute, Some("/pricing")),
                sighting("blog", "v1", t0, Some("/post")),
            ])
            .await
            .unwrap();
        assert_eq!(after.len(), 3);
        assert_eq!(
            (after[1].visits, after[1].page.as_deref()),
            (1, Some("/pricing"))
        );
        // A new visit an hour later; then one from before the first, late.
        store
            .record_sightings(vec![sighting(SHOP, "v1", t0 + 65 * minute, None)])
            .await
            .unwrap();
        store
            .record_sightings(vec![sighting(SHOP, "v1", t0 - minute, Some("/old"))])
            .await
            .unwrap();
        let v = store.visitor(SHOP, "v1").await.unwrap().unwrap();
        assert_eq!(v.first_seen.timestamp_millis(), t0 - minute);
        assert_eq!(v.last_seen.timestamp_millis(), t0 + 65 * minute);
        assert_eq!(v.visits, 2);
        assert_eq!(
            v.page.as_deref(),
            Some("/pricing"),
            "a sighting without a page keeps it"
        );
        assert_eq!(v.referrer.as_deref(), Some("https://search.example/"));
        assert_eq!(v.user_agent.as_deref(), Some("Mozilla/5.0"));
        assert_eq!(v.data.as_deref(), Some(r#"{"plan":"pro"}"#));
        let other = store.visitor("blog", "v1").await.unwrap().unwrap();
        assert_eq!((other.visits, other.page.as_deref()), (1, Some("/post")));
        assert!(store.visitor(SHOP, "nobody").await.unwrap().is_none());
        let recent = store.recent_visitors(SHOP, 10).await.unwrap();
        assert_eq!(recent.len(), 1);
        let named = store
            .visitors_named(SHOP, &["nobody".into(), "v1".into()])
            .await
            .unwrap();
        assert_eq!(
            named,
            std::slice::from_ref(&v),
            "only the stored one, of this domain"
        );
        assert!(store.visitors_named(SHOP, &[]).await.unwrap().is_empty());
    }

    /// Counts over windows and series per hour and per day match what was recorded: a
    /// day's distinct visitors are not the sum of its hours'.
    pub async fn visitor_counts_and_series_match_the_sightings(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let day = 1_765_008_000_000; // 2025-12-06T08:00:00Z
        let hour = 3_600_000;
        let at = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).unwrap();
        // a: 08:00 and 10:00 (two visits, two hours); b: 08:10 and 08:20 (one visit);
        // c: the day before at 23:00 and this day at 08:30 (two days).
        store
            .record_sightings(vec![
                sighting(SHOP, "c", day - 9 * hour, None),
                sighting(SHOP, "a", day, None),
                sighting(SHOP, "b", day + hour / 6, None),
                sighting(SHOP, "b", day + hour / 3, None),
                sighting(SHOP, "c", day + hour / 2, None),
                sighting(SHOP, "a", day + 2 * hour, None),
            ])
            .await
            .unwrap();
        let hours = store
            .visitor_series(
                SHOP,
                at(day - 10 * hour),
                at(day + 3 * hour),
                Interval::Hour,
            )
            .await
            .unwrap();
        let hours: Vec<(i64, u64, u64)> = hours
            .iter()
            .map(|b| ((b.at.timestamp_millis() - day) / hour, b.visitors, b.visits))
            .collect();
        assert_eq!(hours, [(-9, 1, 1), (0, 3, 3), (2, 1, 1)]);
        let days = store
            .visitor_series(SHOP, at(day - 10 * hour), at(day + 3 * hour), Interval::Day)
            .await
            .unwrap();
        let days: Vec<(u64, u64)> = days.iter().map(|b| (b.visitors, b.visits)).collect();
        assert_eq!(
            days,
            [(1, 1), (3, 4)],
            "a second visit of a is a visit, not a visitor"
        );
        let since = store
            .visitors_since(SHOP, &[at(day + hour), at(day), at(day - 24 * hour)])
            .await
            .unwrap();
        assert_eq!(since, [1, 3, 3]);
        assert_eq!(
            store.visitors_since("blog", &[at(0)]).await.unwrap(),
            [0],
            "another domain"
        );
    }

    /// Two nodes recording the same new visitor at once count it once.
    pub async fn concurrent_sightings_of_one_visitor_count_once(ctx: &mut Ctx) {
        let store = Arc::clone(&ctx.store);
        let t0 = 1_765_022_400_000;
        let writes = (0..8).map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .record_sightings(vec![sighting(SHOP, "same", t0 + i * 1000, None)])
                    .await
                    .unwrap();
            })
        });
        for w in writes.collect::<Vec<_>>() {
            w.await.unwrap();
        }
        let at = |ms: i64| chrono::DateTime::from_timestamp_millis(ms).unwrap();
        let days = store
            .visitor_series(
                SHOP,
                at(t0 - 86_400_000),
                at(t0 + 86_400_000),
                Interval::Day,
            )
            .await
            .unwrap();
        assert_eq!(days.len(), 1);
        assert_eq!((days[0].visitors, days[0].visits), (1, 1));
        assert_eq!(
            store.visitor(SHOP, "same").await.unwrap().unwrap().visits,
            1
        );
    }

    /// A file's description reads back as stored, only in its own domain; lookups by ids
    /// leave unknown ones and other domains' out; a room lists and counts its files; an id
    /// is stored once; removal removes one file once.
    pub async fn files_are_described_per_domain_and_room(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let file = |domain: &str, id: &str, room: &str, at: i64| StoredFile {
            id: id.into(),
            domain_id: domain.into(),
            room_id: room.into(),
            uploader_id: "v1".into(),
            name: "ré sumé.pdf".into(),
            size: 12_345,
            content_type: "application/pdf".into(),
            sha256: "ab".repeat(32),
            created_at: chrono::DateTime::from_timestamp_millis(at).unwrap(),
        };
        let t0 = 1_765_022_400_123;
        let first = file(SHOP, "f1", "r1", t0);
        store.add_file(first.clone()).await.unwrap();
        store
            .add_file(file(SHOP, "f2", "r1", t0 + 1))
            .await
            .unwrap();
        store
            .add_file(file(SHOP, "f3", "r2", t0 + 2))
            .await
            .unwrap();
        store.add_file(file("blog", "f4", "r1", t0)).await.unwrap();
        assert_eq!(store.file(SHOP, "f1").await.unwrap(), Some(first.clone()));
        assert_eq!(
            store.file("blog", "f1").await.unwrap(),
            None,
            "domains are apart"
        );
        assert_eq!(store.file(SHOP, "f4").await.unwrap(), None);
        // The same id again is refused and changes nothing.
        let mut again = file(SHOP, "f1", "r2", t0 + 9);
        again.name = "other".into();
        assert!(matches!(
            store.add_file(again).await,
            Err(StoreError::Invalid(_))
        ));
        assert_eq!(store.file(SHOP, "f1").await.unwrap(), Some(first));

        let ids = ["f1", "f3", "f4", "nope"].map(String::from);
        let mut found: Vec<String> = store
            .files(SHOP, &ids)
            .await
            .unwrap()
            .into_iter()
            .map(|f| f.id)
            .collect();
        found.sort();
        assert_eq!(found, ["f1", "f3"]);
        assert!(store.files(SHOP, &[]).await.unwrap().is_empty());

        let listed: Vec<String> = store
            .room_files(SHOP, "r1", 10)
            .await
            .unwrap()
            .into_iter()
            .map(|f| f.id)
            .collect();
        assert_eq!(listed, ["f1", "f2"], "oldest first, this domain only");
        assert_eq!(store.room_files(SHOP, "r1", 1).await.unwrap().len(), 1);
        assert_eq!(store.count_room_files(SHOP, "r1").await.unwrap(), 2);
        assert_eq!(store.count_room_files("blog", "r1").await.unwrap(), 1);
        assert_eq!(store.count_room_files(SHOP, "none").await.unwrap(), 0);

        assert!(!store.remove_file("blog", "f1").await.unwrap());
        assert!(store.remove_file(SHOP, "f1").await.unwrap());
        assert!(!store.remove_file(SHOP, "f1").await.unwrap(), "once");
        assert_eq!(store.file(SHOP, "f1").await.unwrap(), None);
        assert_eq!(store.count_room_files(SHOP, "r1").await.unwrap(), 1);
        assert!(store.file("blog", "f4").await.unwrap().is_some());
    }

    /// A lease goes to one holder, who may renew it; another gets it once it expires.
    pub async fn leases_go_to_one_holder_until_they_expire(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let long = Duration::from_secs(60);
        assert!(store.take_lease("cleanup", "a", long).await.unwrap());
        assert!(!store.take_lease("cleanup", "b", long).await.unwrap());
        assert!(
            store.take_lease("cleanup", "a", long).await.unwrap(),
            "renewed"
        );
        assert!(store.take_lease("other", "b", long).await.unwrap());

        let short = Duration::from_millis(50);
        assert!(store.take_lease("brief", "a", short).await.unwrap());
        assert!(!store.take_lease("brief", "b", short).await.unwrap());
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(
            store.take_lease("brief", "b", long).await.unwrap(),
            "expired"
        );
        assert!(!store.take_lease("brief", "a", short).await.unwrap());
        assert!(!store.take_lease("cleanup", "b", long).await.unwrap());
    }

    /// Each room counts 1, 2, 3… on its own, however appends to rooms interleave.
    pub async fn append_numbers_each_room_from_one(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let a = RoomKey::new("acme", "room-a");
        let b = RoomKey::new("acme", "room-b");
        let order = [&a, &a, &b, &a, &b, &b, &a];
        let mut counters: HashMap<&RoomKey, u64> = HashMap::new();
        let mut appended = Vec::new();
        for (i, key) in order.into_iter().enumerate() {
            let result = append(store, text(key, format!("m{i}"))).await;
            let expected = counters.entry(key).or_default();
            *expected += 1;
            assert_eq!(result.message.seq, *expected, "append #{i} to {key}");
            assert!(!result.duplicate, "append #{i} is not a duplicate");
            assert_eq!(&result.message.room, key, "append #{i} room");
            appended.push(result.message);
        }

        assert_eq!(seqs(&after(store, &a, 0, 100).await), range(1, 4));
        assert_eq!(
            contents(&after(store, &a, 0, 100).await),
            ["m0", "m1", "m3", "m6"]
        );
        assert_eq!(seqs(&after(store, &b, 0, 100).await), range(1, 3));
        assert_eq!(
            contents(&after(store, &b, 0, 100).await),
            ["m2", "m4", "m5"]
        );
        assert_eq!(last_seq(store, &a).await, 4);
        assert_eq!(last_seq(store, &b).await, 3);

        let committed = recv_committed(&mut ctx.committed, order.len()).await;
        assert_eq!(
            committed, appended,
            "the sink reports each append once, in commit order"
        );
        assert_nothing_more_committed(&mut ctx.committed).await;
    }

    /// A room is identified by (domain, id): the same id in two domains is two rooms, with
    /// separate sequences, histories, read positions and client message ids.
    pub async fn same_room_id_in_two_domains_is_two_rooms(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let a = RoomKey::new("tenant-a", "r");
        let b = RoomKey::new("tenant-b", "r");
        append_n(store, &a, "a", 3).await;
        let in_b = append_n(store, &b, "b", 2).await;
        assert_eq!(seqs_of(&in_b), [1, 2], "domain B's room counts from 1");

        let history_a = after(store, &a, 0, 100).await;
        assert_eq!(contents(&history_a), ["a1", "a2", "a3"]);
        assert!(
            history_a.iter().all(|m| m.room == a),
            "A's history holds only A's room"
        );
        let history_b = before(store, &b, u64::MAX, 100).await;
        assert_eq!(contents(&history_b), ["b1", "b2"]);
        assert!(
            history_b.iter().all(|m| m.room == b),
            "B's history holds only B's room"
        );
        assert_eq!(last_seq(store, &a).await, 3);
        assert_eq!(last_seq(store, &b).await, 2);

        assert_eq!(store.mark_read(&a, "alice", 3).await.expect("mark_read"), 3);
        assert_eq!(
            store
                .read_position(&b, "alice")
                .await
                .expect("read_position"),
            0
        );
        assert_eq!(
            store.mark_read(&b, "alice", 3).await.expect("mark_read"),
            2,
            "clamped to B's own last seq"
        );
        assert_eq!(
            store
                .read_position(&a, "alice")
                .await
                .expect("read_position"),
            3
        );

        let in_a = append(store, keyed(&a, "same id", "cmid-1")).await;
        let in_b = append(store, keyed(&b, "same id", "cmid-1")).await;
        assert!(
            !in_b.duplicate,
            "a client message id is scoped to its domain's room"
        );
        assert_ne!(in_a.message.id, in_b.message.id);
        assert_eq!((in_a.message.seq, in_b.message.seq), (4, 3));
    }

    fn seqs_of(messages: &[Arc<Message>]) -> Vec<u64> {
        messages.iter().map(|m| m.seq).collect()
    }

    /// Sending the same client message id twice stores one message: the retry gets the stored
    /// one back, marked duplicate, consumes no seq and is not reported as a new commit.
    pub async fn client_message_id_makes_append_idempotent(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let room = RoomKey::new("acme", "support-1");
        let first = append(store, keyed(&room, "hello", "c-1")).await;
        assert!(!first.duplicate);
        assert_eq!(first.message.seq, 1);
        assert_eq!(first.message.client_message_id.as_deref(), Some("c-1"));

        let retry = append(store, keyed(&room, "hello, edited", "c-1")).await;
        assert!(
            retry.duplicate,
            "the second append is reported as a duplicate"
        );
        assert_eq!(
            *retry.message, *first.message,
            "the retry returns the stored message"
        );
        assert_eq!(
            retry.message.content, "hello",
            "the retry's new content is not stored"
        );

        let stored = after(store, &room, 0, 100).await;
        assert_eq!(
            stored.len(),
            1,
            "one row for one client message id: {stored:?}"
        );
        assert_eq!(last_seq(store, &room).await, 1);

        let committed = recv_committed(&mut ctx.committed, 1).await;
        assert_eq!(committed[0], first.message);
        assert_nothing_more_committed(&mut ctx.committed).await;

        let next = append(store, text(&room, "next")).await;
        assert_eq!(next.message.seq, 2, "the duplicate consumed no seq");

        let other_author = append(
            store,
            NewMessage {
                author: author("bob"),
                ..keyed(&room, "bob's own first message", "c-1")
            },
        )
        .await;
        assert!(
            !other_author.duplicate,
            "another author's message with the same id is another message"
        );
        assert_eq!(other_author.message.seq, 3);
        assert_eq!(other_author.message.content, "bob's own first message");
        recv_committed(&mut ctx.committed, 2).await;

        let elsewhere = append(
            store,
            keyed(&RoomKey::new("acme", "support-2"), "hi", "c-1"),
        )
        .await;
        assert!(
            !elsewhere.duplicate,
            "the same id in another room is another message"
        );
        assert_eq!(elsewhere.message.seq, 1);
        assert_ne!(elsewhere.message.id, first.message.id);

        let twin_1 = append(store, text(&room, "no id")).await;
        let twin_2 = append(store, text(&room, "no id")).await;
        assert!(
            !twin_1.duplicate && !twin_2.duplicate,
            "messages without an id never dedupe"
        );
        assert_eq!((twin_1.message.seq, twin_2.message.seq), (4, 5));
        assert_eq!(after(store, &room, 0, 100).await.len(), 5);
    }

    /// Many simultaneous sends of one client message id store it exactly once.
    pub async fn concurrent_duplicates_are_stored_once(ctx: &mut Ctx) {
        let room = RoomKey::new("acme", "dup-race");
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let store = Arc::clone(&ctx.store);
                let message = keyed(&room, format!("attempt {i}"), "same-id");
                tokio::spawn(async move { store.append(message).await })
            })
            .collect();
        let mut results = Vec::new();
        for task in tasks {
            results.push(task.await.expect("task").expect("append"));
        }
        let originals: Vec<_> = results.iter().filter(|r| !r.duplicate).collect();
        assert_eq!(originals.len(), 1, "exactly one append is not a duplicate");
        let original = &originals[0].message;
        assert_eq!(original.seq, 1);
        for r in &results {
            assert_eq!(
                *r.message, **original,
                "every attempt returns the stored message"
            );
        }
        let stored = after(&*ctx.store, &room, 0, 100).await;
        assert_eq!(stored, [(**original).clone()]);
        let committed = recv_committed(&mut ctx.committed, 1).await;
        assert_eq!(committed[0], *original);
        assert_nothing_more_committed(&mut ctx.committed).await;
    }

    /// 200 simultaneous appends to one room get seqs 1..=200, each once, and the sink reports
    /// them in seq order.
    pub async fn concurrent_appends_to_one_room_get_gapless_seqs(ctx: &mut Ctx) {
        const N: u64 = 200;
        let room = RoomKey::new("acme", "busy");
        let tasks: Vec<_> = (0..N)
            .map(|i| {
                let store = Arc::clone(&ctx.store);
                let message = text(&room, format!("c{i}"));
                tokio::spawn(async move { store.append(message).await })
            })
            .collect();
        let mut by_seq = BTreeMap::new();
        for task in tasks {
            let appended = task.await.expect("task").expect("append");
            assert!(!appended.duplicate);
            let seq = appended.message.seq;
            if let Some(previous) = by_seq.insert(seq, appended.message) {
                panic!("seq {seq} assigned twice (also to {previous:?})");
            }
        }
        assert_eq!(by_seq.keys().copied().collect::<Vec<_>>(), range(1, N));
        let ids: HashSet<&str> = by_seq.values().map(|m| m.id.as_str()).collect();
        assert_eq!(ids.len(), by_seq.len(), "message ids are unique");

        let stored = after(&*ctx.store, &room, 0, 1000).await;
        assert_eq!(stored.len(), by_seq.len());
        for (stored, returned) in stored.iter().zip(by_seq.values()) {
            assert_eq!(
                stored, &**returned,
                "stored message equals the acknowledged one"
            );
        }
        assert_eq!(last_seq(&*ctx.store, &room).await, N);

        let committed = recv_committed(&mut ctx.committed, by_seq.len()).await;
        let committed_seqs: Vec<u64> = committed.iter().map(|m| m.seq).collect();
        assert_eq!(
            committed_seqs,
            range(1, N),
            "the sink reports in strictly increasing seq"
        );
        for m in &committed {
            assert_eq!(m, &by_seq[&m.seq]);
        }
        assert_nothing_more_committed(&mut ctx.committed).await;
    }

    /// Simultaneous appends spread over 10 rooms: each room's seqs are 1..=n on their own,
    /// histories do not mix, and the sink reports each room's messages in seq order.
    pub async fn concurrent_appends_across_rooms_stay_independent(ctx: &mut Ctx) {
        const ROOMS: usize = 10;
        const PER_ROOM: u64 = 25;
        let rooms: Vec<RoomKey> = (0..ROOMS)
            .map(|r| RoomKey::new("acme", format!("room-{r}")))
            .collect();
        let mut tasks = Vec::new();
        for i in 0..PER_ROOM {
            for (r, room) in rooms.iter().enumerate() {
                let store = Arc::clone(&ctx.store);
                let message = text(room, format!("room-{r} #{i}"));
                tasks.push(tokio::spawn(async move { store.append(message).await }));
            }
        }
        let mut seqs_by_room: HashMap<RoomKey, Vec<u64>> = HashMap::new();
        for task in tasks {
            let appended = task.await.expect("task").expect("append");
            seqs_by_room
                .entry(appended.message.room.clone())
                .or_default()
                .push(appended.message.seq);
        }
        for (r, room) in rooms.iter().enumerate() {
            let mut got = seqs_by_room.remove(room).unwrap_or_default();
            got.sort_unstable();
            assert_eq!(got, range(1, PER_ROOM), "acknowledged seqs of {room}");
            let stored = after(&*ctx.store, room, 0, 1000).await;
            assert_eq!(seqs(&stored), range(1, PER_ROOM), "stored seqs of {room}");
            let prefix = format!("room-{r} #");
            assert!(
                stored
                    .iter()
                    .all(|m| m.room == *room && m.content.starts_with(&prefix)),
                "{room} holds only its own messages"
            );
            assert_eq!(last_seq(&*ctx.store, room).await, PER_ROOM);
        }

        let committed = recv_committed(&mut ctx.committed, ROOMS * PER_ROOM as usize).await;
        let mut last: HashMap<&RoomKey, u64> = HashMap::new();
        for m in &committed {
            let previous = last.insert(&m.room, m.seq).unwrap_or(0);
            assert_eq!(m.seq, previous + 1, "sink order within {}", m.room);
        }
        assert_nothing_more_committed(&mut ctx.committed).await;
    }

    /// `messages_after` pages forward in ascending order.
    pub async fn messages_after_pages_forward(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let room = RoomKey::new("acme", "pages");
        append_n(store, &room, "m", 10).await;

        assert_eq!(seqs(&after(store, &room, 0, 3).await), [1, 2, 3]);
        assert_eq!(
            contents(&after(store, &room, 0, 3).await),
            ["m1", "m2", "m3"]
        );
        assert_eq!(seqs(&after(store, &room, 3, 3).await), [4, 5, 6]);
        assert_eq!(seqs(&after(store, &room, 9, 5).await), [10]);
        assert_eq!(seqs(&after(store, &room, 10, 5).await), Vec::<u64>::new());
        assert_eq!(seqs(&after(store, &room, 0, 100).await), range(1, 10));
        assert_eq!(
            seqs(&after(store, &room, 0, usize::MAX).await),
            range(1, 10)
        );
        assert_eq!(seqs(&after(store, &room, 4, 0).await), Vec::<u64>::new());
        assert_eq!(
            seqs(&after(store, &room, u64::MAX, 10).await),
            Vec::<u64>::new()
        );
    }

    /// `messages_before` returns the last `limit` messages below `before`, ascending.
    pub async fn messages_before_returns_latest_page(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let room = RoomKey::new("acme", "pages");
        append_n(store, &room, "m", 10).await;

        assert_eq!(seqs(&before(store, &room, u64::MAX, 3).await), [8, 9, 10]);
        assert_eq!(
            contents(&before(store, &room, u64::MAX, 3).await),
            ["m8", "m9", "m10"]
        );
        assert_eq!(seqs(&before(store, &room, 8, 3).await), [5, 6, 7]);
        assert_eq!(seqs(&before(store, &room, 3, 10).await), [1, 2]);
        assert_eq!(seqs(&before(store, &room, 11, 100).await), range(1, 10));
        assert_eq!(seqs(&before(store, &room, 500, 4).await), [7, 8, 9, 10]);
        assert_eq!(
            seqs(&before(store, &room, u64::MAX, usize::MAX).await),
            range(1, 10)
        );
        assert_eq!(seqs(&before(store, &room, 1, 10).await), Vec::<u64>::new());
        assert_eq!(seqs(&before(store, &room, 0, 10).await), Vec::<u64>::new());
        assert_eq!(seqs(&before(store, &room, 6, 0).await), Vec::<u64>::new());
    }

    /// `last_seqs` gives each room's last `seq` in the order asked, 0 for an empty or unknown
    /// room, keeps domains apart, and follows later appends.
    pub async fn last_seqs_of_many_rooms_come_in_one_call(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let a = RoomKey::new("acme", "a");
        let b = RoomKey::new("acme", "b");
        let other_domain = RoomKey::new("globex", "a");
        let empty = RoomKey::new("acme", "empty");
        let unknown = RoomKey::new("acme", "never-created");
        append_n(store, &a, "a", 3).await;
        append_n(store, &b, "b", 7).await;
        append_n(store, &other_domain, "g", 2).await;
        store.ensure_room(&empty, None).await.expect("ensure_room");
        let asked = [
            unknown.clone(),
            b.clone(),
            empty.clone(),
            a.clone(),
            other_domain.clone(),
            a.clone(),
        ];
        let tops = store.last_seqs(&asked).await.expect("last_seqs");
        assert_eq!(tops, [0, 7, 0, 3, 2, 3]);
        assert_eq!(
            store.last_seqs(&[]).await.expect("no rooms"),
            Vec::<u64>::new()
        );
        append_n(store, &a, "a2", 2).await;
        assert_eq!(store.last_seqs(&[a]).await.expect("after appends"), [5]);
        assert_eq!(
            store.room(&unknown).await.expect("room"),
            None,
            "reads create no room"
        );
    }

    /// Reading an empty or unknown room returns nothing, and reading does not create a room.
    pub async fn history_of_empty_and_unknown_rooms_is_empty(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let empty = RoomKey::new("acme", "empty");
        store.ensure_room(&empty, None).await.expect("ensure_room");
        let unknown = RoomKey::new("acme", "never-created");
        // A non-empty neighbour, so a query ignoring the room key would return something.
        append_n(store, &RoomKey::new("acme", "other"), "x", 3).await;
        for key in [&empty, &unknown] {
            assert_eq!(
                after(store, key, 0, 100).await,
                [],
                "messages_after of {key}"
            );
            assert_eq!(
                before(store, key, u64::MAX, 100).await,
                [],
                "messages_before of {key}"
            );
        }
        assert_eq!(last_seq(store, &empty).await, 0);
        assert_eq!(
            store.room(&unknown).await.expect("room"),
            None,
            "reads create no room"
        );
    }

    /// `ensure_room` creates a support room once; later calls return it unchanged except for
    /// its current `last_seq`. `room` reads it.
    pub async fn ensure_room_creates_once(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let key = RoomKey::new("acme", "made");
        assert_eq!(store.room(&key).await.expect("room"), None);

        let created = store
            .ensure_room(&key, Some("agent-7"))
            .await
            .expect("ensure_room");
        assert_eq!(created.key, key);
        assert_eq!(created.kind, "support");
        assert_eq!(created.created_by.as_deref(), Some("agent-7"));
        assert_eq!(created.last_seq, 0);
        assert_eq!(
            store.room(&key).await.expect("room").as_ref(),
            Some(&created)
        );

        let again = store
            .ensure_room(&key, Some("somebody-else"))
            .await
            .expect("ensure_room");
        assert_eq!(again, created, "a second ensure_room changes nothing");

        append_n(store, &key, "m", 3).await;
        let after_appends = store.ensure_room(&key, None).await.expect("ensure_room");
        assert_eq!(after_appends.last_seq, 3);
        assert_eq!(after_appends.created_by.as_deref(), Some("agent-7"));
        assert_eq!(after_appends.created_at, created.created_at);
        assert_eq!(after_appends.kind, "support");
        let read = store.room(&key).await.expect("room").expect("room exists");
        assert_eq!(read, after_appends);

        let anonymous = RoomKey::new("acme", "anonymous");
        let room = store
            .ensure_room(&anonymous, None)
            .await
            .expect("ensure_room");
        assert_eq!(room.created_by, None);
        assert_eq!(room.last_seq, 0);

        let implicit = RoomKey::new("acme", "implicit");
        append_n(store, &implicit, "m", 2).await;
        let room = store
            .room(&implicit)
            .await
            .expect("room")
            .expect("append creates the room");
        assert_eq!((room.kind.as_str(), room.last_seq), ("support", 2));
    }

    /// A read position only moves forward, never past the room's last message.
    pub async fn mark_read_only_moves_forward(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let room = RoomKey::new("acme", "reads");
        append_n(store, &room, "m", 5).await;
        let position = async |user: &str| store.read_position(&room, user).await.expect("read");
        let mark =
            async |user: &str, seq: u64| store.mark_read(&room, user, seq).await.expect("mark");

        assert_eq!(position("alice").await, 0, "nothing read yet");
        assert_eq!(mark("alice", 3).await, 3);
        assert_eq!(position("alice").await, 3);
        assert_eq!(mark("alice", 2).await, 3, "never lowered");
        assert_eq!(position("alice").await, 3);
        assert_eq!(mark("alice", 100).await, 5, "clamped to the last seq");
        assert_eq!(position("alice").await, 5);

        append_n(store, &room, "n", 2).await;
        assert_eq!(mark("alice", 6).await, 6);
        assert_eq!(mark("alice", u64::MAX).await, 7);
        assert_eq!(position("alice").await, 7);
        assert_eq!(position("bob").await, 0, "positions are per user");
        assert_eq!(mark("bob", 1).await, 1);
        assert_eq!(position("alice").await, 7);

        let unknown = RoomKey::new("acme", "no-such-room");
        assert_eq!(
            store.mark_read(&unknown, "alice", 4).await.expect("mark"),
            0
        );
        assert_eq!(
            store.read_position(&unknown, "alice").await.expect("read"),
            0
        );
        let empty = RoomKey::new("acme", "empty");
        store.ensure_room(&empty, None).await.expect("ensure_room");
        assert_eq!(store.mark_read(&empty, "alice", 1).await.expect("mark"), 0);
    }

    /// Domains and customers can be written and rewritten.
    pub async fn upserts_are_idempotent(ctx: &mut Ctx) {
        let store = &*ctx.store;
        store
            .upsert_domain("acme", "Acme")
            .await
            .expect("create domain");
        store
            .upsert_domain("acme", "Acme")
            .await
            .expect("repeat domain");
        store
            .upsert_domain("acme", "Acme Inc.")
            .await
            .expect("rename domain");

        assert_eq!(store.customer("acme", "cust-1").await.expect("read"), None);
        let profile = CustomerProfile {
            name: Some("Zoë".to_owned()),
            data: Some(json!({"plan": "pro", "seats": 3})),
            context: None,
        };
        store
            .upsert_customer("acme", "cust-1", profile.clone())
            .await
            .expect("create customer");
        store
            .upsert_customer("acme", "cust-1", profile.clone())
            .await
            .expect("repeat customer");
        store
            .upsert_customer("acme", "cust-1", CustomerProfile::default())
            .await
            .expect("update customer with nothing");
        store
            .upsert_customer("other", "cust-1", profile)
            .await
            .expect("same user id in another domain");
        let stored = store.customer("acme", "cust-1").await.expect("read");
        let stored = stored.expect("the customer is stored");
        assert_eq!(
            stored.name.as_deref(),
            Some("Zoë"),
            "a profile without a name keeps it"
        );
        assert_eq!(stored.data, Some(json!({"plan": "pro", "seats": 3})));
        assert_eq!(stored.context, None);
        assert!(stored.first_seen <= stored.last_seen);

        // The context is replaced by the newest one; the name and data stay.
        for page in ["https://shop.example/", "https://shop.example/pricing"] {
            let seen = CustomerProfile {
                context: Some(json!({"page": page, "browser": "Firefox"})),
                ..CustomerProfile::default()
            };
            store
                .upsert_customer("acme", "cust-1", seen)
                .await
                .expect("context");
        }
        let stored = store.customer("acme", "cust-1").await.expect("read");
        let stored = stored.expect("the customer is stored");
        assert_eq!(
            stored.context,
            Some(json!({"page": "https://shop.example/pricing", "browser": "Firefox"}))
        );
        assert_eq!(stored.name.as_deref(), Some("Zoë"));
        let other = store.customer("other", "cust-1").await.expect("read");
        assert_eq!(other.expect("stored").context, None, "domains stay apart");
        store.health().await.expect("the store still works");
    }

    /// Everything a message carries comes back as stored, and as acknowledged.
    pub async fn message_fields_round_trip(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let room = RoomKey::new("acme", "fields");
        let data = json!({
            "actions": [{"type": "button", "label": "Oui ✓", "value": null}],
            "count": 42,
            "negative": -7,
            "ratio": 1.5,
            "beyond_f64": 9_007_199_254_740_993_u64,
            "max": u64::MAX,
            "nested": {"ok": true, "list": [1, "two", 3.25, false]},
            "text": "quote \" backslash \\ newline \n tab \t",
        });
        let content = "Hello 👋 世界! «ça va ?» — 👩‍👩‍👧 \"quoted\" \\ line\nbreak";
        let sent = NewMessage {
            room: room.clone(),
            author: Author {
                user_id: "user-42".to_owned(),
                name: "Zoë 张伟".to_owned(),
                role: "agent".to_owned(),
            },
            kind: "action".to_owned(),
            content: content.to_owned(),
            data: Some(data.clone()),
            client_message_id: Some("cm-round-trip".to_owned()),
        };
        let plain = text(&room, "no data");
        let t0 = now_ms();
        let appended = append(store, sent.clone()).await.message;
        let plain = append(store, plain).await.message;
        let t1 = chrono::Utc::now();

        assert!(!appended.id.is_empty());
        assert_eq!(appended.room, room);
        assert_eq!(appended.author, sent.author);
        assert_eq!(appended.kind, "action");
        assert_eq!(appended.content, content);
        assert_eq!(appended.data.as_ref(), Some(&data));
        assert_eq!(appended.client_message_id.as_deref(), Some("cm-round-trip"));
        assert_eq!(
            appended.created_at.timestamp_subsec_nanos() % 1_000_000,
            0,
            "whole ms"
        );
        assert!(
            t0 <= appended.created_at && appended.created_at <= t1,
            "created_at {} is the time of the append ({t0} ..= {t1})",
            appended.created_at
        );
        assert_eq!(plain.data, None);
        assert_eq!(plain.client_message_id, None);

        let expected = [(*appended).clone(), (*plain).clone()];
        assert_eq!(after(store, &room, 0, 10).await, expected, "messages_after");
        assert_eq!(
            before(store, &room, u64::MAX, 10).await,
            expected,
            "messages_before"
        );
        let duplicate = append(store, sent).await;
        assert!(duplicate.duplicate);
        assert_eq!(
            *duplicate.message, *appended,
            "the duplicate lookup reads it back whole"
        );
        let committed = recv_committed(&mut ctx.committed, 2).await;
        assert_eq!(committed, [appended, plain]);
        assert_nothing_more_committed(&mut ctx.committed).await;
    }

    /// Everything committed is there after closing and reopening, and the store carries on
    /// where it stopped: the next seq, read positions, client message ids.
    pub async fn messages_survive_reopen(ctx: &mut Ctx) {
        let a = RoomKey::new("acme", "durable-a");
        let b = RoomKey::new("acme", "durable-b");
        let mut written = Vec::new();
        for i in 1..=5 {
            let m = keyed(&a, format!("a{i}"), &format!("a-{i}"));
            written.push((*append(&*ctx.store, m).await.message).clone());
        }
        append_n(&*ctx.store, &b, "b", 2).await;
        ctx.store
            .mark_read(&a, "alice", 4)
            .await
            .expect("mark_read");
        recv_committed(&mut ctx.committed, 7).await;

        ctx.reopen().await;
        let store = &*ctx.store;
        assert_eq!(
            after(store, &a, 0, 100).await,
            written,
            "messages are intact"
        );
        assert_eq!(seqs(&after(store, &b, 0, 100).await), [1, 2]);
        assert_eq!(last_seq(store, &a).await, 5);
        assert_eq!(store.read_position(&a, "alice").await.expect("read"), 4);

        let next = append(store, text(&a, "a6")).await;
        assert_eq!(next.message.seq, 6, "the sequence continues after reopen");
        let next_b = append(store, text(&b, "b3")).await;
        assert_eq!(next_b.message.seq, 3);
        let retry = append(store, keyed(&a, "a2 again", "a-2")).await;
        assert!(retry.duplicate, "idempotency holds across reopen");
        assert_eq!(*retry.message, written[1]);
        assert_eq!(
            store
                .ensure_room(&a, None)
                .await
                .expect("ensure_room")
                .last_seq,
            6
        );

        let committed = recv_committed(&mut ctx.committed, 2).await;
        assert_eq!(
            committed,
            [next.message, next_b.message],
            "old messages are not replayed"
        );
        assert_nothing_more_committed(&mut ctx.committed).await;
    }

    /// Appends queued when `close` is called are finished: every acknowledged append is
    /// durable and reported, seqs stay gapless, and the others fail with `Closed`.
    pub async fn close_finishes_queued_writes(ctx: &mut Ctx) {
        let room = RoomKey::new("acme", "closing");
        let tasks: Vec<_> = (0..100)
            .map(|i| {
                let store = Arc::clone(&ctx.store);
                let message = text(&room, format!("q{i}"));
                tokio::spawn(async move { store.append(message).await })
            })
            .collect();
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        ctx.store.close().await;

        let mut acknowledged = HashMap::new();
        for task in tasks {
            match task.await.expect("task") {
                Ok(appended) => {
                    acknowledged.insert(appended.message.id.clone(), appended.message);
                }
                Err(e) => assert!(
                    matches!(e, StoreError::Closed),
                    "expected Closed, got {e:?}"
                ),
            }
        }
        let reported = drain_until_closed(&mut ctx.committed).await;
        for m in acknowledged.values() {
            assert!(
                reported.contains(m),
                "acknowledged {m:?} was reported to the sink"
            );
        }

        ctx.reopen().await;
        let stored = after(&*ctx.store, &room, 0, 1000).await;
        let count = u64::try_from(stored.len()).expect("count");
        assert_eq!(seqs(&stored), range(1, count), "stored seqs are gapless");
        for m in acknowledged.values() {
            assert!(
                stored.iter().any(|s| s == &**m),
                "acknowledged {m:?} is durable"
            );
        }
        let next = append(&*ctx.store, text(&room, "after")).await;
        assert_eq!(next.message.seq, count + 1);
    }

    /// After `close`, writes fail with `Closed` (no panic), `health` fails, a second `close`
    /// is harmless, and the commit sink ends.
    pub async fn closed_store_refuses_writes(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let room = RoomKey::new("acme", "closed");
        store.health().await.expect("healthy while open");
        let before_close = append(store, text(&room, "before")).await;
        store.close().await;

        assert!(store.health().await.is_err(), "health fails after close");
        assert_closed(&store.append(text(&room, "after")).await, "append");
        assert_closed(&store.ensure_room(&room, None).await, "ensure_room");
        assert_closed(&store.mark_read(&room, "alice", 1).await, "mark_read");
        assert_closed(&store.upsert_domain("acme", "Acme").await, "upsert_domain");
        assert_closed(
            &store
                .upsert_customer("acme", "alice", CustomerProfile::default())
                .await,
            "upsert_customer",
        );
        store.close().await;
        let reported = drain_until_closed(&mut ctx.committed).await;
        assert_eq!(
            reported,
            [before_close.message],
            "the sink ends after close"
        );
    }

    /// Nobody listening to the commit sink (e.g. during shutdown) does not stop writes.
    pub async fn append_works_without_commit_listener(ctx: &mut Ctx) {
        let (_, closed) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut ctx.committed, closed));
        let room = RoomKey::new("acme", "unheard");
        let written = append_n(&*ctx.store, &room, "m", 3).await;
        assert_eq!(seqs_of(&written), [1, 2, 3]);
        assert_eq!(after(&*ctx.store, &room, 0, 10).await.len(), 3);
    }

    /// Appends whose only problem is that another append in the same moment fails are not
    /// failed with it: they are stored with correct, gapless seqs and reported.
    ///
    /// The failing operation is a retry of a message whose `data` is nested deeper than the
    /// SQLite store can read back (see `accepted_data_reads_back`): its duplicate lookup fails.
    /// A backend that handles such data correctly (or refuses it up front) makes that operation
    /// succeed (or fail alone); the neighbours' assertions hold either way.
    pub async fn failing_write_does_not_poison_neighbours(ctx: &mut Ctx) {
        let deep_room = RoomKey::new("acme", "deep");
        let deep = NewMessage {
            data: Some(nested(200)),
            ..keyed(&deep_room, "deep", "deep-1")
        };
        let deep_stored = ctx.store.append(deep.clone()).await.is_ok();
        let n1 = RoomKey::new("acme", "neighbour-1");
        let n2 = RoomKey::new("acme", "neighbour-2");
        append_n(&*ctx.store, &n1, "warm", 3).await;
        append_n(&*ctx.store, &n2, "warm", 3).await;
        recv_committed(&mut ctx.committed, if deep_stored { 7 } else { 6 }).await;

        let mut neighbours = Vec::new();
        let mut poisoned = Vec::new();
        for i in 0..60 {
            if i % 20 == 10 {
                let store = Arc::clone(&ctx.store);
                let retry = deep.clone();
                poisoned.push(tokio::spawn(async move { store.append(retry).await }));
            }
            let store = Arc::clone(&ctx.store);
            let key = if i % 2 == 0 { &n1 } else { &n2 };
            let message = text(key, format!("n{i}"));
            neighbours.push(tokio::spawn(async move { store.append(message).await }));
        }
        let mut acknowledged: HashMap<RoomKey, Vec<u64>> = HashMap::new();
        for task in neighbours {
            let appended = task
                .await
                .expect("task")
                .expect("a neighbour of a failing write succeeds");
            assert!(!appended.duplicate);
            acknowledged
                .entry(appended.message.room.clone())
                .or_default()
                .push(appended.message.seq);
        }
        for task in poisoned {
            match task.await.expect("task") {
                Ok(a) => assert!(
                    a.duplicate && a.message.seq == 1,
                    "a retry is the stored message: {a:?}"
                ),
                Err(e) => assert!(
                    matches!(
                        e,
                        StoreError::Invalid(_)
                            | StoreError::Unavailable(_)
                            | StoreError::Corrupt(_)
                    ),
                    "the failing write fails as a storage error, not {e:?}"
                ),
            }
        }
        for key in [&n1, &n2] {
            let mut got = acknowledged.remove(key).unwrap_or_default();
            got.sort_unstable();
            assert_eq!(got, range(4, 33), "acknowledged seqs of {key}");
            let stored = after(&*ctx.store, key, 0, 100).await;
            assert_eq!(seqs(&stored), range(1, 33), "stored seqs of {key}");
        }
        let committed = recv_committed(&mut ctx.committed, 60).await;
        let mut last: HashMap<&RoomKey, u64> = HashMap::from([(&n1, 3), (&n2, 3)]);
        for m in &committed {
            let previous = last.get_mut(&m.room).expect("only neighbours are reported");
            assert_eq!(m.seq, *previous + 1, "sink order within {}", m.room);
            *previous = m.seq;
        }
        assert_nothing_more_committed(&mut ctx.committed).await;

        let next = append(&*ctx.store, text(&n1, "afterwards")).await;
        assert_eq!(
            next.message.seq, 34,
            "the room's seq continues after the failure"
        );
        ctx.store.health().await.expect("the store is healthy");
    }

    /// A store either refuses a message or can give it back: an accepted append never leaves
    /// data behind that breaks reading the room.
    pub async fn accepted_data_reads_back(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let room = RoomKey::new("acme", "deep-data");
        append(store, text(&room, "before")).await;
        let deep = NewMessage {
            data: Some(nested(200)),
            ..keyed(&room, "deep", "deep-1")
        };
        let Ok(stored) = store.append(deep.clone()).await else {
            // Refusing it is fine, as long as the room stays readable.
            assert_eq!(seqs(&after(store, &room, 0, 10).await), [1]);
            return;
        };
        let history = store
            .messages_after(&room, 0, 10)
            .await
            .expect("the room's history is readable");
        assert_eq!(history.len(), 2);
        assert_eq!(history[1], *stored.message);
        let page = store
            .messages_before(&room, u64::MAX, 10)
            .await
            .expect("the room's latest page is readable");
        assert_eq!(page, history);
        let retry = store.append(deep).await.expect("a retry is answered");
        assert!(retry.duplicate);
        assert_eq!(*retry.message, *stored.message);
    }

    /// Run-time domains, their keys (with expiry) and generated settings are stored, changed,
    /// removed and survive a reopen; a config-file domain keeps no settings.
    pub async fn domains_and_keys_round_trip(ctx: &mut Ctx) {
        use parlor::config::Secret;
        use parlor::store::{DomainChange, DomainKey, KeyKind, StoredDomain};
        let store = &*ctx.store;
        store.upsert_domain("acme", "Acme").await.expect("declare");
        let save = |name: &str, settings: &str| DomainChange::Save {
            id: "globex".into(),
            name: name.into(),
            settings: settings.into(),
        };
        assert_eq!(
            store
                .change_domains(save("Globex", "{\"a\":1}"))
                .await
                .expect("save"),
            1
        );
        store
            .change_domains(save("Globex Corp", "{\"a\":2}"))
            .await
            .expect("replace");
        let now = chrono::DateTime::from_timestamp_millis(now_ms().timestamp_millis()).unwrap();
        let key = |id: &str, kind, public: Option<&str>| DomainKey {
            id: id.into(),
            domain_id: "globex".into(),
            kind,
            public_id: public.map(str::to_owned),
            secret: Secret::new(format!("secret-of-{id}")),
            created_at: now,
            expires_at: None,
        };
        for k in [
            key("k1", KeyKind::Server, None),
            key("k2", KeyKind::Server, None),
            key("p1", KeyKind::Pusher, Some("app-key")),
        ] {
            store
                .change_domains(DomainChange::AddKey(k))
                .await
                .expect("add key");
        }
        // A Pusher app key is unique across domains.
        let clash = store
            .change_domains(DomainChange::AddKey(key(
                "p2",
                KeyKind::Pusher,
                Some("app-key"),
            )))
            .await;
        assert!(matches!(clash, Err(StoreError::Invalid(_))), "{clash:?}");
        let later = now + chrono::Duration::seconds(60);
        let expired = store
            .change_domains(DomainChange::ExpireKeys {
                domain_id: "globex".into(),
                kind: KeyKind::Server,
                expires_at: later,
                keep: Some("k2".into()),
            })
            .await
            .expect("expire");
        assert_eq!(expired, 1, "only k1 expires");
        let removed = store
            .change_domains(DomainChange::RemoveKey {
                domain_id: "acme".into(),
                id: "k2".into(),
            })
            .await
            .expect("remove key");
        assert_eq!(removed, 0, "a key is removed only from its own domain");
        for (value, expect) in [("first", "first"), ("second", "first")] {
            store
                .change_domains(DomainChange::InstallSetting {
                    name: "jwt_secret".into(),
                    value: value.into(),
                })
                .await
                .expect("install");
            assert_eq!(
                store
                    .setting("jwt_secret")
                    .await
                    .expect("setting")
                    .as_deref(),
                Some(expect),
                "a setting is generated once"
            );
        }
        assert_eq!(store.setting("nothing").await.expect("setting"), None);

        ctx.reopen().await;
        let store = &*ctx.store;
        let domains = store.domains().await.expect("domains");
        let globex = domains.iter().find(|d| d.id == "globex").expect("globex");
        assert_eq!(
            *globex,
            StoredDomain {
                id: "globex".into(),
                name: "Globex Corp".into(),
                settings: Some("{\"a\":2}".into()),
            }
        );
        let acme = domains.iter().find(|d| d.id == "acme").expect("acme");
        assert_eq!(acme.settings, None);
        let keys = store.domain_keys().await.expect("keys");
        let ids: Vec<&str> = keys.iter().map(|k| k.id.as_str()).collect();
        assert_eq!(ids, ["k1", "k2", "p1"]);
        assert_eq!(keys[0].expires_at, Some(later));
        assert_eq!(keys[0].secret.expose(), "secret-of-k1");
        assert_eq!(keys[1].expires_at, None);
        assert_eq!(keys[2].kind, KeyKind::Pusher);
        assert_eq!(keys[2].public_id.as_deref(), Some("app-key"));
        assert!(keys[0].live_at(now) && !keys[0].live_at(later));

        let removed = store
            .change_domains(DomainChange::Remove {
                id: "globex".into(),
            })
            .await
            .expect("remove");
        assert_eq!(removed, 1);
        let domains = store.domains().await.expect("domains");
        let globex = domains
            .iter()
            .find(|d| d.id == "globex")
            .expect("row stays for its rooms");
        assert_eq!(globex.settings, None);
        assert!(store.domain_keys().await.expect("keys").is_empty());
        let again = store
            .change_domains(DomainChange::Remove { id: "acme".into() })
            .await
            .expect("remove");
        assert_eq!(again, 0, "a config-file domain is not removed");
    }

    /// A decision that moves a room: the new state and one system message, in one step;
    /// the sink sees the message; the state survives a reopen; a decision that declines
    /// writes nothing.
    pub async fn transitions_are_stored_with_their_message(ctx: &mut Ctx) {
        let key = RoomKey::new("acme", "support-1");
        append(&*ctx.store, text(&key, "hello")).await;
        recv_committed(&mut ctx.committed, 1).await;
        assert_eq!(ctx.store.conversation(&key).await.expect("read"), None);
        let to_waiting = waiting_decision();
        let t = ctx
            .store
            .transition(&key, Some("ann"), Arc::clone(&to_waiting))
            .await
            .expect("transition");
        assert_eq!(t.conversation.status, RoomStatus::Waiting);
        assert_eq!(t.conversation.version, 1);
        let stored_message = t.message.expect("a message").message;
        assert_eq!(stored_message.seq, 2);
        assert_eq!(stored_message.kind, "status");
        assert_eq!(
            recv_committed(&mut ctx.committed, 1).await,
            [Arc::clone(&stored_message)]
        );
        // Declined: nothing written, the current state returned.
        let again = ctx
            .store
            .transition(&key, None, to_waiting)
            .await
            .expect("transition");
        assert!(again.message.is_none());
        assert_eq!(again.conversation, t.conversation);
        assert_nothing_more_committed(&mut ctx.committed).await;
        // First response: once.
        let at = parlor::model::now_ms();
        let first = ctx.store.first_response(&key, at).await.expect("first");
        assert_eq!(first.as_ref().and_then(|c| c.first_response_at), Some(at));
        assert_eq!(
            ctx.store.first_response(&key, at).await.expect("again"),
            None
        );
        ctx.reopen().await;
        let read = ctx
            .store
            .conversation(&key)
            .await
            .expect("read")
            .expect("stored");
        assert_eq!(read.status, RoomStatus::Waiting);
        assert_eq!(read.waiting_since, t.conversation.waiting_since);
        assert_eq!(read.first_response_at, Some(at));
        assert_eq!(read.version, 2);
        assert_eq!(last_seq(&*ctx.store, &key).await, 2);
        // A transition of a room that does not exist yet creates it.
        let fresh = RoomKey::new("acme", "support-2");
        let t = ctx
            .store
            .transition(&fresh, Some("bob"), waiting_decision())
            .await
            .expect("transition");
        assert_eq!(t.message.expect("message").message.seq, 1);
        let room = ctx
            .store
            .room(&fresh)
            .await
            .expect("room")
            .expect("created");
        assert_eq!(room.created_by.as_deref(), Some("bob"));
    }

    /// Many decisions on one room at once: each sees the one before, so exactly one of
    /// many identical "take it" decisions wins.
    pub async fn concurrent_transitions_are_decided_one_at_a_time(ctx: &mut Ctx) {
        let key = RoomKey::new("acme", "race");
        append(&*ctx.store, text(&key, "hello")).await;
        let mut tasks = Vec::new();
        for i in 0..20 {
            let store = Arc::clone(&ctx.store);
            let key = key.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .transition(&key, None, waiting_decision())
                    .await
                    .map(|t| (i, t.message.is_some()))
            }));
        }
        let mut winners = 0;
        for t in tasks {
            if t.await.expect("task").expect("transition").1 {
                winners += 1;
            }
        }
        assert_eq!(winners, 1);
        assert_eq!(last_seq(&*ctx.store, &key).await, 2);
    }

    /// The inbox's search matches room ids, visitor names and message text, ignoring case,
    /// with `%`, `_` and `\\` taken literally; `opened_by` keeps one visitor's rooms.
    pub async fn inbox_searches_text_and_lists_one_visitors_rooms(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let by = |user: &str, room: &str, content: &str| NewMessage {
            author: author(user),
            ..text(&RoomKey::new("acme", room), content)
        };
        append(store, by("zoe", "order-1", "Where is my PARCEL?")).await;
        append(store, by("zoe", "order-2", "100% refund, please")).await;
        append(store, by("max", "billing", "My invoice_2 is wrong")).await;
        append(store, by("max", "other-dom", "parcel")).await;
        append(
            store,
            NewMessage {
                room: RoomKey::new("other", "x"),
                ..by("zoe", "x", "parcel")
            },
        )
        .await;
        let find = |text: Option<&str>, opened_by: Option<&str>| {
            let query = InboxQuery {
                domain_id: "acme".into(),
                statuses: Vec::new(),
                reader: "agent".into(),
                limit: 10,
                opened_by: opened_by.map(str::to_owned),
                text: text.map(str::to_owned),
            };
            async move {
                let mut rooms: Vec<String> = store
                    .inbox(query)
                    .await
                    .expect("inbox")
                    .iter()
                    .map(|e| e.conversation.room.room_id.to_string())
                    .collect();
                rooms.sort();
                rooms
            }
        };
        assert_eq!(
            find(Some("parcel"), None).await,
            ["order-1", "other-dom"],
            "any case"
        );
        assert_eq!(
            find(Some("ORDER"), None).await,
            ["order-1", "order-2"],
            "room ids"
        );
        assert_eq!(
            find(Some("name of max"), None).await,
            ["billing", "other-dom"],
            "names"
        );
        assert_eq!(
            find(Some("100%"), None).await,
            ["order-2"],
            "% is a character"
        );
        assert!(find(Some("0%r"), None).await.is_empty(), "…not a wildcard");
        assert_eq!(find(Some("invoice_2"), None).await, ["billing"]);
        assert!(
            find(Some("invoicex2"), None).await.is_empty(),
            "_ is a character"
        );
        assert_eq!(
            find(Some("  "), None).await.len(),
            4,
            "a blank search filters nothing"
        );
        assert_eq!(find(None, Some("zoe")).await, ["order-1", "order-2"]);
        assert_eq!(find(Some("parcel"), Some("zoe")).await, ["order-1"]);
        assert!(find(None, Some("nobody")).await.is_empty());
    }

    /// The inbox: support rooms with messages, filtered by status, waiting first, with the
    /// reader's position; `ai:` rooms and other domains left out. Notes are kept apart from
    /// the stream.
    pub async fn inbox_lists_support_rooms_with_read_positions_and_notes(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let a = RoomKey::new("acme", "a");
        let b = RoomKey::new("acme", "b");
        append(store, text(&a, "a1")).await;
        append(store, text(&b, "b1")).await;
        append(store, text(&b, "b2")).await;
        append(store, text(&RoomKey::new("acme", "ai:conv"), "x")).await;
        append(store, text(&RoomKey::new("other", "c"), "c1")).await;
        store
            .transition(&a, None, waiting_decision())
            .await
            .expect("transition");
        store.mark_read(&b, "agent", 1).await.expect("read");
        let list = |statuses: Vec<RoomStatus>| {
            store.inbox(InboxQuery {
                domain_id: "acme".into(),
                statuses,
                reader: "agent".into(),
                limit: 10,
                opened_by: None,
                text: None,
            })
        };
        let all = list(Vec::new()).await.expect("inbox");
        let rooms: Vec<&str> = all.iter().map(|e| &*e.conversation.room.room_id).collect();
        assert_eq!(
            rooms,
            ["a", "b"],
            "waiting first; no ai: room, no other domain"
        );
        assert_eq!(all[0].conversation.status, RoomStatus::Waiting);
        assert_eq!(all[0].last_message.kind, "status");
        assert_eq!(all[1].conversation.status, RoomStatus::Bot);
        assert_eq!((all[1].last_message.seq, all[1].read_seq), (2, 1));
        assert_eq!(all[1].created_by.as_deref(), Some("alice"));
        let bots = list(vec![RoomStatus::Bot]).await.expect("inbox");
        assert_eq!(bots.len(), 1);
        assert_eq!(&*bots[0].conversation.room.room_id, "b");
        assert!(
            list(vec![RoomStatus::Resolved])
                .await
                .expect("inbox")
                .is_empty()
        );

        let agent = parlor::model::Agent {
            user_id: "alice".into(),
            name: "Alice".into(),
        };
        for t in ["first", "second"] {
            store
                .add_note(NewNote {
                    room: b.clone(),
                    author: agent.clone(),
                    text: t.into(),
                })
                .await
                .expect("note");
        }
        let notes = store.notes(&b, 10).await.expect("notes");
        let texts: Vec<&str> = notes.iter().map(|n| n.text.as_str()).collect();
        assert_eq!(texts, ["first", "second"]);
        assert_eq!(notes[0].author, agent);
        assert!(store.notes(&a, 10).await.expect("notes").is_empty());
        assert_eq!(last_seq(store, &b).await, 2, "notes are not messages");
        let missing = store
            .add_note(NewNote {
                room: RoomKey::new("acme", "nowhere"),
                author: agent,
                text: "x".into(),
            })
            .await;
        assert!(
            matches!(missing, Err(StoreError::Invalid(_))),
            "{missing:?}"
        );
    }

    /// The activity counters are exactly what was stored: messages per role (a duplicate
    /// once, a Pusher channel's never), rooms created, escalations, each room's first AI
    /// reply and whether it reached a human, first responses; per domain, whatever the
    /// batches were, and after a reopen.
    pub async fn activity_counts_what_was_stored(ctx: &mut Ctx) {
        use parlor::store::stats::Activity;
        let store = Arc::clone(&ctx.store);
        let started = chrono::Utc::now() - chrono::Duration::seconds(1);
        let r1 = RoomKey::new(SHOP, "r1"); // AI replies only
        let r2 = RoomKey::new(SHOP, "r2"); // AI replies, then a human
        let r3 = RoomKey::new(SHOP, "r3"); // a human first, then an AI reply
        let channel = RoomKey::new(SHOP, "#app#news");
        let blog = RoomKey::new("blog", "r1");
        let as_role = |key: &RoomKey, role: &str, i: usize| NewMessage {
            author: Author {
                role: role.to_owned(),
                ..author(if role == "assistant" { "bot" } else { "alice" })
            },
            ..keyed(key, format!("{role} {i}"), &format!("{role}-{i}"))
        };
        // Visitors' messages and the assistant's replies at once, so they are batched.
        let mut writes = Vec::new();
        for i in 0..12 {
            for (key, role) in [
                (&r1, "visitor"),
                (&r1, "assistant"),
                (&r2, "visitor"),
                (&r2, "assistant"),
                (&channel, "visitor"),
                (&blog, "visitor"),
            ] {
                let store = Arc::clone(&store);
                let message = as_role(key, role, i);
                writes.push(tokio::spawn(async move { store.append(message).await }));
            }
        }
        // The same client message id again: stored, and counted, once.
        store.append(as_role(&r1, "visitor", 0)).await.unwrap();
        for w in writes {
            w.await.unwrap().unwrap();
        }

        let escalated = store
            .transition(&r2, Some("alice"), waiting_decision())
            .await
            .unwrap();
        assert!(escalated.message.is_some());
        let responded = store
            .first_response(&r2, parlor::model::now_ms())
            .await
            .unwrap()
            .expect("the first response of a waiting room");
        store
            .transition(&r3, Some("carol"), waiting_decision())
            .await
            .unwrap();
        append(&*store, as_role(&r3, "assistant", 99)).await;

        let expect = |metric: &str, n: i64| (metric.to_owned(), n);
        let mut wanted: Vec<(String, i64)> = vec![
            expect("conversations", 3),
            expect("conversations.ai", 3),
            expect("conversations.ai_only", 1),
            expect("escalated", 2),
            expect("messages.assistant", 25),
            expect("messages.system", 2),
            expect("messages.visitor", 24),
        ];
        wanted.sort();
        let totals = |rows: Vec<Activity>| {
            let mut sums: HashMap<String, i64> = HashMap::new();
            for row in rows {
                assert_eq!(
                    row.at.timestamp_millis() % 3_600_000,
                    0,
                    "hours: {}",
                    row.at
                );
                *sums.entry(row.metric).or_default() += row.n;
            }
            let mut sums: Vec<(String, i64)> = sums.into_iter().collect();
            sums.sort();
            sums
        };
        let to = chrono::Utc::now() + chrono::Duration::hours(1);
        let rows = store.activity(SHOP, started, to).await.unwrap();
        assert_eq!(totals(rows), wanted);
        let times = store.first_response_times(SHOP, started, to).await.unwrap();
        assert_eq!(times.len(), 1);
        let expected_ms = u64::try_from(responded.first_response_ms().unwrap()).unwrap();
        assert_eq!(times[0], expected_ms);
        assert_eq!(
            totals(store.activity("blog", started, to).await.unwrap()),
            [expect("conversations", 1), expect("messages.visitor", 12)],
            "another domain"
        );
        // A range that ends before the writes holds none of them.
        let early = store
            .activity(
                SHOP,
                started - chrono::Duration::hours(5),
                started - chrono::Duration::hours(2),
            )
            .await
            .unwrap();
        assert!(early.is_empty(), "{early:?}");

        ctx.reopen().await;
        let rows = ctx.store.activity(SHOP, started, to).await.unwrap();
        assert_eq!(totals(rows), wanted, "after a reopen");
    }

    // --------------------------------------------------------------------------------------
    // Webhook outbox
    // --------------------------------------------------------------------------------------

    const HOOK: &str = "http://receiver.example/hook";

    /// Subscribes domain `hooked` to `events` at [`HOOK`].
    fn subscribe(store: &dyn Store, events: &[WebhookEvent]) {
        let mut hooked = DomainConfig::new("hooked", "Hooked");
        hooked.webhooks = vec![WebhookConfig {
            url: HOOK.into(),
            secret: parlor::config::Secret::new("0123456789abcdef"),
            events: events.to_vec(),
        }];
        store
            .webhook_subscriptions()
            .replace([&hooked, &DomainConfig::new("quiet", "Quiet")]);
    }

    async fn claim(
        store: &dyn Store,
        holder: &str,
        at: chrono::DateTime<chrono::Utc>,
    ) -> Vec<ClaimedRow> {
        store
            .claim_webhooks(&Claim {
                holder: holder.into(),
                now: at,
                lease: Duration::from_secs(30),
                limit: 100,
                per_endpoint: 100,
                skip: Vec::new(),
            })
            .await
            .expect("claim")
    }

    fn attempt(outcome: Outcome) -> Attempt {
        Attempt {
            at: chrono::Utc::now(),
            outcome,
            http_status: Some(500),
            error: Some("the receiver answered 500".into()),
        }
    }

    fn seq_of(row: &ClaimedRow) -> u64 {
        serde_json::from_str::<Value>(&row.payload).unwrap()["seq"]
            .as_u64()
            .unwrap()
    }

    /// Messages and transitions of a subscribed domain write outbox rows with them, a quiet
    /// domain's none; a partition gives out its rows one at a time, in order, to one holder
    /// per lease; a retry holds the partition back until it is due; a lease that passed
    /// hands the row to another holder; outcomes are recorded by the holder only (delivery
    /// by anyone); the log lists, filters and pages; pruning removes ended rows only.
    pub async fn webhook_outbox_claims_in_order_with_leases(ctx: &mut Ctx) {
        let store = &*ctx.store;
        subscribe(
            store,
            &[
                WebhookEvent::MessageCreated,
                WebhookEvent::ConversationEscalated,
            ],
        );
        let (a, b) = (RoomKey::new("hooked", "a"), RoomKey::new("hooked", "b"));
        let quiet = RoomKey::new("quiet", "a");
        // Queued together: on PostgreSQL one batch append, with its outbox rows.
        let mut answers = Vec::new();
        for (key, text_of) in [
            (&a, "a1"),
            (&b, "b1"),
            (&quiet, "q1"),
            (&a, "a2"),
            (&a, "a3"),
        ] {
            answers.push(
                store
                    .queue_append(text(key, text_of))
                    .await
                    .expect("queued"),
            );
        }
        for answer in answers {
            answer.await.expect("appended");
        }
        append(store, text(&b, "b2")).await;
        append(store, text(&quiet, "q2")).await;
        // A duplicate writes no event.
        append(store, keyed(&a, "a-keyed", "k1")).await;
        assert!(append(store, keyed(&a, "a-keyed", "k1")).await.duplicate);
        let moved = store
            .transition(&a, Some("ann"), waiting_decision())
            .await
            .expect("transition");
        assert!(moved.message.is_some());
        let (pending, oldest) = store.webhook_backlog().await.unwrap();
        assert_eq!(
            pending, 8,
            "a: 4 messages, status message, escalation; b: 2"
        );
        assert!(oldest.is_some());

        let now = chrono::Utc::now();
        let first = claim(store, "n1", now).await;
        let heads: Vec<(&str, &str, u64)> = first
            .iter()
            .map(|r| (r.partition.as_str(), r.event.as_str(), seq_of(r)))
            .collect();
        assert_eq!(
            heads,
            [
                ("room:a", "message.created", 1),
                ("room:b", "message.created", 1)
            ]
        );
        assert!(
            first
                .iter()
                .all(|r| r.domain_id == "hooked" && r.endpoint == HOOK)
        );
        assert!(claim(store, "n2", now).await.is_empty(), "heads are held");

        // a's head delivered: its next row comes out, to anyone.
        let (a1, b1) = (&first[0], &first[1]);
        assert!(
            store
                .finish_webhook(&a1.id, "n1", attempt(Outcome::Delivered))
                .await
                .unwrap()
        );
        let next = claim(store, "n2", now).await;
        assert_eq!(next.len(), 1);
        assert_eq!(
            (next[0].partition.as_str(), seq_of(&next[0])),
            ("room:a", 2)
        );

        // b's head fails: retried in an hour, and b waits for it.
        let later = now + chrono::Duration::hours(1);
        assert!(
            !store
                .finish_webhook(&b1.id, "n2", attempt(Outcome::Retry(later)))
                .await
                .unwrap(),
            "only the holder records a failure"
        );
        assert!(
            store
                .finish_webhook(&b1.id, "n1", attempt(Outcome::Retry(later)))
                .await
                .unwrap()
        );
        assert!(claim(store, "n3", now).await.is_empty());
        // n2's lease on a2 passes: a2 goes to n3, with b's retry when due.
        let after_lease = now + chrono::Duration::seconds(31);
        let taken = claim(store, "n3", after_lease).await;
        assert_eq!(taken.len(), 1);
        assert_eq!(
            (taken[0].id.as_str(), taken[0].attempts),
            (next[0].id.as_str(), 0)
        );
        // The late holder's delivery still counts.
        assert!(
            store
                .finish_webhook(&taken[0].id, "n2", attempt(Outcome::Delivered))
                .await
                .unwrap()
        );
        let due = claim(store, "n3", later).await;
        let by_room = |rows: &[ClaimedRow], room: &str| -> ClaimedRow {
            rows.iter()
                .find(|r| r.partition == room)
                .cloned()
                .unwrap_or_else(|| panic!("no row of {room} in {rows:?}"))
        };
        assert_eq!(due.len(), 2, "{due:?}");
        let (a3, b1_again) = (by_room(&due, "room:a"), by_room(&due, "room:b"));
        assert_eq!(seq_of(&a3), 3);
        assert_eq!(
            (b1_again.id.as_str(), b1_again.attempts),
            (b1.id.as_str(), 1)
        );
        // A dead row lets its partition go on.
        assert!(
            store
                .finish_webhook(&b1.id, "n3", attempt(Outcome::Dead))
                .await
                .unwrap()
        );
        assert!(
            store
                .finish_webhook(&a3.id, "n3", attempt(Outcome::Delivered))
                .await
                .unwrap()
        );
        let rest = claim(store, "n1", later).await;
        assert_eq!(rest.len(), 2, "{rest:?}");
        let (a4, b2) = (by_room(&rest, "room:a"), by_room(&rest, "room:b"));
        assert_eq!((seq_of(&a4), seq_of(&b2)), (4, 2));
        assert!(
            claim(store, "n2", later + chrono::Duration::seconds(10))
                .await
                .is_empty(),
            "n1 holds them"
        );
        // A row given back unattempted is claimed again at once, unchanged.
        assert!(
            store
                .finish_webhook(&a4.id, "n1", attempt(Outcome::Released))
                .await
                .unwrap()
        );
        let again = claim(store, "n2", later).await;
        assert_eq!(again.len(), 1);
        assert_eq!(
            (again[0].id.as_str(), again[0].attempts),
            (a4.id.as_str(), 0)
        );

        // The log: newest first, filtered, paged.
        let query = |status, before, limit| DeliveryQuery {
            domain_id: "hooked".into(),
            status,
            before,
            limit,
        };
        let all = store
            .webhook_deliveries(query(None, None, 100))
            .await
            .unwrap();
        assert_eq!(all.len(), 8);
        assert!(all.windows(2).all(|w| w[0].position > w[1].position));
        assert_eq!(all.last().unwrap().id, a1.id);
        assert_eq!(all[0].event, "conversation.escalated");
        let dead = store
            .webhook_deliveries(query(Some(DeliveryStatus::Dead), None, 100))
            .await
            .unwrap();
        assert_eq!(dead.len(), 1);
        assert_eq!(
            (dead[0].id.as_str(), dead[0].attempts, dead[0].last_status),
            (b1.id.as_str(), 2, Some(500))
        );
        assert_eq!(
            dead[0].last_error.as_deref(),
            Some("the receiver answered 500")
        );
        assert!(dead[0].finished_at.is_some() && dead[0].next_attempt_at.is_none());
        let delivered = store
            .webhook_deliveries(query(Some(DeliveryStatus::Delivered), None, 100))
            .await
            .unwrap();
        assert_eq!(delivered.len(), 3);
        let page1 = store
            .webhook_deliveries(query(None, None, 5))
            .await
            .unwrap();
        let page2 = store
            .webhook_deliveries(query(None, Some(page1[4].position), 5))
            .await
            .unwrap();
        assert_eq!(page2.len(), 3);
        let ids: HashSet<&str> = page1.iter().chain(&page2).map(|d| d.id.as_str()).collect();
        assert_eq!(ids.len(), 8, "pages do not overlap");
        assert!(
            store
                .webhook_deliveries(DeliveryQuery {
                    domain_id: "quiet".into(),
                    ..query(None, None, 100)
                })
                .await
                .unwrap()
                .is_empty()
        );

        // Pruning removes what ended before the cut, a few at a time, never pending rows.
        let cut = chrono::Utc::now() + chrono::Duration::days(1);
        assert_eq!(store.prune_webhooks(cut, 3).await.unwrap(), 3);
        assert_eq!(store.prune_webhooks(cut, 3).await.unwrap(), 1);
        assert_eq!(store.prune_webhooks(cut, 3).await.unwrap(), 0);
        assert_eq!(store.webhook_backlog().await.unwrap().0, 4);
    }

    /// Whether each pending row of domain `hooked` is due (has a next attempt), oldest first.
    async fn pending_due(store: &dyn Store) -> Vec<bool> {
        let mut log = store
            .webhook_deliveries(DeliveryQuery {
                domain_id: "hooked".into(),
                status: Some(DeliveryStatus::Pending),
                before: None,
                limit: 100,
            })
            .await
            .unwrap();
        log.sort_by_key(|d| d.position);
        log.iter().map(|d| d.next_attempt_at.is_some()).collect()
    }

    /// Only a partition's head is due: the rows behind it wait with no time of their own
    /// (so a claim reads heads, never a backlog), and the next becomes due as the head ends,
    /// whether delivered or given up; a retried head keeps the rest waiting.
    pub async fn webhook_rows_behind_a_head_wait_until_it_ends(ctx: &mut Ctx) {
        let store = &*ctx.store;
        subscribe(store, &[WebhookEvent::MessageCreated]);
        let a = RoomKey::new("hooked", "a");
        for i in 1..=4 {
            append(store, text(&a, format!("a{i}"))).await;
        }
        assert_eq!(pending_due(store).await, [true, false, false, false]);
        let now = chrono::Utc::now();
        let head = claim(store, "n1", now).await;
        assert_eq!(head.len(), 1);
        assert_eq!(seq_of(&head[0]), 1);
        // Retried: the rest still waits.
        let later = now + chrono::Duration::minutes(5);
        store
            .finish_webhook(&head[0].id, "n1", attempt(Outcome::Retry(later)))
            .await
            .unwrap();
        assert_eq!(pending_due(store).await, [true, false, false, false]);
        assert!(claim(store, "n1", now).await.is_empty());
        // Given up: the next is due.
        let again = claim(store, "n1", later).await;
        assert_eq!(again.len(), 1);
        store
            .finish_webhook(&again[0].id, "n1", attempt(Outcome::Dead))
            .await
            .unwrap();
        assert_eq!(pending_due(store).await, [true, false, false]);
        let second = claim(store, "n1", later).await;
        assert_eq!(seq_of(&second[0]), 2);
        store
            .finish_webhook(&second[0].id, "n1", attempt(Outcome::Delivered))
            .await
            .unwrap();
        // Written after the head ended: due at once when it is the head.
        let third = claim(store, "n1", later).await;
        assert_eq!(seq_of(&third[0]), 3);
        store
            .finish_webhook(&third[0].id, "n1", attempt(Outcome::Delivered))
            .await
            .unwrap();
        let fourth = claim(store, "n1", later).await;
        store
            .finish_webhook(&fourth[0].id, "n1", attempt(Outcome::Delivered))
            .await
            .unwrap();
        append(store, text(&a, "a5")).await;
        assert_eq!(
            pending_due(store).await,
            [true],
            "a new head is due at once"
        );
    }

    /// A claim takes at most `per_endpoint` rows of one URL and none of the URLs it skips,
    /// so one busy receiver cannot take every place of a node.
    pub async fn webhook_claims_are_capped_per_url(ctx: &mut Ctx) {
        let store = &*ctx.store;
        let mut hooked = DomainConfig::new("hooked", "Hooked");
        let other = "http://other.example/hook";
        hooked.webhooks = vec![
            WebhookConfig {
                url: HOOK.into(),
                secret: parlor::config::Secret::new("0123456789abcdef"),
                events: vec![WebhookEvent::MessageCreated],
            },
            WebhookConfig {
                url: other.into(),
                secret: parlor::config::Secret::new("0123456789abcdef"),
                events: vec![WebhookEvent::MessageCreated],
            },
        ];
        store.webhook_subscriptions().replace([&hooked]);
        for room in ["r1", "r2", "r3", "r4", "r5"] {
            append(store, text(&RoomKey::new("hooked", room), "hi")).await;
        }
        let claim = |per_endpoint, skip: Vec<String>| Claim {
            holder: "n1".into(),
            now: chrono::Utc::now(),
            lease: Duration::from_secs(30),
            limit: 100,
            per_endpoint,
            skip,
        };
        let capped = store.claim_webhooks(&claim(2, Vec::new())).await.unwrap();
        let count =
            |rows: &[ClaimedRow], url: &str| rows.iter().filter(|r| r.endpoint == url).count();
        assert_eq!(
            (count(&capped, HOOK), count(&capped, other)),
            (2, 2),
            "{capped:?}"
        );
        let rooms: Vec<&str> = capped
            .iter()
            .filter(|r| r.endpoint == HOOK)
            .map(|r| r.partition.as_str())
            .collect();
        assert_eq!(rooms, ["room:r1", "room:r2"], "the oldest first");
        let skipping = store
            .claim_webhooks(&claim(100, vec![HOOK.to_owned()]))
            .await
            .unwrap();
        assert_eq!((count(&skipping, HOOK), count(&skipping, other)), (0, 3));
        let rest = store.claim_webhooks(&claim(100, Vec::new())).await.unwrap();
        assert_eq!((count(&rest, HOOK), count(&rest, other)), (3, 0));
    }

    /// Notifications, visitors' visits and completed sessions write their events with them;
    /// a departure is written on its own; unsubscribed events write nothing.
    pub async fn webhook_events_of_notifications_visitors_and_sessions(ctx: &mut Ctx) {
        let store = &*ctx.store;
        subscribe(
            store,
            &[
                WebhookEvent::NotificationCreated,
                WebhookEvent::VisitorAdded,
                WebhookEvent::SessionCompleted,
            ],
        );
        store
            .add_notifications(vec![
                notice("hooked", "ann", None, "one"),
                notice("quiet", "ann", None, "two"),
                notice("hooked", "ann", None, "three"),
            ])
            .await
            .unwrap();
        let t0 = 1_765_022_400_000;
        let minute = 60_000;
        store
            .record_sightings(vec![
                sighting("hooked", "v1", t0, Some("/")),
                sighting("hooked", "v1", t0 + minute, Some("/a")),
                sighting("hooked", "v1", t0 + 40 * minute, Some("/b")),
                sighting("quiet", "v1", t0, Some("/")),
            ])
            .await
            .unwrap();
        let mut new = new_session("s1", "ann", "intake");
        new.domain_id = "hooked".into();
        let (opened, _) = store.open_session(new).await.unwrap();
        store
            .complete_session(
                "s1",
                opened.version,
                step(vec![], None, &json!({})),
                document("d1", Some("# Ann")),
            )
            .await
            .unwrap()
            .expect("completed");
        let removed = store.webhook_subscriptions().rows(
            "hooked",
            WebhookEvent::VisitorRemoved,
            Partition::Visitor("v1"),
            || json!({}),
        );
        assert!(removed.is_empty(), "visitor.removed is not subscribed");
        store.enqueue_webhooks(removed).await.unwrap();

        let rows = claim(store, "n1", chrono::Utc::now()).await;
        let mut got: Vec<(String, String)> = rows
            .iter()
            .map(|r| (r.partition.clone(), r.event.clone()))
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                ("session:s1".to_owned(), "session.completed".to_owned()),
                ("user:ann".to_owned(), "notification.created".to_owned()),
                ("visitor:v1".to_owned(), "visitor.added".to_owned()),
            ]
        );
        for row in &rows {
            let data: Value = serde_json::from_str(&row.payload).unwrap();
            match row.event.as_str() {
                "notification.created" => {
                    assert_eq!(
                        (data["content"].as_str(), data["seq"].as_u64()),
                        (Some("one"), Some(1))
                    );
                }
                "visitor.added" => {
                    assert_eq!(
                        (data["page"].as_str(), data["firstVisit"].as_bool()),
                        (Some("/"), Some(true))
                    );
                }
                _ => assert_eq!(data["document"]["id"], "d1"),
            }
            store
                .finish_webhook(&row.id, "n1", attempt(Outcome::Delivered))
                .await
                .unwrap();
        }
        let rows = claim(store, "n1", chrono::Utc::now()).await;
        let seconds: Vec<(String, Value)> = rows
            .iter()
            .map(|r| {
                let data: Value = serde_json::from_str(&r.payload).unwrap();
                (r.event.clone(), data)
            })
            .collect();
        assert_eq!(seconds.len(), 2, "{seconds:?}");
        assert!(
            seconds
                .iter()
                .any(|(e, d)| e == "notification.created" && d["content"] == "three")
        );
        assert!(
            seconds.iter().any(|(e, d)| e == "visitor.added"
                && d["page"] == "/b"
                && d["firstVisit"] == false)
        );
        assert_eq!(store.webhook_backlog().await.unwrap().0, 2);
    }
}

// ------------------------------------------------------------------------------------------
// PostgreSQL only: several nodes on one database, and a database that goes away
// ------------------------------------------------------------------------------------------

mod postgres_nodes {
    use super::*;
    use parlor::store::postgres::{ACQUIRE_TIMEOUT, DEADLINE};
    use std::net::SocketAddr;
    use std::time::Instant;

    /// A store ("node") and what its commit sink reports.
    type Node = (Arc<dyn Store>, UnboundedReceiver<Arc<Message>>);

    /// Two nodes on one fresh database.
    struct TwoNodes {
        db: PostgresDatabase,
        nodes: [Node; 2],
    }

    impl TwoNodes {
        /// `None` when PARLOR_TEST_DATABASE_URL is unset. Node 0 has small batches, node 1
        /// the default ones, so their transactions overlap in many different shapes.
        async fn open() -> Option<Self> {
            let db = PostgresDatabase::new(StoreConfig::default())?;
            let open = async |config: StoreConfig| {
                let (sink, committed) = mpsc::unbounded_channel();
                let store = db
                    .open_with(&config, sink.into())
                    .await
                    .expect("open a node");
                (Arc::new(store) as Arc<dyn Store>, committed)
            };
            let a = open(StoreConfig {
                max_batch: 4,
                ..StoreConfig::default()
            })
            .await;
            let b = open(StoreConfig::default()).await;
            Some(Self { db, nodes: [a, b] })
        }

        fn store(&self, node: usize) -> Arc<dyn Store> {
            Arc::clone(&self.nodes[node].0)
        }

        async fn close(self) {
            for (store, _) in &self.nodes {
                store.close().await;
            }
            drop(self.db);
        }
    }

    /// Both nodes append to one room at once (and, in between, to nine other rooms in
    /// opposite orders, so their batches lock rooms in conflicting arrival orders): the
    /// room's seqs are 1..=N, each once; both nodes read the same history; each node's sink
    /// reports its own messages in seq order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_nodes_appending_to_one_room_get_gapless_unique_seqs() {
        const PER_NODE: usize = 150;
        let Some(mut cluster) = TwoNodes::open().await else {
            return;
        };
        let room = RoomKey::new("acme", "shared");
        let others: Vec<RoomKey> = (0..9)
            .map(|i| RoomKey::new("acme", format!("other-{i}")))
            .collect();
        let mut tasks = Vec::new();
        for node in 0..2 {
            for i in 0..PER_NODE {
                let store = cluster.store(node);
                let message = text(&room, format!("node {node} #{i}"));
                tasks.push(tokio::spawn(
                    async move { (node, store.append(message).await) },
                ));
                if i % 3 == 0 {
                    let other = if node == 0 {
                        &others[i % 9]
                    } else {
                        &others[8 - i % 9]
                    };
                    let store = cluster.store(node);
                    let message = text(other, format!("node {node} elsewhere #{i}"));
                    tasks.push(tokio::spawn(async move {
                        (node + 10, store.append(message).await)
                    }));
                }
            }
        }
        let mut by_seq = BTreeMap::new();
        let mut acknowledged = [Vec::new(), Vec::new()];
        for task in tasks {
            let (node, result) = task.await.expect("task");
            let appended = result.expect("append on a node");
            if node >= 10 {
                continue;
            }
            assert!(!appended.duplicate);
            let seq = appended.message.seq;
            acknowledged[node].push(Arc::clone(&appended.message));
            if let Some(previous) = by_seq.insert(seq, appended.message) {
                panic!("seq {seq} assigned twice (also to {previous:?})");
            }
        }
        let n = u64::try_from(2 * PER_NODE).expect("count");
        assert_eq!(by_seq.keys().copied().collect::<Vec<_>>(), range(1, n));
        for node in 0..2 {
            let store = cluster.store(node);
            let stored = after(&*store, &room, 0, 1000).await;
            assert_eq!(stored.len(), by_seq.len(), "node {node} sees every message");
            for (stored, returned) in stored.iter().zip(by_seq.values()) {
                assert_eq!(
                    stored, &**returned,
                    "node {node} reads what was acknowledged"
                );
            }
            assert_eq!(last_seq(&*store, &room).await, n);
        }
        for (node, (store, committed)) in cluster.nodes.iter_mut().enumerate() {
            let mut reported = Vec::new();
            let total = acknowledged[node].len() + PER_NODE.div_ceil(3);
            for m in recv_committed(committed, total).await {
                if m.room == room {
                    reported.push(m);
                }
            }
            let seqs: Vec<u64> = reported.iter().map(|m| m.seq).collect();
            assert!(
                seqs.windows(2).all(|w| w[0] < w[1]),
                "node {node}'s sink reports in seq order: {seqs:?}"
            );
            acknowledged[node].sort_by_key(|m| m.seq);
            assert_eq!(
                reported, acknowledged[node],
                "node {node} reports its own commits"
            );
            assert_nothing_more_committed(committed).await;
            for other in &others {
                let stored = after(&**store, other, 0, 1000).await;
                assert_eq!(
                    seqs_of_messages(&stored),
                    range(1, u64::try_from(stored.len()).expect("count"))
                );
            }
        }
        cluster.close().await;
    }

    fn seqs_of_messages(messages: &[Message]) -> Vec<u64> {
        messages.iter().map(|m| m.seq).collect()
    }

    /// The same client message id sent through both nodes at once is stored once; the same
    /// "take it" decision made on both nodes at once wins once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_nodes_agree_on_duplicates_and_transitions() {
        let Some(cluster) = TwoNodes::open().await else {
            return;
        };
        let room = RoomKey::new("acme", "contested");
        let mut sends = Vec::new();
        let mut decisions = Vec::new();
        for i in 0..20 {
            let store = cluster.store(i % 2);
            let message = keyed(&room, format!("attempt {i}"), "same-id");
            sends.push(tokio::spawn(async move { store.append(message).await }));
        }
        let mut originals = Vec::new();
        let mut all = Vec::new();
        for task in sends {
            let appended = task.await.expect("task").expect("append");
            if !appended.duplicate {
                originals.push(Arc::clone(&appended.message));
            }
            all.push(appended.message);
        }
        assert_eq!(originals.len(), 1, "stored once across nodes");
        assert!(all.iter().all(|m| **m == *originals[0]));
        for i in 0..20 {
            let store = cluster.store(i % 2);
            let key = room.clone();
            decisions.push(tokio::spawn(async move {
                store.transition(&key, None, waiting_decision()).await
            }));
        }
        let mut winners = 0;
        for task in decisions {
            let t = task.await.expect("task").expect("transition");
            if t.message.is_some() {
                winners += 1;
            }
            assert_eq!(t.conversation.status, RoomStatus::Waiting);
            assert_eq!(
                t.conversation.version, 1,
                "every loser saw the winner's state"
            );
        }
        assert_eq!(winners, 1, "one of the decisions on two nodes wins");
        for node in 0..2 {
            assert_eq!(last_seq(&*cluster.store(node), &room).await, 2);
        }
        cluster.close().await;
    }

    /// Nodes started at the same moment on an empty database migrate it once between them
    /// and all come up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn nodes_starting_together_migrate_once() {
        let Some(db) = PostgresDatabase::new(StoreConfig::default()) else {
            return;
        };
        db.create().await;
        let config = StoreConfig::default();
        let opening = (0..4).map(|_| db.open_with(&config, mpsc::unbounded_channel().0.into()));
        let stores = futures_util::future::join_all(opening).await;
        for store in &stores {
            let store = store.as_ref().expect("every node starts");
            store.health().await.expect("healthy");
        }
        let room = RoomKey::new("acme", "after-start");
        for (i, store) in stores.iter().enumerate() {
            let store = store.as_ref().expect("open");
            let appended = append(store, text(&room, format!("from node {i}"))).await;
            assert_eq!(appended.message.seq, u64::try_from(i + 1).expect("seq"));
        }
        for store in stores.iter().flatten() {
            store.close().await;
        }
    }

    /// What the conformance stories do not compare: usage grouped by model and by day
    /// (integer means, sums, byte order of keys), documents and domains in byte order, and
    /// the inbox leaving out `ai:` rooms whatever their case. The same writes go to SQLite
    /// and PostgreSQL, and every read must answer the same.
    #[tokio::test]
    async fn listings_match_sqlite() {
        use parlor::store::{DomainChange, UsageGrouping, UsageRecord};
        let Some(pg_db) = PostgresDatabase::new(StoreConfig::default()) else {
            return;
        };
        let sqlite_db = SqliteDatabase::boxed(StoreConfig::default()).expect("sqlite");
        let (pg, _) = open(&pg_db).await;
        let (lite, _) = open(&*sqlite_db).await;
        let day = |d: i64, ms: i64| {
            chrono::DateTime::from_timestamp_millis(1_764_633_600_000 + d * 86_400_000 + ms)
                .expect("time")
        };
        let usage = [
            ("openai", "gpt-4o-mini", 10, 5, 1, "ok", day(0, 5)),
            (
                "openai",
                "gpt-4o-mini",
                20,
                7,
                2,
                "timeout",
                day(0, 86_399_999),
            ),
            ("Anthropic", "claude", 3, 4, 100, "ok", day(1, 0)),
            ("kb", "bm25", 0, 0, 7, "cancelled", day(2, 1)),
            ("_local", "Zeta", 1, 1, 3, "ok", day(2, 2)),
            ("kb", "bm25", 0, 0, 8, "ok", day(9, 0)),
        ];
        let all = [pg.as_ref(), lite.as_ref()];
        for store in all {
            for (provider, model, prompt, completion, latency, outcome, at) in usage {
                store
                    .record_usage(UsageRecord {
                        domain_id: "acme".into(),
                        room_id: Some("r".into()),
                        user_id: None,
                        provider: provider.into(),
                        model: model.into(),
                        prompt_tokens: prompt,
                        completion_tokens: completion,
                        latency_ms: latency,
                        outcome: outcome.into(),
                        created_at: at,
                    })
                    .await
                    .expect("record usage");
            }
            for name in ["b.md", "B.md", "a.md", "_x.md", "Z.txt"] {
                store
                    .change_domains(DomainChange::PutDocument {
                        domain_id: "acme".into(),
                        name: name.into(),
                        text: format!("text of {name}"),
                    })
                    .await
                    .expect("put document");
            }
            for id in ["acme", "Zed", "_under", "a.b", "Acme"] {
                store.upsert_domain(id, id).await.expect("declare");
            }
            for room in ["support-1", "AI:upper", "ai:lower", "Ai:mixed", "aix"] {
                append(store, text(&RoomKey::new("acme", room), "hello")).await;
            }
        }
        let usage_of = async |store: &dyn Store, group| {
            store
                .usage("acme", day(0, 0), day(9, 0), group)
                .await
                .expect("usage")
        };
        for group in [UsageGrouping::Model, UsageGrouping::Day] {
            let expected = usage_of(lite.as_ref(), group).await;
            assert!(!expected.is_empty());
            assert_eq!(usage_of(pg.as_ref(), group).await, expected, "{group:?}");
        }
        let documents = async |store: &dyn Store| {
            store
                .documents("acme")
                .await
                .expect("documents")
                .into_iter()
                .map(|(name, text, _)| (name, text))
                .collect::<Vec<_>>()
        };
        assert_eq!(documents(&*pg).await, documents(&*lite).await);
        assert_eq!(
            pg.domains().await.expect("domains"),
            lite.domains().await.expect("domains")
        );
        let inbox = async |store: &dyn Store| {
            store
                .inbox(InboxQuery {
                    domain_id: "acme".into(),
                    statuses: Vec::new(),
                    reader: "agent".into(),
                    limit: 10,
                    opened_by: None,
                    text: None,
                })
                .await
                .expect("inbox")
                .into_iter()
                .map(|e| e.conversation.room.room_id.to_string())
                .collect::<HashSet<_>>()
        };
        let expected = inbox(&*lite).await;
        assert_eq!(expected, HashSet::from(["support-1".into(), "aix".into()]));
        assert_eq!(inbox(&*pg).await, expected);
        pg.close().await;
        lite.close().await;
    }

    /// A TCP relay to the PostgreSQL server that the test can cut and restore, as if the
    /// database went away and came back on the same address.
    struct Relay {
        port: u16,
        upstream: SocketAddr,
        task: Option<tokio::task::JoinHandle<()>>,
    }

    impl Relay {
        async fn start(port: u16, upstream: SocketAddr) -> Self {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket.set_reuseaddr(true).expect("reuseaddr");
            socket
                .bind(SocketAddr::from(([127, 0, 0, 1], port)))
                .expect("bind the relay");
            let listener = socket.listen(64).expect("listen");
            let port = listener.local_addr().expect("address").port();
            let task = tokio::spawn(async move {
                // Dropping the set (when this task is aborted) cuts every relayed connection.
                let mut connections = tokio::task::JoinSet::new();
                while let Ok((mut client, _)) = listener.accept().await {
                    connections.spawn(async move {
                        if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                }
            });
            Self {
                port,
                upstream,
                task: Some(task),
            }
        }

        /// Closes the listener and every connection.
        async fn cut(&mut self) {
            if let Some(task) = self.task.take() {
                task.abort();
                let _ = task.await;
            }
        }

        async fn restore(&mut self) {
            *self = Relay::start(self.port, self.upstream).await;
        }
    }

    /// The test server's TCP address (`None` for a Unix socket).
    async fn server_address(server: &str) -> Option<SocketAddr> {
        use std::str::FromStr;
        let options = sqlx::postgres::PgConnectOptions::from_str(server).expect("parse the URL");
        if options.get_host().starts_with('/') {
            eprintln!("skipped: the relay test needs a TCP PARLOR_TEST_DATABASE_URL");
            return None;
        }
        tokio::net::lookup_host((options.get_host(), options.get_port()))
            .await
            .expect("resolve the test server")
            .next()
    }

    /// The URL of `database` on the test server, reached through 127.0.0.1:`port`.
    fn through_port(server: &str, database: &str, port: u16) -> String {
        let url = with_database(server, database);
        // Swap the authority's host and port for the relay's.
        let start = url.find("://").map_or(0, |i| i + 3);
        let end = url[start..].find('/').map_or(url.len(), |i| start + i);
        let authority = &url[start..end];
        let user = authority.rfind('@').map_or("", |i| &authority[..=i]);
        format!("{}{user}127.0.0.1:{port}{}", &url[..start], &url[end..])
    }

    /// While PostgreSQL is unreachable, writes, reads and health fail within a bound with
    /// `Unavailable` (nothing hangs, nothing is acknowledged); when it is back, the same
    /// store recovers by itself and the room continues without a gap.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unreachable_postgres_fails_fast_and_the_store_recovers() {
        let Some(db) = PostgresDatabase::new(StoreConfig::default()) else {
            return;
        };
        let Some(upstream) = server_address(&db.server).await else {
            return;
        };
        db.create().await;
        let mut relay = Relay::start(0, upstream).await;
        let url = through_port(&db.server, &db.name, relay.port);

        let (sink, mut committed) = mpsc::unbounded_channel();
        let store = PostgresStore::open(&url, &StoreConfig::default(), sink)
            .await
            .expect("open through the relay");
        let room = RoomKey::new("acme", "outage");
        assert_eq!(append(&store, text(&room, "before")).await.message.seq, 1);
        recv_committed(&mut committed, 1).await;

        relay.cut().await;
        let bound = DEADLINE + Duration::from_secs(2);
        let started = Instant::now();
        let result = tokio::time::timeout(bound, store.append(text(&room, "during")))
            .await
            .expect("append returns while PostgreSQL is unreachable");
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "expected Unavailable, got {result:?}"
        );
        eprintln!("append failed after {:?}: {result:?}", started.elapsed());
        let read = tokio::time::timeout(bound, store.messages_after(&room, 0, 10))
            .await
            .expect("a read returns");
        assert!(matches!(read, Err(StoreError::Unavailable(_))), "{read:?}");
        let health = tokio::time::timeout(bound, store.health())
            .await
            .expect("health returns");
        assert!(
            health.is_err(),
            "health fails while PostgreSQL is unreachable"
        );
        assert_nothing_more_committed(&mut committed).await;

        relay.restore().await;
        let deadline = Instant::now() + ACQUIRE_TIMEOUT + DEADLINE;
        let recovered = loop {
            match store.append(text(&room, "after")).await {
                Ok(appended) => break appended,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("not yet recovered: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("the store did not recover: {e}"),
            }
        };
        assert_eq!(recovered.message.seq, 2, "the failed append left no gap");
        assert_eq!(
            recv_committed(&mut committed, 1).await,
            [Arc::clone(&recovered.message)]
        );
        assert_eq!(
            contents(&after(&store, &room, 0, 10).await),
            ["before", "after"]
        );
        store.health().await.expect("healthy again");
        store.close().await;
        relay.cut().await;
    }

    /// Opening a store whose PostgreSQL is not there fails at once with `Unavailable`.
    /// (Needs no server: the port is one nobody listens on.)
    #[tokio::test]
    async fn opening_an_unreachable_postgres_fails_with_unavailable() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = closed.local_addr().expect("address").port();
        drop(closed);
        let url = format!("postgres://parlor@127.0.0.1:{port}/parlor");
        let started = Instant::now();
        let (sink, _committed) = mpsc::unbounded_channel();
        let result = tokio::time::timeout(
            DEADLINE + Duration::from_secs(2),
            PostgresStore::open(&url, &StoreConfig::default(), sink),
        )
        .await
        .expect("open returns");
        assert!(
            matches!(result, Err(StoreError::Unavailable(ref e)) if e.contains("127.0.0.1")),
            "expected Unavailable naming the server, got {result:?}"
        );
        assert!(started.elapsed() < DEADLINE, "{:?}", started.elapsed());
    }
}
