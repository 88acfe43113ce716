//! `demo`: the identity stand-in, a Mosaic stand-in and the proxy on loopback, and one
//! request through them, printed. Needs no credentials.

use crate::app::{App, StartError};
use crate::config::{Config, ConfigErrors};
use crate::shutdown::{Shutdown, ShutdownTrigger};
use crate::stub::{IdentityStub, MosaicUpstream, SigningKey, StubSettings};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;

/// What the demo needs to know.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Where the proxy listens.
    pub listen: SocketAddr,
    /// The lifetime of the stand-in's tokens.
    pub token_lifetime: Duration,
    /// Stop after the first request instead of serving until Ctrl-C.
    pub once: bool,
}

/// Why the demo failed.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot start a stand-in")]
    Stub(#[source] std::io::Error),
    #[error("the demo configuration is invalid: {0}")]
    Config(ConfigErrors),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("the request through the proxy failed")]
    Request(#[source] reqwest::Error),
}

const DEMO_SECRET_VAR: &str = "DEMO_CLIENT_SECRET";

/// Runs the demo until `shutdown` (or after one request with `once`).
pub async fn run(
    options: DemoOptions,
    trigger: ShutdownTrigger,
    shutdown: Shutdown,
) -> Result<(), DemoError> {
    let loopback: SocketAddr = ([127, 0, 0, 1], 0).into();
    let settings = StubSettings {
        lifetime: options.token_lifetime,
        ..StubSettings::default()
    };
    let secret = crate::stub::identity::DEFAULT_SECRET.to_owned();
    let identity = IdentityStub::bind(loopback, settings, SigningKey::bundled())
        .await
        .map_err(DemoError::Stub)?;
    let stub = identity.handle();
    let upstream = MosaicUpstream::bind(loopback, stub.origin())
        .await
        .map_err(DemoError::Stub)?;
    let upstream_addr = upstream.local_addr();
    let text = format!(
        r#"
        [server]
        listen = "{listen}"
        [identity]
        origin = "{origin}"
        [accounts.demo]
        client_id = "demo-client"
        client_secret_env = "{DEMO_SECRET_VAR}"
        [[routes]]
        upstream = "http://{upstream_addr}"
        account = "demo"
        "#,
        listen = options.listen,
        origin = stub.origin(),
    );
    let config = Config::parse(&text, &|name| {
        (name == DEMO_SECRET_VAR).then(|| secret.clone())
    })
    .map_err(DemoError::Config)?;
    let app = App::bind(config).await?;
    let proxy_addr = app.local_addr();
    let accounts = app.accounts();
    tokio::spawn(identity.run(shutdown.clone()));
    tokio::spawn(upstream.run(shutdown.clone()));
    let proxy = tokio::spawn(app.run(shutdown.clone()));

    println!("mosaic-auth-proxy demo, all on loopback:");
    println!(
        "  identity stand-in  {}  (JWKS {})",
        stub.origin(),
        stub.jwks_url()
    );
    println!("  Mosaic stand-in    http://{upstream_addr}  (checks tokens like a Mosaic service)");
    println!(
        "  proxy              http://{proxy_addr}  (route / → Mosaic stand-in, account \"demo\")"
    );
    let _ = accounts[0].header_or_wait(Duration::from_secs(10)).await;

    let url = format!("http://{proxy_addr}/graphql?access_token=stale");
    println!();
    println!("GET {url}");
    println!("    sent with \"Authorization: Bearer client-supplied\"; the proxy replaces both");
    let reply = reqwest::Client::builder()
        .tls_backend_preconfigured(
            crate::tls::client_config(false, None).map_err(StartError::from)?,
        )
        .build()
        .map_err(DemoError::Request)?
        .get(&url)
        .header("authorization", "Bearer client-supplied")
        .send()
        .await
        .map_err(DemoError::Request)?;
    let status = reply.status();
    let body: Value = reply.json().await.map_err(DemoError::Request)?;
    println!("<- HTTP {status}");
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    if let Some(whoami) = body.pointer("/data/whoami") {
        println!("the Mosaic stand-in verified the injected token; its claims:");
        println!("{}", pretty(whoami));
        println!("the request as the upstream saw it (Authorization left out):");
        println!("{}", pretty(&body["request"]));
    } else {
        println!("{}", pretty(&body));
    }
    if options.once {
        trigger.trigger();
    } else {
        println!();
        println!("The proxy keeps running. Try: curl -s http://{proxy_addr}/whoami");
        println!("Ctrl-C stops it.");
    }
    let _ = proxy.await;
    Ok(())
}
