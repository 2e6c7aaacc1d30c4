//! The `parlor` binary: parses the command line and configuration, sets up logging, binds
//! the listener and hands over to [`parlor::run`].

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use parlor::config::{Config, LogFormat, Overrides};
use tokio_util::sync::CancellationToken;

/// Self-hosted real-time conversation server.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (the default).
    Serve(ServeArgs),
    /// Print a connection token signed with `auth.jwt_secret`, or with the secret the
    /// server generated in its database when that is unset (for development).
    Token(TokenArgs),
    /// Make a new server API key for a domain's back end (`--domain`) or an admin key
    /// (`--admin`), and the configuration entry (its hash) that accepts it.
    Key(KeyArgs),
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

#[derive(Debug, Clone, clap::Args)]
struct ServeArgs {
    /// Address to listen on [default: 0.0.0.0:8080].
    #[arg(long, global = true)]
    listen: Option<SocketAddr>,
    /// Database URL: sqlite://PATH, or postgres://USER@HOST/DATABASE for several nodes
    /// [default: sqlite://parlor.db].
    #[arg(long, global = true)]
    database: Option<String>,
    /// Message broker: memory, or redis://HOST:PORT for several nodes [default: memory].
    #[arg(long, global = true)]
    broker: Option<String>,
    /// Configuration file [default: ./parlor.toml when present].
    #[arg(long, global = true, env = "PARLOR_CONFIG")]
    config: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, global = true)]
    log_format: Option<LogFormat>,
}

#[derive(Debug, Clone, clap::Args)]
struct TokenArgs {
    /// User id (`sub`).
    #[arg(long)]
    user: String,
    /// Role: visitor, agent, admin or service.
    #[arg(long, default_value = "visitor")]
    role: String,
    /// Domain id.
    #[arg(long, default_value = "demo")]
    domain: String,
    /// Display name.
    #[arg(long)]
    name: Option<String>,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    ttl: u64,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let (args, token) = match cli.command {
        Some(Command::Serve(args)) => (args, None),
        Some(Command::Token(t)) => (cli.serve, Some(t)),
        Some(Command::Key(k)) => {
            print_key(&k);
            return Ok(());
        }
        None => (cli.serve, None),
    };
    let overrides = Overrides {
        listen: args.listen,
        database: args.database.clone(),
        broker: args.broker.clone(),
        log_format: args.log_format,
    };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    if let Some(t) = token {
        let secret = runtime.block_on(parlor::token_secret(&config))?;
        return print_token(&secret, &t);
    }
    init_tracing(&config);
    for name in parlor::config::ignored_env_vars() {
        tracing::warn!(variable = %name, "ignoring environment variable: it names no configuration key");
    }
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listener =
        bind(config.listen).with_context(|| format!("cannot listen on {}", config.listen))?;
    let shutdown = CancellationToken::new();
    tokio::spawn(signal_shutdown(shutdown.clone()));
    parlor::run(config, listener, shutdown).await?;
    Ok(())
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

fn init_tracing(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn print_key(args: &KeyArgs) {
    use parlor::auth::keys;
    let (key, entry) = match &args.domain {
        Some(_) => keys::generate(),
        None => keys::generate_with(keys::ADMIN_KEY_PREFIX),
    };
    println!("key (it is shown only now; Parlor keeps only its hash):\n  {key}\n");
    println!("configuration:");
    match &args.domain {
        Some(domain) => {
            println!("  [[domains]]\n  id = \"{domain}\"\n  server_keys = [\"{entry}\"]");
        }
        None => println!("  [auth]\n  admin_keys = [\"{entry}\"]"),
    }
}

fn print_token(secret: &parlor::config::Secret, args: &TokenArgs) -> anyhow::Result<()> {
    let token = parlor::auth::issue_token(
        secret,
        &args.user,
        args.name.as_deref(),
        &args.role,
        &args.domain,
        args.ttl,
    )?;
    println!("{token}");
    Ok(())
}
