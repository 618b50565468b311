//! Real BabyAI-Text episodes through the bridge. Needs scripts/setup-babyai; skips without it
//! unless TANDEM_REQUIRE_ASSETS=1 (as in CI), where absence fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::Instant;
use tandem_agent::env::babyai::ACTIONS;
use tandem_agent::env::{BabyAiEpisode, BabyAiText, Environment, GameState, Split};
use tandem_agent::AgentError;
use tandem_models::assets::Store;

fn required() -> bool {
    std::env::var("TANDEM_REQUIRE_ASSETS").is_ok_and(|v| v == "1")
}

fn babyai(step_limit: u32) -> Option<BabyAiText> {
    let site = Store::default_home().home().join("py/babyai");
    match BabyAiText::start(&site, Path::new("python3"), step_limit) {
        Ok(env) => Some(env),
        Err(e) => {
            assert!(!required(), "{e}");
            eprintln!("skipping: {e}");
            None
        }
    }
}

fn play(env: &mut BabyAiText, episode: &BabyAiEpisode, policy: &[&str]) -> Vec<GameState> {
    let mut states = vec![Environment::reset(env, episode).unwrap()];
    for (i, action) in policy.iter().cycle().enumerate() {
        if states.last().unwrap().done {
            break;
        }
        assert!(i < 10_000, "never done");
        states.push(Environment::step(env, action).unwrap());
    }
    states
}

#[test]
fn levels_and_seed_splits() {
    let Some(mut env) = babyai(64) else { return };
    let levels = env.levels().unwrap();
    for l in [
        "BabyAI-GoToLocal-v0",
        "BabyAI-PickupLoc-v0",
        "BabyAI-PutNextLocal-v0",
    ] {
        assert!(levels.iter().any(|x| x == l), "{l} not in {levels:?}");
    }
    let train = BabyAiText::seeds(Split::Train, 100);
    let test = BabyAiText::seeds(Split::Test, 100);
    assert_eq!(train.len(), 100);
    assert!(train.iter().all(|s| !test.contains(s)), "held out");
    assert_eq!(
        BabyAiText::seeds(Split::Dev, 3),
        BabyAiText::seeds(Split::Dev, 3)
    );
}

#[test]
fn an_episode_reads_as_text_runs_to_its_step_limit_and_replays() {
    let Some(mut env) = babyai(8) else { return };
    let episode = BabyAiEpisode::new("BabyAI-GoToLocal-v0", BabyAiText::seeds(Split::Train, 4)[3]);
    // A scripted policy: the first admissible action (turning left) forever.
    let t = Instant::now();
    let first = play(&mut env, &episode, &["turn left"]);
    let took = t.elapsed().as_secs_f32();
    eprintln!(
        "{} steps in {took:.3} s ({:.0} steps/s with the reset)",
        first.len() - 1,
        (first.len() - 1) as f32 / took
    );
    let start = &first[0];
    assert!(start.objective.starts_with("go to "), "{}", start.objective);
    assert_eq!(start.admissible, ACTIONS.to_vec());
    assert_eq!(start.inventory, "You carry nothing");
    for s in &first {
        assert!(s.observation.starts_with("You see "), "{}", s.observation);
        assert!((0..=100).contains(&s.score));
        assert!(!s.won);
    }
    let last = first.last().unwrap();
    assert!(last.done && last.moves == 8 && first.len() == 9, "{last:?}");
    // The same seed and actions: the same episode; another seed, another room.
    assert_eq!(play(&mut env, &episode, &["turn left"]), first);
    let other = BabyAiEpisode::new("BabyAI-GoToLocal-v0", episode.seed + 1);
    assert_ne!(env.reset(&other).unwrap(), first[0]);
}

#[test]
fn a_mission_achieved_is_won_and_scored_by_its_speed() {
    let Some(mut env) = babyai(64) else { return };
    // Seed 7 of GoToLocal: "go to a purple ball"; once turned left, one is 3 steps ahead and
    // reaching the cell before it achieves the mission.
    let states = play(
        &mut env,
        &BabyAiEpisode::new("BabyAI-GoToLocal-v0", 7),
        &["turn left", "go forward", "go forward"],
    );
    let start = &states[0];
    assert_eq!(start.objective, "go to a purple ball");
    assert!(
        start
            .observation
            .contains("You see a purple ball 2 steps forward"),
        "{}",
        start.observation
    );
    let end = states.last().unwrap();
    assert!(end.won && end.done && !end.lost, "{end:?}");
    assert_eq!(end.moves, 3);
    // minigrid's reward, 1 - 0.9 * 3 / 64, as a score out of 100.
    assert_eq!(end.score, 96);
}

#[test]
fn the_levels_own_limit_ends_an_episode_and_bad_requests_are_clear() {
    let Some(mut env) = babyai(10_000) else {
        return;
    };
    let states = play(
        &mut env,
        &BabyAiEpisode::new("BabyAI-GoToLocal-v0", 3),
        &["turn right"],
    );
    assert_eq!(states.last().unwrap().moves, 64, "GoToLocal's max_steps");

    let e = env.step("fly").unwrap_err();
    assert!(matches!(e, AgentError::Env(_)), "{e}");
    assert!(
        e.to_string().contains("turn left, turn right, go forward"),
        "{e}"
    );
    let e = env
        .reset(&BabyAiEpisode::new("BabyAI-Nowhere-v0", 1))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("unknown BabyAI level 'BabyAI-Nowhere-v0'"),
        "{e}"
    );
    // The bridge survives the refusals.
    let s = env
        .reset(&BabyAiEpisode::new("BabyAI-PickupLoc-v0", 2))
        .unwrap();
    assert!(s.objective.starts_with("pick up"), "{}", s.objective);
}
