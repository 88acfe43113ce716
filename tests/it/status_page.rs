//! The status page in headless Chromium: loaded from a running proxy, its script fetches the
//! data and renders it; the DOM names the account, and its countdown moves. A screenshot is
//! left in `target/tmp/status-page.png`. Without Chromium (Debian's `chromium`) the test says so
//! and passes; `.ci/run` installs it.

use crate::support::*;
use mosaic_auth_proxy::stub::StubSettings;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

fn chromium() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("CHROMIUM").map(PathBuf::from),
        Some("/usr/bin/chromium".into()),
        Some("/usr/bin/chromium-browser".into()),
    ];
    candidates.into_iter().flatten().find(|p| p.is_file())
}

/// Loads `url` headless, lets its script run for a few (virtual) seconds, and returns the
/// DOM; with `screenshot`, also writes a PNG there.
fn render(browser: &Path, url: &str, screenshot: Option<&Path>) -> String {
    let profile = crate::operations::tempdir();
    let mut command = Command::new(browser);
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--virtual-time-budget=3000",
        "--window-size=1200,900",
    ]);
    command.arg(format!("--user-data-dir={}", profile.display()));
    match screenshot {
        Some(path) => command.arg(format!("--screenshot={}", path.display())),
        None => command.arg("--dump-dom"),
    };
    let out = command.arg(url).output().expect("chromium runs");
    let _ = std::fs::remove_dir_all(profile);
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the first element with `marker` in its opening tag.
fn text_of<'a>(dom: &'a str, marker: &str) -> &'a str {
    let start = dom
        .find(marker)
        .unwrap_or_else(|| panic!("no {marker} in {dom}"));
    let open_end = start + dom[start..].find('>').unwrap() + 1;
    let close = open_end + dom[open_end..].find('<').unwrap();
    &dom[open_end..close]
}

#[tokio::test]
async fn the_status_page_renders_accounts_and_a_live_countdown_in_chromium() {
    let Some(browser) = chromium() else {
        eprintln!("skipped: Chromium is not installed (apt-get install chromium, or set CHROMIUM)");
        return;
    };
    let h = harness(StubSettings::default()).await;
    let url = format!("http://{}/", h.proxy.admin);
    let render_async = |screenshot: Option<PathBuf>| {
        let (browser, url) = (browser.clone(), url.clone());
        tokio::task::spawn_blocking(move || render(&browser, &url, screenshot.as_deref()))
    };
    let first = render_async(None).await.unwrap();
    assert!(
        first.contains(r#"data-loaded="true""#),
        "the data never loaded: {first}"
    );
    assert!(first.contains(r#"data-account="main""#), "{first}");
    let state = text_of(&first, "class=\"state ready\"");
    assert_eq!(state, "ready");
    let fingerprint = h.proxy.accounts[0].status().fingerprint.unwrap();
    assert!(first.contains(&fingerprint), "the fingerprint is not shown");
    let expiry = text_of(&first, "data-kind=\"expiry\"").to_owned();
    assert!(
        expiry.starts_with("59m") || expiry.starts_with("1h"),
        "{expiry}"
    );
    assert!(first.contains("*/"), "the route is not listed");

    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = render_async(None).await.unwrap();
    let later = text_of(&second, "data-kind=\"expiry\"");
    assert_ne!(expiry, later, "the countdown did not move");

    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    render_async(Some(shot.clone())).await.unwrap();
    let png = std::fs::read(&shot).expect("a screenshot was written");
    assert!(png.starts_with(b"\x89PNG"), "the screenshot is not a PNG");
}
