//! The binary: exit statuses and the demo.

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

#[tokio::test]
async fn wait_ready_prints_ready_once_every_account_holds_a_token() {
    use mosaic_auth_proxy::stub::{IdentityStub, SigningKey, StubSettings};
    use std::io::BufRead;
    let stub = IdentityStub::bind(
        ([127, 0, 0, 1], 0).into(),
        StubSettings::default(),
        SigningKey::bundled(),
    )
    .await
    .unwrap();
    let origin = stub.handle().origin().to_owned();
    let (trigger, signal) = mosaic_auth_proxy::shutdown::channel();
    tokio::spawn(stub.run(signal));
    let file = config_file("stub", &origin);
    let mut child = binary()
        .args(["run", "--wait-ready", "10", "--config"])
        .arg(&file)
        .env("A_SECRET", "demo-secret")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line =
        tokio::task::spawn_blocking(move || rx.recv_timeout(std::time::Duration::from_secs(10)))
            .await
            .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    trigger.trigger();
    assert_eq!(line.expect("the proxy reports readiness").trim(), "ready");
}
