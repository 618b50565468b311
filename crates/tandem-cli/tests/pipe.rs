//! A reader that closes tandem's stdout early (`tandem … | head`) ends it quietly, whatever the
//! command: no panic, no backtrace.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::{Command, Stdio};

fn tiny_file(dir: &Path) -> String {
    let mut text = String::new();
    for i in 0..200 {
        let hard = i % 3 == 0;
        text += &serde_json::json!({
            "id": format!("q{i}"),
            "prompt": if hard { format!("prove theorem {i}") } else { format!("what is {i} plus one") },
            "correct": {"small": !hard, "big": true},
        })
        .to_string();
        text.push('\n');
    }
    let p = dir.join("tiny.jsonl");
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

/// Runs tandem with a stdout whose reading end is already closed, so its first print fails.
fn run_with_closed_stdout(args: &[&str]) -> (Option<i32>, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn closed_stdout_ends_every_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let data = tiny_file(dir.path());
    let prior = dir.path().join("p.prior");
    let prior = prior.to_str().unwrap();
    let cases: [&[&str]; 4] = [
        &["eval", "--data", &data, "--grid", "3"],
        &[
            "eval",
            "--data",
            &data,
            "--tiers",
            "small,big",
            "--price",
            "small=call:0.001,big=call:0.01",
            "--grid",
            "3",
        ],
        &["train", "--data", &data, "--out", prior, "--epochs", "1"],
        &["assets", "status"],
    ];
    for args in cases {
        let (code, stderr) = run_with_closed_stdout(args);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert!(!stderr.contains("Broken pipe"), "{args:?}: {stderr}");
        assert_eq!(code, Some(141), "{args:?}: {stderr}");
    }
}

/// A closed stderr (`tandem … 2>&1 | head` once head has gone) ends the command quietly too:
/// each of these prints an error to stderr, which fails; the exit is SIGPIPE's 141, not a
/// panic's 101.
#[test]
fn closed_stderr_ends_a_failing_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.jsonl");
    let missing = missing.to_str().unwrap();
    let cases: [&[&str]; 3] = [
        &["eval", "--data", missing],
        &["bench", "londi", "--env", "babyai", "--costs", "0.1,0.1"],
        &["bench", "londi", "--rooms", "0"],
    ];
    for args in cases {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(writer)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(141), "{args:?}");
    }
}
