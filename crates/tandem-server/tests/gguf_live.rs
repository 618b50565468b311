//! The gateway over real in-process GGUF models (SmolLM2-135M as both tiers, so CI needs one
//! asset): a cascade judged by the small model's real token log-probabilities and energies, a
//! forced large call and a stream. Skips without the asset unless TANDEM_REQUIRE_ASSETS=1.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::start;
use serde_json::{json, Value};
use tandem_models::assets::{find, Store};

fn installed() -> bool {
    let ok = find("smollm2-135m").is_ok_and(|a| Store::default_home().is_installed(a));
    if !ok {
        assert!(
            std::env::var("TANDEM_REQUIRE_ASSETS").map_or(true, |v| v != "1"),
            "smollm2-135m is not installed; run scripts/setup smollm2-135m"
        );
        eprintln!("skipping: smollm2-135m is not installed (scripts/setup smollm2-135m)");
    }
    ok
}

const CFG: &str = r#"
[[upstream]]
name = "small"
kind = "gguf"
asset = "smollm2-135m"
price = "token:0.02"
[[upstream]]
name = "large"
kind = "gguf"
asset = "smollm2-135m"
price = "token:0.1:0.3"
[[route]]
name = "energy"
kind = "cascade"
small = "small"
large = "large"
gate = "energy"
threshold = 1e9
explore = 0.0
max_tokens = 12
[route.budget]
max_calls = 1
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_models_answer_through_the_gateway() {
    if !installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let gw = start(CFG, dir.path()).await;
    let c = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", gw.url);
    let body =
        json!({"model": "energy", "messages": [{"role": "user", "content": "Name a colour."}]});
    // Energy is negative (−logsumexp of real logits) and under the huge threshold: the small
    // model's answer stands.
    let r = c.post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tandem-role"], "small");
    let score: f32 = r.headers()["x-tandem-score"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(score.is_finite() && score < 0.0, "energy {score}");
    let v: Value = r.json().await.unwrap();
    assert!(!v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .trim()
        .is_empty());
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 5);
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 12);
    // Forced to the large tier, within its one-call budget; then the budget sends it back.
    for want in ["large", "small"] {
        let r = c
            .post(&url)
            .header("x-tandem-force", "large")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-tandem-role"], want);
    }
    let mut s = body.clone();
    s["stream"] = json!(true);
    let text = c
        .post(&url)
        .json(&s)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    gw.stop().await;
}
