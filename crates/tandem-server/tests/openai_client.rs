//! The official `openai` Python package as a client of the gateway (installed by
//! `scripts/setup-python`; CI runs that first). Skips with a message when the package is absent,
//! unless TANDEM_REQUIRE_ASSETS=1 (as in CI), where absence fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use std::path::PathBuf;

fn client_dir() -> Option<PathBuf> {
    let home = std::env::var_os("TANDEM_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/tandem")))?;
    let dir = home.join("py/openai");
    if dir.join("openai").is_dir() {
        Some(dir)
    } else if std::env::var("TANDEM_REQUIRE_ASSETS").is_ok_and(|v| v == "1") {
        panic!(
            "the openai client is not installed in {}; run scripts/setup-python",
            dir.display()
        );
    } else {
        eprintln!("skipping: the openai client is not installed (run scripts/setup-python)");
        None
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_works_against_the_gateway() {
    let Some(py) = client_dir() else { return };
    std::env::set_var("TANDEM_TEST_LARGE_KEY", "sk-test");
    std::env::set_var("TANDEM_TEST_CLIENT_KEYS", "k1");
    let (_s, s_url) = mock(reply(|p| {
        if p.contains("hard") {
            ("maybe 7".into(), -3.0)
        } else {
            ("the answer is 4".into(), -0.05)
        }
    }))
    .await;
    let (_l, l_url) = mock(reply(|_| ("the answer is 4".into(), -0.01))).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[server]\napi_keys_env = \"TANDEM_TEST_CLIENT_KEYS\"\n{}[[route]]\nname = \"t\"\nkind = \"cascade\"\nsmall = \"small\"\nlarge = \"large\"\nthreshold = 1.0\nexplore = 0.0\n",
        upstreams(&s_url, &l_url, "token:10:30")
    );
    let gw = start(&cfg, dir.path()).await;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let url = gw.url.clone();
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .arg(&url)
        .env("PYTHONPATH", &py)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim() == "ok",
        "stdout: {stdout}\nstderr: {stderr}"
    );
    gw.stop().await;
}
