//! Bind, then run: the proxy's listeners, accounts and background tasks as one value.

use crate::config::{Config, ConnectionLimits, ListenAddress, SecretSource};
use crate::identity::refresher::{keep_fresh, watch_secret_file, Policies};
use crate::identity::{Account, IdentityClient};
use crate::proxy::forward::upstream_clients;
use crate::proxy::upstream::Budgets;
use crate::proxy::{Proxy, ProxyService, Route, RouteTable};
use crate::server::transport::Listener;
use crate::server::{derived_max_connections, serve, TlsConfig};
use crate::shutdown::Shutdown;
use crate::tls::ListenerTls;
use crate::tls::{client_config, client_config_for, TlsError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Why the proxy cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot create the identity service client")]
    IdentityClient(#[source] reqwest::Error),
    #[error("cannot serve TLS: {0}")]
    ListenerTls(String),
    #[error("cannot resolve the identity service {origin}: {problem}")]
    IdentityAddress { origin: String, problem: String },
    #[error("cannot listen on the Unix socket {path}")]
    BindSocket {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Why the proxy stopped before serving.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("account {account} has no token after {}: {reason}", humantime::format_duration(*.waited))]
    NotReady {
        account: String,
        waited: Duration,
        reason: String,
    },
}

/// A proxy whose listeners are bound and whose accounts are created; nothing runs yet.
pub struct App {
    listener: TcpListener,
    admin: Option<TcpListener>,
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    proxy: Arc<Proxy>,
    accounts: Arc<[Arc<Account>]>,
    identity: IdentityClient,
    policies: Policies,
    secret_poll: Duration,
    shutdown_grace: Duration,
    limits: ConnectionLimits,
    tls: Option<ServingTls>,
    extra: Vec<ExtraListener>,
}

/// A further listener with its own routes (and so its own proxy) and TLS.
struct ExtraListener {
    name: String,
    listener: Listener,
    address: ListenAddress,
    proxy: Arc<Proxy>,
    tls: Option<ServingTls>,
}

/// The listener's TLS, and what its reload watches.
struct ServingTls {
    config: TlsConfig,
    files: ListenerTls,
    every: Duration,
}

/// Connections the admin listener serves at once: its own small budget, so that probes
/// still answer while the proxy's listener is full.
pub const ADMIN_MAX_CONNECTIONS: usize = 32;

impl App {
    /// Binds the listeners (port 0 picks a free port) and builds the proxy from `config`.
    pub async fn bind(config: Config) -> Result<App, StartError> {
        let global_ca = config.tls.ca_file.as_deref();
        let tls = client_config(config.tls.native_roots, global_ca)?;
        let identity_tls =
            client_config_for(config.tls.native_roots, global_ca, &config.identity.tls)?;
        let identity_addrs = match &config.identity.tls.server_name {
            Some(_) => identity_addresses(&config.identity.origin).await?,
            None => Vec::new(),
        };
        let identity = IdentityClient::new(
            &config.identity.origin,
            config.identity.timeout,
            config.identity.max_reply_bytes,
            identity_tls,
            config
                .identity
                .tls
                .server_name
                .as_deref()
                .map(|name| (name, identity_addrs.as_slice())),
        )
        .map_err(StartError::IdentityClient)?;
        let accounts: Arc<[Arc<Account>]> = config
            .accounts
            .iter()
            .map(|a| {
                Arc::new(Account::new(
                    &a.name,
                    &a.client_id,
                    a.secret.clone(),
                    a.secret_source.clone(),
                    config.identity.retry.clone(),
                    config.identity.breaker.clone(),
                ))
            })
            .collect();
        let origin = |r: &crate::config::RouteConfig| {
            format!("{}://{}", r.upstream.scheme, r.upstream.authority)
        };
        let budgets = Budgets::new(config.routes.iter().map(|r| {
            let max = r
                .max_connections
                .unwrap_or(config.server.upstream_max_connections);
            (origin(r), max)
        }));
        let budgets = Arc::new(budgets);
        let shared = Arc::new(upstream_clients(
            tls,
            None,
            config.server.connect_timeout,
            budgets.clone(),
        ));
        // The main listener's routes first, then each further listener's.
        let mut routes: Vec<Vec<Route>> =
            (0..=config.listeners.len()).map(|_| Vec::new()).collect();
        for r in &config.routes {
            let budget = budgets
                .get(&origin(r))
                .expect("every route's upstream has a budget");
            let clients = match &r.tls {
                None => shared.clone(),
                Some(own) => Arc::new(upstream_clients(
                    client_config_for(config.tls.native_roots, global_ca, own)?,
                    own.server_name.as_deref(),
                    config.server.connect_timeout,
                    budgets.clone(),
                )),
            };
            let slot = r.listener.map_or(0, |l| l + 1);
            routes[slot].push(Route::new(r, accounts[r.account].clone(), budget, clients));
        }
        let mut routes = routes.into_iter();
        let main_routes = routes.next().unwrap_or_default();
        let proxy = Arc::new(Proxy::new(RouteTable::new(main_routes), &config.server));
        let every = config.server.tls_reload;
        let tls = serving_tls(config.server.tls.as_ref(), every)?;
        let mut extra = Vec::new();
        for (listener, routes) in config.listeners.iter().zip(routes) {
            extra.push(ExtraListener {
                name: listener.name.clone(),
                listener: bind_listener(&listener.address).await?,
                address: listener.address.clone(),
                proxy: Arc::new(Proxy::new(RouteTable::new(routes), &config.server)),
                tls: serving_tls(listener.tls.as_ref(), every)?,
            });
        }
        let mut limits = config.server.limits.clone();
        limits.max_connections = Some(
            limits
                .max_connections
                .unwrap_or_else(derived_max_connections),
        );
        let listener = bind(config.server.listen).await?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.server.listen,
            source,
        })?;
        let admin = match config.server.admin_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
        Ok(App {
            listener,
            admin,
            local_addr,
            admin_addr,
            proxy,
            accounts,
            identity,
            policies: Policies {
                refresh: config.identity.refresh.clone(),
                sample: rand::random::<f64>,
            },
            secret_poll: config.identity.secret_poll,
            shutdown_grace: config.server.shutdown_grace,
            limits,
            tls,
            extra,
        })
    }

    /// Returns the further listeners' names and addresses (a socket path for a Unix socket).
    pub fn listener_addrs(&self) -> Vec<(String, String)> {
        self.extra
            .iter()
            .map(|l| {
                let address = match (&l.listener, &l.address) {
                    (Listener::Tcp(tcp), _) => tcp
                        .local_addr()
                        .map_or_else(|e| e.to_string(), |a| a.to_string()),
                    (_, ListenAddress::Unix { path, .. }) => path.display().to_string(),
                    (_, ListenAddress::Tcp(addr)) => addr.to_string(),
                };
                (l.name.clone(), address)
            })
            .collect()
    }

    /// Returns the address the proxy listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Returns the address of the admin listener, if one is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// Returns the forwarding state shared by every connection.
    pub fn proxy(&self) -> Arc<Proxy> {
        self.proxy.clone()
    }

    /// Returns the accounts, whose readiness can be watched.
    pub fn accounts(&self) -> Arc<[Arc<Account>]> {
        self.accounts.clone()
    }

    /// Starts the token refreshers and serves until `shutdown`, then drains for the grace period.
    pub async fn run(self, shutdown: Shutdown) {
        let _ = self.run_when_ready(shutdown, None, || {}).await;
    }

    /// Like [`App::run`], but with `wait_ready` the listener accepts no connection before every
    /// account holds its first token (connections made meanwhile wait in the backlog), then
    /// calls `on_ready`; the proxy stops with [`RunError::NotReady`] if that takes longer
    /// than `wait_ready`.
    pub async fn run_when_ready(
        self,
        shutdown: Shutdown,
        wait_ready: Option<Duration>,
        on_ready: impl FnOnce(),
    ) -> Result<(), RunError> {
        let mut tasks = tokio::task::JoinSet::new();
        for account in self.accounts.iter() {
            tasks.spawn(keep_fresh(
                account.clone(),
                self.identity.clone(),
                self.policies.clone(),
                shutdown.clone(),
            ));
            if matches!(account.secret_source(), SecretSource::File(_)) {
                tasks.spawn(watch_secret_file(
                    account.clone(),
                    self.secret_poll,
                    shutdown.clone(),
                ));
            }
        }
        let serving = self
            .tls
            .iter()
            .chain(self.extra.iter().filter_map(|l| l.tls.as_ref()));
        for tls in serving {
            tasks.spawn(reload_tls(
                tls.config.clone(),
                tls.files.clone(),
                tls.every,
                shutdown.clone(),
            ));
        }
        for extra in self.extra {
            let (proxy, limits) = (extra.proxy, self.limits.clone());
            let (shutdown, grace) = (shutdown.clone(), self.shutdown_grace);
            let tls = extra.tls.map(|t| t.config);
            tracing::info!(listener = %extra.name, address = ?extra.address, routes = proxy.routes().routes().len(), "listening");
            tasks.spawn(async move {
                serve(
                    extra.listener,
                    move |conn| ProxyService::new(proxy.clone(), conn.clone()),
                    limits,
                    tls,
                    shutdown,
                    grace,
                )
                .await;
                if let ListenAddress::Unix { path, .. } = &extra.address {
                    let _ = std::fs::remove_file(path);
                }
            });
        }
        if let Some(admin) = self.admin {
            let accounts = self.accounts.clone();
            let limits = ConnectionLimits {
                max_connections: Some(ADMIN_MAX_CONNECTIONS),
                ..self.limits.clone()
            };
            let (shutdown, grace) = (shutdown.clone(), self.shutdown_grace);
            tasks.spawn(async move {
                serve(
                    admin,
                    move |_| crate::admin::AdminService::new(accounts.clone()),
                    limits,
                    None,
                    shutdown,
                    grace,
                )
                .await;
            });
        }
        if let Some(limit) = wait_ready {
            let deadline = tokio::time::Instant::now() + limit;
            for account in self.accounts.iter() {
                let mut stop = shutdown.clone();
                let ready = tokio::select! {
                    ready = account.wait_ready(deadline) => ready,
                    () = stop.wait() => {
                        tracing::info!("stopped before every account held a token");
                        tasks.abort_all();
                        return Ok(());
                    }
                };
                if !ready {
                    let reason = account
                        .unavailable()
                        .failure
                        .map_or_else(|| "no answer yet".to_owned(), |f| f.to_string());
                    tasks.abort_all();
                    return Err(RunError::NotReady {
                        account: account.name().to_owned(),
                        waited: limit,
                        reason,
                    });
                }
            }
            tracing::info!("every account holds a token");
            on_ready();
        }
        let proxy = self.proxy.clone();
        tracing::info!(
            listen = %self.local_addr,
            admin = ?self.admin_addr,
            routes = proxy.routes().routes().len(),
            accounts = self.accounts.len(),
            max_connections = self.limits.max_connections,
            "proxy listening"
        );
        let deadline = serve(
            self.listener,
            move |conn| ProxyService::new(proxy.clone(), conn.clone()),
            self.limits.clone(),
            self.tls.as_ref().map(|tls| tls.config.clone()),
            shutdown,
            self.shutdown_grace,
        )
        .await;
        // Every task watches the same signal and drains by the same deadline.
        let _ = tokio::time::timeout_at(deadline, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        tracing::info!("proxy stopped");
        Ok(())
    }
}

/// Reads the listener's certificate files every `every` and serves the new ones once they
/// change and make a valid configuration (cert-manager and mounted Secrets rotate them in
/// place); a broken set is reported and the one in use kept.
async fn reload_tls(
    config: TlsConfig,
    files: ListenerTls,
    every: Duration,
    mut shutdown: Shutdown,
) {
    let read = |files: &ListenerTls| {
        let paths = [
            Some(&files.cert_file),
            Some(&files.key_file),
            files.client_ca_file.as_ref(),
        ];
        paths.map(|p| p.and_then(|p| std::fs::read(p).ok()))
    };
    let mut seen = read(&files);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait() => return,
        }
        let now = read(&files);
        if now == seen {
            continue;
        }
        match crate::tls::server_config(&files) {
            Ok((server, warnings)) => {
                for warning in warnings {
                    tracing::warn!("{warning}");
                }
                config.store(Arc::new(server));
                tracing::info!(cert = %files.cert_file.display(), "serving the renewed TLS certificate");
                seen = now;
            }
            Err(problem) => {
                tracing::warn!(%problem, "the TLS files changed but cannot be served; keeping the ones in use");
                seen = now;
            }
        }
    }
}

/// Resolves the identity service's origin host once, for a server-name override.
async fn identity_addresses(origin: &str) -> Result<Vec<SocketAddr>, StartError> {
    let failed = |problem: String| StartError::IdentityAddress {
        origin: origin.to_owned(),
        problem,
    };
    let url = reqwest::Url::parse(origin).map_err(|e| failed(e.to_string()))?;
    let host = url.host_str().ok_or_else(|| failed("no host".into()))?;
    let port = url.port_or_known_default().unwrap_or(443);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| failed(e.to_string()))?
        .collect();
    if addrs.is_empty() {
        return Err(failed("resolves to no address".into()));
    }
    Ok(addrs)
}

/// Builds a listener's TLS from its files, if it has any.
fn serving_tls(
    files: Option<&ListenerTls>,
    every: Duration,
) -> Result<Option<ServingTls>, StartError> {
    let Some(files) = files else {
        return Ok(None);
    };
    let (server, _) = crate::tls::server_config(files).map_err(StartError::ListenerTls)?;
    Ok(Some(ServingTls {
        config: Arc::new(arc_swap::ArcSwap::from_pointee(server)),
        files: files.clone(),
        every,
    }))
}

/// Binds a further listener: a TCP address, or a Unix socket created with its file mode
/// (a socket file left by an earlier run is replaced).
async fn bind_listener(address: &ListenAddress) -> Result<Listener, StartError> {
    match address {
        ListenAddress::Tcp(addr) => Ok(Listener::Tcp(bind(*addr).await?)),
        ListenAddress::Unix { path, mode } => {
            use std::os::unix::fs::{FileTypeExt, PermissionsExt};
            let problem = |source| StartError::BindSocket {
                path: path.display().to_string(),
                source,
            };
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                std::fs::remove_file(path).map_err(problem)?;
            }
            let listener = tokio::net::UnixListener::bind(path).map_err(problem)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode))
                .map_err(problem)?;
            Ok(Listener::Unix(listener))
        }
    }
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })
}

/// Reads every account's secret again on each SIGHUP (files at once; an environment variable
/// can only change with a restart, so it is read but cannot differ).
pub async fn reload_secrets_on_hangup(accounts: Arc<[Arc<Account>]>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP: reading the client secrets again");
            for account in accounts.iter() {
                if let Err(error) = account.reload_secret() {
                    tracing::warn!(account = account.name(), %error, "cannot read the secret again; keeping the one in use");
                }
            }
        }
    }
    #[cfg(not(unix))]
    let _ = accounts;
}
