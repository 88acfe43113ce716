//! The command line: parse arguments, set up logging, load the configuration, bind, run.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand, ValueEnum};
use mosaic_auth_proxy::config::Config;
use mosaic_auth_proxy::demo::{self, DemoOptions};
use mosaic_auth_proxy::error_chain;
use mosaic_auth_proxy::shutdown;
use mosaic_auth_proxy::stub::{
    IdentityStub, MosaicUpstream, SigningKey, StubAccount, StubSettings,
};
use mosaic_auth_proxy::{app, App};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// jemalloc, purging freed memory in the background, gives memory back after a burst of
/// connections; glibc's malloc kept all of it (`benches/hostile.py` measures both).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit status for a bad configuration or bad arguments (BSD `EX_USAGE`).
const EXIT_CONFIG: u8 = 64;
/// Exit status when the proxy cannot start, or a token request failed for now (BSD
/// `EX_UNAVAILABLE`).
const EXIT_START: u8 = 69;
/// Exit status when the identity service refused the account (BSD `EX_NOPERM`).
const EXIT_NOPERM: u8 = 77;

#[derive(Parser)]
#[command(
    version,
    about = "Authenticating reverse proxy for Axinom Mosaic service accounts"
)]
struct Cli {
    /// Log format on standard error; the level comes from RUST_LOG (default: info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with the given configuration.
    Run {
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
        /// Listen here instead of at server.listen (containers: "0.0.0.0:8080").
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Serve health and readiness here instead of at server.admin_listen.
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
        /// Accept connections only once every account holds a token; exit with status 69
        /// if that takes longer than SECONDS. Prints "ready" on standard output when serving.
        #[arg(long, value_name = "SECONDS")]
        wait_ready: Option<u64>,
    },
    /// Log an account in once and print its access token on standard output (for curl
    /// experiments); errors go to standard error with the proxy's classification.
    Token {
        /// The account's name, as in [accounts.NAME].
        account: String,
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
        /// Print the token's header, claims and expiry as JSON instead of the token.
        #[arg(long)]
        decode: bool,
    },
    /// GET a URL and exit 0 for a 2xx answer, 1 otherwise: a container HEALTHCHECK that
    /// needs no shell tools ("probe http://127.0.0.1:9901/livez").
    Probe {
        url: String,
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Validate a configuration (secrets included) without serving.
    Check {
        #[arg(long, short, default_value = "proxy.toml")]
        config: PathBuf,
    },
    /// Run the identity stand-in, a Mosaic stand-in and the proxy on loopback, and show a
    /// request going through. Needs no credentials.
    Demo {
        #[arg(long, default_value = mosaic_auth_proxy::config::DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// Lifetime of the stand-in's tokens, such as "60s".
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        token_lifetime: Duration,
        /// Stop after the first request.
        #[arg(long)]
        once: bool,
    },
    /// Serve a local stand-in for the Mosaic identity service (rigs, drills, tests). It keeps
    /// only a hash of each secret; POST /admin/accounts/CLIENT_ID/secret resets one and
    /// POST /admin/rotate-key[?retire=true] rotates the signing key. Prints its origin on
    /// standard output once it listens.
    IdentityStub {
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,
        /// Lifetime of issued tokens (down to 1s).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        lifetime: Duration,
        /// An account as CLIENT_ID:CLIENT_SECRET[:SERVICE=PERMISSION,...]; repeat for more
        /// (default demo-client:demo-secret with media-service=ADMIN). Other users of the host
        /// can read a command line: give secrets that matter in --accounts-file.
        #[arg(long = "account", value_parser = parse_account)]
        accounts: Vec<StubAccount>,
        /// A TOML file of accounts ([[accounts]] with client_id, client_secret or
        /// client_secret_sha256, name, permissions).
        #[arg(long)]
        accounts_file: Option<PathBuf>,
        /// A permission of every account as SERVICE=KEY[,KEY...]; repeatable.
        #[arg(long = "permission", value_parser = parse_permission)]
        permissions: Vec<(String, Vec<String>)>,
        /// The tenantId claim and the first segment of the JWKS path.
        #[arg(long)]
        tenant_id: Option<String>,
        /// The environmentId claim and the second segment of the JWKS path.
        #[arg(long)]
        environment_id: Option<String>,
        /// A PKCS#8 PEM RSA key to sign with, instead of the bundled stand-in key.
        #[arg(long)]
        signing_key: Option<PathBuf>,
    },
    /// Serve a local stand-in for a Mosaic service, checking tokens against the JWKS of
    /// an identity service (the stand-in's, usually).
    UpstreamStub {
        #[arg(long, default_value = "127.0.0.1:8082")]
        listen: SocketAddr,
        /// The identity service whose JWKS signs the tokens.
        #[arg(long, default_value = "http://127.0.0.1:8081")]
        identity_origin: String,
    },
}

fn parse_account(text: &str) -> Result<StubAccount, String> {
    mosaic_auth_proxy::stub::accounts::parse_account(text)
}

fn parse_permission(text: &str) -> Result<(String, Vec<String>), String> {
    text.split_once('=')
        .filter(|(service, keys)| !service.is_empty() && !keys.is_empty())
        .map(|(service, keys)| {
            (
                service.to_owned(),
                keys.split(',').map(str::to_owned).collect(),
            )
        })
        .ok_or_else(|| "write the permission as SERVICE=KEY[,KEY...]".into())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    if let Err(error) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(%error, "freed memory is not purged in the background");
    }
    // Room for max_connections: servers raise the soft open-file limit to the hard one.
    if let Some(limit) = mosaic_auth_proxy::server::raise_open_file_limit() {
        tracing::debug!(open_files = limit, "open-file limit");
    }
    // The proxy serves on its workers' runtimes; this one carries the control work (token
    // refreshers, the admin listener, signals). The stand-ins serve on this one, with every core.
    let mut builder = match cli.command {
        Command::IdentityStub { .. } | Command::UpstreamStub { .. } => {
            tokio::runtime::Builder::new_multi_thread()
        }
        _ => tokio::runtime::Builder::new_current_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return ExitCode::from(EXIT_START);
        }
    };
    runtime.block_on(dispatch(cli.command))
}

async fn dispatch(command: Command) -> ExitCode {
    match command {
        Command::Check { config } => check(&config),
        Command::Token {
            account,
            config,
            decode,
        } => token(&config, &account, decode).await,
        Command::Probe { url, timeout } => {
            match mosaic_auth_proxy::commands::probe::run(&url, timeout).await {
                Ok(_) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("probe {url}: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run {
            config,
            listen,
            admin_listen,
            wait_ready,
        } => run(&config, listen, admin_listen, wait_ready).await,
        Command::Demo {
            listen,
            token_lifetime,
            once,
        } => {
            let options = DemoOptions {
                listen,
                token_lifetime,
                once,
            };
            run_demo(options).await
        }
        Command::IdentityStub {
            listen,
            lifetime,
            mut accounts,
            accounts_file,
            permissions,
            tenant_id,
            environment_id,
            signing_key,
        } => {
            let mut settings = StubSettings {
                lifetime,
                ..StubSettings::default()
            };
            if let Some(path) = accounts_file {
                match mosaic_auth_proxy::stub::accounts::read_accounts_file(&path) {
                    Ok(listed) => accounts.extend(listed),
                    Err(error) => {
                        eprintln!("error: --accounts-file {}: {error}", path.display());
                        return ExitCode::from(EXIT_CONFIG);
                    }
                }
            }
            if !accounts.is_empty() {
                settings.accounts = accounts;
            }
            if !permissions.is_empty() {
                let map: BTreeMap<String, Vec<String>> = permissions.into_iter().collect();
                for account in &mut settings.accounts {
                    account.permissions = map.clone();
                }
            }
            settings.tenant_id = tenant_id.unwrap_or(settings.tenant_id);
            settings.environment_id = environment_id.unwrap_or(settings.environment_id);
            identity_stub(listen, settings, signing_key.as_deref()).await
        }
        Command::UpstreamStub {
            listen,
            identity_origin,
        } => upstream_stub(listen, &identity_origin).await,
    }
}

fn load(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|errors| {
        eprint!("error: {errors}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn check(path: &Path) -> ExitCode {
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    for warning in &config.warnings {
        eprintln!("warning: {warning}");
    }
    println!(
        "configuration is valid: {} account(s), {} route(s), listening on {}",
        config.accounts.len(),
        config.routes.len(),
        config.server.listen
    );
    ExitCode::SUCCESS
}

async fn token(path: &Path, account: &str, decode: bool) -> ExitCode {
    use mosaic_auth_proxy::commands::token::{self, Printed, TokenCommandError};
    let config = match load(path) {
        Ok(config) => config,
        Err(code) => return code,
    };
    match token::run(&config, account, decode).await {
        Ok(Printed::Token(jwt)) => {
            println!("{jwt}");
            ExitCode::SUCCESS
        }
        Ok(Printed::Decoded(json)) => {
            println!("{json:#}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            match error {
                TokenCommandError::NoAccount { .. } => ExitCode::from(EXIT_CONFIG),
                TokenCommandError::Identity(e) if e.is_permanent() => ExitCode::from(EXIT_NOPERM),
                _ => ExitCode::from(EXIT_START),
            }
        }
    }
}

async fn run(
    path: &Path,
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    wait_ready: Option<u64>,
) -> ExitCode {
    let source = app::Source {
        path: path.to_owned(),
        listen,
        admin_listen,
    };
    let config = match source.load() {
        Ok(config) => config,
        Err(errors) => {
            eprint!("error: {errors}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    for warning in &config.warnings {
        tracing::warn!("{warning}");
    }
    let app = match App::bind_reloadable(config, Some(source)).await {
        Ok(app) => app,
        Err(error) => {
            tracing::error!(error = %error_chain(&error), "cannot start");
            return ExitCode::from(EXIT_START);
        }
    };
    let (_trigger, signal) = shutdown::channel_on_signal();
    tokio::spawn(app::reload_on_hangup(app.live()));
    let wait_ready = wait_ready.map(Duration::from_secs);
    match app
        .run_when_ready(signal, wait_ready, || {
            // Like a log line, never worth a panic if stdout is gone.
            let mut stdout = std::io::stdout();
            let _ = writeln!(stdout, "ready").and_then(|()| stdout.flush());
        })
        .await
    {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "not ready in time");
            ExitCode::from(EXIT_START)
        }
    }
}

async fn run_demo(options: DemoOptions) -> ExitCode {
    let (trigger, signal) = shutdown::channel_on_signal();
    match demo::run(options, trigger, signal).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", error_chain(&error));
            ExitCode::from(EXIT_START)
        }
    }
}

async fn identity_stub(
    listen: SocketAddr,
    settings: StubSettings,
    signing_key: Option<&Path>,
) -> ExitCode {
    let key = match signing_key {
        None => SigningKey::bundled(),
        Some(path) => match std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|pem| SigningKey::from_pem(&pem).map_err(|e| e.to_string()))
        {
            Ok(key) => key,
            Err(error) => {
                eprintln!("error: --signing-key {}: {error}", path.display());
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let stub = match IdentityStub::bind(listen, settings, key).await {
        Ok(stub) => stub,
        Err(error) => {
            eprintln!("error: cannot listen on {listen}: {error}");
            return ExitCode::from(EXIT_START);
        }
    };
    let handle = stub.handle();
    tracing::info!(origin = handle.origin(), jwks = %handle.jwks_url(), kid = handle.kid(), "identity stand-in listening");
    println!("{}", handle.origin());
    let (_trigger, signal) = shutdown::channel_on_signal();
    stub.run(signal).await;
    ExitCode::SUCCESS
}

async fn upstream_stub(listen: SocketAddr, identity_origin: &str) -> ExitCode {
    let upstream = match MosaicUpstream::bind(listen, identity_origin).await {
        Ok(upstream) => upstream,
        Err(error) => {
            eprintln!("error: cannot listen on {listen}: {error}");
            return ExitCode::from(EXIT_START);
        }
    };
    tracing::info!(listen = %upstream.local_addr(), identity_origin, "Mosaic stand-in listening");
    println!("http://{}", upstream.local_addr());
    let (_trigger, signal) = shutdown::channel_on_signal();
    upstream.run(signal).await;
    ExitCode::SUCCESS
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        // A line that cannot be written (stderr a pipe whose reader is gone) is dropped: the
        // default complaint about it goes to stderr too, and fails there with a panic.
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
