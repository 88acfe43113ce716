//! What the probes and the status page say: each account's state and token (by fingerprint,
//! never the token), each route, and the latest events.

use crate::app::Live;
use crate::identity::stats::now_ms;
use serde_json::{json, Value};

/// Events shown on the status page's timeline, all accounts together.
const TIMELINE: usize = 60;

/// Tells whether every account holds a usable token, and each account's state.
pub fn readiness(live: &Live) -> (bool, Value) {
    let accounts: Vec<Value> = live
        .accounts()
        .iter()
        .map(|a| {
            let s = a.status();
            json!({
                "account": s.account,
                "state": s.state,
                "fingerprint": s.fingerprint,
                "expires_in_s": s.expires_in_s,
                "last_error": s.last_error,
            })
        })
        .collect();
    let ready = accounts.iter().all(|a| a["state"] == "ready");
    let status = if ready { "ready" } else { "not_ready" };
    (ready, json!({"status": status, "accounts": accounts}))
}

/// Everything the status page shows.
pub fn status(live: &Live) -> Value {
    let generation = live.generation();
    let accounts = live.accounts();
    let mut events: Vec<Value> = Vec::new();
    let account_list: Vec<Value> = accounts
        .iter()
        .map(|a| {
            for event in a.stats().timeline() {
                events.push(json!({
                    "account": a.name(),
                    "at_ms": event.at_ms,
                    "kind": event.kind,
                    "detail": event.detail,
                }));
            }
            let mut value = serde_json::to_value(a.status()).unwrap_or(Value::Null);
            value["last_refresh_ms"] = a.stats().last_refresh_ms().into();
            value
        })
        .collect();
    events.sort_by_key(|e| std::cmp::Reverse(e["at_ms"].as_u64()));
    events.truncate(TIMELINE);
    let listeners = std::iter::once("main").chain(live.listener_names().iter().map(String::as_str));
    let routes: Vec<Value> = generation
        .proxies
        .iter()
        .zip(listeners)
        .flat_map(|(proxy, listener)| {
            proxy.routes().routes().iter().map(move |r| {
                json!({
                    "route": r.name,
                    "listener": listener,
                    "upstream": r.upstream.to_string(),
                    "account": r.account.name(),
                })
            })
        })
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "now_ms": now_ms(),
        "started_ms": live.started_ms(),
        "accounts": account_list,
        "routes": routes,
        "events": events,
        "last_reload": live.last_reload(),
    })
}
