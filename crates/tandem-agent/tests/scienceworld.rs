//! Real ScienceWorld episodes through the bridge. Needs scripts/setup-scienceworld (the wheel and
//! Java 17); skips without it unless TANDEM_REQUIRE_ASSETS=1 (as in CI), where absence fails. One
//! JVM serves the whole file: the tests take turns on it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Instant;
use tandem_agent::env::scienceworld::{SwConfig, Variations};
use tandem_agent::env::{Environment, GameState, ScienceWorld, Split, SwEpisode};
use tandem_agent::AgentError;
use tandem_models::assets::Store;

fn required() -> bool {
    std::env::var("TANDEM_REQUIRE_ASSETS").is_ok_and(|v| v == "1")
}

/// The file's one ScienceWorld, or `None` (after saying why) when it is not installed.
fn scienceworld() -> Option<MutexGuard<'static, ScienceWorld>> {
    static ENV: OnceLock<Option<Mutex<ScienceWorld>>> = OnceLock::new();
    let env = ENV.get_or_init(|| {
        let site = Store::default_home().home().join("py/scienceworld");
        let t = Instant::now();
        match ScienceWorld::start(&site, Path::new("python3"), SwConfig::default()) {
            Ok(env) => {
                eprintln!(
                    "ScienceWorld (JVM) started in {:.1} s",
                    t.elapsed().as_secs_f32()
                );
                Some(Mutex::new(env))
            }
            Err(e) => {
                assert!(!required(), "{e}");
                eprintln!("skipping: {e}");
                None
            }
        }
    });
    let mut guard = env.as_ref()?.lock().unwrap_or_else(|e| e.into_inner());
    guard.config = SwConfig::default();
    Some(guard)
}

/// Plays `episode` with the first admissible action at every step until done; the states seen.
fn play_first_action(env: &mut ScienceWorld, episode: &SwEpisode) -> Vec<GameState> {
    let mut states = vec![Environment::reset(env, episode).unwrap()];
    while !states.last().unwrap().done {
        let action = states.last().unwrap().admissible[0].clone();
        states.push(Environment::step(env, &action).unwrap());
        assert!(states.len() < 1000, "never done");
    }
    states
}

/// A state without what ScienceWorld orders or names at random: lines sorted, actions counted.
type Canonical<'a> = (
    Vec<&'a str>,
    Vec<&'a str>,
    &'a str,
    &'a str,
    [i64; 3],
    [bool; 3],
    usize,
);

fn sorted_lines(t: &str) -> Vec<&str> {
    let mut v: Vec<&str> = t.lines().map(str::trim).collect();
    v.sort_unstable();
    v
}

fn canonical(s: &GameState) -> Canonical<'_> {
    (
        sorted_lines(&s.observation),
        sorted_lines(&s.description),
        &s.inventory,
        &s.objective,
        [s.score, s.max_score, s.moves],
        [s.done, s.won, s.lost],
        s.admissible.len(),
    )
}

#[test]
fn tasks_and_their_variation_splits() {
    let Some(mut env) = scienceworld() else {
        return;
    };
    let tasks = env.tasks().unwrap();
    assert_eq!(tasks.len(), 30, "{tasks:?}");
    for t in ["boil", "find-animal", "grow-plant", "use-thermometer"] {
        assert!(tasks.iter().any(|x| x == t), "{t} not in {tasks:?}");
    }
    let v: Variations = env.variations("boil").unwrap();
    assert_eq!(v.count, 30);
    let mut all: Vec<u32> = [Split::Train, Split::Dev, Split::Test]
        .iter()
        .flat_map(|&s| {
            assert!(!v.split(s).is_empty(), "{s:?} is empty");
            v.split(s).to_vec()
        })
        .collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..30).collect::<Vec<_>>(),
        "the splits partition the variations"
    );
    // ScienceWorld's own split of boil: 14 train, 7 dev, 9 test.
    assert_eq!((v.train.len(), v.dev.len(), v.test.len()), (14, 7, 9));
}

#[test]
fn an_episode_runs_to_its_step_limit_and_replays_identically() {
    let Some(mut env) = scienceworld() else {
        return;
    };
    env.config.step_limit = 6;
    env.config.max_actions = 64;
    let variation = env.variations("find-animal").unwrap().train[1];
    let episode = SwEpisode::new("find-animal", variation);
    let t = Instant::now();
    let first = play_first_action(&mut env, &episode);
    let took = t.elapsed().as_secs_f32();
    eprintln!(
        "{} steps in {took:.2} s ({:.1} steps/s with the reset)",
        first.len() - 1,
        (first.len() - 1) as f32 / took
    );
    let start = &first[0];
    assert!(!start.observation.is_empty() && !start.description.is_empty());
    assert!(
        start.objective.starts_with("Your task is to"),
        "{}",
        start.objective
    );
    assert_eq!((start.moves, start.score, start.max_score), (0, 0, 100));
    for s in &first {
        assert!((0..=100).contains(&s.score), "{}", s.score);
        assert!(!s.observation.is_empty());
        assert!(!s.admissible.is_empty() && s.admissible.len() <= 64);
        assert!(
            s.admissible.windows(2).all(|w| w[0] < w[1]),
            "sorted, unique"
        );
    }
    let last = first.last().unwrap();
    assert!(last.done);
    if !last.won && !last.lost {
        assert_eq!(last.moves, 6, "done at the step limit");
        assert_eq!(first.len(), 7);
    }
    // The same variation and actions: the same episode, up to order and naming. ScienceWorld
    // lists a room's objects in an order that changes from run to run, and names each object in
    // the admissible actions by one of its names drawn at random on every call ("focus on paint
    // in cup" or "focus on red paint on wood cup"); their number is the same.
    let second = play_first_action(&mut env, &episode);
    assert_eq!(first.len(), second.len());
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(canonical(a), canonical(b));
    }
}

#[test]
fn the_gold_path_wins_with_score_100() {
    let Some(mut env) = scienceworld() else {
        return;
    };
    env.config.max_actions = 0;
    let (mut state, gold) = env
        .reset_with_gold(&SwEpisode::new("lifespan-longest-lived", 0))
        .unwrap();
    assert!(!gold.is_empty());
    let uncapped = state.admissible.len();
    // The gold path may end with a "wait" after the task is done.
    for action in &gold {
        if state.done {
            break;
        }
        state = env.step(action).unwrap();
    }
    assert!(state.won && state.done && !state.lost, "{state:?}");
    assert_eq!(state.score, 100);

    // A cap keeps that many actions.
    env.config.max_actions = 20;
    let capped = env
        .reset(&SwEpisode::new("lifespan-longest-lived", 0))
        .unwrap();
    assert!(uncapped > 20, "{uncapped}");
    assert_eq!(capped.admissible.len(), 20);
}

#[test]
fn a_wrong_focus_loses_and_bad_requests_are_clear() {
    let Some(mut env) = scienceworld() else {
        return;
    };
    let episode = SwEpisode::new("boil", 0);
    let s = env.reset(&episode).unwrap();
    // An unknown command is ScienceWorld's business: it answers in text and no time passes.
    let s2 = env.step("dance wildly").unwrap();
    assert!(
        s2.observation.contains("No known action"),
        "{}",
        s2.observation
    );
    assert_eq!((s2.moves, s2.done), (s.moves, false));
    // Focusing on something that is not the task's substance fails the task.
    let focus = s
        .admissible
        .iter()
        .find(|a| a.starts_with("focus on") && a.contains("door"))
        .expect("a door to focus on");
    let lost = env.step(focus).unwrap();
    assert!(lost.lost && lost.done && !lost.won, "{lost:?}");
    assert_eq!(
        lost.score, 0,
        "a failed task scores 0 (its raw score is negative)"
    );

    let e = env.reset(&SwEpisode::new("boil-the-ocean", 0)).unwrap_err();
    assert!(matches!(e, AgentError::Env(_)), "{e}");
    assert!(
        e.to_string().contains("unknown task 'boil-the-ocean'"),
        "{e}"
    );
    let e = env.reset(&SwEpisode::new("boil", 30)).unwrap_err();
    assert!(e.to_string().contains("30 variations"), "{e}");
    let e = env.variations("nope").unwrap_err();
    assert!(e.to_string().contains("unknown task 'nope'"), "{e}");
    // The bridge survives the refusals.
    assert_eq!(env.reset(&episode).unwrap(), s);
}
