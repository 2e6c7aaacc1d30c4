//! The `parlor` binary: parses the command line and configuration, sets up logging, binds
//! the listener and hands over to [`parlor::run`]. `parlor token` and `parlor key` are the
//! operator's tools; `token` reads the configuration and database of the server it signs for
//! and creates neither.
//!
//! Every error it reports is one sentence on standard error, prefixed `error:`, and the
//! process exits with status 1 (2 for a command line clap refuses).

/// jemalloc rather than the system allocator: an idle WebSocket costs about 10 % less memory
/// with it, and it keeps that across threads (`docs/decisions.md`, 2026-12-06).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;
use clap::{Parser, Subcommand};
use parlor::config::{Config, ListenAddr, LogFormat, Overrides};
use parlor::model::Role;
use tokio_util::sync::CancellationToken;

/// Self-hosted real-time conversation server.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// `parlor` alone serves, with `serve`'s flags.
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve(ServeArgs),
    /// Print a connection token the server accepts.
    ///
    /// It is signed with the secret of the server whose configuration and database it
    /// reads: `auth.jwt_secret`, or the secret the server generated in its database. Run it
    /// where the server runs, or pass the server's `--config`/`--database`; it creates
    /// nothing.
    Token(TokenArgs),
    /// Make a server API key or an admin key, with the configuration entry that accepts it.
    ///
    /// `--domain ID` makes a key for that domain's back end, `--admin` one for `/api/admin`.
    /// The entry holds only the key's hash.
    Key(KeyArgs),
    /// Manage the agent accounts of a domain's inbox: add one (with its invite link), list
    /// them, or make a new invite link.
    ///
    /// It works on the server's own database (run it where the server runs, or pass the
    /// server's `--config`/`--database`) and creates no database.
    Agent(AgentArgs),
}

#[derive(Debug, Clone, clap::Args)]
struct AgentArgs {
    #[command(subcommand)]
    action: AgentAction,
}

#[derive(Debug, Clone, Subcommand)]
enum AgentAction {
    /// Create an agent (or admin) account and print its one-time invite link.
    Add {
        /// The domain the account belongs to.
        #[arg(long)]
        domain: String,
        /// The person's e-mail address (they sign in with it).
        #[arg(long)]
        email: String,
        /// Display name [default: the part of the address before the @].
        #[arg(long)]
        name: Option<String>,
        /// `agent` answers conversations; `admin` also manages the domain's agents.
        #[arg(long, value_enum, default_value = "agent")]
        role: AgentRole,
        /// The server's public address, for the link [default: http://localhost:PORT].
        #[arg(long, value_name = "URL")]
        url: Option<String>,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// A new invite link for an account (the old one stops working).
    Invite {
        /// The domain.
        #[arg(long)]
        domain: String,
        /// The account's e-mail address.
        #[arg(long)]
        email: String,
        /// The server's public address, for the link [default: http://localhost:PORT].
        #[arg(long, value_name = "URL")]
        url: Option<String>,
        #[command(flatten)]
        source: SourceArgs,
    },
    /// List a domain's accounts.
    List {
        /// The domain.
        #[arg(long)]
        domain: String,
        #[command(flatten)]
        source: SourceArgs,
    },
}

impl AgentAction {
    /// The server's configuration and database it works on.
    fn source(&self) -> &SourceArgs {
        match self {
            AgentAction::Add { source, .. }
            | AgentAction::Invite { source, .. }
            | AgentAction::List { source, .. } => source,
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum AgentRole {
    Agent,
    Admin,
}

#[derive(Debug, Clone, clap::Args)]
#[group(required = true, multiple = false)]
struct KeyArgs {
    /// Domain id the server key is for.
    #[arg(long)]
    domain: Option<String>,
    /// Make an admin key for `/api/admin` instead.
    #[arg(long)]
    admin: bool,
}

/// Where the configuration and data are: the flags `serve`, `token` and `agent` share.
#[derive(Debug, Clone, clap::Args)]
struct SourceArgs {
    /// Configuration file [default: ./parlor.toml when present].
    #[arg(long, env = "PARLOR_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Database URL: sqlite://PATH, or postgres://USER@HOST/DATABASE for several nodes
    /// [default: sqlite://parlor.db].
    #[arg(long, value_name = "URL")]
    database: Option<String>,
}

#[derive(Debug, Clone, clap::Args)]
struct ServeArgs {
    /// Address to listen on, HOST:PORT; the host may be a name (localhost:8080). Servers
    /// and containers listen on all interfaces with 0.0.0.0:8080
    /// [default: 127.0.0.1:8080, this machine only].
    #[arg(long, value_name = "HOST:PORT")]
    listen: Option<ListenAddr>,
    #[command(flatten)]
    source: SourceArgs,
    /// Message broker: memory, or redis://HOST:PORT for several nodes [default: memory].
    #[arg(long, value_name = "URL")]
    broker: Option<String>,
    /// Log format [default: text].
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

#[derive(Debug, Clone, clap::Args)]
struct TokenArgs {
    /// User id (`sub`): 1-128 characters of A-Z a-z 0-9 - _ . : @.
    #[arg(long, value_parser = parse_user)]
    user: String,
    /// Role.
    #[arg(long, value_enum, default_value_t = TokenRole::Visitor)]
    role: TokenRole,
    /// Domain id: one of the configuration's, or one created through the admin API.
    #[arg(long, default_value = parlor::config::DEMO_DOMAIN)]
    domain: String,
    /// Display name [default: the user id].
    #[arg(long)]
    name: Option<String>,
    /// Lifetime: seconds, or a number with s, m, h or d (90m, 8h, 7d); at most 30 days.
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    ttl: u64,
    #[command(flatten)]
    source: SourceArgs,
}

/// The roles a token can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TokenRole {
    /// A website visitor or signed-in customer.
    Visitor,
    /// A support agent of the domain.
    Agent,
    /// An operator of the whole server.
    Admin,
    /// A back end calling the server API.
    Service,
}

impl From<TokenRole> for Role {
    fn from(role: TokenRole) -> Role {
        match role {
            TokenRole::Visitor => Role::Visitor,
            TokenRole::Agent => Role::Agent,
            TokenRole::Admin => Role::Admin,
            TokenRole::Service => Role::Service,
        }
    }
}

/// The longest lifetime `parlor token` signs: a token cannot be revoked before it expires,
/// so a long-lived one is a standing credential (the longest visitor token by default).
const MAX_TOKEN_TTL_SECS: u64 = 30 * 24 * 3600;

/// `--ttl`: `3600`, `90s`, `15m`, `8h`, `7d`; 1 second to [`MAX_TOKEN_TTL_SECS`].
fn parse_ttl(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 24 * 3600,
        _ => return Err("write seconds, or a number with s, m, h or d (90m, 8h, 7d)".to_owned()),
    };
    let secs = number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| "write seconds, or a number with s, m, h or d (90m, 8h, 7d)".to_owned())?;
    if secs == 0 || secs > MAX_TOKEN_TTL_SECS {
        return Err("a token lives from 1 second to 30 days".to_owned());
    }
    Ok(secs)
}

/// `--user`: a user id the server accepts in `sub`.
fn parse_user(s: &str) -> Result<String, String> {
    if parlor::model::valid_id(s) {
        Ok(s.to_owned())
    } else {
        Err("a user id is 1-128 characters of A-Z a-z 0-9 - _ . : @".to_owned())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Serve(args)) => serve(&args),
        Some(Command::Token(args)) => token(&args),
        Some(Command::Key(args)) => print_key(&args),
        Some(Command::Agent(args)) => agent(&args),
        None => serve(&cli.serve),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The outer message only: every error here is built as one full sentence, and
            // the chain would repeat its causes.
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The configuration `args` name, with their overrides.
fn load(source: &SourceArgs, overrides: Overrides) -> Result<Config, parlor::config::ConfigError> {
    let overrides = Overrides {
        database: source.database.clone(),
        ..overrides
    };
    Config::load(source.config.as_deref(), &overrides)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow!("cannot start the async runtime: {}", parlor::io_reason(&e)))
}

fn serve(args: &ServeArgs) -> anyhow::Result<()> {
    let overrides = Overrides {
        listen: args.listen.clone(),
        broker: args.broker.clone(),
        log_format: args.log_format,
        ..Overrides::default()
    };
    let config = load(&args.source, overrides)?;
    init_tracing(&config);
    for var in parlor::config::ignored_env_vars() {
        let hint = var
            .suggestion
            .map(|close| format!("; did you mean {close}?"))
            .unwrap_or_default();
        tracing::warn!(
            "ignoring environment variable {}: it names no configuration key{hint}",
            var.name
        );
    }
    let addrs = config.listen.resolve().map_err(|e| {
        anyhow!(
            "cannot resolve the listen address {}: {}",
            config.listen,
            parlor::io_reason(&e)
        )
    })?;
    let runtime = runtime()?;
    runtime.block_on(async {
        let listener = bind_any(&config.listen, &addrs)?;
        let shutdown = CancellationToken::new();
        tokio::spawn(signal_shutdown(shutdown.clone()));
        parlor::run(config, listener, shutdown).await?;
        Ok(())
    })
}

/// Binds the first of `addrs` (what `listen` resolved to) that can be bound.
fn bind_any(listen: &ListenAddr, addrs: &[SocketAddr]) -> anyhow::Result<tokio::net::TcpListener> {
    let mut failure = None;
    for addr in addrs {
        match bind(*addr) {
            Ok(listener) => return Ok(listener),
            Err(e) => failure = Some((*addr, e)),
        }
    }
    Err(match failure {
        Some((addr, e)) => {
            let advice = match e.kind() {
                std::io::ErrorKind::AddrInUse => {
                    "; another program (or another Parlor) listens there: stop it, or choose \
                     another port with --listen"
                }
                std::io::ErrorKind::PermissionDenied => {
                    "; ports below 1024 need privileges: choose another port with --listen"
                }
                std::io::ErrorKind::AddrNotAvailable => {
                    "; choose an address of this machine with --listen"
                }
                _ => "",
            };
            anyhow!("cannot listen on {addr}: {}{advice}", parlor::io_reason(&e))
        }
        None => anyhow!("the listen address {listen} stands for no address"),
    })
}

/// Connections waiting to be accepted. The kernel caps it at `net.core.somaxconn`; a short
/// queue makes a burst of reconnecting clients (after a restart, say) wait a second per
/// overflow for their SYN to be retried.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds the listener with [`LISTEN_BACKLOG`] and `SO_REUSEADDR`, so a restart does not wait
/// for the old sockets' `TIME_WAIT`.
fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Cancels `shutdown` on SIGINT or SIGTERM.
async fn signal_shutdown(shutdown: CancellationToken) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("signal received");
    shutdown.cancel();
}

/// Logs go to standard output. Text logs are coloured only on a terminal (and without
/// `NO_COLOR`): in a file or a pipe the escape codes would be noise.
fn init_tracing(config: &Config) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => {
            let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            builder.with_ansi(colour).init();
        }
    }
}

/// Writes `text` to standard output. A reader that went away (`parlor key | head -1`) ends
/// the output quietly instead of with a panic.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(anyhow!(
            "cannot write to standard output: {}",
            parlor::io_reason(&e)
        )),
        _ => Ok(()),
    }
}

/// `parlor key`: a new key, and the configuration entry that accepts it.
fn print_key(args: &KeyArgs) -> anyhow::Result<()> {
    use parlor::auth::keys;
    let (key, entry) = match &args.domain {
        Some(_) => keys::generate(),
        None => keys::generate_with(keys::ADMIN_KEY_PREFIX),
    };
    let config = match &args.domain {
        Some(domain) => {
            format!("  [[domains]]\n  id = \"{domain}\"\n  server_keys = [\"{entry}\"]")
        }
        None => format!("  [auth]\n  admin_keys = [\"{entry}\"]"),
    };
    emit(&format!(
        "key (it is shown only now; Parlor keeps only its hash):\n  {key}\n\nconfiguration:\n{config}\n"
    ))
}

/// `parlor agent`: the agent accounts of a domain, on the server's own database.
fn agent(args: &AgentArgs) -> anyhow::Result<()> {
    use parlor::store::accounts::AccountRole;
    let config = load(args.action.source(), Overrides::default())?;
    let runtime = runtime()?;
    runtime.block_on(async {
        let (accounts, store) = parlor::account_admin(&config).await?;
        let base = |url: &Option<String>| {
            url.clone()
                .unwrap_or_else(|| format!("http://localhost:{}", config.listen.port()))
                .trim_end_matches('/')
                .to_owned()
        };
        let result = match &args.action {
            AgentAction::Add {
                domain,
                email,
                name,
                role,
                url,
                ..
            } => {
                let name = name
                    .clone()
                    .unwrap_or_else(|| email.split('@').next().unwrap_or(email).to_owned());
                let role = match role {
                    AgentRole::Agent => AccountRole::Agent,
                    AgentRole::Admin => AccountRole::Admin,
                };
                match accounts.invite(domain, email, &name, role).await {
                    Ok(invited) => emit(&format!(
                        "{} ({}) can now join the inbox of {domain} with this link, valid for {} days:\n{}/inbox#invite={}\n",
                        invited.account.email,
                        invited.account.role.as_str(),
                        parlor::service::accounts::INVITE_DAYS,
                        base(url),
                        invited.token
                    )),
                    Err(e) => Err(anyhow!("{e}")),
                }
            }
            AgentAction::Invite {
                domain, email, url, ..
            } => {
                let wanted = email.trim().to_lowercase();
                let found = accounts
                    .list(domain)
                    .await
                    .map_err(|e| anyhow!("{e}"))?
                    .into_iter()
                    .find(|a| a.email == wanted);
                match found {
                    None => Err(anyhow!("the domain {domain:?} has no account {wanted}")),
                    Some(account) => match accounts.reinvite(domain, &account.id).await {
                        Ok(invited) => emit(&format!(
                            "a new link for {} (the old one no longer works):\n{}/inbox#invite={}\n",
                            invited.account.email,
                            base(url),
                            invited.token
                        )),
                        Err(e) => Err(anyhow!("{e}")),
                    },
                }
            }
            AgentAction::List { domain, .. } => match accounts.list(domain).await {
                Ok(list) if list.is_empty() => emit(&format!("{domain} has no agent accounts\n")),
                Ok(list) => {
                    let lines: String = list
                        .iter()
                        .map(|a| {
                            format!(
                                "{}\t{}\t{}\t{}\n",
                                a.email,
                                a.role.as_str(),
                                a.name,
                                if a.has_password { "active" } else { "invited" }
                            )
                        })
                        .collect();
                    emit(&lines)
                }
                Err(e) => Err(anyhow!("{e}")),
            },
        };
        store.close().await;
        result
    })
}

/// `parlor token`: signs with the secret the server checks tokens with.
fn token(args: &TokenArgs) -> anyhow::Result<()> {
    let config = load(&args.source, Overrides::default())?;
    let runtime = runtime()?;
    let secret = runtime.block_on(parlor::token_secret(&config, &args.domain))?;
    let token = parlor::auth::issue_token(
        &secret,
        &args.user,
        args.name.as_deref(),
        Role::from(args.role).as_str(),
        &args.domain,
        args.ttl,
    )
    .map_err(|e| anyhow!("cannot sign the token: {e}"))?;
    emit(&format!("{token}\n"))
}
