//! `tandem eval` end to end: the quality floors on the shared RouteLLM files, determinism, budget
//! caps and every bad-input case. Tests that need `../shared` say so and skip when it is absent.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::tandem;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// `../shared/data/routellm` beside the checkout (CI always has it; a user's clone may not).
fn shared(file: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("TANDEM_SHARED_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/routellm")
        });
    let p = dir.join(file);
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "skipping: {} is absent (this test needs ../shared)",
            p.display()
        );
        None
    }
}

fn eval_json(data: &Path, extra: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let mut args = vec![
        "eval",
        "--data",
        data.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let out = tandem(&args);
    assert!(
        out.status.success(),
        "tandem eval failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        dir.path().join("r.svg").exists() && dir.path().join("r.png").exists(),
        "plot written beside the JSON"
    );
    let r: Value = serde_json::from_slice(&std::fs::read(json).unwrap()).unwrap();
    // Two models: quality against dollars beside it (a ladder's plot has its dollar panel).
    if r.get("models").is_none() {
        assert!(
            dir.path().join("r-cost.svg").exists() && dir.path().join("r-cost.png").exists(),
            "quality against dollars written beside the share plot"
        );
    }
    r
}

fn row<'a>(r: &'a Value, name: &str, feedback: &str) -> &'a Value {
    r["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name && p["feedback"] == feedback)
        .unwrap_or_else(|| panic!("no row {name}/{feedback}"))
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

#[test]
fn mmlu_router_beats_routellm_floors() {
    let Some(data) = shared("mmlu.jsonl") else {
        return;
    };
    // No flag but --json: every policy, both feedback modes.
    let r = eval_json(&data, &[]);
    // MMLU's records carry their subject: the router reads it, and the report says so.
    assert_eq!(r["router_metadata"], true);
    for p in r["policies"].as_array().unwrap() {
        for key in [
            "name",
            "feedback",
            "quality",
            "strong_share",
            "cost_usd",
            "apgr",
            "cpt50",
            "cpt80",
            "decision_us_p50",
            "decision_us_p99",
        ] {
            assert!(p.get(key).is_some(), "row lacks {key}: {p}");
        }
    }
    let full = row(&r, "router", "full");
    let partial = row(&r, "router", "partial");
    let random = row(&r, "random", "none");
    // Measured 0.664–0.668 (full) and 0.604–0.616 (partial) over seeds 0–3: floors with margin.
    assert!(f(full, "apgr") >= 0.63, "full APGR {}", full["apgr"]);
    assert!(f(full, "cpt50") <= 0.31, "full CPT50 {}", full["cpt50"]);
    assert!(
        f(partial, "apgr") >= 0.57,
        "partial APGR {}",
        partial["apgr"]
    );
    assert!(
        (f(random, "apgr") - 0.5).abs() < 0.05,
        "random APGR {}",
        random["apgr"]
    );
    assert!(f(row(&r, "oracle", "none"), "apgr") > 1.0);
    assert!(f(partial, "explore_share") > 0.08 && f(partial, "explore_share") < 0.12);
    for p in [full, partial, random] {
        assert!(
            (f(p, "strong_share") - 0.3).abs() < 0.02,
            "operating share held: {p}"
        );
    }
    assert!(
        f(row(&r, "always-strong", "none"), "quality")
            > f(row(&r, "always-weak", "none"), "quality")
    );
}

#[test]
fn gsm8k_cascade_beats_routellm_best_router() {
    let Some(data) = shared("gsm8k.jsonl") else {
        return;
    };
    let r = eval_json(&data, &["--policies", "cascade,router:full"]);
    // GSM8K's records carry no metadata: the report does not claim the router reads any.
    assert_eq!(r["router_metadata"], false);
    let full = row(&r, "cascade", "full");
    let partial = row(&r, "cascade", "partial");
    // RouteLLM's best published GSM8K router: APGR 0.622, CPT(50%) 33.6%. Measured 0.727–0.733.
    assert!(
        f(full, "apgr") >= 0.68,
        "cascade full APGR {}",
        full["apgr"]
    );
    assert!(
        f(full, "cpt50") <= 0.28,
        "cascade full CPT50 {}",
        full["cpt50"]
    );
    assert!(
        f(partial, "apgr") >= 0.63,
        "cascade partial APGR {}",
        partial["apgr"]
    );
    // Escalating pays both calls: the cascade costs more than the router at the same share.
    assert!(f(full, "cost_usd") > 0.0);
}

#[test]
fn same_seed_same_numbers() {
    let Some(data) = shared("gsm8k.jsonl") else {
        return;
    };
    let args = [
        "--limit",
        "400",
        "--grid",
        "6",
        "--policies",
        "random,router,cascade:partial",
    ];
    let strip = |mut v: Value| {
        for p in v["policies"].as_array_mut().unwrap() {
            p.as_object_mut()
                .unwrap()
                .retain(|k, _| !k.starts_with("decision_us"));
        }
        v
    };
    let a = strip(eval_json(&data, &args));
    let b = strip(eval_json(&data, &args));
    assert_eq!(a, b);
    let mut other = args.to_vec();
    other.extend(["--seed", "7"]);
    assert_ne!(a, strip(eval_json(&data, &other)));
}

/// A small recorded file of our own, so bad-input and budget tests run anywhere.
fn tiny_file(dir: &Path) -> PathBuf {
    let mut text = String::new();
    for i in 0..300 {
        let hard = i % 3 == 0;
        text += &serde_json::json!({
            "id": format!("q{i}"),
            "prompt": if hard { format!("prove theorem {i} about groups") } else { format!("what is {i} plus one") },
            "correct": {"small": !hard, "big": true},
        })
        .to_string();
        text.push('\n');
    }
    let p = dir.join("tiny.jsonl");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn hard_cap_is_never_exceeded() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_file(dir.path());
    let r = eval_json(
        &data,
        &[
            "--max-strong-calls",
            "25",
            "--grid",
            "5",
            "--target-share",
            "0.5",
        ],
    );
    assert_eq!(r["max_strong_calls"], 25);
    for p in r["policies"].as_array().unwrap() {
        let calls = (f(p, "strong_share") * 300.0).round();
        assert!(calls <= 25.0, "{} made {calls} strong calls", p["name"]);
        for c in p["curve"].as_array().unwrap() {
            assert!((f(c, "share") * 300.0).round() <= 25.0);
        }
    }
    assert!(row(&r, "always-strong", "none")["capped"].as_u64().unwrap() >= 275);
    // Dollar cap: "call:0.01" a strong call and at most $0.10 → at most 10 calls.
    let r = eval_json(
        &data,
        &[
            "--strong-price",
            "call:0.01",
            "--max-usd",
            "0.1",
            "--grid",
            "3",
        ],
    );
    for p in r["policies"].as_array().unwrap() {
        assert!(f(p, "strong_share") * 300.0 <= 10.0 + 1e-9, "{p}");
    }
}

fn fails_with(args: &[&str], needle: &str) {
    let out = tandem(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure for {args:?}");
    assert!(err.contains(needle), "stderr {err:?} lacks {needle:?}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let good = tiny_file(dir.path());
    let text = std::fs::read_to_string(&good).unwrap();
    let write = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p.to_str().unwrap().to_string()
    };
    let first = text.lines().next().unwrap();
    let malformed = write("m.jsonl", &format!("{first}\n{{\"id\": \"x\",\n"));
    fails_with(&["eval", "--data", &malformed], "m.jsonl:2: malformed JSON");
    let missing = write(
        "f.jsonl",
        &format!("{first}\n{{\"id\":\"y\",\"correct\":{{\"small\":true,\"big\":true}}}}\n"),
    );
    fails_with(
        &["eval", "--data", &missing],
        "f.jsonl:2: missing field `prompt`",
    );
    let empty = write("e.jsonl", "");
    fails_with(
        &["eval", "--data", &empty],
        "e.jsonl: no records: the file is empty",
    );
    let g = good.to_str().unwrap();
    // A thread count of 0 is refused naming the flag, in every command that takes one.
    for cmd in [
        &["eval", "--data", g][..],
        &["run", "--config", g, "--input", g],
        &["bench", "cascade", "--quick"],
        &["bench", "londi", "--quick"],
        &["record", "--config", g, "--tier", "t", "--out", g],
    ] {
        let mut args = cmd.to_vec();
        args.extend(["--threads", "0"]);
        fails_with(&args, "invalid value '0' for '--threads");
    }
    // Flags that only the learned policies read, where none runs.
    fails_with(
        &[
            "eval",
            "--data",
            g,
            "--embed",
            "--policies",
            "random,oracle",
        ],
        "--policies runs neither",
    );
    fails_with(
        &[
            "eval",
            "--data",
            g,
            "--tiers",
            "small,big",
            "--price",
            "small=call:0.001,big=call:0.01",
            "--cost-weight",
            "0.5",
        ],
        "apply to the learned router of two models",
    );
    fails_with(
        &["eval", "--data", g, "--weak", "gpt-9"],
        "model \"gpt-9\" is not in the file (it has: big, small)",
    );
    fails_with(
        &["eval", "--data", g, "--max-strong-calls", "0"],
        "a cap of zero calls",
    );
    fails_with(
        &["eval", "--data", g, "--max-usd", "0"],
        "a cap of zero dollars",
    );
    for grid in ["2", "1", "202"] {
        fails_with(
            &["eval", "--data", g, "--grid", grid],
            &format!("--grid {grid}: must be between 3 and 201"),
        );
    }
    fails_with(
        &[
            "eval",
            "--data",
            g,
            "--tiers",
            "small,big",
            "--price",
            "small=call:0.001,big=call:0.01",
            "--grid",
            "2",
        ],
        "--grid 2: must be between 3 and 201",
    );
    fails_with(
        &["eval", "--data", g, "--target-share", "1.5"],
        "--target-share 1.5",
    );
    fails_with(
        &["eval", "--data", g, "--policies", "cascade"],
        "needs the weak model's recorded responses",
    );
    fails_with(
        &["eval", "--data", g, "--strong-price", "tokens:3"],
        "--strong-price",
    );
    fails_with(
        &["eval", "--data", "/nonexistent/x.jsonl"],
        "/nonexistent/x.jsonl: cannot read",
    );

    // With --skip-bad the bad lines are counted and reported, the rest evaluated.
    let out = tandem(&["eval", "--data", &malformed, "--skip-bad", "--grid", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("skipped 1 bad lines"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("skipped 1 bad lines"));
}

/// On short streams the share controller may not settle: every share-holding run whose share
/// is more than five points off its target is flagged in the JSON and footnoted in the table,
/// and no other is.
#[test]
fn a_share_off_its_target_is_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_file(dir.path());
    let d = data.to_str().unwrap();
    let mut flagged = 0;
    for (limit, target) in [
        ("40", "0.3"),
        ("120", "0.3"),
        ("300", "0.1"),
        ("300", "0.5"),
    ] {
        let json = dir.path().join("r.json");
        let out = tandem(&[
            "eval",
            "--data",
            d,
            "--limit",
            limit,
            "--target-share",
            target,
            "--grid",
            "3",
            "--json",
            json.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let table = String::from_utf8_lossy(&out.stdout);
        let r: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        let target: f64 = target.parse().unwrap();
        for p in r["policies"].as_array().unwrap() {
            let holds = !p["name"].as_str().unwrap().starts_with("always-");
            let share = f(p, "strong_share");
            let off = holds && (share - target).abs() > 0.05;
            assert_eq!(p["off_target"], off, "{p}");
            let note = format!(
                "* {} ({}) held {:.1}% against a target of {:.0}%",
                p["name"].as_str().unwrap(),
                p["feedback"].as_str().unwrap(),
                100.0 * share,
                100.0 * target
            );
            assert_eq!(table.contains(&note), off, "{note:?} in {table}");
            flagged += usize::from(off);
        }
    }
    assert!(flagged > 0, "no short stream missed its share");
}

/// `--plot` names both plots whichever of .svg and .png it ends in (or neither); another
/// extension is refused before anything runs.
#[test]
fn plot_names_both_formats() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_file(dir.path());
    let d = data.to_str().unwrap();
    for (i, given) in ["p.png", "p.svg", "p"].into_iter().enumerate() {
        let out_dir = dir.path().join(format!("o{i}"));
        let plot = out_dir.join(given);
        let out = tandem(&[
            "eval",
            "--data",
            d,
            "--grid",
            "3",
            "--plot",
            plot.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout);
        for name in ["p.svg", "p.png", "p-cost.svg", "p-cost.png"] {
            let f = out_dir.join(name);
            assert!(f.exists(), "{given}: no {name}");
            assert!(said.contains(f.to_str().unwrap()), "{given}: {said}");
        }
    }
    fails_with(
        &["eval", "--data", d, "--plot", "out/p.pdf"],
        "plot out/p.pdf: .pdf is not a plot format; name it NAME.svg or NAME.png",
    );
}
