//! The binary: exit statuses and the demo.

use mosaic_auth_proxy::shutdown::ShutdownTrigger;
use mosaic_auth_proxy::stub::{IdentityStub, SigningKey, StubAccount, StubHandle, StubSettings};
use std::io::BufRead;
use std::process::Command;

fn binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mosaic-auth-proxy"))
}

#[test]
fn check_exits_64_and_names_the_key_of_a_bad_configuration() {
    let dir = std::env::temp_dir().join(format!("map-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[server]\nlisten = \"nowhere\"\n").unwrap();
    let out = binary()
        .arg("check")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("server.listen"), "{stderr}");
    assert!(stderr.contains("accounts"), "{stderr}");
    let out = binary()
        .arg("check")
        .arg("--config")
        .arg(dir.join("absent.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn check_accepts_the_shipped_configuration_when_its_secret_is_set() {
    let out = binary()
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml"),
        ])
        .env("MEDIA_CLIENT_SECRET", "x")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = binary()
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml"),
        ])
        .env_remove("MEDIA_CLIENT_SECRET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("accounts.media.client_secret_env"));
}

#[test]
fn the_demo_shows_a_request_going_through_with_the_injected_tokens_claims() {
    let out = binary()
        .args(["demo", "--once", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("HTTP 200"), "{stdout}");
    assert!(
        stdout.contains("\"subjectType\"") || stdout.contains("\"permissions\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("\"x-forwarded-for\": \"127.0.0.1\""),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("demo-secret") && !stdout.contains("demo-secret"));
}

fn config_file(name: &str, origin: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("map-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("proxy.toml");
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[identity]\norigin = \"{origin}\"\nretry_initial = \"50ms\"\nretry_max = \"100ms\"\n\
         [accounts.a]\nclient_id = \"demo-client\"\nclient_secret_env = \"A_SECRET\"\n\
         [[routes]]\nupstream = \"http://127.0.0.1:9\"\naccount = \"a\"\n"
    );
    std::fs::write(&file, text).unwrap();
    file
}

#[test]
fn wait_ready_exits_69_with_the_reason_when_no_token_arrives_in_time() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let file = config_file("closed", &format!("http://{closed}"));
    let out = binary()
        .args(["run", "--wait-ready", "1", "--config"])
        .arg(&file)
        .env("A_SECRET", "demo-secret")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot connect to the identity service"),
        "{stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("ready"));
}

/// Starts `run --config` with `args` first, against an identity service that refuses
/// connections, its output piped. Returns once it has logged its first line: the process,
/// that line and the rest of its log.
fn run_without_identity(
    name: &str,
    args: &[&str],
) -> (
    std::process::Child,
    String,
    std::io::BufReader<std::process::ChildStderr>,
) {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let file = config_file(name, &format!("http://{closed}"));
    let mut child = binary()
        .arg("run")
        .args(args)
        .arg("--config")
        .arg(&file)
        .env("A_SECRET", "demo-secret")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    stderr.read_line(&mut first).unwrap();
    (child, first, stderr)
}

#[test]
fn sigterm_during_wait_ready_stops_at_once() {
    // The first failed token request is logged: the proxy is waiting by then. The rest of
    // its log is read to the end, so that it never writes to a closed pipe.
    let (mut child, first, mut stderr) = run_without_identity("term", &["--wait-ready", "60"]);
    let rest = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut rest);
        rest
    });
    // Bounded: --wait-ready would keep it for a minute; the signal must end it long before.
    let status = terminate(&mut child);
    let rest = rest.join().unwrap();
    assert_eq!(status.code(), Some(0), "{first}{rest}");
    assert!(
        rest.contains("stopped before every account held a token"),
        "{rest}"
    );
}

/// Sends SIGTERM to `child` and waits for it to exit, at most 20 s (then kills it and fails).
fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() >= deadline {
            child.kill().unwrap();
            panic!("SIGTERM did not stop the proxy");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn sigterm_stops_the_proxy_when_its_log_and_output_pipes_are_gone() {
    // Serving by the first log line; then whatever reads its output goes away, as a log
    // collector that died would.
    let (mut child, first, stderr) = run_without_identity("gone", &[]);
    drop(stderr);
    drop(child.stdout.take());
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(terminate(&mut child).code(), Some(0), "{first}");
}

/// Starts the identity stand-in in process.
async fn identity_stub() -> (StubHandle, ShutdownTrigger) {
    let stub = IdentityStub::bind(
        ([127, 0, 0, 1], 0).into(),
        StubSettings::default(),
        SigningKey::bundled(),
    )
    .await
    .unwrap();
    let handle = stub.handle();
    let (trigger, signal) = mosaic_auth_proxy::shutdown::channel();
    tokio::spawn(stub.run(signal));
    (handle, trigger)
}

/// Runs the proxy with `--wait-ready` and returns it with the first line it printed.
async fn run_until_ready(file: &std::path::Path) -> (std::process::Child, Option<String>) {
    let mut child = binary()
        .args(["run", "--wait-ready", "10", "--config"])
        .arg(file)
        .env("A_SECRET", "demo-secret")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // Bounded by --wait-ready: the proxy prints "ready" or exits within ten seconds.
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .ok()
            .map(|_| line.trim().to_owned())
    })
    .await
    .unwrap();
    (child, line)
}

#[tokio::test]
async fn wait_ready_prints_ready_once_every_account_holds_a_token() {
    let (stub, trigger) = identity_stub().await;
    let file = config_file("stub", stub.origin());
    let (mut child, line) = run_until_ready(&file).await;
    child.kill().unwrap();
    child.wait().unwrap();
    trigger.trigger();
    assert_eq!(line.as_deref(), Some("ready"));
}

#[tokio::test]
async fn sighup_reads_a_changed_secret_file_at_once() {
    let (stub, trigger) = identity_stub().await;
    let file = config_file("hup", stub.origin());
    let secret = file.with_file_name("secret");
    std::fs::write(&secret, "demo-secret").unwrap();
    // Polling is slowed to an hour, so only the signal can explain a prompt re-read.
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace(
            "client_secret_env = \"A_SECRET\"",
            &format!("client_secret_file = {:?}", secret.display().to_string()),
        )
        .replace(
            "retry_max = \"100ms\"",
            "retry_max = \"100ms\"\nsecret_poll = \"1h\"",
        );
    std::fs::write(&file, text).unwrap();
    let (mut child, line) = run_until_ready(&file).await;
    assert_eq!(line.as_deref(), Some("ready"));
    stub.set_accounts(vec![StubAccount::new("demo-client", "rotated")]);
    std::fs::write(&secret, "rotated\n").unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while stub.tokens_issued() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    trigger.trigger();
    assert_eq!(
        stub.tokens_issued(),
        2,
        "SIGHUP did not bring a token with the new secret"
    );
}

#[test]
fn check_applies_environment_overrides_and_refuses_unknown_ones() {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml");
    let out = binary()
        .args(["check", "--config"])
        .arg(&file)
        .env("MEDIA_CLIENT_SECRET", "x")
        .env("MOSAIC_AUTH_PROXY__SERVER__LISTEN", "127.0.0.1:18080")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("127.0.0.1:18080"), "{stdout}");
    let out = binary()
        .args(["check", "--config"])
        .arg(&file)
        .env("MEDIA_CLIENT_SECRET", "x")
        .env("MOSAIC_AUTH_PROXY__SERVER__LISTEN_ON", "127.0.0.1:18080")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("server.listen_on"), "{stderr}");
    assert!(
        stderr.contains("MOSAIC_AUTH_PROXY__SERVER__LISTEN_ON"),
        "{stderr}"
    );
}
