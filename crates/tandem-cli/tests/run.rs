//! `tandem run` end to end on the installed assets (SmolLM2-135M as the top tier, so it is quick):
//! record -> replay gives identical decisions; an interrupted run resumed from its checkpoint
//! gives exactly the answers of an uninterrupted one, none lost or repeated; bad input is named.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::tandem;
use serde_json::Value;
use std::path::Path;
use std::process::Output;
use tandem_models::assets::{find, Store};

fn have_assets() -> bool {
    let store = Store::default_home();
    let ok = ["smollm2-135m", "snippets"]
        .iter()
        .all(|id| store.is_installed(find(id).unwrap()));
    if !ok {
        assert!(
            std::env::var("TANDEM_REQUIRE_ASSETS").map_or(true, |v| v != "1"),
            "assets missing: run scripts/setup"
        );
        eprintln!("skipping: assets smollm2-135m and snippets are not installed (scripts/setup)");
    }
    ok
}

fn config(dir: &Path, recording: &Path) -> String {
    let text = format!(
        r#"labels = ["negative", "positive"]
[[tier]]
name = "hashed"
kind = "hashed"
threshold = 0.8
warmup = 10
[[tier]]
name = "smol"
kind = "gguf"
asset = "smollm2-135m"
instruction = "Is the sentiment of this movie review positive or negative? Answer with one word.\nReview: {{text}}"
price = "call:0.001"
recording = "{}"
"#,
        recording.display()
    );
    let p = dir.join("c.toml");
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "tandem failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn lines(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn record_replay_and_resume() {
    if !have_assets() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("rec.jsonl");
    let cfg = config(dir.path(), &rec);
    let d = |s: &str| dir.path().join(s).to_str().unwrap().to_string();
    let (a_out, a_json, sa, b_out, c_out, sc) = (
        d("a.jsonl"),
        d("a.json"),
        d("sa"),
        d("b.jsonl"),
        d("c.jsonl"),
        d("sc"),
    );

    // An uninterrupted run of 60 items records the LLM's answers.
    let full = [
        "run",
        "--config",
        &cfg,
        "--input",
        "snippets",
        "--limit",
        "60",
        "--checkpoint-every",
        "7",
    ];
    let mut a = full.to_vec();
    a.extend(["--out", &a_out, "--json", &a_json, "--state", &sa]);
    ok(&tandem(&a));
    let first = lines(&dir.path().join("a.jsonl"));
    assert_eq!(first.len(), 60);
    let recorded = std::fs::read_to_string(&rec).unwrap().lines().count();
    assert!(recorded > 0 && recorded <= 60);

    // Replaying the recording gives identical decisions.
    let mut b = full.to_vec();
    b.extend(["--out", &b_out]);
    ok(&tandem(&b));
    assert_eq!(lines(&dir.path().join("b.jsonl")), first);
    assert_eq!(
        std::fs::read_to_string(&rec).unwrap().lines().count(),
        recorded,
        "nothing recomputed"
    );

    // Interrupted after 25 items, then resumed to 60: the same 60 answers, each once, in order.
    let c = [
        "run",
        "--config",
        &cfg,
        "--input",
        "snippets",
        "--checkpoint-every",
        "7",
        "--out",
        &c_out,
        "--state",
        &sc,
    ];
    let mut c1 = c.to_vec();
    c1.extend(["--limit", "25"]);
    ok(&tandem(&c1));
    // Simulate a crash after the checkpoint: a half-written answer beyond it must not survive.
    std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("c.jsonl"))
        .map(|mut f| {
            use std::io::Write;
            f.write_all(b"{\"id\":\"partial").unwrap();
        })
        .unwrap();
    let mut c2 = c.to_vec();
    c2.extend(["--limit", "60", "--resume"]);
    ok(&tandem(&c2));
    assert_eq!(lines(&dir.path().join("c.jsonl")), first);

    let report: Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("a.json")).unwrap()).unwrap();
    assert_eq!(report["items"], 60);
    let tiers = report["tiers"].as_array().unwrap();
    let share: f64 = tiers.iter().map(|t| t["share"].as_f64().unwrap()).sum();
    assert!((share - 1.0).abs() < 1e-9);
    assert!(report["accuracy"].as_f64().is_some() && report["top_share"].as_f64().unwrap() > 0.0);

    // A resume with another configuration is refused.
    let other = config(dir.path(), &dir.path().join("other.jsonl"));
    let out = tandem(&[
        "run", "--config", &other, "--input", "snippets", "--state", &sc, "--resume", "--limit",
        "70",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("another configuration"));
}

#[test]
fn ocl_policy_learns_deferral_and_resumes_exactly() {
    learned_policy_resumes_exactly("ocl");
}

#[test]
fn energy_gate_policy_resumes_exactly() {
    learned_policy_resumes_exactly("energy");
}

fn learned_policy_resumes_exactly(kind: &str) {
    if !have_assets() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(config(dir.path(), &dir.path().join("rec.jsonl"))).unwrap();
    let cfg = dir.path().join("ocl.toml");
    std::fs::write(
        &cfg,
        base.replace("warmup = 10", "warmup = 5")
            + &format!("[policy]\nkind = \"{kind}\"\ntarget_top_share = 0.5\n"),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap().to_string();
    let d = |s: &str| dir.path().join(s).to_str().unwrap().to_string();
    let (a_out, a_json, b_out, sb) = (d("a.jsonl"), d("a.json"), d("b.jsonl"), d("sb"));
    let common = [
        "run",
        "--config",
        &cfg,
        "--input",
        "snippets",
        "--checkpoint-every",
        "9",
    ];
    let mut a = common.to_vec();
    a.extend(["--limit", "80", "--out", &a_out, "--json", &a_json]);
    ok(&tandem(&a));
    let report: Value = serde_json::from_slice(&std::fs::read(&a_json).unwrap()).unwrap();
    let top = report["top_share"].as_f64().unwrap();
    assert!(
        top < 1.0,
        "the cheap tier answered some items: top share {top}"
    );
    // Interrupted at 30, resumed to 80: the deferral models come back from the checkpoint.
    let mut b1 = common.to_vec();
    b1.extend(["--limit", "30", "--out", &b_out, "--state", &sb]);
    ok(&tandem(&b1));
    let saved = if kind == "ocl" {
        "sb/deferral.bin"
    } else {
        "sb/gates.json"
    };
    assert!(dir.path().join(saved).exists());
    let mut b2 = common.to_vec();
    b2.extend(["--limit", "80", "--out", &b_out, "--state", &sb, "--resume"]);
    ok(&tandem(&b2));
    assert_eq!(
        lines(&dir.path().join("b.jsonl")),
        lines(&dir.path().join("a.jsonl"))
    );
}

#[test]
fn bad_configs_and_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &dir.path().join("r.jsonl"));
    let text = std::fs::read_to_string(&cfg).unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        text.replace("warmup = 10", "warmup = 10\ncolour = \"red\""),
    )
    .unwrap();
    let out = tandem(&["run", "--config", bad.to_str().unwrap(), "--check"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("bad.toml") && err.contains("unknown field `colour`"),
        "{err}"
    );

    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"text\":\"fine\",\"label\":\"positive\"}\n{\"text\":\"meh\",\"label\":\"neutral\"}\n",
    )
    .unwrap();
    let out = tandem(&["run", "--config", &cfg, "--input", input.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    if have_assets() {
        assert!(
            !out.status.success() && err.contains("in.jsonl:2: field `label`: \"neutral\""),
            "{err}"
        );
        ok(&tandem(&["run", "--config", &cfg, "--check"]));
    }
    let out = tandem(&["run", "--config", &cfg, "--input", "no-such-dataset"]);
    assert!(!out.status.success());
}

/// `--pretrain` warms the cheap tiers up on labelled items before the stream (`rest`: the
/// input's items past --limit; or a file), and `teach = "gold"` teaches them the items' own
/// labels; bad pretraining sources are named.
#[test]
fn pretraining_warms_the_cheap_tiers_before_the_stream() {
    if !have_assets() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &dir.path().join("r.jsonl"));
    let text = std::fs::read_to_string(&cfg).unwrap();
    let gold = dir.path().join("gold.toml");
    std::fs::write(&gold, format!("{text}[policy]\nteach = \"gold\"\n")).unwrap();
    let g = gold.to_str().unwrap();
    let answers = dir.path().join("a.jsonl");
    let out = ok(&tandem(&[
        "run",
        "--config",
        g,
        "--limit",
        "40",
        "--pretrain",
        "rest",
        "--pretrain-limit",
        "2000",
        "--out",
        answers.to_str().unwrap(),
    ]));
    assert!(
        out.contains("pretrained the cheap tiers on 2000 labelled items"),
        "{out}"
    );
    // Past its warm-up from the first item: the hashed tier answers some of the first ten.
    let first: Vec<Value> = lines(&answers).into_iter().take(10).collect();
    assert!(first.iter().any(|l| l["tier"] == "hashed"), "{first:?}");
    let input = dir.path().join("labelled.jsonl");
    std::fs::write(
        &input,
        "{\"text\":\"a fine film\",\"label\":\"positive\"}\n{\"text\":\"dull\"}\n",
    )
    .unwrap();
    let out = ok(&tandem(&[
        "run",
        "--config",
        g,
        "--limit",
        "3",
        "--pretrain",
        input.to_str().unwrap(),
    ]));
    assert!(
        out.contains("on 1 labelled items") && out.contains("1 without a label skipped"),
        "{out}"
    );
    for (args, needle) in [
        (vec!["--pretrain", "rest"], "none past --limit"),
        (vec!["--pretrain", "missing.jsonl"], "missing.jsonl"),
    ] {
        let mut all = vec!["run", "--config", g, "--input", input.to_str().unwrap()];
        all.extend(args);
        let out = tandem(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle),
            "{needle:?}: {err}"
        );
    }
}

/// An I/O error names its OS cause once (it was printed twice: in the message and again as the
/// chained source).
#[test]
fn io_errors_print_their_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &dir.path().join("r.jsonl"));
    let nowhere = dir.path().join("nowhere");
    let nowhere = nowhere.to_str().unwrap();
    let mut cases: Vec<Vec<&str>> = vec![
        vec!["eval", "--data", "/nonexistent/x.jsonl"],
        vec![
            "train",
            "--data",
            "/nonexistent/x.jsonl",
            "--out",
            "x.prior",
        ],
    ];
    if have_assets() {
        cases.push(vec![
            "run", "--config", &cfg, "--input", "snippets", "--state", nowhere, "--resume",
            "--limit", "5",
        ]);
    }
    for args in cases {
        let out = tandem(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert_eq!(err.matches("(os error 2)").count(), 1, "{args:?}: {err}");
    }
}
