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
