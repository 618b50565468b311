//! `tandem bench cascade --quick` end to end: the first 600 movie-review snippets, hashed -> MiniLM head ->
//! SmolLM2-135M (recorded on the first run), every policy over three stream orders. Needs the
//! assets minilm, smollm2-135m and snippets (scripts/setup); skips without them unless
//! TANDEM_REQUIRE_ASSETS=1 (as in CI).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use serde_json::Value;
use std::process::Command;
use tandem_models::assets::{find, Store};

fn have_assets() -> bool {
    let store = Store::default_home();
    let ok = ["minilm", "smollm2-135m", "snippets"]
        .iter()
        .all(|id| store.is_installed(find(id).unwrap()));
    if !ok {
        assert!(
            std::env::var("TANDEM_REQUIRE_ASSETS").map_or(true, |v| v != "1"),
            "assets missing: run scripts/setup"
        );
        eprintln!(
            "skipping: assets minilm, smollm2-135m and snippets are not installed (scripts/setup)"
        );
    }
    ok
}

/// One quick bench over the first 600 snippets with `extra` flags; its JSON and stdout.
fn quick_bench(extra: &[&str]) -> (Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["bench", "cascade", "--quick", "--limit", "600"])
        .args(extra)
        .arg("--json")
        .arg(&json)
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "bench {extra:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{stdout}");
    assert!(dir.path().join("snippets-quick-frontier.svg").exists());
    assert!(dir.path().join("snippets-quick-frontier.png").exists());
    (
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap(),
        stdout,
    )
}

fn row_accuracy(v: &Value, name: &str) -> f64 {
    v["datasets"][0]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no row {name}"))["accuracy"]
        .as_f64()
        .unwrap()
}

/// One test, run in sequence, so that SmolLM2 answers the 600 snippets once (the recording in
/// $TANDEM_HOME/recordings) and the later runs replay it: recording is most of CI's cost here.
#[test]
fn quick_bench_orders_learned_deferral_above_random_and_gold_teaching_helps() {
    if !have_assets() {
        return;
    }
    let (v, _) = quick_bench(&[]);
    let ds = &v["datasets"][0];
    assert_eq!(ds["items"], 600);
    // A share no run of a policy reached is null, never a made-up accuracy.
    let at_or_none = |family: &str, share: f64| -> Option<f64> {
        ds["at_share"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["family"] == family && (a["share"].as_f64().unwrap() - share).abs() < 1e-9)
            .unwrap_or_else(|| panic!("no {family} at {share}"))["accuracy"]
            .as_f64()
    };
    let at = |family: &str, share: f64| -> f64 {
        at_or_none(family, share).unwrap_or_else(|| panic!("{family} did not reach {share}"))
    };
    // Measured on these three orders of 600: at 50% OCL 75.6% and the shunt 76.6% vs random
    // 72.8%. 30% is not reached: the 100-item warm-up alone sends a sixth of the stream up, and
    // the lowest target (20%) held 33%.
    let (ocl, random, shunt) = (
        at("OCL", 0.5),
        at("random deferral", 0.5),
        at("DS+ shunt (share held)", 0.5),
    );
    assert!(
        ocl >= random + 0.01,
        "OCL {ocl} vs random {random} at 50% top share"
    );
    assert!(
        shunt >= random + 0.01,
        "shunt {shunt} vs random {random} at 50%"
    );
    if let (Some(ocl), Some(random)) = (at_or_none("OCL", 0.3), at_or_none("random deferral", 0.3))
    {
        assert!(ocl >= random - 0.01, "OCL {ocl} vs random {random} at 30%");
    }
    // Every row names its policy and carries the columns the table promises.
    let rows = ds["rows"].as_array().unwrap();
    for name in ["always-top", "hashed alone", "minilm alone"] {
        assert!(rows.iter().any(|r| r["name"] == name), "no row {name}");
    }
    for r in rows {
        for k in [
            "accuracy",
            "top_share",
            "cost_usd",
            "agreement",
            "compute_s",
        ] {
            assert!(r[k].as_f64().is_some(), "{}: {k}", r["name"]);
        }
    }
    // The top tier alone is what every item costs at its price; shares are measured, not set.
    let top = rows.iter().find(|r| r["name"] == "always-top").unwrap();
    assert!((top["top_share"].as_f64().unwrap() - 1.0).abs() < 1e-9);
    assert!((top["cost_usd"].as_f64().unwrap() - 0.06).abs() < 1e-6);

    // The same 600 snippets, one order: cheap tiers taught by gold labels after 2,000 labelled
    // snippets held out of the stream are stronger than those taught by SmolLM2 from nothing.
    let (plain, says) = quick_bench(&["--seeds", "0", "--teach", "top"]);
    assert!(says.contains("the top tier's answers"), "{says}");
    let (taught, says) = quick_bench(&["--seeds", "0", "--teach", "gold", "--pretrain", "2000"]);
    assert!(says.contains("each item's gold label"), "{says}");
    assert_eq!(taught["datasets"][0]["items"], 600);
    // Measured: MiniLM head alone 70.8% taught by SmolLM2 from nothing, 83.0% by gold labels
    // after 2,000 labelled snippets.
    let (before, after) = (
        row_accuracy(&plain, "minilm alone"),
        row_accuracy(&taught, "minilm alone"),
    );
    assert!(after >= before + 0.05, "minilm alone: {before} -> {after}");
    let (before, after) = (
        row_accuracy(&plain, "hashed alone"),
        row_accuracy(&taught, "hashed alone"),
    );
    assert!(after >= before + 0.03, "hashed alone: {before} -> {after}");
}

#[test]
fn the_bench_refuses_a_pretraining_split_it_cannot_make() {
    if !have_assets() {
        return;
    }
    for (args, says) in [
        (
            &["--limit", "600", "--pretrain", "20000"][..],
            "--pretrain 20000: snippets has",
        ),
        (
            &["--limit", "0", "--pretrain", "10"][..],
            "would leave no items in the stream",
        ),
        (&["--teach", "teacher"][..], "teacher"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["bench", "cascade", "--quick", "--seeds", "0"])
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
