//! The `parlor` command as a new user meets it: the real binary, run in a temporary
//! directory with a clean environment.
//!
//! Each test is a trap a first run fell into: `parlor token` outside the server's directory
//! made a new database and a token the server refused; a typo in the configuration was
//! reported twice, with a `default.` prefix and no line; errors showed Rust's `Debug` text;
//! logs in a file kept colour codes; a host name was not accepted by `--listen`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// `parlor` in `dir`, without the `PARLOR_*`, vendor and log variables of the environment
/// the tests run in.
fn parlor(dir: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_parlor"));
    command.current_dir(dir);
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy().to_ascii_uppercase();
        if name.starts_with("PARLOR_")
            || name.ends_with("_API_KEY")
            || name == "RUST_LOG"
            || name == "NO_COLOR"
        {
            command.env_remove(&name);
        }
    }
    command
}

/// What a finished command printed.
#[derive(Debug)]
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `command` to its end; a command that is still running after 30 s fails the test.
fn run(command: &mut Command) -> Outcome {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn parlor");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        stderr.read_to_string(&mut s).unwrap();
        s
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("parlor did not exit within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Outcome {
        code: status.code(),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

/// The names in `dir`, sorted.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A refusal: status 1 and one line on stderr, `error: …`, free of `Debug` text.
fn assert_one_sentence(outcome: &Outcome) -> &str {
    assert_eq!(outcome.code, Some(1), "{outcome:?}");
    let line = outcome.stderr.trim_end();
    assert!(line.starts_with("error: "), "{outcome:?}");
    assert_eq!(line.lines().count(), 1, "one line: {outcome:?}");
    for debug in ["Os {", "kind:", "Error {", "Caused by", "Some(", "\\\""] {
        assert!(!line.contains(debug), "Debug text {debug:?} in {line:?}");
    }
    line
}

/// A running server; killed when dropped so a failed assertion does not leave it behind.
struct Server {
    child: Child,
    addr: String,
    /// The log events it printed up to "parlor listening" and the URLs after it.
    events: Vec<Value>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `parlor serve` with JSON logs and `args` in `dir`, and waits for its start-up log.
fn serve(dir: &Path, args: &[&str]) -> Server {
    let mut child = parlor(dir)
        .args(["serve", "--log-format", "json"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn parlor");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(event) = serde_json::from_str::<Value>(&line) {
                let _ = tx.send(event);
            }
        }
    });
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    // The start-up log ends with the health check's URL.
    while !events
        .iter()
        .any(|e: &Value| e["fields"]["message"] == "health check")
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(event) => events.push(event),
            Err(_) => panic!("no start-up log; got {events:?}"),
        }
    }
    let addr = events
        .iter()
        .find(|e| e["fields"]["message"] == "parlor listening")
        .and_then(|e| e["fields"]["addr"].as_str())
        .expect("the listening address is logged")
        .to_owned();
    Server {
        child,
        addr,
        events,
    }
}

impl Server {
    /// The `url` field of the start-up event `message`.
    fn url(&self, message: &str) -> String {
        self.events
            .iter()
            .find(|e| e["fields"]["message"] == message)
            .and_then(|e| e["fields"]["url"].as_str())
            .unwrap_or_else(|| panic!("no {message:?} URL in {:?}", self.events))
            .to_owned()
    }

    /// `GET path` with an optional bearer token: the status and the body.
    fn get(&self, path: &str, token: Option<&str>) -> (u16, String) {
        let mut stream = TcpStream::connect(&self.addr).unwrap();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not HTTP: {response:?}"));
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }
}

#[test]
fn token_outside_the_server_directory_is_refused_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let outcome = run(parlor(dir.path()).args(["token", "--user", "alice"]));
    let line = assert_one_sentence(&outcome);
    assert!(line.contains("no Parlor database at parlor.db"), "{line}");
    assert!(line.contains("where the server runs"), "{line}");
    assert!(
        line.contains("--config") && line.contains("--database"),
        "{line}"
    );
    assert!(outcome.stdout.is_empty(), "no token: {outcome:?}");
    assert_eq!(files(dir.path()), Vec::<String>::new(), "nothing created");

    // A database named by flag, elsewhere, is not created either.
    let elsewhere = dir.path().join("data").join("parlor.db");
    let outcome = run(parlor(dir.path())
        .args(["token", "--user", "alice", "--database"])
        .arg(format!("sqlite://{}", elsewhere.display())));
    assert!(assert_one_sentence(&outcome).contains("no Parlor database"));
    assert_eq!(files(dir.path()), Vec::<String>::new(), "nothing created");
}

#[test]
fn token_signed_where_the_server_runs_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--listen", "127.0.0.1:0"]);
    let outcome = run(parlor(dir.path()).args(["token", "--user", "alice", "--role", "agent"]));
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    let token = outcome.stdout.trim();
    let (status, body) = server.get("/api/inbox", Some(token));
    assert_eq!(status, 200, "the server accepts the token: {body}");

    // From another directory, naming the server's database.
    let other = tempfile::tempdir().unwrap();
    let outcome = run(parlor(other.path())
        .args(["token", "--user", "bob", "--role", "agent", "--database"])
        .arg(format!(
            "sqlite://{}",
            dir.path().join("parlor.db").display()
        )));
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    let (status, _) = server.get("/api/inbox", Some(outcome.stdout.trim()));
    assert_eq!(status, 200);
    assert_eq!(files(other.path()), Vec::<String>::new());

    // A domain the server does not have.
    let outcome = run(parlor(dir.path()).args(["token", "--user", "bob", "--domain", "acme"]));
    let line = assert_one_sentence(&outcome);
    assert!(line.contains("no domain \"acme\""), "{line}");
    assert!(
        line.contains("demo"),
        "the known domains are listed: {line}"
    );

    // A token signed with another secret is refused with a sentence, not `InvalidSignature`.
    let outcome = run(parlor(other.path())
        .args(["token", "--user", "mallory", "--role", "agent"])
        .env("PARLOR_AUTH__JWT_SECRET", "not-the-servers-secret"));
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    let (status, body) = server.get("/api/inbox", Some(outcome.stdout.trim()));
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("signature does not verify"), "{body}");
}

#[test]
fn token_with_a_configured_secret_needs_no_database() {
    let dir = tempfile::tempdir().unwrap();
    let outcome = run(parlor(dir.path())
        .args(["token", "--user", "alice", "--ttl", "15m"])
        .env("PARLOR_AUTH__JWT_SECRET", "0123456789abcdef0123"));
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert_eq!(outcome.stdout.trim().split('.').count(), 3, "a JWT");
    assert_eq!(files(dir.path()), Vec::<String>::new(), "nothing created");

    // Without a database, only the configuration's domains exist.
    let outcome = run(parlor(dir.path())
        .args(["token", "--user", "alice", "--domain", "nope"])
        .env("PARLOR_AUTH__JWT_SECRET", "0123456789abcdef0123"));
    assert!(assert_one_sentence(&outcome).contains("no domain \"nope\""));
}

#[test]
fn token_flags_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    for (args, expected) in [
        (
            &["--role", "boss"][..],
            "possible values: visitor, agent, admin, service",
        ),
        (&["--ttl", "0"][..], "from 1 second to 30 days"),
        (&["--ttl", "31d"][..], "from 1 second to 30 days"),
        (&["--ttl", "soon"][..], "a number with s, m, h or d"),
    ] {
        let outcome = run(parlor(dir.path())
            .args(["token", "--user", "alice"])
            .args(args));
        assert_eq!(outcome.code, Some(2), "{args:?}: {outcome:?}");
        assert!(outcome.stderr.contains(expected), "{args:?}: {outcome:?}");
    }
    let outcome = run(parlor(dir.path()).args(["token", "--user", "a b"]));
    assert_eq!(outcome.code, Some(2), "{outcome:?}");
    assert!(outcome.stderr.contains("user id"), "{outcome:?}");
    assert_eq!(files(dir.path()), Vec::<String>::new(), "nothing created");
}

#[test]
fn subcommands_show_only_their_flags() {
    let dir = tempfile::tempdir().unwrap();
    let help = |command: &str| {
        let outcome = run(parlor(dir.path()).args([command, "--help"]));
        assert_eq!(outcome.code, Some(0), "{outcome:?}");
        outcome.stdout
    };
    let key = help("key");
    for flag in [
        "--listen",
        "--database",
        "--broker",
        "--config",
        "--log-format",
    ] {
        assert!(!key.contains(flag), "key --help shows {flag}:\n{key}");
    }
    let token = help("token");
    assert!(
        token.contains("--config") && token.contains("--database"),
        "{token}"
    );
    for flag in ["--listen", "--broker", "--log-format"] {
        assert!(!token.contains(flag), "token --help shows {flag}:\n{token}");
    }
    let serve = help("serve");
    assert!(
        serve.contains("127.0.0.1:8080"),
        "the default listen address: {serve}"
    );
    assert!(
        serve.contains("0.0.0.0:8080"),
        "how to listen on all interfaces: {serve}"
    );
}

#[test]
fn a_typo_in_the_file_is_reported_once_with_its_line_and_the_key_meant() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("parlor.toml"),
        "# my settings\n[limits]\nmax_frame_bytez = 65536\n",
    )
    .unwrap();
    let outcome = run(parlor(dir.path()).arg("serve"));
    let line = assert_one_sentence(&outcome);
    assert_eq!(
        line,
        "error: `limits.max_frame_bytez` in parlor.toml, line 3 is not a configuration key; \
         did you mean `limits.max_frame_bytes`?"
    );

    // A value of the wrong type, in a file named by flag; `token` reads it the same way.
    let file = dir.path().join("other.toml");
    std::fs::write(
        &file,
        "listen = \"127.0.0.1:0\"\n\n[limits]\nmessages_per_second = \"fast\"\n",
    )
    .unwrap();
    let outcome = run(parlor(dir.path())
        .args(["token", "--user", "alice", "--config"])
        .arg(&file));
    let line = assert_one_sentence(&outcome);
    assert_eq!(
        line,
        format!(
            "error: `limits.messages_per_second` in {}, line 4 must be a whole number, not the \
             string \"fast\"",
            file.display()
        )
    );

    // A file that is not TOML: where, and what was expected, on one line.
    std::fs::write(&file, "listen = [\n").unwrap();
    let outcome = run(parlor(dir.path()).arg("serve").env("PARLOR_CONFIG", &file));
    let line = assert_one_sentence(&outcome);
    assert!(
        line.starts_with(&format!(
            "error: cannot read the configuration file {}: line 1, column ",
            file.display()
        )),
        "{line}"
    );
    assert_eq!(
        files(dir.path()),
        ["other.toml", "parlor.toml"],
        "nothing created"
    );
}

#[test]
fn a_typo_in_an_environment_variable_names_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let outcome = run(parlor(dir.path())
        .arg("serve")
        .env("PARLOR_LIMITS__MAX_FRAME_BYTEZ", "65536"));
    let line = assert_one_sentence(&outcome);
    assert_eq!(
        line,
        "error: the environment variable PARLOR_LIMITS__MAX_FRAME_BYTEZ is not a configuration \
         key; did you mean PARLOR_LIMITS__MAX_FRAME_BYTES?"
    );
    let outcome = run(parlor(dir.path())
        .arg("serve")
        .env("PARLOR_LOG_FORMAT", "xml"));
    let line = assert_one_sentence(&outcome);
    assert_eq!(
        line,
        "error: the environment variable PARLOR_LOG_FORMAT must be `text` or `json`, not \"xml\""
    );
    assert_eq!(files(dir.path()), Vec::<String>::new(), "nothing created");
}

#[test]
fn a_port_in_use_is_a_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let outcome = run(parlor(dir.path()).args(["serve", "--listen", &addr.to_string()]));
    let line = assert_one_sentence(&outcome);
    assert!(
        line.starts_with(&format!(
            "error: cannot listen on {addr}: the address is already in use; another program"
        )),
        "{line}"
    );
    assert_eq!(
        files(dir.path()),
        Vec::<String>::new(),
        "no database either"
    );

    let outcome = run(parlor(dir.path()).args(["serve", "--listen", "no-such-host.invalid:8080"]));
    let line = assert_one_sentence(&outcome);
    assert!(
        line.starts_with("error: cannot resolve the listen address no-such-host.invalid:8080: "),
        "{line}"
    );
    let outcome = run(parlor(dir.path()).args(["serve", "--listen", "8080"]));
    assert_eq!(outcome.code, Some(2), "{outcome:?}");
    assert!(outcome.stderr.contains("HOST:PORT"), "{outcome:?}");
}

#[test]
fn unreachable_databases_and_brokers_are_sentences() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 1.
    let outcome = run(parlor(dir.path()).args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--database",
        "postgres://parlor@127.0.0.1:1/parlor",
    ]));
    let line = assert_one_sentence(&outcome);
    assert!(
        line.contains("cannot connect to PostgreSQL at 127.0.0.1:1/parlor: connection refused"),
        "{line}"
    );
    let outcome = run(parlor(dir.path()).args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--database",
        &format!("sqlite://{}/db/parlor.db", dir.path().display()),
        "--broker",
        "redis://127.0.0.1:1",
    ]));
    let line = assert_one_sentence(&outcome);
    assert!(
        line.contains("cannot connect to Redis at redis://127.0.0.1:1: connection refused"),
        "{line}"
    );
    // A SQLite file that cannot be made: its folder is a file.
    std::fs::write(dir.path().join("plain"), "not a folder").unwrap();
    let outcome = run(parlor(dir.path()).args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--database",
        "sqlite://plain/parlor.db",
    ]));
    let line = assert_one_sentence(&outcome);
    assert!(
        line.starts_with(
            "error: cannot open the SQLite database plain/parlor.db: cannot create the folder plain: "
        ),
        "{line}"
    );
}

#[test]
fn logs_in_a_file_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("parlor.log");
    let mut child = parlor(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let text = std::fs::read(&log).unwrap();
        if String::from_utf8_lossy(&text).contains("health check") {
            break text;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("no start-up log: {}", String::from_utf8_lossy(&text));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        !text.contains(&0x1b),
        "ESC in {}",
        String::from_utf8_lossy(&text)
    );
    assert!(String::from_utf8_lossy(&text).contains("INFO"));
}

#[test]
fn listen_takes_a_host_name_and_the_log_gives_the_urls() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--listen", "localhost:0"]);
    let port = server.addr.rsplit(':').next().unwrap().to_owned();
    assert_eq!(server.url("demo page"), format!("http://localhost:{port}/"));
    assert_eq!(
        server.url("agent inbox"),
        format!("http://localhost:{port}/inbox")
    );
    assert_eq!(
        server.url("health check"),
        format!("http://localhost:{port}/health")
    );
    let (status, body) = server.get("/health", None);
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn token_on_a_postgres_database_without_parlor_is_refused() {
    use sqlx::{Connection, Executor};
    let Ok(server) = std::env::var("PARLOR_TEST_DATABASE_URL") else {
        eprintln!("skipped: PARLOR_TEST_DATABASE_URL is unset");
        return;
    };
    let name = format!("parlor_cli_{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&server).await.unwrap();
    admin
        .execute(&*format!("CREATE DATABASE {name}"))
        .await
        .unwrap();
    let (base, _) = server
        .split('?')
        .next()
        .and_then(|s| s.rsplit_once('/'))
        .expect("postgres://HOST/DATABASE");
    let url = format!("{base}/{name}");
    let dir = tempfile::tempdir().unwrap();
    let outcome = run(parlor(dir.path()).args(["token", "--user", "alice", "--database", &url]));
    let mut fresh = sqlx::PgConnection::connect(&url).await.unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(&mut fresh)
    .await
    .unwrap();
    fresh.close().await.ok();
    admin
        .execute(&*format!("DROP DATABASE {name} WITH (FORCE)"))
        .await
        .unwrap();
    let line = assert_one_sentence(&outcome);
    assert!(
        line.contains(&format!(
            "the PostgreSQL database {} has no Parlor schema",
            parlor::config::redact_url(&url)
        )),
        "{line}"
    );
    assert_eq!(tables, 0, "no schema created");
}

/// `POST path` with a JSON body to `server`, as its own page would: the status and body.
fn post_json(server: &Server, path: &str, body: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(&server.addr).unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not HTTP: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn agent_accounts_are_added_where_the_server_runs_and_their_invite_works() {
    // Nowhere near a server: refused, nothing created.
    let empty = tempfile::tempdir().unwrap();
    let outcome = run(parlor(empty.path()).args([
        "agent",
        "add",
        "--domain",
        "demo",
        "--email",
        "a@x.example",
    ]));
    let line = assert_one_sentence(&outcome);
    assert!(line.contains("no Parlor database"), "{line}");
    assert_eq!(files(empty.path()), Vec::<String>::new());

    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &["--listen", "127.0.0.1:0"]);
    let outcome = run(parlor(dir.path()).args([
        "agent",
        "add",
        "--domain",
        "demo",
        "--email",
        "Ann@X.example",
        "--name",
        "Ann",
        "--url",
        "https://chat.x.example/",
    ]));
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    let link = outcome
        .stdout
        .lines()
        .find(|l| l.starts_with("https://chat.x.example/inbox#invite="))
        .unwrap_or_else(|| panic!("a link: {outcome:?}"));
    let token = link.rsplit('=').next().unwrap();
    // The server takes the invite at once: the person sets a password and is signed in.
    let (status, body) = post_json(
        &server,
        "/api/auth/invite",
        &format!(r#"{{"token":"{token}","password":"ann's long password"}}"#),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("ann@x.example"), "{body}");
    let outcome = run(parlor(dir.path()).args(["agent", "list", "--domain", "demo"]));
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert_eq!(outcome.stdout, "ann@x.example\tagent\tAnn\tactive\n");

    // Mistakes are sentences.
    let outcome = run(parlor(dir.path()).args([
        "agent",
        "add",
        "--domain",
        "demo",
        "--email",
        "ann@x.example",
    ]));
    let line = assert_one_sentence(&outcome);
    assert!(line.contains("already has an account"), "{line}");
    let outcome = run(parlor(dir.path()).args([
        "agent",
        "add",
        "--domain",
        "nope",
        "--email",
        "b@x.example",
    ]));
    let line = assert_one_sentence(&outcome);
    assert!(line.contains("no domain \"nope\""), "{line}");
    let outcome = run(parlor(dir.path()).args([
        "agent",
        "add",
        "--domain",
        "demo",
        "--email",
        "not-an-address",
    ]));
    let line = assert_one_sentence(&outcome);
    assert!(line.contains("not an e-mail address"), "{line}");
    let outcome = run(parlor(dir.path()).args([
        "agent",
        "invite",
        "--domain",
        "demo",
        "--email",
        "who@x.example",
    ]));
    assert_one_sentence(&outcome);
    // A new link for Ann replaces the old one.
    let outcome = run(parlor(dir.path()).args([
        "agent",
        "invite",
        "--domain",
        "demo",
        "--email",
        "ann@x.example",
    ]));
    assert_eq!(outcome.code, Some(0), "{outcome:?}");
    assert!(outcome.stdout.contains("/inbox#invite="), "{outcome:?}");
    drop(server);
}
