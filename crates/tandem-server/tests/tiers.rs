//! Cascades of tiers (`tiers = [...]`) on the core's engine, against mock upstreams with
//! expected call counts: each tier judged in turn, the budget re-checked at every step up, a
//! failing tier passed over, S4L into the top tier's prompt, streaming of the last answer, OCL
//! learning from the top tier's agreement, feedback, and the policy's state across a restart;
//! then against real in-process models (two SmolLM2 tiers under an HTTP top tier).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::Path;
use std::sync::Arc;
use tandem_server::config::{ConfigError, ServerConfig, Validated};

fn upstream(name: &str, url: &str, price: &str) -> String {
    format!(
        "[[upstream]]\nname = \"{name}\"\nkind = \"openai\"\nbase_url = \"{url}\"\nmodel = \"{name}-model\"\nlogprobs = true\nprice = \"{price}\"\ntimeout_ms = 2000\n"
    )
}

/// Tier 0 is sure of "easy" prompts only, tier 1 of "easy" and "medium"; the top answers all.
async fn three_mocks() -> (Vec<Arc<Mock>>, String) {
    let (t0, u0) = mock(reply(|p| {
        if p.contains("easy") {
            ("the answer is 4".into(), -0.05)
        } else {
            ("maybe 7".into(), -3.0)
        }
    }))
    .await;
    let (t1, u1) = mock(reply(|p| {
        if p.contains("hard") {
            ("perhaps 9".into(), -2.5)
        } else {
            ("the answer is 4".into(), -0.1)
        }
    }))
    .await;
    let (t2, u2) = mock(reply(|_| ("the answer is 4".into(), -0.01))).await;
    let ups = upstream("t0", &u0, "token:0.1:0.1")
        + &upstream("t1", &u1, "token:1:2")
        + &upstream("t2", &u2, "token:10:30");
    (vec![t0, t1, t2], ups)
}

/// The route's tiers when it runs over all three mocks.
const ALL_THREE: &str = "tiers = [\"t0\", \"t1\", \"t2\"]\n";

/// Sure below a mean −log-probability of 1, no exploration: each tier keeps a fixed set.
const JUDGED: &str = "threshold = 1.0\nexplore = 0.0\n";

/// A gateway over the three mocks (and the upstreams in `more_ups`) whose route "t" is a cascade
/// with these settings, joined (its `tiers` first); the directory holds its files.
async fn cascade_over_three(
    more_ups: &str,
    settings: &[&str],
) -> (Vec<Arc<Mock>>, Running, tempfile::TempDir) {
    let (m, ups) = three_mocks().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{ups}{more_ups}[[route]]\nname = \"t\"\nkind = \"cascade\"\n{}",
        settings.concat()
    );
    let gw = start(&cfg, dir.path()).await;
    (m, gw, dir)
}

/// Posts `body` and checks that it was answered.
async fn answered(url: &str, body: &Value) -> reqwest::Response {
    let r = post_chat(url, body).await;
    assert_eq!(r.status(), 200, "{body}");
    r
}

/// The first route's policy state, as it saves it.
fn policy_state(gw: &Running) -> Vec<u8> {
    gw.gateway.routes()[0]
        .engine()
        .unwrap()
        .policy()
        .save()
        .unwrap()
}

fn validated(text: &str, dir: &Path) -> Result<Validated, ConfigError> {
    toml::from_str::<ServerConfig>(text)
        .unwrap()
        .validate(Path::new("test.toml"), dir.to_path_buf())
}

/// Why a gateway started from `text` refuses its first route's saved state.
fn refused_state(text: &str, dir: &Path) -> String {
    let g = tandem_server::Gateway::start(&validated(text, dir).unwrap()).unwrap();
    let why = g.routes()[0].refused_state().unwrap().to_string();
    why
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tier_is_judged_in_turn_and_the_first_sure_one_answers() {
    // Escalate when −mean log-probability > 1: tier 0 keeps "easy", tier 1 keeps "medium".
    let (m, gw, _dir) = cascade_over_three("", &[ALL_THREE, JUDGED, "s4l = true\n"]).await;
    for (text, tier, called, role) in [
        ("easy sum", "0", "1", "small"),
        ("medium sum", "1", "2", "mid"),
        ("hard proof", "2", "3", "large"),
        ("another easy one", "0", "1", "small"),
        ("hard again", "2", "3", "large"),
    ] {
        let r = answered(&gw.url, &chat_body("t", text)).await;
        assert_eq!(header(&r, "x-tandem-tier-index"), tier, "{text}");
        assert_eq!(header(&r, "x-tandem-tiers-called"), called, "{text}");
        assert_eq!(header(&r, "x-tandem-role"), role, "{text}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["model"], "t");
        assert_eq!(
            body["tandem"]["tier_index"].as_u64().unwrap().to_string(),
            tier
        );
        assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    }
    assert_eq!(
        [m[0].calls(), m[1].calls(), m[2].calls()],
        [5, 3, 2],
        "every item starts at the cheapest tier and goes up only as far as needed"
    );
    // The cheap tiers were asked for log-probabilities (the gate reads them); the top was not.
    assert_eq!(m[0].bodies()[0]["logprobs"], true);
    assert_eq!(m[1].bodies()[0]["logprobs"], true);
    let top = m[2].bodies();
    assert!(top[0].get("logprobs").is_none());
    // S4L: the top tier's prompt carries the draft of the tier below it.
    let system = top[0]["messages"][0]["content"].as_str().unwrap();
    assert!(system.contains("perhaps 9"), "{system}");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_step_up_rechecks_the_budget() {
    let (m, gw, _dir) =
        cascade_over_three("", &[ALL_THREE, JUDGED, "[route.budget]\nmax_calls = 3\n"]).await;
    // Three metered calls allowed: the first hard item takes two (tiers 1 and 2), the second
    // gets tier 1 only (the top is refused: tier 1's answer stands, capped), the third none.
    let mut seen = Vec::new();
    for _ in 0..3 {
        let r = answered(&gw.url, &chat_body("t", "hard proof")).await;
        seen.push((
            header(&r, "x-tandem-tier-index"),
            header(&r, "x-tandem-capped"),
        ));
    }
    assert_eq!(
        seen,
        [
            ("2".into(), "false".into()),
            ("1".into(), "true".into()),
            ("0".into(), "true".into())
        ]
    );
    assert_eq!([m[0].calls(), m[1].calls(), m[2].calls()], [3, 2, 1]);
    gw.stop().await;
    // A route that refuses answers 429 once its budget is spent.
    let refuse = "on_exhausted = \"refuse\"\n[route.budget]\nmax_calls = 1\n";
    let (_m, gw, _dir) = cascade_over_three("", &[ALL_THREE, JUDGED, refuse]).await;
    assert_eq!(
        post_chat(&gw.url, &chat_body("t", "medium")).await.status(),
        200
    );
    assert_eq!(
        post_chat(&gw.url, &chat_body("t", "easy")).await.status(),
        200
    );
    assert_eq!(
        post_chat(&gw.url, &chat_body("t", "medium")).await.status(),
        429
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_tier_is_passed_over_and_a_failing_top_leaves_the_best_draft() {
    let (m, gw, _dir) = cascade_over_three("", &[ALL_THREE, JUDGED]).await;
    let fail = || {
        Scripted::error(
            500,
            json!({"error": {"message": "down", "type": "server_error"}}),
        )
    };
    m[1].set_always(Some(fail()));
    // Tier 1 is down: a medium item goes on to the top.
    let r = answered(&gw.url, &chat_body("t", "medium sum")).await;
    assert_eq!(header(&r, "x-tandem-tier-index"), "2");
    m[1].set_always(None);
    m[2].set_always(Some(fail()));
    // The top is down: the deepest usable draft (tier 1's) serves.
    let r = answered(&gw.url, &chat_body("t", "hard proof")).await;
    assert_eq!(header(&r, "x-tandem-tier-index"), "1");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "perhaps 9");
    // Every tier down: the error of the last one stands.
    m[0].set_always(Some(fail()));
    m[1].set_always(Some(fail()));
    let r = post_chat(&gw.url, &chat_body("t", "hard proof")).await;
    assert_eq!(r.status(), 502, "{:?}", r.text().await);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_that_ends_the_walk_streams() {
    let (m, gw, _dir) = cascade_over_three("", &[ALL_THREE, JUDGED]).await;
    for (text, tier) in [("hard proof", "2"), ("easy sum", "0")] {
        let mut body = chat_body("t", text);
        body["stream"] = json!(true);
        let r = answered(&gw.url, &body).await;
        assert_eq!(header(&r, "x-tandem-tier-index"), tier, "{text}");
        assert!(header(&r, "content-type").starts_with("text/event-stream"));
        let sse = r.text().await.unwrap();
        assert!(
            sse.contains("answer") && sse.trim_end().ends_with("data: [DONE]"),
            "{sse}"
        );
    }
    // The top streamed (called once with stream = true); the cheap tiers were judged whole.
    assert_eq!(m[2].bodies()[0]["stream"], true);
    assert!(m[0]
        .bodies()
        .iter()
        .all(|b| b.get("stream").is_none_or(|s| s == false)));
    gw.stop().await;
}

/// OCL on two tiers: the cheap tier is confidently wrong on "hard" prompts (its text differs
/// from the top's) and right on "easy" ones. Exploration sends some of each up; OCL learns from
/// the top tier's agreement which prompts to defer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ocl_learns_from_the_top_tier_which_items_to_send_up() {
    ocl_learns(false).await;
}

/// The same when every client streams: the top tier's answer teaches once its stream is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ocl_learns_from_streamed_top_answers_too() {
    ocl_learns(true).await;
}

async fn ocl_learns(stream: bool) {
    let (_small, su) = mock(reply(|p| {
        if p.contains("hard") {
            ("the answer is 5".into(), -0.05)
        } else {
            ("the answer is 4".into(), -0.05)
        }
    }))
    .await;
    let (_large, lu) = mock(reply(|_| ("the answer is 4".into(), -0.01))).await;
    let ups = upstream("s", &su, "token:0.1:0.1") + &upstream("l", &lu, "token:10:30");
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[server]\nstate_dir = \"state\"\npersist_interval_s = 3600\n{ups}[[route]]\nname = \"t\"\nkind = \"cascade\"\ntiers = [\"s\", \"l\"]\ngate = \"ocl\"\nexplore = 0.4\n"
    );
    let gw = start(&cfg, dir.path()).await;
    let words = [
        "apple", "river", "stone", "cloud", "maple", "ember", "tiger", "quartz",
    ];
    let (mut hard_up, mut easy_up) = (0, 0);
    for i in 0..400 {
        let hard = i % 2 == 1;
        let text = format!(
            "{} question about {} {}",
            if hard { "hard" } else { "easy" },
            words[i % words.len()],
            i
        );
        let mut body = chat_body("t", &text);
        body["stream"] = json!(stream);
        let r = answered(&gw.url, &body).await;
        let up = header(&r, "x-tandem-tier-index") == "1";
        // Read to the end: a stream's answer teaches when it is whole.
        let _ = r.text().await.unwrap();
        if i >= 300 {
            *(if hard { &mut hard_up } else { &mut easy_up }) += u32::from(up);
        }
    }
    // Of the last 50 of each kind: the hard ones go up, the easy ones mostly stay.
    assert!(hard_up >= 40, "hard items sent up: {hard_up} of 50");
    assert!(easy_up <= 20, "easy items sent up: {easy_up} of 50");
    if stream {
        gw.stop().await;
        return;
    }
    // Feedback on a response teaches the policy too (and is counted).
    let r = post_chat(&gw.url, &chat_body("t", "easy question about tigers")).await;
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let fb = reqwest::Client::new()
        .post(format!("{}/v1/feedback", gw.url))
        .json(&json!({"response_id": id, "correct": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(fb.status(), 200, "{:?}", fb.text().await);
    // The learned deferral survives a restart: the restored route decides as the saved one.
    let saved = policy_state(&gw);
    gw.stop().await;
    let gw = start(&cfg, dir.path()).await;
    let back = policy_state(&gw);
    assert_eq!(saved, back, "the policy's state is restored from state_dir");
    // A file whose policy is another gate's is refused with a message naming both.
    gw.stop().await;
    let other = cfg.replace("gate = \"ocl\"", "gate = \"energy\"\ntarget_share = 0.3");
    let why = refused_state(&other, dir.path());
    assert!(
        why.contains("gate = \"ocl\"") && why.contains("gate = \"energy\""),
        "{why}"
    );
    // So is one whose tiers are other upstreams now (the learned deferral is about those).
    let swapped = cfg
        .replace("tiers = [\"s\", \"l\"]", "tiers = [\"s2\", \"l\"]")
        .replace("[[upstream]]\nname = \"s\"", "[[upstream]]\nname = \"s2\"");
    let why = refused_state(&swapped, dir.path());
    assert!(
        why.contains("tiers [s, l]") && why.contains("tiers [s2, l]"),
        "{why}"
    );
}

#[test]
fn bad_tier_configs_name_the_field() {
    let ups = upstream("a", "http://127.0.0.1:9/v1", "call:0")
        + &upstream("b", "http://127.0.0.1:9/v1", "call:0.01")
        + &upstream("c", "http://127.0.0.1:9/v1", "call:0.1");
    let nine = (0..9).map(|_| "\"a\"").collect::<Vec<_>>().join(", ");
    for (route, want) in [
        ("tiers = [\"a\"]\nthreshold = 1.0", "route[0].tiers = 1"),
        (
            &format!("tiers = [{nine}]\nthreshold = 1.0")[..],
            "route[0].tiers = 9",
        ),
        (
            "tiers = [\"a\", \"nope\"]\nthreshold = 1.0",
            "route[0].tiers[1]",
        ),
        (
            "tiers = [\"a\", \"b\"]\nsmall = \"a\"\nthreshold = 1.0",
            "remove small, large",
        ),
        (
            "tiers = [\"a\", \"b\", \"c\"]\ngate = \"learned\"\nthreshold = 1.0",
            "route[0].gate = learned",
        ),
        (
            "tiers = [\"a\", \"b\", \"c\"]\ngate = \"energy\"\nthreshold = 1.0",
            "route[0].target_share",
        ),
        (
            "tiers = [\"a\", \"b\", \"c\"]\ngate = \"random\"",
            "route[0].target_share",
        ),
        (
            "tiers = [\"a\", \"b\", \"c\"]\ngate = \"ocl\"\nthreshold = 0.5",
            "route[0].threshold",
        ),
        // Out of price order: the walk would start at the dearest tier.
        (
            "tiers = [\"a\", \"c\", \"b\"]\nthreshold = 1.0",
            "route[0].tiers[2] = \"b\" ($0.010000",
        ),
    ] {
        let text = format!("{ups}[[route]]\nname = \"x\"\nkind = \"cascade\"\n{route}\n");
        let err = validated(&text, Path::new(""))
            .err()
            .unwrap_or_else(|| panic!("accepted: {route}"))
            .to_string();
        assert!(err.contains(want), "{route}: {err}");
    }
    let text = format!("{ups}[[route]]\nname = \"x\"\nkind = \"route_before\"\ntiers = [\"a\", \"b\"]\ntarget_share = 0.3\n");
    let err = validated(&text, Path::new("")).err().unwrap().to_string();
    assert!(err.contains("route[0].tiers"), "{err}");
}

/// Two real in-process tiers (SmolLM2-135M twice: CI installs that one model, priced as two
/// sizes) under an HTTP top tier, with OCL's learned deferral reading the local tiers' real token
/// log-probabilities. Skips without the asset unless TANDEM_REQUIRE_ASSETS=1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_tiers_over_real_local_models_with_ocl() {
    use tandem_models::assets::{find, Store};
    if !find("smollm2-135m").is_ok_and(|a| Store::default_home().is_installed(a)) {
        assert!(
            std::env::var("TANDEM_REQUIRE_ASSETS").map_or(true, |v| v != "1"),
            "smollm2-135m is not installed; run scripts/setup smollm2-135m"
        );
        eprintln!("skipping: smollm2-135m is not installed (scripts/setup smollm2-135m)");
        return;
    }
    let (top, tu) = mock(reply(|_| ("Paris".into(), -0.01))).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        r#"[server]
state_dir = "state"
persist_interval_s = 3600
[[upstream]]
name = "local-a"
kind = "gguf"
asset = "smollm2-135m"
price = "token:0.02"
[[upstream]]
name = "local-b"
kind = "gguf"
asset = "smollm2-135m"
price = "token:0.1:0.3"
{}[[route]]
name = "t"
kind = "cascade"
tiers = ["local-a", "local-b", "top"]
gate = "ocl"
explore = 0.5
max_tokens = 6
"#,
        upstream("top", &tu, "token:10:30")
    );
    let gw = start(&cfg, dir.path()).await;
    let before = policy_state(&gw);
    let mut tiers = [0u32; 3];
    let prompts = [
        "What is the capital of France?",
        "Name the largest ocean.",
        "What is 2 + 2?",
        "Who wrote Hamlet?",
    ];
    for i in 0..12 {
        let r = answered(&gw.url, &chat_body("t", prompts[i % prompts.len()])).await;
        let k: usize = header(&r, "x-tandem-tier-index").parse().unwrap();
        let called: usize = header(&r, "x-tandem-tiers-called").parse().unwrap();
        assert!(
            k < 3 && called > k && called <= 3,
            "tier {k}, called {called}"
        );
        let body: Value = r.json().await.unwrap();
        let text = body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or("");
        assert!(
            !text.trim().is_empty() || k == 2,
            "a served local answer is never empty"
        );
        tiers[k] += 1;
    }
    // Every item reached the top or stopped below it; the top saw some (OCL explores at 0.5
    // and SmolLM2 is rarely sure), and the policy learned from the top's answers.
    assert_eq!(tiers.iter().sum::<u32>(), 12);
    assert!(top.calls() >= 1, "the top tier was never called: {tiers:?}");
    let after = policy_state(&gw);
    assert_ne!(before, after, "OCL learned nothing from the top tier");
    gw.stop().await;
}

/// Random deferral pays only for the tier that answers: the tiers below the last cheap one are
/// never called, and about the target share goes to the top.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_deferral_calls_only_the_tier_that_answers() {
    let random = "gate = \"random\"\ntarget_share = 0.3\n";
    let (m, gw, _dir) = cascade_over_three("", &[ALL_THREE, random]).await;
    for i in 0..200 {
        let r = answered(&gw.url, &chat_body("t", &format!("question {i}"))).await;
        assert_eq!(header(&r, "x-tandem-tiers-called"), "1");
    }
    let [a, b, c] = [m[0].calls(), m[1].calls(), m[2].calls()];
    assert_eq!((a, b + c), (0, 200), "{a} {b} {c}");
    assert!(
        (40..=80).contains(&c),
        "top calls {c} of 200 at a 30% share"
    );
    gw.stop().await;
}

/// A tier whose upstream refuses the connection was never sent the request: its reservation is
/// given back, so it does not use up the calls the tiers above need.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_tier_costs_no_budget() {
    let down = upstream("down", "http://127.0.0.1:9/v1", "token:1:2");
    let (m, gw, _dir) = cascade_over_three(
        &down,
        &[
            "tiers = [\"t0\", \"down\", \"t2\"]\n",
            JUDGED,
            "[route.budget]\nmax_calls = 2\n",
        ],
    )
    .await;
    for _ in 0..2 {
        let r = answered(&gw.url, &chat_body("t", "hard proof")).await;
        assert_eq!(header(&r, "x-tandem-tier-index"), "2");
        assert_eq!(header(&r, "x-tandem-capped"), "false");
    }
    assert_eq!(
        m[2].calls(),
        2,
        "both items reached the top within two calls"
    );
    gw.stop().await;
}
