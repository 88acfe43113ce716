//! The deployment examples: `deploy/validate.py` checks the Kubernetes manifests against the
//! API schemas and every proxy.toml they carry with `check`. Skipped, with a message, where
//! kubernetes-validate is not installed; `.ci/run` installs it.

use std::process::Command;

#[test]
fn the_manifests_and_the_rig_validate() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("python3")
        .arg(format!("{root}/deploy/validate.py"))
        .arg(env!("CARGO_BIN_EXE_mosaic-auth-proxy"))
        .output()
        .expect("python3 runs");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.code() == Some(77) {
        eprintln!("skipped: {report}");
        return;
    }
    assert!(out.status.success(), "{report}");
    assert!(
        report.contains("poddisruptionbudget/mosaic-gateway"),
        "{report}"
    );
    assert_eq!(
        report.matches("configuration is valid").count(),
        3,
        "{report}"
    );
}
