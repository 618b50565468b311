//! `tandem train` end to end: a prior written from a labelled file of one's own and read back by
//! `tandem eval --prior`; every bad input named (file and line, field, value).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::tandem;
use std::path::Path;
use std::process::Output;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A user's own labelled file: "proof" prompts only the strong model gets right.
fn labelled(dir: &Path, n: usize) -> std::path::PathBuf {
    let mut s = String::new();
    for i in 0..n {
        let hard = i % 3 == 0;
        let prompt = if hard {
            format!("give a proof of lemma {i}")
        } else {
            format!("what is the capital of country {i}")
        };
        s.push_str(&format!(
            "{{\"id\":\"q{i}\",\"prompt\":\"{prompt}\",\"correct\":{{\"cheap\":{},\"dear\":true}},\"response\":{{\"cheap\":\"answer {i}\",\"dear\":\"answer {i}\"}}}}\n",
            !hard
        ));
    }
    let p = dir.join("mine.jsonl");
    std::fs::write(&p, s).unwrap();
    p
}

#[test]
fn a_prior_from_a_labelled_file_is_read_back_by_eval() {
    let dir = tempfile::tempdir().unwrap();
    let data = labelled(dir.path(), 300);
    let prior = dir.path().join("mine.prior");
    let out = tandem(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--out",
        prior.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("router yes, cascade scorer yes")
            && said.contains("300 items, cheap vs dear"),
        "{said}"
    );
    let out = tandem(&[
        "eval",
        "--data",
        data.to_str().unwrap(),
        "--prior",
        prior.to_str().unwrap(),
        "--policies",
        "router:full,cascade:full",
        "--grid",
        "5",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("prior ") && said.contains("mine.prior"),
        "{said}"
    );
    assert!(
        said.contains("router ") && said.contains("cascade "),
        "{said}"
    );
    // Progress reaches a log as lines (stderr is not a terminal here).
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("decisions (100%)"), "{err}");
}

/// `--embed`: the router reads MiniLM vectors of the prompts (needs the `minilm` asset; skips
/// without it unless TANDEM_REQUIRE_ASSETS=1). A prior trained on them says so and needs them
/// again; one trained without them refuses them.
#[test]
fn a_prior_on_sentence_vectors_needs_them_again() {
    use tandem_models::assets::{find, Store};
    if !find("minilm").is_ok_and(|a| Store::default_home().is_installed(a)) {
        assert!(
            std::env::var("TANDEM_REQUIRE_ASSETS").map_or(true, |v| v != "1"),
            "minilm is not installed; run scripts/setup minilm"
        );
        eprintln!("skipping: minilm is not installed (scripts/setup minilm)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = labelled(dir.path(), 200);
    let d = data.to_str().unwrap();
    let vec_prior = dir.path().join("vec.prior");
    let plain_prior = dir.path().join("plain.prior");
    let out = tandem(&[
        "train",
        "--data",
        d,
        "--out",
        vec_prior.to_str().unwrap(),
        "--embed",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("reads all-MiniLM-L6-v2/128"),
        "{}",
        text(&out)
    );
    let out = tandem(&["train", "--data", d, "--out", plain_prior.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let eval = |prior: &Path, embed: bool| {
        let mut args = vec![
            "eval",
            "--data",
            d,
            "--prior",
            prior.to_str().unwrap(),
            "--policies",
            "router:full",
            "--grid",
            "5",
        ];
        if embed {
            args.push("--embed");
        }
        tandem(&args)
    };
    let ok = eval(&vec_prior, true);
    assert!(ok.status.success(), "{}", text(&ok));
    assert!(text(&ok).contains("router "), "{}", text(&ok));
    for (prior, embed, needle) in [
        (&vec_prior, false, "add --embed"),
        (&plain_prior, true, "trained without sentence vectors"),
    ] {
        let out = eval(prior, embed);
        assert!(!out.status.success());
        assert!(
            text(&out).contains(needle),
            "{needle:?} not in {}",
            text(&out)
        );
    }
}

/// `eval --embed --limit N` encodes only the N prompts it replays, not the whole file; a longer
/// rerun encodes only the prompts it has not seen (the rest come from the cache).
#[test]
fn a_limited_eval_embeds_only_the_rows_it_replays() {
    use tandem_models::assets::{find, Store};
    if !find("minilm").is_ok_and(|a| Store::default_home().is_installed(a)) {
        assert!(
            std::env::var("TANDEM_REQUIRE_ASSETS").map_or(true, |v| v != "1"),
            "minilm is not installed; run scripts/setup minilm"
        );
        eprintln!("skipping: minilm is not installed (scripts/setup minilm)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Texts no other run has cached: the cache is per file name and keyed by text.
    let nonce = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let mut s = String::new();
    for i in 0..400 {
        s.push_str(&format!(
            "{{\"id\":\"q{i}\",\"prompt\":\"question {i} of run {nonce}\",\"correct\":{{\"cheap\":{},\"dear\":true}}}}\n",
            i % 3 != 0
        ));
    }
    let data = dir.path().join(format!("limited-{nonce}.jsonl"));
    std::fs::write(&data, s).unwrap();
    let eval = |limit: &str| {
        let out = tandem(&[
            "eval",
            "--data",
            data.to_str().unwrap(),
            "--policies",
            "router:full",
            "--grid",
            "5",
            "--embed",
            "--limit",
            limit,
        ]);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // The stream of a seed cut shorter is a prefix of the longer one: 45 rows are all cached.
    for (limit, encoded) in [
        ("30", Some("30/30 prompts of")),
        ("50", Some("20/20 prompts of")),
        ("45", None),
    ] {
        let err = eval(limit);
        match encoded {
            Some(e) => assert!(err.contains(e), "--limit {limit}: {e:?} not in {err}"),
            None => assert!(
                !err.contains("prompts of limited"),
                "--limit {limit}: {err}"
            ),
        }
        assert!(
            !err.contains("/400 prompts"),
            "--limit {limit} encoded the whole file: {err}"
        );
    }
}

#[test]
fn bad_training_inputs_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let data = labelled(dir.path(), 20);
    let d = data.to_str().unwrap();
    let prior = dir.path().join("p.prior");
    let p = prior.to_str().unwrap();
    let bad_line = dir.path().join("bad.jsonl");
    std::fs::write(
        &bad_line,
        "{\"id\":\"a\",\"prompt\":\"x\",\"correct\":{\"w\":true,\"s\":false}}\n{\"id\":\"b\",\"prompt\":\"y\",\"correct\":{\"w\":\"yes\",\"s\":true}}\n",
    )
    .unwrap();
    let not_prior = dir.path().join("not.prior");
    std::fs::write(&not_prior, "{\"this\": \"is a JSON file, not a prior\"}").unwrap();
    let missing = dir.path().join("missing.jsonl");
    let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
        (
            vec!["train", "--data", missing.to_str().unwrap(), "--out", p],
            vec!["missing.jsonl", "cannot read"],
        ),
        (
            vec!["train", "--data", bad_line.to_str().unwrap(), "--out", p],
            vec!["bad.jsonl:2", "correct"],
        ),
        (
            vec!["train", "--data", d, "--out", p, "--epochs", "0"],
            vec!["--epochs"],
        ),
        (
            vec!["train", "--data", d, "--out", p, "--bits", "40"],
            vec!["--bits 40"],
        ),
        (
            vec!["train", "--data", d, "--out", p, "--weak", "nobody"],
            vec!["nobody", "cheap, dear"],
        ),
        (
            vec!["eval", "--data", d, "--prior", not_prior.to_str().unwrap()],
            vec!["not.prior", "not a prior file"],
        ),
        (
            vec!["eval", "--data", d, "--prior", missing.to_str().unwrap()],
            vec!["missing.jsonl", "cannot read"],
        ),
    ];
    for (args, needles) in cases {
        let out = tandem(&args);
        let said = text(&out);
        assert!(!out.status.success(), "{args:?} succeeded: {said}");
        for n in needles {
            assert!(said.contains(n), "{args:?}: expected {n:?} in: {said}");
        }
        assert!(!said.contains("panicked"), "{args:?}: {said}");
    }
    assert!(!prior.exists(), "no prior is written from bad input");
}

/// `eval --prior P --embed` checks the prior against the encoder before anything is encoded (or
/// an encoder installed): with an empty `$TANDEM_HOME`, each mismatch is named at once.
#[test]
fn a_prior_is_checked_against_the_vectors_before_encoding() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let data = labelled(dir.path(), 60);
    let d = data.to_str().unwrap();
    let plain = dir.path().join("plain.prior");
    let out = tandem(&["train", "--data", d, "--out", plain.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    // Priors whose router read vectors: another encoder's, and MiniLM's as `--embed` reads them.
    let with_encoder = |name: &str, file: &str| {
        let mut p = tandem_core::prior::Prior::load(&plain).unwrap();
        p.info.embedder = Some(name.into());
        let path = dir.path().join(file);
        p.save(&path).unwrap();
        path
    };
    let other = with_encoder("other-encoder/64", "other.prior");
    let minilm = with_encoder("all-MiniLM-L6-v2/128", "minilm.prior");
    for (prior, embed, needle) in [
        (
            &plain,
            true,
            "trained without sentence vectors: drop --embed",
        ),
        (
            &other,
            true,
            "read other-encoder/64's vectors, not all-MiniLM-L6-v2/128's",
        ),
        (
            &minilm,
            false,
            "reads all-MiniLM-L6-v2/128 sentence vectors: add --embed",
        ),
    ] {
        let mut args = vec![
            "eval",
            "--data",
            d,
            "--prior",
            prior.to_str().unwrap(),
            "--limit",
            "50",
        ];
        if embed {
            args.push("--embed");
        }
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(&args)
            .env("TANDEM_HOME", &home)
            .env_remove("TANDEM_ENCODER")
            .output()
            .unwrap();
        let said = text(&out);
        assert!(!out.status.success(), "{said}");
        assert!(said.contains(needle), "{needle:?} not in {said}");
        assert!(
            !said.contains("embedded") && !said.contains("installing"),
            "encoded before checking: {said}"
        );
    }
}

/// A prior changed after `tandem train` wrote it — one byte deep in its weights, a run of NaN
/// floats, a cut — is refused by `eval --prior`, naming the file and why.
#[test]
fn a_damaged_prior_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = labelled(dir.path(), 60);
    let d = data.to_str().unwrap();
    let prior = dir.path().join("p.prior");
    let p = prior.to_str().unwrap();
    let out = tandem(&["train", "--data", d, "--out", p, "--bits", "10"]);
    assert!(out.status.success(), "{}", text(&out));
    let good = std::fs::read(&prior).unwrap();
    let n = good.len();
    let nan: Vec<u8> = std::iter::repeat_n(f32::NAN.to_le_bytes(), 16)
        .flatten()
        .collect();
    let damaged: Vec<(&str, Vec<u8>)> = vec![
        ("a flipped byte mid-file", {
            let mut b = good.clone();
            b[n / 2] ^= 0x10;
            b
        }),
        ("a flipped byte near the end", {
            let mut b = good.clone();
            b[n - 100] ^= 0x01;
            b
        }),
        ("NaN floats", {
            let mut b = good.clone();
            b[n / 3..n / 3 + nan.len()].copy_from_slice(&nan);
            b
        }),
        ("a cut", good[..n - 10].to_vec()),
    ];
    for (what, bytes) in damaged {
        std::fs::write(&prior, &bytes).unwrap();
        let out = tandem(&["eval", "--data", d, "--prior", p, "--grid", "3"]);
        let said = text(&out);
        assert!(!out.status.success(), "{what}: accepted");
        assert!(
            said.contains("p.prior") && said.contains("checksum does not match"),
            "{what}: {said}"
        );
    }
}
