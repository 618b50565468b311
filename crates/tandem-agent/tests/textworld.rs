//! Real TextWorld games through the bridge, and `tandem bench londi --quick` end to end with
//! SmolLM2-135M as the large policy. Needs scripts/setup-textworld and the smollm2-135m asset;
//! skips without them unless TANDEM_REQUIRE_ASSETS=1 (as in CI), where absence fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use tandem_agent::actor::LlmActor;
use tandem_agent::bench::{Bench, BenchConfig, TextWorldGames};
use tandem_agent::env::{GameSpec, TextWorld};
use tandem_agent::AgentError;
use tandem_models::assets::Store;
use tandem_models::gguf::GgufLm;

fn required() -> bool {
    std::env::var("TANDEM_REQUIRE_ASSETS").is_ok_and(|v| v == "1")
}

fn textworld() -> Option<TextWorld> {
    let site = Store::default_home().home().join("py/textworld");
    match TextWorld::start(&site, Path::new("python3")) {
        Ok(env) => Some(env),
        Err(e) => {
            assert!(!required(), "{e}");
            eprintln!("skipping: {e}");
            None
        }
    }
}

fn smollm2() -> Option<PathBuf> {
    match Store::default_home().path("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf") {
        Ok(p) => Some(p),
        Err(e) => {
            assert!(!required(), "{e}");
            eprintln!("skipping: {e}");
            None
        }
    }
}

#[test]
fn a_generated_game_plays_and_bad_requests_are_clear_errors() {
    let Some(mut env) = textworld() else { return };
    let dir = tempfile::tempdir().unwrap();
    let spec = GameSpec {
        seed: 5,
        rooms: 3,
        objects: 4,
        quest_length: 2,
    };
    let game = env.make(spec, dir.path()).unwrap();
    assert!(game.exists());
    // Made once: a second call reuses the file.
    let modified = std::fs::metadata(&game).unwrap().modified().unwrap();
    env.make(spec, dir.path()).unwrap();
    assert_eq!(
        std::fs::metadata(&game).unwrap().modified().unwrap(),
        modified
    );

    let s = env.reset(&game).unwrap();
    assert!(!s.objective.is_empty() && !s.admissible.is_empty());
    assert_eq!((s.score, s.max_score, s.done), (0, 1, false));
    let s2 = env.step(&s.admissible[0]).unwrap();
    assert_eq!(s2.moves, 1);
    // An unknown command is the game's business (it answers in text), not an error.
    let s3 = env.step("dance wildly").unwrap();
    assert!(!s3.observation.is_empty());

    let e = env.reset(&dir.path().join("missing.z8")).unwrap_err();
    assert!(matches!(e, AgentError::Env(_)), "{e}");
    assert!(e.to_string().contains("missing.z8"), "{e}");
    // The bridge survives the refusal.
    assert_eq!(env.reset(&game).unwrap().moves, 0);
}

#[test]
fn quick_bench_runs_keeps_budgets_and_replays_identically() {
    let (Some(mut env), Some(model)) = (textworld(), smollm2()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let recording = dir.path().join("recorded.jsonl");
    let mut cfg = BenchConfig::quick();
    // Few episodes: this checks the bench's structure, budgets and replay, not what LONDI learns
    // (tandem-core's tests and the README's tables do), and every large step is a SmolLM2 call.
    cfg.train_episodes = 6;
    let games = TextWorldGames::quick(dir.path().join("games"));
    let (train, test) = games.make(&mut env).unwrap();
    let run = |env: &mut TextWorld, large: &mut LlmActor| {
        let mut log = |l: &str| eprintln!("{l}");
        Bench {
            cfg: cfg.clone(),
            env,
            train: train.clone(),
            test: test.clone(),
            env_name: "textworld".into(),
            games: games.describe(),
            large,
            large_name: "smollm2-135m".into(),
            log: &mut log,
        }
        .run()
        .unwrap()
    };
    let mut large = LlmActor::new(
        Some(GgufLm::load(&model).unwrap()),
        "smollm2-135m",
        Some(&recording),
    )
    .unwrap();
    let first = run(&mut env, &mut large);
    let names: Vec<&str> = first.rows.iter().map(|r| r.name.as_str()).collect();
    for want in [
        "always-small",
        "always-large",
        "LONDI c=",
        "LONDI-B b=2",
        "random ",
    ] {
        assert!(names.iter().any(|n| n.starts_with(want)), "{names:?}");
    }
    for r in &first.rows {
        assert!((0.0..=1.0).contains(&r.success) && (0.0..=1.0).contains(&r.large_share));
        match r.name.as_str() {
            "always-small" => assert_eq!(r.large_share, 0.0),
            "always-large" => assert_eq!(r.large_share, 1.0),
            _ => {}
        }
        if let Some(b) = r.budget {
            assert!(
                r.max_large_calls <= b,
                "{}: {} > {b}",
                r.name,
                r.max_large_calls
            );
        }
    }
    assert!(first.large_cost.calls > first.large_cost.replayed);

    // Without a model: every large step comes from the recording, and the table is the same.
    let mut replay = LlmActor::new(None, "smollm2-135m", Some(&recording)).unwrap();
    let second = run(&mut env, &mut replay);
    assert_eq!(second.large_cost.calls, second.large_cost.replayed);
    for (a, b) in first.rows.iter().zip(&second.rows) {
        assert_eq!(
            (&a.name, a.success, a.large_share),
            (&b.name, b.success, b.large_share)
        );
    }
}

#[test]
fn a_corrupt_recording_names_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("rec.jsonl");
    std::fs::write(
        &p,
        "{\"key\":\"00000000000000ff\",\"scores\":[-1.0]}\n{\"key\":\"zz\",\"scores\":[]}\n",
    )
    .unwrap();
    let e = LlmActor::new(None, "m", Some(&p))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("rec.jsonl:2") && e.contains("zz"), "{e}");
}

#[test]
fn a_last_line_cut_by_an_interrupted_run_is_dropped_and_cut_from_the_file() {
    let whole = "{\"key\":\"00000000000000ff\",\"scores\":[-1.0,-2.0]}\n";
    let second = "{\"key\":\"00000000000000fe\",\"scores\":[-0.5]}";
    // Cut at several places of the last entry: mid-number, mid-key, after its opening brace.
    for cut in [second.len() - 5, 10, 1] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rec.jsonl");
        std::fs::write(&p, format!("{whole}{}", &second[..cut])).unwrap();
        let a = LlmActor::new(None, "m", Some(&p)).unwrap();
        assert_eq!(a.torn_line(), Some(2), "cut {cut}");
        assert_eq!(a.recorded(), 1, "cut {cut}");
        assert_eq!(std::fs::read_to_string(&p).unwrap(), whole, "cut {cut}");
        // Loading again finds nothing torn.
        let b = LlmActor::new(None, "m", Some(&p)).unwrap();
        assert_eq!((b.torn_line(), b.recorded()), (None, 1));
    }
    // A whole last entry without its newline is kept, and gets its newline.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("rec.jsonl");
    std::fs::write(&p, format!("{whole}{second}")).unwrap();
    let a = LlmActor::new(None, "m", Some(&p)).unwrap();
    assert_eq!((a.torn_line(), a.recorded()), (None, 2));
    assert_eq!(
        std::fs::read_to_string(&p).unwrap(),
        format!("{whole}{second}\n")
    );
    // A damaged line that is not the last one is still an error, naming its line and the fix.
    std::fs::write(&p, format!("{whole}{{\"key\":\n{second}\n")).unwrap();
    let e = LlmActor::new(None, "m", Some(&p))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("rec.jsonl:2") && e.contains("delete this line"),
        "{e}"
    );
}
