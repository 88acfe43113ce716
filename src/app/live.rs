//! The configuration in use, and the reload that swaps it: the next generation is built
//! aside and installed at once (every listener's proxy, the accounts), so each request runs
//! on one configuration from start to end. Refreshers follow their accounts: a kept account
//! keeps its task, a removed one's task stops, a new one's starts.

use super::generation::Generation;
use super::StartError;
use crate::config::{Config, ConfigErrors, SecretSource};
use crate::error_chain;
use crate::identity::refresher::{keep_fresh, watch_secret_file};
use crate::identity::stats::now_ms;
use crate::identity::Account;
use crate::metrics::{LiveAccounts, Metrics};
use crate::proxy::Proxy;
use crate::shutdown::Shutdown;
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use tokio::task::AbortHandle;

/// Where the configuration comes from: the file, and what the command line puts over it.
#[derive(Clone, Debug)]
pub struct Source {
    pub path: PathBuf,
    /// `run --listen`.
    pub listen: Option<SocketAddr>,
    /// `run --admin-listen`.
    pub admin_listen: Option<SocketAddr>,
}

impl Source {
    /// Reads and validates the file (environment overrides included), then applies the
    /// command line's addresses.
    pub fn load(&self) -> Result<Config, ConfigErrors> {
        let mut config = Config::load(&self.path)?;
        config.server.listen = self.listen.unwrap_or(config.server.listen);
        config.server.admin_listen = self.admin_listen.or(config.server.admin_listen);
        Ok(config)
    }
}

/// Why a reload was refused; the configuration in use stays.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Config(ConfigErrors),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(
        "the proxy was started without a configuration file; only the secrets were read again"
    )]
    NoFile,
}

/// What a reload changed.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ReloadReport {
    pub routes_added: Vec<String>,
    pub routes_removed: Vec<String>,
    pub accounts_kept: Vec<String>,
    pub accounts_started: Vec<String>,
    pub accounts_stopped: Vec<String>,
    /// What changed but takes a restart (listen addresses, connection limits, listener TLS).
    pub warnings: Vec<String>,
}

/// The last reload, for the status page.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LastReload {
    pub at_ms: u64,
    pub ok: bool,
    pub summary: String,
}

/// The configuration in use, shared by the listeners and the admin listener.
pub struct Live {
    generation: ArcSwap<Generation>,
    accounts: LiveAccounts,
    /// The proxy each listener serves with: the main listener's, then the further ones'.
    slots: Vec<Arc<ArcSwap<Proxy>>>,
    listeners: Vec<String>,
    metrics: Metrics,
    source: Option<Source>,
    refreshers: Mutex<Vec<Refresher>>,
    shutdown: OnceLock<Shutdown>,
    reloading: tokio::sync::Mutex<()>,
    last_reload: Mutex<Option<LastReload>>,
    started_ms: u64,
}

/// The tasks that keep one account's token fresh.
struct Refresher {
    account: Arc<Account>,
    tasks: Vec<AbortHandle>,
}

impl Live {
    /// Builds the first generation of `config` for the further listeners `listeners`.
    pub async fn new(
        config: Config,
        listeners: Vec<String>,
        source: Option<Source>,
    ) -> Result<Live, StartError> {
        let accounts: LiveAccounts = Arc::default();
        let metrics = Metrics::new(accounts.clone());
        let generation = Generation::build(config, &listeners, None, &metrics).await?;
        for warning in &generation.warnings {
            tracing::warn!("{warning}");
        }
        accounts.store(Arc::new(generation.accounts.clone()));
        let slots = generation
            .proxies
            .iter()
            .map(|p| Arc::new(ArcSwap::new(p.clone())))
            .collect();
        Ok(Live {
            generation: ArcSwap::from_pointee(generation),
            accounts,
            slots,
            listeners,
            metrics,
            source,
            refreshers: Mutex::default(),
            shutdown: OnceLock::new(),
            reloading: tokio::sync::Mutex::new(()),
            last_reload: Mutex::default(),
            started_ms: now_ms(),
        })
    }

    /// Returns the generation in use.
    pub fn generation(&self) -> Arc<Generation> {
        self.generation.load_full()
    }

    /// Returns the accounts in use.
    pub fn accounts(&self) -> Arc<Vec<Arc<Account>>> {
        self.accounts.load_full()
    }

    /// Returns the proxy slot of listener `index` (0: the main listener).
    pub fn slot(&self, index: usize) -> Arc<ArcSwap<Proxy>> {
        self.slots[index].clone()
    }

    /// Returns the further listeners' names, in the order of their slots after the first.
    pub fn listener_names(&self) -> &[String] {
        &self.listeners
    }

    /// Returns the metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Returns when the proxy started, in milliseconds since the Unix epoch.
    pub fn started_ms(&self) -> u64 {
        self.started_ms
    }

    /// Returns the last reload's outcome, if there was one.
    pub fn last_reload(&self) -> Option<LastReload> {
        lock(&self.last_reload).clone()
    }

    /// Starts the refreshers of the accounts in use; later ones start as reloads add them.
    pub fn start_refreshers(&self, shutdown: Shutdown) {
        let _ = self.shutdown.set(shutdown);
        self.follow_accounts(&self.generation());
    }

    /// Re-reads the configuration file and installs it, or refuses it and keeps the one in
    /// use. Reloads run one at a time.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let _one = self.reloading.lock().await;
        let outcome = self.reload_file().await;
        let summary = match &outcome {
            Ok(report) => {
                for warning in &report.warnings {
                    tracing::warn!("reload: {warning}");
                }
                tracing::info!(
                    routes_added = ?report.routes_added,
                    routes_removed = ?report.routes_removed,
                    accounts_started = ?report.accounts_started,
                    accounts_stopped = ?report.accounts_stopped,
                    accounts_kept = report.accounts_kept.len(),
                    "configuration reloaded"
                );
                format!(
                    "{} route(s) added, {} removed; {} account(s) started, {} stopped, {} kept",
                    report.routes_added.len(),
                    report.routes_removed.len(),
                    report.accounts_started.len(),
                    report.accounts_stopped.len(),
                    report.accounts_kept.len()
                )
            }
            Err(error) => {
                tracing::error!(error = %error_chain(error).trim_end(), "reload refused; the configuration in use stays");
                error_chain(error)
            }
        };
        *lock(&self.last_reload) = Some(LastReload {
            at_ms: now_ms(),
            ok: outcome.is_ok(),
            summary,
        });
        outcome
    }

    async fn reload_file(&self) -> Result<ReloadReport, ReloadError> {
        let Some(source) = &self.source else {
            for account in self.accounts().iter() {
                if let Err(error) = account.reload_secret() {
                    tracing::warn!(account = account.name(), %error, "cannot read the secret again; keeping the one in use");
                }
            }
            return Err(ReloadError::NoFile);
        };
        let config = source.load().map_err(ReloadError::Config)?;
        let old = self.generation();
        let next = Generation::build(config, &self.listeners, Some(&old), &self.metrics).await?;
        let mut report = compare(&old, &next);
        report.warnings.extend(next.warnings.iter().cloned());
        report.warnings.extend(next.config.warnings.iter().cloned());
        next.settle();
        // The switch: each listener's proxy, then the accounts' views.
        for (slot, proxy) in self.slots.iter().zip(&next.proxies) {
            slot.store(proxy.clone());
        }
        let next = Arc::new(next);
        self.accounts.store(Arc::new(next.accounts.clone()));
        self.generation.store(next.clone());
        self.follow_accounts(&next);
        Ok(report)
    }

    /// Stops the refreshers of accounts no longer in use and starts those of new ones.
    fn follow_accounts(&self, generation: &Generation) {
        let Some(shutdown) = self.shutdown.get() else {
            return;
        };
        let mut refreshers = lock(&self.refreshers);
        refreshers.retain(|r| {
            let kept = generation
                .accounts
                .iter()
                .any(|a| Arc::ptr_eq(a, &r.account));
            if !kept {
                r.tasks.iter().for_each(AbortHandle::abort);
            }
            kept
        });
        for account in &generation.accounts {
            if refreshers.iter().any(|r| Arc::ptr_eq(&r.account, account)) {
                continue;
            }
            let mut tasks = vec![tokio::spawn(keep_fresh(
                account.clone(),
                generation.identity.clone(),
                generation.policies.clone(),
                shutdown.clone(),
            ))
            .abort_handle()];
            if matches!(account.secret_source(), SecretSource::File(_)) {
                tasks.push(
                    tokio::spawn(watch_secret_file(
                        account.clone(),
                        generation.config.identity.secret_poll,
                        shutdown.clone(),
                    ))
                    .abort_handle(),
                );
            }
            refreshers.push(Refresher {
                account: account.clone(),
                tasks,
            });
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        for refresher in lock(&self.refreshers).iter() {
            refresher.tasks.iter().for_each(AbortHandle::abort);
        }
    }
}

/// Says what `next` changes of `old`, and what of it takes a restart.
fn compare(old: &Generation, next: &Generation) -> ReloadReport {
    let names = |g: &Generation| -> Vec<String> {
        g.proxies
            .iter()
            .flat_map(|p| p.routes().routes().iter().map(|r| r.name.clone()))
            .collect()
    };
    let (before, after) = (names(old), names(next));
    let kept = |a: &Arc<Account>| old.accounts.iter().any(|o| Arc::ptr_eq(o, a));
    let mut report = ReloadReport {
        routes_added: after
            .iter()
            .filter(|r| !before.contains(r))
            .cloned()
            .collect(),
        routes_removed: before
            .iter()
            .filter(|r| !after.contains(r))
            .cloned()
            .collect(),
        accounts_kept: next
            .accounts
            .iter()
            .filter(|a| kept(a))
            .map(|a| a.name().to_owned())
            .collect(),
        accounts_started: next
            .accounts
            .iter()
            .filter(|a| !kept(a))
            .map(|a| a.name().to_owned())
            .collect(),
        accounts_stopped: old
            .accounts
            .iter()
            .filter(|o| !next.accounts.iter().any(|a| Arc::ptr_eq(a, o)))
            .map(|a| a.name().to_owned())
            .collect(),
        warnings: Vec::new(),
    };
    let (o, n) = (&old.config.server, &next.config.server);
    let restart_only = [
        ("server.listen", o.listen != n.listen),
        ("server.admin_listen", o.admin_listen != n.admin_listen),
        (
            "server connection limits (max_connections, timeouts, h2_*)",
            o.limits != n.limits,
        ),
        (
            "server.tls_* (the files themselves are re-read every tls_reload)",
            o.tls != n.tls || o.tls_reload != n.tls_reload,
        ),
        (
            "server.shutdown_grace",
            o.shutdown_grace != n.shutdown_grace,
        ),
        ("server.workers", o.workers != n.workers),
        ("server.defer_accept", o.defer_accept != n.defer_accept),
        ("server.quickack", o.quickack != n.quickack),
        ("[listeners]", old.config.listeners != next.config.listeners),
    ];
    for (what, changed) in restart_only {
        if changed {
            report.warnings.push(format!(
                "{what} changed: it takes effect at the next restart"
            ));
        }
    }
    report
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
