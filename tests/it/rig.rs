//! The load-test rig as processes: `identity-stub` and `upstream-stub` run as a rig runs
//! them, the `token` command against them, a key rotation and a secret reset through the
//! stand-in's admin endpoints, and the proxy reloading on SIGHUP.

use crate::support::*;
use http::{header, Request, StatusCode};
use mosaic_auth_proxy::stub::keys::VerifyingKey;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mosaic-auth-proxy"))
}

/// A child process, killed when dropped so that a failing test leaves none behind.
struct Process(Child);

impl Process {
    /// Starts `args` and returns it with the first line it prints (its address).
    fn start(args: &[&str]) -> (Process, String) {
        let mut child = binary()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the binary starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(!line.is_empty(), "{args:?} printed no address");
        (Process(child), line.trim().to_owned())
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `upstream-stub` checking tokens against the identity stand-in at `origin`.
fn upstream_stub(origin: &str) -> (Process, String) {
    Process::start(&[
        "upstream-stub",
        "--listen",
        "127.0.0.1:0",
        "--identity-origin",
        origin,
    ])
}

fn token(config: &std::path::Path, decode: bool) -> std::process::Output {
    let mut command = binary();
    command.args(["token", "importer", "--config"]).arg(config);
    if decode {
        command.arg("--decode");
    }
    command.output().unwrap()
}

async fn post(url: String, body: &'static str) -> Reply {
    use http_body_util::{BodyExt, Full};
    let body = Full::new(bytes::Bytes::from_static(body.as_bytes()))
        .map_err(|never| match never {})
        .boxed();
    send(&client(), Request::post(url).body(body).unwrap()).await
}

async fn verify(origin: &str, jwt: &str) -> bool {
    let jwks = get(&format!("{origin}/tenant-t/env-e/.well-known/jwks.json")).await;
    assert_eq!(jwks.status, StatusCode::OK);
    let header = mosaic_auth_proxy::jwt::decode(jwt).unwrap().header;
    jwks.json()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["kid"] == header["kid"])
        .filter_map(VerifyingKey::from_jwk)
        .any(|key| key.verifies(jwt))
}

#[tokio::test]
async fn the_stand_ins_run_as_processes_serve_the_token_command_and_rotation_drills() {
    let (_identity, origin) = Process::start(&[
        "identity-stub",
        "--listen",
        "127.0.0.1:0",
        "--account",
        "importer:first-secret:media-service=ADMIN,media-service=READ,video-service=VIDEOS_READ",
        "--tenant-id",
        "tenant-t",
        "--environment-id",
        "env-e",
    ]);
    let (_upstream, upstream) = upstream_stub(&origin);
    let dir = crate::operations::tempdir();
    let secret = dir.join("secret");
    std::fs::write(&secret, "first-secret\n").unwrap();
    let config = dir.join("proxy.toml");
    std::fs::write(
        &config,
        format!(
            "[identity]\norigin = \"{origin}\"\n[accounts.importer]\nclient_id = \"importer\"\nclient_secret_file = \"{}\"\n[[routes]]\nupstream = \"{upstream}\"\naccount = \"importer\"\n",
            secret.display()
        ),
    )
    .unwrap();

    // `token` prints a JWT the stand-in's JWKS verifies, and the upstream takes.
    let out = token(&config, false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let jwt = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(jwt.split('.').count(), 3, "{jwt}");
    assert!(
        verify(&origin, &jwt).await,
        "the JWKS does not verify the token"
    );
    let whoami = |jwt: String| {
        let upstream = upstream.clone();
        async move {
            let request = Request::get(format!("{upstream}/whoami"))
                .header(header::AUTHORIZATION, format!("Bearer {jwt}"))
                .body(empty())
                .unwrap();
            send(&client(), request).await
        }
    };
    let reply = whoami(jwt.clone()).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply.json()["data"]["whoami"].is_object(),
        "{:?}",
        reply.body
    );

    // --decode: the claims, as the stand-in was told.
    let out = token(&config, true);
    assert!(out.status.success());
    let decoded: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(decoded["claims"]["tenantId"], "tenant-t");
    assert_eq!(decoded["claims"]["environmentId"], "env-e");
    assert_eq!(
        decoded["claims"]["permissions"]["media-service"],
        serde_json::json!(["ADMIN", "READ"])
    );
    assert_eq!(decoded["header"]["alg"], "RS256");
    assert!(decoded["expires_in_seconds"].as_u64().unwrap() > 3000);
    assert!(!String::from_utf8_lossy(&out.stdout).contains(&jwt));

    // A rotation drill: a new key signs, the old one stays published.
    let rotated = post(format!("{origin}/admin/rotate-key"), "").await;
    assert_eq!(rotated.status, StatusCode::OK);
    let kid = rotated.json()["kid"].as_str().unwrap().to_owned();
    let out = token(&config, false);
    let fresh = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let header = mosaic_auth_proxy::jwt::decode(&fresh).unwrap().header;
    assert_eq!(header["kid"], kid.as_str());
    assert!(verify(&origin, &fresh).await);
    assert!(
        verify(&origin, &jwt).await,
        "the previous key was retired too early"
    );
    assert_eq!(whoami(fresh).await.status, StatusCode::OK);

    // The stand-in shows no secret, and a reset one refuses the old secret for good.
    let listed = get(&format!("{origin}/admin/accounts")).await;
    assert!(!String::from_utf8_lossy(&listed.body).contains("first-secret"));
    assert_eq!(listed.json()["accounts"][0]["client_id"], "importer");
    let reset = post(
        format!("{origin}/admin/accounts/importer/secret"),
        "second-secret",
    )
    .await;
    assert_eq!(reset.status, StatusCode::OK);
    let out = token(&config, false);
    assert_eq!(out.status.code(), Some(77));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("permanent"), "{stderr}");
    assert!(out.stdout.is_empty());
    std::fs::write(&secret, "second-secret").unwrap();
    assert!(token(&config, false).status.success());
    let out = binary()
        .args(["token", "nobody", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("importer"));
}

#[tokio::test]
async fn sighup_reloads_the_routes_of_a_running_proxy() {
    let (_identity, origin) = Process::start(&["identity-stub", "--listen", "127.0.0.1:0"]);
    let (_upstream, upstream) = upstream_stub(&origin);
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (listen, admin) = (free(), free());
    let dir = crate::operations::tempdir();
    let config = dir.join("proxy.toml");
    let write = |prefix: &str| {
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\n[identity]\norigin = \"{origin}\"\n\
                 [accounts.a]\nclient_id = \"demo-client\"\nclient_secret = \"demo-secret\"\n\
                 [[routes]]\npath_prefix = \"{prefix}\"\nupstream = \"{upstream}\"\naccount = \"a\"\n"
            ),
        )
        .unwrap()
    };
    write("/before");
    let mut proxy = binary()
        .args(["run", "--wait-ready", "10", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(proxy.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let _proxy = Process(proxy);
    assert_eq!(line.trim(), "ready");
    // The container health check.
    let probe = |path: &str| {
        binary()
            .args(["probe", &format!("http://{admin}{path}")])
            .output()
            .unwrap()
    };
    assert!(probe("/livez").status.success());
    let missing = probe("/nowhere");
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404"));
    let closed = free();
    let refused = binary()
        .args(["probe", &format!("http://{closed}/livez")])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(
        get(&format!("http://{listen}/before/whoami")).await.status,
        StatusCode::OK
    );
    write("/after");
    let hup = Command::new("kill")
        .args(["-HUP", &_proxy.0.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let reloaded = eventually(Duration::from_secs(10), async || {
        get(&format!("http://{listen}/after/whoami")).await.status == StatusCode::OK
    })
    .await;
    assert!(reloaded, "SIGHUP did not reload the routes");
    assert_eq!(
        get(&format!("http://{listen}/before/whoami")).await.status,
        StatusCode::NOT_FOUND
    );
    let status = get(&format!("http://{admin}/status.json")).await.json();
    assert_eq!(status["last_reload"]["ok"], true);
}
