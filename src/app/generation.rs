//! One configuration made into what requests use: the identity client, the accounts and each
//! listener's proxy. A reload builds the next generation from the one in use, keeping every
//! account whose identity settings did not change (with its token and its refresher, which
//! takes the identity client made from the TLS files as they are then), every
//! upstream budget whose size did not change, and every upstream pool (with its open
//! connections) whose settings and budget did not change.

use super::StartError;
use crate::config::{Config, RouteConfig};
use crate::identity::refresher::Policies;
use crate::identity::{Account, IdentityClient};
use crate::metrics::Metrics;
use crate::proxy::pool::{connector, Connector, Pool};
use crate::proxy::upstream::Budgets;
use crate::proxy::{Proxy, Route, RouteTable};
use crate::tls::{client_config_for, client_tls, UpstreamTls};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// What one configuration serves with.
pub struct Generation {
    pub config: Config,
    pub identity: IdentityClient,
    pub policies: Policies,
    /// In the configuration's order.
    pub accounts: Vec<Arc<Account>>,
    /// The main listener's proxy, then one per running further listener, in that order.
    pub proxies: Vec<Arc<Proxy>>,
    /// What this configuration asks for that the running listeners cannot give.
    pub warnings: Vec<String>,
    budgets: Arc<Budgets>,
    pools: HashMap<PoolKey, Arc<Pool>>,
    /// The pools kept from the generation before, and the connectors they take at the switch
    /// with the digest of the certificates each was made from.
    renewed: Vec<(Arc<Pool>, Connector, u64)>,
    /// The identity client the kept one (`identity`) takes at the switch.
    renewed_identity: Option<IdentityClient>,
}

/// What a pool is made of besides its budget: routes that agree on it share one, and a
/// reload keeps one whose key is unchanged (with `[tls]`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    origin: String,
    h2c: bool,
    /// The route's own TLS settings.
    tls: Option<UpstreamTls>,
    idle_timeout: Duration,
    workers: usize,
}

impl Generation {
    /// Builds a generation for the further listeners `listeners` (by name, in the order they
    /// run), reusing the identity client and the accounts of `previous` where unchanged.
    pub async fn build(
        config: Config,
        listeners: &[String],
        previous: Option<&Generation>,
        metrics: &Metrics,
    ) -> Result<Generation, StartError> {
        let global_ca = config.tls.ca_file.as_deref();
        let same_identity =
            previous.filter(|p| p.config.identity == config.identity && p.config.tls == config.tls);
        // The identity client is made anew from the TLS files as they are now; kept accounts'
        // refreshers, which hold the one in use, take it at the switch.
        let fresh_identity = identity_client(&config)?;
        let (identity, policies, renewed_identity) = match same_identity {
            Some(p) => (p.identity.clone(), p.policies.clone(), Some(fresh_identity)),
            None => (
                fresh_identity,
                Policies {
                    refresh: config.identity.refresh.clone(),
                    sample: rand::random::<f64>,
                },
                None,
            ),
        };
        let accounts: Vec<Arc<Account>> = config
            .accounts
            .iter()
            .map(|a| {
                let kept = same_identity.and_then(|p| {
                    p.accounts.iter().find(|old| {
                        old.name() == a.name
                            && old.client_id() == a.client_id
                            && *old.secret_source() == a.secret_source
                    })
                });
                match kept {
                    Some(old) => old.clone(),
                    None => Arc::new(Account::new(
                        &a.name,
                        &a.client_id,
                        a.secret.clone(),
                        a.secret_source.clone(),
                        config.identity.retry.clone(),
                        config.identity.breaker.clone(),
                    )),
                }
            })
            .collect();
        let budgets = Arc::new(Budgets::keeping(
            config.routes.iter().map(|r| {
                let max = r
                    .max_connections
                    .unwrap_or(config.server.upstream_max_connections);
                (origin(r), max)
            }),
            previous.map(|p| &*p.budgets),
        ));
        // Pools are kept only under the same `[tls]`: trust settings that changed apply to
        // every connection, not only to those opened from now on.
        let same_tls = previous.filter(|p| p.config.tls == config.tls);
        let connect_timeout = config.server.connect_timeout;
        let (shared_tls, shared_material) =
            client_tls(config.tls.native_roots, global_ca, &UpstreamTls::default())?;
        let shared = connector(shared_tls, None, connect_timeout);
        // One pool per upstream, h2c or not, and TLS settings (the shared ones, or a route's).
        let mut pools: HashMap<PoolKey, Arc<Pool>> = HashMap::new();
        let mut renewed = Vec::new();
        let mut warnings = Vec::new();
        let mut routes: Vec<Vec<Route>> = (0..=listeners.len()).map(|_| Vec::new()).collect();
        for (i, r) in config.routes.iter().enumerate() {
            let slot = match &r.listener_name {
                None => 0,
                Some(name) => match listeners.iter().position(|l| l == name) {
                    Some(l) => l + 1,
                    None => {
                        warnings.push(format!(
                            "routes[{i}] is for listener {name:?}, which is not running; it is served after a restart"
                        ));
                        continue;
                    }
                },
            };
            let budget = budgets
                .get(&origin(r))
                .expect("every route's upstream has a budget");
            let key = PoolKey {
                origin: origin(r),
                h2c: r.h2c,
                tls: r.tls.clone(),
                idle_timeout: config.server.upstream_idle_timeout,
                workers: config.server.workers,
            };
            let pool = match pools.get(&key) {
                Some(pool) => pool.clone(),
                None => {
                    let (connector, material) = match &r.tls {
                        None => (shared.clone(), shared_material),
                        Some(own) => {
                            let (tls, material) =
                                client_tls(config.tls.native_roots, global_ca, own)?;
                            let made = connector(tls, own.server_name.as_deref(), connect_timeout);
                            (made, material)
                        }
                    };
                    // Only `https://` connections are made with the certificates.
                    let material = if r.upstream.scheme == http::uri::Scheme::HTTPS {
                        material
                    } else {
                        0
                    };
                    let kept = same_tls
                        .and_then(|p| p.pools.get(&key))
                        .filter(|pool| Arc::ptr_eq(pool.budget(), &budget));
                    let pool = match kept {
                        Some(pool) => {
                            renewed.push((pool.clone(), connector, material));
                            pool.clone()
                        }
                        None => Arc::new(Pool::new(
                            r.upstream.scheme.clone(),
                            r.upstream.authority.clone(),
                            r.h2c,
                            connector,
                            material,
                            config.server.upstream_idle_timeout,
                            budget.clone(),
                            config.server.workers,
                        )),
                    };
                    pools.insert(key, pool.clone());
                    pool
                }
            };
            let account = accounts[r.account].clone();
            routes[slot].push(Route::new(r, account, budget, pool, metrics));
        }
        let proxies = routes
            .into_iter()
            .map(|routes| Arc::new(Proxy::new(RouteTable::new(routes), &config.server, metrics)))
            .collect();
        Ok(Generation {
            config,
            identity,
            policies,
            accounts,
            proxies,
            warnings,
            budgets,
            pools,
            renewed,
            renewed_identity,
        })
    }

    /// Hands each kept account the secret this configuration gives it (a changed secret is
    /// used for the next token request, at once; the token in use stays until then), the
    /// identity client and each kept pool what was made from the TLS files as they are now
    /// (a pool whose certificates changed stops reusing the connections made with the old
    /// ones), and has an account whose last token request failed ask again at once. Until
    /// this, building the generation changed nothing in use.
    pub fn settle(&self) {
        if let Some(fresh) = &self.renewed_identity {
            self.identity.renew(fresh);
        }
        for (account, config) in self.accounts.iter().zip(&self.config.accounts) {
            if !account.replace_secret(config.secret.clone()) && account.retry_if_failing() {
                tracing::info!(account = %account.name(), "the last token request failed; asking again with the reloaded configuration");
            }
        }
        for (pool, connector, material) in &self.renewed {
            pool.renew_connector(connector.clone(), *material);
        }
    }
}

fn origin(route: &RouteConfig) -> String {
    format!("{}://{}", route.upstream.scheme, route.upstream.authority)
}

/// Builds the identity service client of `config`.
pub fn identity_client(config: &Config) -> Result<IdentityClient, StartError> {
    let global_ca = config.tls.ca_file.as_deref();
    let identity_tls = client_config_for(config.tls.native_roots, global_ca, &config.identity.tls)?;
    IdentityClient::new(
        &config.identity.origin,
        config.identity.timeout,
        config.identity.max_reply_bytes,
        identity_tls,
        config.identity.tls.server_name.as_deref(),
    )
    .map_err(StartError::IdentityClient)
}
