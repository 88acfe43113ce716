//! Bind, then run: the proxy's listeners, the configuration in use and the background
//! tasks as one value. [`generation`] makes a configuration into what requests use; [`live`]
//! holds the one in use and swaps it on reload.

pub mod generation;
pub mod live;

pub use live::{Live, ReloadError, ReloadReport, Source};

use crate::config::{Config, ConnectionLimits, ListenAddress};
use crate::identity::Account;
use crate::proxy::{Proxy, ProxyService};
use crate::server::transport::{self, Bound};
use crate::server::{connection_slots, derived_max_connections, serve, worker, TlsConfig};
use crate::shutdown::Shutdown;
use crate::tls::ListenerTls;
use crate::tls::TlsError;
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
    /// The main listener's sockets, one per worker.
    listeners: Vec<Bound>,
    admin: Option<TcpListener>,
    local_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    live: Arc<Live>,
    shutdown_grace: Duration,
    limits: ConnectionLimits,
    tls: Option<ServingTls>,
    extra: Vec<ExtraListener>,
}

/// A further listener with its own routes (and so its own proxy) and TLS.
struct ExtraListener {
    name: String,
    /// One per worker.
    sockets: Vec<Bound>,
    address: ListenAddress,
    tls: Option<ServingTls>,
}

/// What one worker serves: its socket of the main listener and of each further one.
struct WorkerSockets {
    main: Bound,
    further: Vec<Bound>,
}

/// What the workers share to serve one listener.
#[derive(Clone)]
struct Serving {
    name: String,
    proxy: Arc<arc_swap::ArcSwap<Proxy>>,
    /// Its places of `max_connections`, taken by every worker's connections.
    slots: Arc<tokio::sync::Semaphore>,
    tls: Option<TlsConfig>,
}

/// What every worker serves with: each listener's shared state, and the connection limits.
#[derive(Clone)]
struct Workload {
    main: Serving,
    further: Vec<Serving>,
    /// Open client connections, all listeners together.
    connections: prometheus_client::metrics::gauge::Gauge,
    limits: ConnectionLimits,
    shutdown: Shutdown,
    grace: Duration,
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
        App::bind_reloadable(config, None).await
    }

    /// Like [`App::bind`], with the file `config` came from, which a reload (SIGHUP,
    /// `POST /reload`) reads again.
    pub async fn bind_reloadable(
        config: Config,
        source: Option<Source>,
    ) -> Result<App, StartError> {
        let names = config.listeners.iter().map(|l| l.name.clone()).collect();
        let every = config.server.tls_reload;
        let tls = serving_tls(config.server.tls.as_ref(), every)?;
        let mut extra = Vec::new();
        for listener in &config.listeners {
            extra.push(ExtraListener {
                name: listener.name.clone(),
                sockets: bind_listener(&listener.address, &config.server)?,
                address: listener.address.clone(),
                tls: serving_tls(listener.tls.as_ref(), every)?,
            });
        }
        let mut limits = config.server.limits.clone();
        limits.max_connections = Some(
            limits
                .max_connections
                .unwrap_or_else(derived_max_connections),
        );
        let bound = |source| StartError::Bind {
            addr: config.server.listen,
            source,
        };
        let (local_addr, listeners) = worker::bind(
            config.server.listen,
            config.server.workers,
            config.server.defer_accept,
            config.server.quickack,
        )
        .map_err(bound)?;
        let admin = match config.server.admin_listen {
            Some(addr) => Some(bind(addr)?),
            None => None,
        };
        let admin_addr = admin.as_ref().and_then(|l| l.local_addr().ok());
        let shutdown_grace = config.server.shutdown_grace;
        let live = Arc::new(Live::new(config, names, source).await?);
        Ok(App {
            listeners,
            admin,
            local_addr,
            admin_addr,
            live,
            shutdown_grace,
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
                let address = match (l.sockets.first().and_then(Bound::local_addr), &l.address) {
                    (Some(bound), _) => bound.to_string(),
                    (None, ListenAddress::Unix { path, .. }) => path.display().to_string(),
                    (None, ListenAddress::Tcp(addr)) => addr.to_string(),
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

    /// Returns the main listener's proxy of the configuration in use.
    pub fn proxy(&self) -> Arc<Proxy> {
        self.live.slot(0).load_full()
    }

    /// Returns the accounts in use, whose readiness can be watched.
    pub fn accounts(&self) -> Arc<Vec<Arc<Account>>> {
        self.live.accounts()
    }

    /// Returns the configuration in use and its reload.
    pub fn live(&self) -> Arc<Live> {
        self.live.clone()
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
        self.live.start_refreshers(shutdown.clone());
        let live = self.live.clone();
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
        // Each further listener's state is shared by the workers; its sockets go one to each.
        let mut further = Vec::new();
        let mut sockets: Vec<std::vec::IntoIter<Bound>> = Vec::new();
        let mut unix_paths = Vec::new();
        for (index, extra) in self.extra.into_iter().enumerate() {
            let proxy = live.slot(index + 1);
            tracing::info!(listener = %extra.name, address = ?extra.address, routes = proxy.load().routes().routes().len(), "listening");
            if let ListenAddress::Unix { path, .. } = &extra.address {
                unix_paths.push(path.clone());
            }
            further.push(Serving {
                name: extra.name,
                proxy,
                slots: connection_slots(&self.limits),
                tls: extra.tls.map(|t| t.config),
            });
            sockets.push(extra.sockets.into_iter());
        }
        if let Some(admin) = self.admin {
            let live = live.clone();
            let limits = ConnectionLimits {
                max_connections: Some(ADMIN_MAX_CONNECTIONS),
                ..self.limits.clone()
            };
            let (shutdown, grace) = (shutdown.clone(), self.shutdown_grace);
            tasks.spawn(async move {
                serve(
                    admin,
                    move |_| crate::admin::AdminService::new(live.clone()),
                    limits,
                    None,
                    None,
                    shutdown,
                    grace,
                )
                .await;
            });
        }
        if let Some(limit) = wait_ready {
            let deadline = tokio::time::Instant::now() + limit;
            for account in live.accounts().iter() {
                let ready = tokio::select! {
                    ready = account.wait_ready(deadline) => ready,
                    () = shutdown.wait() => {
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
        let proxy = live.slot(0);
        let connections = live.metrics().client_connections().clone();
        tracing::info!(
            listen = %self.local_addr,
            admin = ?self.admin_addr,
            workers = self.listeners.len(),
            routes = proxy.load().routes().routes().len(),
            accounts = live.accounts().len(),
            max_connections = self.limits.max_connections,
            "proxy listening"
        );
        // The workers share the places of max_connections.
        let main = Serving {
            name: "main".to_owned(),
            proxy,
            slots: connection_slots(&self.limits),
            tls: self.tls.as_ref().map(|tls| tls.config.clone()),
        };
        let workers: Vec<WorkerSockets> = self
            .listeners
            .into_iter()
            .map(|main| WorkerSockets {
                main,
                further: sockets.iter_mut().filter_map(Iterator::next).collect(),
            })
            .collect();
        let load = Workload {
            main,
            further,
            connections,
            limits: self.limits.clone(),
            shutdown,
            grace: self.shutdown_grace,
        };
        let deadline = worker::run(workers, move |i, sockets| {
            serve_worker(i, sockets, load.clone())
        })
        .await;
        for path in unix_paths {
            let _ = std::fs::remove_file(path);
        }
        // Every task watches the same signal and drains by the same deadline.
        let _ = tokio::time::timeout_at(deadline, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        tracing::info!("proxy stopped");
        Ok(())
    }
}

/// Serves one worker's sockets: the main listener's and each further listener's, the
/// latter as tasks of the worker's runtime; returns the latest deadline they drained by.
async fn serve_worker(
    worker: usize,
    sockets: WorkerSockets,
    load: Workload,
) -> tokio::time::Instant {
    let Workload {
        main,
        further,
        connections,
        limits,
        shutdown,
        grace,
    } = load;
    let listen = |bound: Bound, serving: Serving| {
        let listener = match bound.register() {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(worker, listener = %serving.name, %error, "cannot listen in a worker");
                return None;
            }
        };
        let connections = connections.clone();
        let proxy = serving.proxy;
        Some(serve(
            listener,
            move |conn| ProxyService::new(proxy.clone(), conn.clone(), &connections),
            limits.clone(),
            Some(serving.slots),
            serving.tls,
            shutdown.clone(),
            grace,
        ))
    };
    let others: Vec<_> = sockets
        .further
        .into_iter()
        .zip(further)
        .filter_map(|(bound, serving)| listen(bound, serving))
        .map(tokio::spawn)
        .collect();
    let mut latest = match listen(sockets.main, main) {
        Some(serving) => serving.await,
        None => tokio::time::Instant::now(),
    };
    for other in others {
        if let Ok(deadline) = other.await {
            latest = latest.max(deadline);
        }
    }
    latest
}

/// Reads the listener's certificate files every `every` and serves the new ones once they
/// change and make a valid configuration (cert-manager and mounted Secrets rotate them in
/// place); a broken set is reported and the one in use kept.
async fn reload_tls(config: TlsConfig, files: ListenerTls, every: Duration, shutdown: Shutdown) {
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

/// Binds a further listener for `server.workers` workers: a TCP address (a socket each, with
/// `SO_REUSEPORT`, accepts deferred as `server.defer_accept` says, acknowledgements as
/// `server.quickack` says), or a Unix socket created
/// with its file mode (a socket file left by an earlier run is replaced), which every
/// worker accepts from.
fn bind_listener(
    address: &ListenAddress,
    server: &crate::config::ServerConfig,
) -> Result<Vec<Bound>, StartError> {
    let workers = server.workers;
    match address {
        ListenAddress::Tcp(addr) => {
            let (_, sockets) = worker::bind(*addr, workers, server.defer_accept, server.quickack)
                .map_err(|source| StartError::Bind {
                addr: *addr,
                source,
            })?;
            Ok(sockets)
        }
        ListenAddress::Unix { path, mode } => {
            use std::os::unix::fs::{FileTypeExt, PermissionsExt};
            let problem = |source| StartError::BindSocket {
                path: path.display().to_string(),
                source,
            };
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                std::fs::remove_file(path).map_err(problem)?;
            }
            let listener = std::os::unix::net::UnixListener::bind(path).map_err(problem)?;
            listener.set_nonblocking(true).map_err(problem)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode))
                .map_err(problem)?;
            let mut sockets = Vec::with_capacity(workers.max(1));
            for _ in 1..workers.max(1) {
                sockets.push(Bound::Unix(listener.try_clone().map_err(problem)?));
            }
            sockets.push(Bound::Unix(listener));
            Ok(sockets)
        }
    }
}

fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    transport::tcp_listener(addr).map_err(|source| StartError::Bind { addr, source })
}

/// Reloads the configuration on each SIGHUP (without a file: reads the secrets again).
pub async fn reload_on_hangup(live: Arc<Live>) {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut hangup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hangup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading the configuration");
        // The outcome is logged by the reload itself.
        let _ = live.reload().await;
    }
}
