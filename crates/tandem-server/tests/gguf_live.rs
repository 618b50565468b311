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
[[route]]
name = "fixed"
kind = "fixed"
upstream = "small"
max_tokens = 8
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

/// Concatenated `bytes` of the logprob entries, and their texts.
fn logprob_bytes(entries: &[Value]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|e| {
            e["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_models_give_logprobs_as_the_client_asks() {
    if !installed() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let gw = start(CFG, dir.path()).await;
    let c = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", gw.url);
    for route in ["fixed", "energy"] {
        for k in [0u64, 3] {
            let body = json!({"model": route, "messages": [{"role": "user", "content": "Name a colour."}],
                              "logprobs": true, "top_logprobs": k, "max_tokens": 8});
            let v: Value = c
                .post(&url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let content = v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_string();
            let entries = v["choices"][0]["logprobs"]["content"]
                .as_array()
                .unwrap()
                .clone();
            assert!(!entries.is_empty(), "{route}: {v}");
            for e in &entries {
                let lp = e["logprob"].as_f64().unwrap();
                assert!(lp <= 0.0 && lp.is_finite());
                // The energy gate asked the small model for 5 alternatives; the client gets k.
                assert_eq!(
                    e["top_logprobs"].as_array().unwrap().len() as u64,
                    k,
                    "{route}: {e}"
                );
            }
            assert_eq!(
                String::from_utf8_lossy(&logprob_bytes(&entries)),
                content,
                "{route}"
            );
        }
        // Not asked: none.
        let body = json!({"model": route, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8});
        let v: Value = c
            .post(&url)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(v["choices"][0]["logprobs"].is_null(), "{route}: {v}");
    }
    // Streamed: each content chunk carries its tokens' entries.
    let body = json!({"model": "fixed", "messages": [{"role": "user", "content": "Name a colour."}],
                      "logprobs": true, "top_logprobs": 2, "max_tokens": 8, "stream": true});
    let text = c
        .post(&url)
        .json(&body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (mut content, mut entries) = (String::new(), Vec::new());
    for ev in text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")) {
        if ev == "[DONE]" {
            continue;
        }
        let c: Value = serde_json::from_str(ev).unwrap();
        if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
            content.push_str(t);
        }
        if let Some(es) = c["choices"][0]["logprobs"]["content"].as_array() {
            entries.extend(es.iter().cloned());
        }
    }
    assert!(!entries.is_empty(), "{text}");
    assert!(entries
        .iter()
        .all(|e| e["top_logprobs"].as_array().unwrap().len() == 2));
    assert_eq!(String::from_utf8_lossy(&logprob_bytes(&entries)), content);
    gw.stop().await;
}
