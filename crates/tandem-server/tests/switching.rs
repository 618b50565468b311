//! LONDI through the gateway: requests carry an episode id, a `switching` route's controller
//! picks the model per step, and episode rewards sent to `/v1/feedback` teach it to call the
//! large model exactly at the step that needs it — within its per-episode budget, and across a
//! restart.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};

const STEPS: usize = 4;
const HARD: usize = 2;

fn step_text(k: usize) -> String {
    if k == HARD {
        "step 2: a locked door blocks the corridor".into()
    } else {
        format!("step {k}: an open corridor, room {k}")
    }
}

async fn step(url: &str, episode: &str, k: usize, learn: bool) -> (u16, String) {
    let mut body = chat_body("agent", &step_text(k));
    if !learn {
        body["tandem"] = json!({"no_learn": true});
    }
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .header("x-tandem-episode", episode)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let role = r
        .headers()
        .get("x-tandem-role")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, role)
}

async fn episode_feedback(url: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/feedback"))
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Plays one episode: the agent gets through only if the large model served the hard step.
/// Returns the steps at which the large model served.
async fn play(url: &str, id: &str, learn: bool, budget: usize) -> Vec<usize> {
    let mut large_at = Vec::new();
    for k in 0..STEPS {
        let (status, role) = step(url, id, k, learn).await;
        assert_eq!(status, 200);
        if role == "large" {
            large_at.push(k);
        }
        assert!(
            large_at.len() <= budget,
            "episode {id}: large at {large_at:?}"
        );
        if k == HARD && role != "large" {
            break;
        }
    }
    let reward = if large_at.contains(&HARD) { 1.0 } else { 0.0 };
    let (s, v) = episode_feedback(
        url,
        json!({"episode_id": id, "reward": reward, "done": true}),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    large_at
}

fn config(s_url: &str, l_url: &str) -> String {
    format!(
        "[server]\nstate_dir = \"state\"\n{}[[route]]\nname = \"agent\"\nkind = \"switching\"\nsmall = \"small\"\nlarge = \"large\"\n\
         switching = {{ cost = 0.1, budget = 2, epsilon_start = 0.5, epsilon_end = 0.05, epsilon_decay_episodes = 250, hash_bits = 12, learning_rate = 0.03, n_step = 4 }}\n",
        upstreams(s_url, l_url, "token:10:30")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switching_route_learns_from_episode_rewards_within_its_budget_and_keeps_it() {
    std::env::set_var("TANDEM_TEST_LARGE_KEY", "sk-test");
    let (_s, s_url) = mock(reply(|_| ("go on".into(), -0.1))).await;
    let (_l, l_url) = mock(reply(|_| ("use the key".into(), -0.1))).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&s_url, &l_url);
    let gw = start(&cfg, dir.path()).await;
    for e in 0..400 {
        play(&gw.url, &format!("train-{e}"), true, 2).await;
    }
    // Greedy, without learning: large exactly at the locked door.
    for e in 0..5 {
        let at = play(&gw.url, &format!("greedy-{e}"), false, 2).await;
        assert_eq!(at, vec![HARD], "greedy episode {e}");
    }
    gw.stop().await;

    // A restart keeps what was learned.
    let gw = start(&cfg, dir.path()).await;
    let at = play(&gw.url, "after-restart", false, 2).await;
    assert_eq!(at, vec![HARD]);

    // Bad episode input: a missing episode id, feedback for an unknown episode, mixed fields.
    let r = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(&chat_body("agent", "no episode"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("x-tandem-episode"),
        "{v}"
    );
    let (s, v) = episode_feedback(&gw.url, json!({"episode_id": "never", "reward": 1.0})).await;
    assert_eq!(s, 404, "{v}");
    let (s, _) = episode_feedback(
        &gw.url,
        json!({"episode_id": "x", "response_id": "y", "reward": 1.0}),
    )
    .await;
    assert_eq!(s, 400);
    step(&gw.url, "open-one", 0, true).await;
    let (s, v) = episode_feedback(&gw.url, json!({"episode_id": "open-one", "score": 1.0})).await;
    assert_eq!(s, 400, "{v}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_episode_budget_holds_even_when_large_always_pays() {
    std::env::set_var("TANDEM_TEST_LARGE_KEY", "sk-test");
    let (_s, s_url) = mock(reply(|_| ("small".into(), -0.1))).await;
    let (l, l_url) = mock(reply(|_| ("large".into(), -0.1))).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}[[route]]\nname = \"agent\"\nkind = \"switching\"\nsmall = \"small\"\nlarge = \"large\"\n\
         switching = {{ cost = 0.0, budget = 3, epsilon_start = 1.0, epsilon_end = 1.0, hash_bits = 12 }}\n",
        upstreams(&s_url, &l_url, "token:10:30")
    );
    let gw = start(&cfg, dir.path()).await;
    let mut total_large = 0;
    for e in 0..30 {
        let id = format!("e{e}");
        let mut large = 0;
        for k in 0..10 {
            let (status, role) = step(&gw.url, &id, k, true).await;
            assert_eq!(status, 200);
            if role == "large" {
                large += 1;
                // Every large step is rewarded, so Q(large) only grows.
                episode_feedback(&gw.url, json!({"episode_id": id, "reward": 1.0})).await;
            }
            assert!(large <= 3, "episode {id}: {large} large calls");
        }
        total_large += large;
        episode_feedback(&gw.url, json!({"episode_id": id, "done": true})).await;
    }
    assert_eq!(l.calls(), total_large);
    assert!(
        total_large > 30,
        "exploration should reach the budget often: {total_large}"
    );
    gw.stop().await;
}
