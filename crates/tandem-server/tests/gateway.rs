//! The gateway against mock OpenAI upstreams: routing and cascade decisions with expected call
//! counts, budgets under concurrency, timeouts, error shapes, streaming, feedback learning and
//! restarts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

const KEY: &str = "sk-large-upstream-secret-123";

fn setup_env() {
    // Read by the large upstream's api_key_env; must never appear in a response.
    std::env::set_var("TANDEM_TEST_LARGE_KEY", KEY);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cascade_escalates_exactly_the_unsure_answers() {
    setup_env();
    let (small, s_url) = mock(small_reply()).await;
    let (large, l_url) = mock(large_reply()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}[[route]]\nname = \"tandem\"\nkind = \"cascade\"\nsmall = \"small\"\nlarge = \"large\"\nthreshold = 1.0\nexplore = 0.0\n",
        upstreams(&s_url, &l_url, "token:10:30")
    );
    let gw = start(&cfg, dir.path()).await;
    for i in 0..20 {
        let text = if i % 2 == 0 { "easy sum" } else { "hard proof" };
        let r = post_chat(&gw.url, &chat_body("tandem", text)).await;
        assert_eq!(r.status(), 200);
        let role = header(&r, "x-tandem-role");
        assert_eq!(role, if i % 2 == 0 { "small" } else { "large" }, "{text}");
        let score: f32 = header(&r, "x-tandem-score").parse().unwrap();
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["model"], "tandem");
        assert_eq!(body["choices"][0]["message"]["role"], "assistant");
        assert!((score - if i % 2 == 0 { 0.05 } else { 3.0 }).abs() < 1e-3);
        // The two-model form runs on the engine as two tiers.
        assert_eq!(body["tandem"]["tier_index"], if i % 2 == 0 { 0 } else { 1 });
        assert_eq!(
            body["tandem"]["tiers_called"],
            if i % 2 == 0 { 1 } else { 2 }
        );
    }
    assert_eq!(small.calls(), 20, "the small model answers first, always");
    assert_eq!(large.calls(), 10, "only the unsure answers escalate");
    // The small call asked for log-probabilities; the large one got the client's conversation.
    assert_eq!(small.last.lock().unwrap()["logprobs"], true);
    assert_eq!(large.last.lock().unwrap()["model"], "large-model");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s4l_puts_the_small_draft_in_the_large_prompt() {
    setup_env();
    let (_small, s_url) = mock(small_reply()).await;
    let (large, l_url) = mock(large_reply()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}[[route]]\nname = \"t\"\nkind = \"cascade\"\nsmall = \"small\"\nlarge = \"large\"\nthreshold = 1.0\nexplore = 0.0\ns4l = true\n",
        upstreams(&s_url, &l_url, "token:10:30")
    );
    let gw = start(&cfg, dir.path()).await;
    let body = json!({"model": "t", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hard one"}]});
    assert_eq!(post_chat(&gw.url, &body).await.status(), 200);
    let sent = large.last.lock().unwrap().clone();
    let msgs = sent["messages"].as_array().unwrap();
    assert_eq!(msgs.len(), 3);
    assert_eq!(
        msgs[0]["content"], "be brief",
        "the client's system prompt stays first"
    );
    assert!(msgs[1]["content"].as_str().unwrap().contains("maybe 7"));
    assert_eq!(msgs[2]["content"], "hard one");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_holds_under_64_concurrent_clients() {
    setup_env();
    let (small, s_url) = mock(small_reply()).await;
    let (large, l_url) = mock(large_reply()).await;
    large.delay_ms.store(20, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    // $0.01 a large call, $0.05 cap: five calls at most, whatever the concurrency.
    let cfg = format!(
        "{}[[route]]\nname = \"big\"\nkind = \"fixed\"\nupstream = \"large\"\nsmall = \"small\"\n[route.budget]\nmax_usd = 0.05\n\
         [[route]]\nname = \"strict\"\nkind = \"fixed\"\nupstream = \"large\"\non_exhausted = \"refuse\"\n[route.budget]\nmax_calls = 3\n",
        upstreams(&s_url, &l_url, "call:0.01")
    );
    let gw = start(&cfg, dir.path()).await;
    let mut tasks = Vec::new();
    for i in 0..64 {
        let url = gw.url.clone();
        tasks.push(tokio::spawn(async move {
            let r = post_chat(&url, &chat_body("big", &format!("q{i}"))).await;
            (r.status().as_u16(), header(&r, "x-tandem-role"))
        }));
    }
    let mut large_served = 0;
    for t in tasks {
        let (status, role) = t.await.unwrap();
        assert_eq!(status, 200, "over budget the route serves the small model");
        large_served += usize::from(role == "large");
    }
    assert_eq!(large.calls(), 5);
    assert_eq!(large_served, 5);
    assert_eq!(small.calls(), 59);
    let spent = gw.gateway.routes()[0].budget.spent();
    assert_eq!(spent.calls, 5);
    assert!(
        spent.micros <= 50_000,
        "spent {} micro-dollars",
        spent.micros
    );

    // The refusing route: three calls, then 429 in OpenAI's shape.
    let mut tasks = Vec::new();
    for i in 0..16 {
        let url = gw.url.clone();
        tasks.push(tokio::spawn(async move {
            post_chat(&url, &chat_body("strict", &format!("s{i}"))).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        let r = t.await.unwrap();
        if r.status() == 200 {
            ok += 1;
        } else {
            assert_eq!(r.status(), 429);
            let e: Value = r.json().await.unwrap();
            assert_eq!(e["error"]["code"], "insufficient_quota");
        }
    }
    assert_eq!(ok, 3);
    assert_eq!(large.calls(), 8);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_failures_release_the_budget() {
    setup_env();
    let (_small, s_url) = mock(small_reply()).await;
    let (large, l_url) = mock(large_reply()).await;
    let dir = tempfile::tempdir().unwrap();
    // Six failures in a row follow: the large upstream's breaker must not open on them here.
    let cfg = format!(
        "{}[upstream.breaker]\nconsecutive_failures = 100\n[[route]]\nname = \"casc\"\nkind = \"cascade\"\nsmall = \"small\"\nlarge = \"large\"\nthreshold = 1.0\nexplore = 0.0\n[route.budget]\nmax_calls = 100\n\
         [[route]]\nname = \"direct\"\nkind = \"fixed\"\nupstream = \"large\"\n",
        upstreams(&s_url, &l_url, "token:10:30")
    );
    let gw = start(&cfg, dir.path()).await;
    // The large upstream's total timeout is 300 ms.
    large.delay_ms.store(1500, Ordering::SeqCst);
    let r = post_chat(&gw.url, &chat_body("direct", "anything")).await;
    assert_eq!(r.status(), 504);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "upstream_timeout");
    // A cascade whose large model times out serves the small draft and gives the money back;
    // the call, which reached the upstream, stays counted against max_calls.
    let r = post_chat(&gw.url, &chat_body("casc", "hard one")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tandem-role"), "small");
    let spent = gw.gateway.routes()[0].budget.spent();
    assert_eq!((spent.calls, spent.micros), (1, 0));
    large.delay_ms.store(0, Ordering::SeqCst);
    for (mode, status, needle) in [
        (FAIL_500, 502, "mock is down"),
        (GARBAGE, 502, "malformed response"),
    ] {
        large.mode.store(mode, Ordering::SeqCst);
        let r = post_chat(&gw.url, &chat_body("direct", "x")).await;
        assert_eq!(r.status(), status);
        assert_eq!(header(&r, "x-should-retry"), "true");
        let text = r.text().await.unwrap();
        assert!(text.contains(needle), "{text}");
        assert!(!text.contains(KEY), "the upstream key leaked: {text}");
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_openai_shaped_errors() {
    setup_env();
    std::env::set_var("TANDEM_TEST_GATEWAY_KEYS", "k1, k2");
    let (_s, s_url) = mock(small_reply()).await;
    let (_l, l_url) = mock(large_reply()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[server]\napi_keys_env = \"TANDEM_TEST_GATEWAY_KEYS\"\nmax_body_bytes = 4096\n{}[[route]]\nname = \"r\"\nkind = \"fixed\"\nupstream = \"large\"\n",
        upstreams(&s_url, &l_url, "token:10:30")
    );
    let gw = start(&cfg, dir.path()).await;
    let c = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", gw.url);
    let send = |body: String, key: Option<&str>| {
        let mut r = c
            .post(&url)
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    let cases: Vec<(String, Option<&str>, u16, &str, &str)> = vec![
        ("{}".into(), None, 401, "authentication_error", "API key"),
        (
            "{}".into(),
            Some("wrong"),
            401,
            "authentication_error",
            "API key",
        ),
        (
            "{not json".into(),
            Some("k2"),
            400,
            "invalid_request_error",
            "invalid JSON",
        ),
        (
            r#"{"model":"r"}"#.into(),
            Some("k1"),
            400,
            "invalid_request_error",
            "missing field `messages`",
        ),
        (
            r#"{"model":"r","messages":[]}"#.into(),
            Some("k1"),
            400,
            "invalid_request_error",
            "must not be empty",
        ),
        (
            r#"{"model":"nope","messages":[{"role":"user","content":"hi"}]}"#.into(),
            Some("k1"),
            404,
            "invalid_request_error",
            "`nope` does not exist",
        ),
        (
            format!(
                r#"{{"model":"r","messages":[{{"role":"user","content":"{}"}}]}}"#,
                "x".repeat(5000)
            ),
            Some("k1"),
            413,
            "invalid_request_error",
            "over the limit",
        ),
    ];
    for (body, key, status, kind, needle) in cases {
        let r = send(body.clone(), key).await.unwrap();
        assert_eq!(r.status().as_u16(), status, "{body:.60}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["type"], kind, "{e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(needle),
            "{e}"
        );
    }
    let r = send(chat_body("r", "hi").to_string(), Some("k1"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(format!("{}/v1/nothing", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.json::<Value>().await.unwrap()["error"]["message"].is_string());
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 405);
    let r = c
        .get(format!("{}/v1/models", gw.url))
        .bearer_auth("k1")
        .send()
        .await
        .unwrap();
    let models: Value = r.json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "r");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_is_openai_chunks_and_matches_the_plain_answer() {
    setup_env();
    let (_s, s_url) = mock(small_reply()).await;
    let (_l, l_url) = mock(reply(|_| ("one two  three\nfour".into(), -0.1))).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}[[route]]\nname = \"t\"\nkind = \"cascade\"\nsmall = \"small\"\nlarge = \"large\"\nthreshold = 1.0\nexplore = 0.0\n",
        upstreams(&s_url, &l_url, "token:10:30")
    );
    let gw = start(&cfg, dir.path()).await;
    let mut body = chat_body("t", "hard one");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = post_chat(&gw.url, &body).await;
    assert_eq!(r.status(), 200);
    assert!(header(&r, "content-type").starts_with("text/event-stream"));
    assert_eq!(header(&r, "x-tandem-role"), "large");
    let text = r.text().await.unwrap();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").unwrap())
        .collect();
    assert_eq!(*events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "one two  three\nfour");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert!(last["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    // An accepted small answer was judged whole, then sent as the same kind of stream.
    let mut body = chat_body("t", "easy one");
    body["stream"] = json!(true);
    let r = post_chat(&gw.url, &body).await;
    assert_eq!(header(&r, "x-tandem-role"), "small");
    let text = r.text().await.unwrap();
    let content: String = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(content, "the answer is 4");
    gw.stop().await;
}

fn data_events(text: &str) -> Vec<&str> {
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_streams_pass_through_with_their_timeouts_and_budget() {
    setup_env();
    let (_s, s_url) = mock(small_reply()).await;
    let (large, l_url) = mock(reply(|_| ("one two three four".into(), -0.1))).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}[[route]]\nname = \"t\"\nkind = \"cascade\"\nsmall = \"small\"\nlarge = \"large\"\nthreshold = 1.0\nexplore = 0.0\n[route.budget]\nmax_usd = 1.0\n\
         [[route]]\nname = \"direct\"\nkind = \"fixed\"\nupstream = \"large\"\n",
        upstreams(&s_url, &l_url, "token:10:30")
    );
    let gw = start(&cfg, dir.path()).await;
    let stream_body = |route: &str, text: &str| {
        let mut b = chat_body(route, text);
        b["stream"] = json!(true);
        b["stream_options"] = json!({"include_usage": true});
        b
    };
    // An escalated cascade streams the large answer from its upstream as it comes.
    let r = post_chat(&gw.url, &stream_body("t", "hard one")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-tandem-role"), "large");
    assert_eq!(
        header(&r, "x-tandem-cost-usd"),
        "",
        "the cost is only known at the end"
    );
    let text = r.text().await.unwrap();
    let ev = data_events(&text);
    assert_eq!(*ev.last().unwrap(), "[DONE]");
    let last: Value = serde_json::from_str(ev[ev.len() - 2]).unwrap();
    // 3 prompt tokens at $10/M and 4 completion tokens at $30/M: 150 micro-dollars, settled.
    assert_eq!(last["usage"]["completion_tokens"], 4);
    let spent = gw.gateway.routes()[0].budget.spent();
    assert_eq!((spent.calls, spent.micros), (1, 150));
    assert!(last["tandem"]["cost_usd"].as_f64().unwrap() >= 150e-6);
    assert_eq!(large.last.lock().unwrap()["stream"], true);

    // Cut mid-stream: the client gets the pieces so far, then an error event.
    large.mode.store(CUT, Ordering::SeqCst);
    let text = post_chat(&gw.url, &stream_body("direct", "x"))
        .await
        .text()
        .await
        .unwrap();
    let ev = data_events(&text);
    let last: Value = serde_json::from_str(ev.last().unwrap()).unwrap();
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ended before its finish"),
        "{text}"
    );
    // Stalled between pieces (idle timeout 150 ms).
    large.mode.store(OK, Ordering::SeqCst);
    large.chunk_delay_ms.store(400, Ordering::SeqCst);
    let text = post_chat(&gw.url, &stream_body("direct", "x"))
        .await
        .text()
        .await
        .unwrap();
    let last: Value = serde_json::from_str(data_events(&text).last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_timeout", "{text}");
    // No first byte within the first-token timeout (200 ms): a plain 504 before any stream.
    large.chunk_delay_ms.store(0, Ordering::SeqCst);
    large.delay_ms.store(1000, Ordering::SeqCst);
    let r = post_chat(&gw.url, &stream_body("direct", "x")).await;
    assert_eq!(r.status(), 504);
    gw.stop().await;
}

async fn feedback(url: &str, id: &str, correct: bool) -> u16 {
    reqwest::Client::new()
        .post(format!("{url}/v1/feedback"))
        .json(&json!({"response_id": id, "correct": correct}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

/// "proof" prompts need the large model (the small one is wrong on them), "capital" prompts do
/// not. Returns the share of each kind that went to the large model over `n` requests.
async fn route_round(url: &str, n: usize, offset: usize, learn: bool) -> (f64, f64) {
    let (mut proof_large, mut capital_large) = (0, 0);
    for i in 0..n {
        let proof = i % 2 == 0;
        let text = if proof {
            format!("give a proof of lemma {}", i + offset)
        } else {
            format!("what is the capital of country {}", i + offset)
        };
        let mut body = chat_body("rb", &text);
        if !learn {
            body["tandem"] = json!({"no_learn": true});
        }
        let r = post_chat(url, &body).await;
        assert_eq!(r.status(), 200);
        let role = header(&r, "x-tandem-role");
        let id = r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let large = role == "large";
        if learn {
            // The truth as a user would report it: the small model fails proofs.
            let correct = large || !proof;
            assert_eq!(feedback(url, &id, correct).await, 200);
            assert_eq!(
                feedback(url, &id, correct).await,
                404,
                "feedback counts once"
            );
        }
        if proof {
            proof_large += usize::from(large);
        } else {
            capital_large += usize::from(large);
        }
    }
    let half = (n / 2) as f64;
    (proof_large as f64 / half, capital_large as f64 / half)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_before_learns_from_feedback_and_survives_a_restart() {
    setup_env();
    let (_s, s_url) = mock(small_reply()).await;
    let (_l, l_url) = mock(large_reply()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[server]\nstate_dir = \"state\"\n{}[[route]]\nname = \"rb\"\nkind = \"route_before\"\nsmall = \"small\"\nlarge = \"large\"\ntarget_share = 0.5\nexplore = 0.1\n",
        upstreams(&s_url, &l_url, "token:10:30")
    );
    let gw = start(&cfg, dir.path()).await;
    for round in 0..4 {
        route_round(&gw.url, 100, round * 100, true).await;
        gw.gateway.flush().await.unwrap();
    }
    let (proof, capital) = route_round(&gw.url, 100, 10_000, false).await;
    assert!(
        proof > 0.75 && capital < 0.25,
        "large share: proofs {proof}, capitals {capital}"
    );
    let before = gw.gateway.routes()[0]
        .counters
        .requests
        .load(Ordering::SeqCst);
    gw.stop().await;
    assert!(dir.path().join("state/rb.state").exists());

    // A new process on the same state: same counters, same routing.
    let gw = start(&cfg, dir.path()).await;
    assert_eq!(
        gw.gateway.routes()[0]
            .counters
            .requests
            .load(Ordering::SeqCst),
        before
    );
    let (proof2, capital2) = route_round(&gw.url, 100, 10_000, false).await;
    assert!(
        proof2 > 0.75 && capital2 < 0.25,
        "after restart: proofs {proof2}, capitals {capital2}"
    );
    let m = reqwest::get(format!("{}/metrics", gw.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("tandem_overhead_seconds_bucket"), "{m:.400}");
    assert!(m.contains("tandem_requests_total"));
    gw.stop().await;
}

/// A route-before router that reads MiniLM sentence vectors beside its n-grams (needs the
/// `minilm` asset; skips without it unless TANDEM_REQUIRE_ASSETS=1): it learns from feedback,
/// its neighbour memory survives a restart, and the settings it cannot use are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_before_router_reads_sentence_vectors() {
    use tandem_models::assets::{find, Store};
    let installed = find("minilm").is_ok_and(|a| Store::default_home().is_installed(a));
    if !installed {
        assert!(
            std::env::var("TANDEM_REQUIRE_ASSETS").map_or(true, |v| v != "1"),
            "minilm is not installed; run scripts/setup minilm"
        );
        eprintln!("skipping: minilm is not installed (scripts/setup minilm)");
        return;
    }
    setup_env();
    let (_s, s_url) = mock(small_reply()).await;
    let (_l, l_url) = mock(large_reply()).await;
    let dir = tempfile::tempdir().unwrap();
    let ups = upstreams(&s_url, &l_url, "token:10:30");
    let cfg = format!(
        "[server]\nstate_dir = \"state\"\n{ups}[[route]]\nname = \"rb\"\nkind = \"route_before\"\nsmall = \"small\"\nlarge = \"large\"\ntarget_share = 0.5\nexplore = 0.1\nembeddings = \"minilm\"\n"
    );
    let gw = start(&cfg, dir.path()).await;
    for round in 0..3 {
        route_round(&gw.url, 100, round * 100, true).await;
        gw.gateway.flush().await.unwrap();
    }
    let (proof, capital) = route_round(&gw.url, 100, 10_000, false).await;
    assert!(
        proof > 0.75 && capital < 0.25,
        "large share: proofs {proof}, capitals {capital}"
    );
    gw.stop().await;
    let state = std::fs::read(dir.path().join("state/rb.state")).unwrap();
    assert!(
        state.windows(8).any(|w| w == b"TNDKNN01"),
        "the state holds the neighbour memory"
    );

    // A new process on the same state routes the same.
    let gw = start(&cfg, dir.path()).await;
    let (proof2, capital2) = route_round(&gw.url, 100, 10_000, false).await;
    assert!(
        proof2 > 0.75 && capital2 < 0.25,
        "after restart: proofs {proof2}, capitals {capital2}"
    );
    gw.stop().await;

    // The route may stop reading vectors and keep what it learned (the neighbour memory is
    // dropped; its n-gram weights serve), and start again (the memory starts empty, the
    // vectors' weights in the linear models are still there): its state loads both ways.
    let plain = cfg.replace("embeddings = \"minilm\"\n", "");
    for (text, sharp) in [(&plain, false), (&cfg, true)] {
        let gw = start(text, dir.path()).await;
        let health = reqwest::get(format!("{}/health", gw.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!health.contains("rb.state"), "{health}");
        let (proof3, capital3) = route_round(&gw.url, 100, 10_000, false).await;
        // Without the vectors the scores are flatter than the share the gate learned on them:
        // it serves, and still sends proofs up more often, until its window recalibrates.
        let ok = if sharp {
            proof3 > 0.75 && capital3 < 0.25
        } else {
            proof3 > capital3
        };
        assert!(ok, "vectors {sharp}: proofs {proof3}, capitals {capital3}");
        gw.stop().await;
    }
    // A prior trained without vectors, on a route that reads them: the fix is named.
    let plain_prior = tandem_core::prior::Prior {
        info: tandem_core::prior::PriorInfo {
            version: tandem_core::prior::PRIOR_VERSION,
            router: None,
            cascade: None,
            trained_on: vec![],
            embedder: None,
            epochs: 1,
            seed: 0,
        },
        router: Some(
            tandem_core::policy::router::GainRouter::new(tandem_server::route::router_config(None))
                .unwrap(),
        ),
        cascade: None,
    };
    plain_prior.save(&dir.path().join("plain.prior")).unwrap();
    for (text, needles) in [
        (
            format!("{ups}[[route]]\nname = \"r\"\nkind = \"route_before\"\nsmall = \"small\"\nlarge = \"large\"\ntarget_share = 0.5\nembeddings = \"minilm\"\nprior = \"plain.prior\"\n"),
            vec!["route[0].prior", "without sentence vectors", "tandem train --embed"],
        ),
        (
            format!("{ups}[[route]]\nname = \"c\"\nkind = \"cascade\"\nsmall = \"small\"\nlarge = \"large\"\nthreshold = 0.5\nembeddings = \"minilm\"\n"),
            vec!["route[0].embeddings", "route_before"],
        ),
        (
            format!("{ups}[[route]]\nname = \"r\"\nkind = \"route_before\"\nsmall = \"small\"\nlarge = \"large\"\ntarget_share = 0.5\nembeddings = \"bert\"\n"),
            vec!["embeddings", "bert", "minilm"],
        ),
    ] {
        let msg = match toml::from_str::<tandem_server::ServerConfig>(&text) {
            Err(e) => e.to_string(),
            Ok(c) => c
                .validate(Path::new("test.toml"), dir.path().to_path_buf())
                .err()
                .unwrap()
                .to_string(),
        };
        for n in needles {
            assert!(msg.contains(n), "{n:?} not in {msg}");
        }
    }
}

/// A bad state file (garbage, truncated, a learner header that lies about its size, NaN
/// weights) stops only its own route's large calls: the gateway starts, the other routes serve,
/// the route answers from its small model (or 503 when it has none to fall back on), `/health`
/// names the file, and the file is left as it was for the operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_state_file_closes_its_route_only() {
    setup_env();
    let (_s, s_url) = mock(small_reply()).await;
    let (large, l_url) = mock(large_reply()).await;
    let cfg = format!(
        "[server]\nstate_dir = \"state\"\n{}[[route]]\nname = \"rb\"\nkind = \"route_before\"\nsmall = \"small\"\nlarge = \"large\"\ntarget_share = 0.5\n\
         [[route]]\nname = \"direct\"\nkind = \"fixed\"\nupstream = \"large\"\non_exhausted = \"refuse\"\n\
         [[route]]\nname = \"healthy\"\nkind = \"fixed\"\nupstream = \"large\"\n",
        upstreams(&s_url, &l_url, "token:10:30")
    );
    // A good route_before state to corrupt in several ways.
    let good = {
        let dir = tempfile::tempdir().unwrap();
        let gw = start(&cfg, dir.path()).await;
        post_chat(&gw.url, &chat_body("rb", "hello")).await;
        gw.stop().await;
        std::fs::read(dir.path().join("state/rb.state")).unwrap()
    };
    // Version 2: magic, version, header length (u32), weights length (u64), checksum, header,
    // weights. A damaged one fails its checksum; the learners' own checks are exercised through
    // version 1 files (no checksum), which are still read.
    assert_eq!(&good[..8], b"TNDMSTAT");
    let header_len = u32::from_le_bytes(good[12..16].try_into().unwrap()) as usize;
    let mut v1 = b"TNDMSRV1".to_vec();
    v1.extend_from_slice(&(header_len as u32).to_le_bytes());
    v1.extend_from_slice(&good[32..]);
    let learner = 12 + header_len; // the router's first learner checkpoint starts here
    let mut lying = v1.clone();
    lying[learner + 8..learner + 12].copy_from_slice(&28u32.to_le_bytes());
    lying[learner + 12..learner + 16].copy_from_slice(&1024u32.to_le_bytes());
    let mut nan = v1.clone();
    let w = learner + 32 + 4 * 11;
    nan[w..w + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let mut flipped = good.clone();
    let at = 32 + header_len + 100;
    flipped[at] ^= 0x20;
    let cases: [(&str, Vec<u8>, &str); 5] = [
        (
            "garbage",
            b"garbage-garbage-garbage".to_vec(),
            "not a tandem route state file",
        ),
        ("truncated", good[..good.len() / 2].to_vec(), "truncated"),
        ("lying header", lying, "truncated after"),
        ("NaN weight", nan, "not a number"),
        ("a flipped bit", flipped, "checksum mismatch"),
    ];
    for (what, bytes, needle) in cases {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("state")).unwrap();
        let path = dir.path().join("state/rb.state");
        std::fs::write(&path, &bytes).unwrap();
        std::fs::write(dir.path().join("state/direct.state"), b"junk").unwrap();
        let calls = large.calls();
        let gw = start(&cfg, dir.path()).await;
        let health: Value = reqwest::get(format!("{}/health", gw.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(health["status"], "degraded", "{what}: {health}");
        let why = health["routes"]["rb"]["state_refused"].as_str().unwrap();
        assert!(
            why.contains("rb.state") && why.contains(needle),
            "{what}: {why}"
        );
        // The operator's file is at fault, not the gateway.
        assert!(!why.contains("internal error"), "{what}: {why}");
        // Its large model is closed, even when forced; its small model serves.
        let mut body = chat_body("rb", "anything");
        body["tandem"] = json!({"force": "large"});
        let r = post_chat(&gw.url, &body).await;
        assert_eq!(r.status(), 200, "{what}");
        assert_eq!(header(&r, "x-tandem-role"), "small", "{what}");
        assert_eq!(header(&r, "x-tandem-capped"), "true", "{what}");
        // A route with nothing to fall back on refuses, saying why.
        let r = post_chat(&gw.url, &chat_body("direct", "x")).await;
        assert_eq!(r.status(), 503, "{what}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], "route_state_refused");
        // The other routes serve.
        assert_eq!(
            post_chat(&gw.url, &chat_body("healthy", "x"))
                .await
                .status(),
            200
        );
        assert_eq!(
            large.calls(),
            calls + 1,
            "{what}: only the healthy route called large"
        );
        gw.stop().await;
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "{what}: the file is left as it was"
        );
        assert!(dir.path().join("state/healthy.state").exists());
    }
}

/// The router sees the tools a request offers: with the same words, requests offering the
/// `calculator` tool need the large model (the small one calls it wrongly), the others do not,
/// and the router's score learns it.
/// Feedback grades the tool-call answers by `reference` (the call as `name(arguments)`). No
/// exploration: what is learned comes from the feedback alone (both mocks answer alike).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_before_learns_from_the_tools_offered() {
    setup_env();
    let (_s, s_url) = mock(small_reply()).await;
    let (_l, l_url) = mock(large_reply()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}[[route]]\nname = \"rb\"\nkind = \"route_before\"\nsmall = \"small\"\nlarge = \"large\"\ntarget_share = 0.5\nexplore = 0.0\n",
        upstreams(&s_url, &l_url, "token:10:30")
    );
    let gw = start(&cfg, dir.path()).await;
    let tools = json!([{"type": "function", "function": {"name": "calculator",
        "parameters": {"type": "object", "properties": {"expr": {"type": "string"}}, "required": ["expr"]}}}]);
    let round = |n: usize, offset: usize, learn: bool| {
        let (url, tools) = (gw.url.clone(), tools.clone());
        async move {
            // The router's score (the large model's expected gain) per kind.
            let (mut with_score, mut without_score) = (0.0f64, 0.0f64);
            for i in 0..n {
                let offers = i % 2 == 0;
                let mut body = chat_body("rb", &format!("please help with item {}", i + offset));
                if offers {
                    body["tools"] = tools.clone();
                }
                if !learn {
                    body["tandem"] = json!({"no_learn": true});
                }
                let r = post_chat(&url, &body).await;
                assert_eq!(r.status(), 200);
                let large = header(&r, "x-tandem-role") == "large";
                let score: f64 = header(&r, "x-tandem-score").parse().unwrap();
                let v: Value = r.json().await.unwrap();
                if learn {
                    let id = v["id"].as_str().unwrap();
                    // The large model's answer is right; the small one's only without tools.
                    let correct = large || !offers;
                    assert_eq!(feedback(&url, id, correct).await, 200);
                }
                if offers {
                    with_score += score;
                } else {
                    without_score += score;
                }
            }
            let half = (n / 2) as f64;
            (with_score / half, without_score / half)
        }
    };
    for r in 0..4 {
        round(100, r * 100, true).await;
        gw.gateway.flush().await.unwrap();
    }
    let (with, without) = round(100, 10_000, false).await;
    // Same words on both kinds: only the tools tell them apart (a router blind to them would
    // score both kinds alike: a gap of 0). Measured gaps: 0.15 to 0.18 over six runs. Which ones
    // go up then is the share controller's business.
    assert!(
        with - without > 0.08,
        "mean expected gain: with tools {with}, without {without}"
    );
    // A tool-call answer takes feedback by reference.
    let mut body = chat_body("rb", "anything");
    body["tools"] = tools.clone();
    body["tandem"] = json!({"force": "large"});
    let v: Value = post_chat(&gw.url, &body).await.json().await.unwrap();
    let id = v["id"].as_str().unwrap();
    let r = reqwest::Client::new()
        .post(format!("{}/v1/feedback", gw.url))
        .json(&json!({"response_id": id, "reference": "calculator({\"expr\": \"2+2\"})"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    gw.stop().await;
}

/// A route's cap lowers the client's own field, fills a field the client nulled, and leaves a
/// value that is not a number for the upstream to refuse; with no cap configured, nothing changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_cap_respects_the_clients_fields() {
    setup_env();
    let (_s, s_url) = mock(small_reply()).await;
    let (large, l_url) = mock(large_reply()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}[[route]]\nname = \"capped\"\nkind = \"fixed\"\nupstream = \"large\"\nmax_tokens = 50\n",
        upstreams(&s_url, &l_url, "token:10:30")
    );
    let gw = start(&cfg, dir.path()).await;
    let cases = [
        (json!({"max_tokens": 500}), json!({"max_tokens": 50})),
        (json!({"max_tokens": 20}), json!({"max_tokens": 20})),
        (
            json!({"max_completion_tokens": 900}),
            json!({"max_completion_tokens": 50}),
        ),
        (
            json!({"max_completion_tokens": null}),
            json!({"max_completion_tokens": 50}),
        ),
        (json!({"max_tokens": "abc"}), json!({"max_tokens": "abc"})),
        (json!({}), json!({"max_tokens": 50})),
    ];
    for (sent, want) in cases {
        let mut body = chat_body("capped", "hi");
        for (k, v) in sent.as_object().unwrap() {
            body[k] = v.clone();
        }
        post_chat(&gw.url, &body).await;
        let got = large.last.lock().unwrap().clone();
        for f in ["max_tokens", "max_completion_tokens"] {
            assert_eq!(got.get(f), want.get(f), "sent {sent}: {f} upstream");
        }
    }
    gw.stop().await;
}

/// A config with a capped route `one` (refusing when spent) and an uncapped route `free`, both on
/// the large upstream at $0.01 a call, its state in `state/`, saved only hourly: spend after a
/// crash can only come from the journal.
fn journaled_cfg(s_url: &str, l_url: &str, max_calls: u64) -> String {
    format!(
        "[server]\nstate_dir = \"state\"\npersist_interval_s = 3600\n{}\
         [[route]]\nname = \"one\"\nkind = \"fixed\"\nupstream = \"large\"\non_exhausted = \"refuse\"\n[route.budget]\nmax_calls = {max_calls}\n\
         [[route]]\nname = \"free\"\nkind = \"fixed\"\nupstream = \"large\"\n",
        upstreams(s_url, l_url, "call:0.01")
    )
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

async fn health(url: &str) -> Value {
    reqwest::get(format!("{url}/health"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Each large call's reservation is on disk before the call: the state directory as it is
/// while the gateway runs (what a `kill -9` leaves; the state file is not due for an hour)
/// keeps every call made, plain or streamed, so a gateway restarted on it refuses the call over
/// the cap. An uncapped route keeps no journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journaled_spend_survives_a_crash() {
    setup_env();
    let (_s, s_url) = mock(small_reply()).await;
    let (large, l_url) = mock(large_reply()).await;
    let cfg = journaled_cfg(&s_url, &l_url, 2);
    let dir = tempfile::tempdir().unwrap();
    let gw = start(&cfg, dir.path()).await;
    assert_eq!(
        post_chat(&gw.url, &chat_body("one", "a")).await.status(),
        200
    );
    let mut streamed = chat_body("one", "b");
    streamed["stream"] = json!(true);
    let r = post_chat(&gw.url, &streamed).await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("[DONE]"));
    assert_eq!(
        post_chat(&gw.url, &chat_body("free", "c")).await.status(),
        200
    );
    let crashed = tempfile::tempdir().unwrap();
    copy_dir(&dir.path().join("state"), &crashed.path().join("state"));
    assert!(
        !crashed.path().join("state/one.state").exists(),
        "no state file yet"
    );
    assert!(!crashed.path().join("state/free.journal").exists());
    gw.stop().await;
    let gw = start(&cfg, crashed.path()).await;
    let spent = gw.gateway.routes()[0].budget.spent();
    assert_eq!((spent.calls, spent.micros), (2, 20_000));
    let r = post_chat(&gw.url, &chat_body("one", "d")).await;
    assert_eq!(r.status(), 429);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "insufficient_quota");
    assert_eq!(
        large.calls(),
        3,
        "the call over the cap never reached the upstream"
    );
    assert_eq!(health(&gw.url).await["status"], "ok");
    gw.stop().await;
}

/// A reservation that cannot be written refuses its call with an OpenAI-shaped 503 — the
/// upstream is never called unpaid — and gives its budget back; once the disk is back, the
/// journal is rewritten whole and calls go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_that_cannot_be_written_refuses_large_calls() {
    setup_env();
    let (_s, s_url) = mock(small_reply()).await;
    let (large, l_url) = mock(large_reply()).await;
    let cfg = journaled_cfg(&s_url, &l_url, 100);
    let dir = tempfile::tempdir().unwrap();
    let gw = start(&cfg, dir.path()).await;
    assert_eq!(
        post_chat(&gw.url, &chat_body("one", "a")).await.status(),
        200
    );
    // The state directory goes away (a file in its place): nothing can be created in it, even
    // by root. The next compaction fails, and the journal must be rewritten before any append.
    let state = dir.path().join("state");
    let away = dir.path().join("state.away");
    std::fs::rename(&state, &away).unwrap();
    std::fs::write(&state, b"not a directory").unwrap();
    assert!(gw.gateway.flush().await.is_err());
    let mut streamed = chat_body("one", "s");
    streamed["stream"] = json!(true);
    for body in [
        chat_body("one", "b"),
        streamed.clone(),
        chat_body("one", "c"),
    ] {
        let r = post_chat(&gw.url, &body).await;
        assert_eq!(r.status(), 503);
        assert_eq!(header(&r, "x-should-retry"), "true");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], "spend_not_durable", "{e}");
        assert_eq!(e["error"]["type"], "server_error");
        assert!(
            e["error"]["message"]
                .as_str()
                .unwrap()
                .contains("one.journal"),
            "{e}"
        );
    }
    assert_eq!(large.calls(), 1, "no call was made unpaid");
    assert_eq!(
        gw.gateway.routes()[0].budget.spent().calls,
        1,
        "refused calls gave their reservation back"
    );
    // The uncapped route needs no journal.
    assert_eq!(
        post_chat(&gw.url, &chat_body("free", "f")).await.status(),
        200
    );
    std::fs::remove_file(&state).unwrap();
    std::fs::rename(&away, &state).unwrap();
    assert_eq!(post_chat(&gw.url, &streamed).await.status(), 200);
    assert_eq!(
        post_chat(&gw.url, &chat_body("one", "e")).await.status(),
        200
    );
    assert_eq!(large.calls(), 4);
    gw.stop().await;
    let gw = start(&cfg, dir.path()).await;
    assert_eq!(gw.gateway.routes()[0].budget.spent().calls, 3);
    gw.stop().await;
}

/// A damaged journal, or one missing while its state file says it exists, closes its route's
/// large model like a bad state file: `/health` names the file and the fault, the route refuses
/// with 503, the other routes serve, and the file is left as it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_or_missing_journal_closes_its_route() {
    setup_env();
    let (_s, s_url) = mock(small_reply()).await;
    let (large, l_url) = mock(large_reply()).await;
    let cfg = journaled_cfg(&s_url, &l_url, 100);
    let good = tempfile::tempdir().unwrap();
    let gw = start(&cfg, good.path()).await;
    assert_eq!(
        post_chat(&gw.url, &chat_body("one", "a")).await.status(),
        200
    );
    gw.stop().await;
    let journal = std::fs::read(good.path().join("state/one.journal")).unwrap();
    let mut flipped = journal.clone();
    let last = flipped.len() - 12;
    flipped[last] ^= 0x01;
    let cases: [(&str, Option<Vec<u8>>, &str); 4] = [
        ("flipped bit", Some(flipped), "compacted record"),
        (
            "garbage",
            Some(b"garbage, not a journal".to_vec()),
            "not a tandem spend journal",
        ),
        (
            "another route's",
            Some(b"TNDMJRNL".to_vec()),
            "truncated header",
        ),
        ("missing", None, "is missing"),
    ];
    for (what, bytes, needle) in cases {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&good.path().join("state"), &dir.path().join("state"));
        let path = dir.path().join("state/one.journal");
        match &bytes {
            Some(b) => std::fs::write(&path, b).unwrap(),
            None => std::fs::remove_file(&path).unwrap(),
        }
        let calls = large.calls();
        let gw = start(&cfg, dir.path()).await;
        let h = health(&gw.url).await;
        assert_eq!(h["status"], "degraded", "{what}: {h}");
        let why = h["routes"]["one"]["state_refused"].as_str().unwrap();
        assert!(
            why.contains("one.journal") && why.contains(needle),
            "{what}: {why}"
        );
        let r = post_chat(&gw.url, &chat_body("one", "x")).await;
        assert_eq!(r.status(), 503, "{what}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["code"], "route_state_refused");
        assert_eq!(
            post_chat(&gw.url, &chat_body("free", "x")).await.status(),
            200
        );
        assert_eq!(large.calls(), calls + 1, "{what}");
        gw.stop().await;
        assert_eq!(std::fs::read(&path).ok(), bytes, "{what}: left as it was");
    }
}

/// Two gateways on one `state_dir` would overwrite each other's spend (and pass a cap
/// together): the second refuses to start, naming the directory; once the first has stopped,
/// a new one starts there. Different directories start side by side.
#[tokio::test]
async fn a_state_dir_serves_one_gateway_at_a_time() {
    let (_m, url) = mock(reply(|_| ("ok".into(), -0.1))).await;
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let cfg = |state: &Path| {
        format!(
            "[server]\nstate_dir = \"{}\"\n[[upstream]]\nname = \"l\"\nkind = \"openai\"\nbase_url = \"{url}\"\nmodel = \"m\"\n[[route]]\nname = \"f\"\nkind = \"fixed\"\nupstream = \"l\"\n[route.budget]\nmax_calls = 10\n",
            state.display()
        )
    };
    let validated = |state: &Path| {
        let c: tandem_server::ServerConfig = toml::from_str(&cfg(state)).unwrap();
        c.validate(Path::new("t.toml"), PathBuf::new()).unwrap()
    };
    let first = start(&cfg(dir.path()), dir.path()).await;
    for _ in 0..3 {
        let e = match tandem_server::Gateway::start(&validated(dir.path())) {
            Ok(_) => panic!("a second gateway started on a state_dir in use"),
            Err(e) => e.to_string(),
        };
        assert!(
            e.contains(&dir.path().display().to_string()) && e.contains("in use"),
            "{e}"
        );
    }
    let side = start(&cfg(other.path()), other.path()).await;
    side.stop().await;
    first.stop().await;
    let again = start(&cfg(dir.path()), dir.path()).await;
    again.stop().await;
}

/// Route-before's exploration (`both`) calls the two models at once, not one after the other:
/// the large call is in flight while the slow small one still is. The pair then teaches the
/// router (one lesson, counted by the learner), unless the client said `no_learn`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_before_explores_with_both_models_at_once_and_learns_from_the_pair() {
    setup_env();
    let (small, s_url) = mock(small_reply()).await;
    let (large, l_url) = mock(large_reply()).await;
    small.delay_ms.store(1200, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}[[route]]\nname = \"rb\"\nkind = \"route_before\"\nsmall = \"small\"\nlarge = \"large\"\ntarget_share = 1.0\nexplore = 1.0\n",
        upstreams(&s_url, &l_url, "token:10:30")
    );
    let gw = start(&cfg, dir.path()).await;
    let learned = |gw: &Running| {
        gw.gateway.routes()[0]
            .counters
            .learned
            .load(Ordering::SeqCst)
    };
    for (k, no_learn) in [(1, false), (2, true)] {
        let url = gw.url.clone();
        let mut body = chat_body("rb", "easy sum");
        if no_learn {
            body["tandem"] = json!({"no_learn": true});
        }
        let pending = tokio::spawn(async move { post_chat(&url, &body).await });
        // Well inside the small model's 1.2 s: one after the other, the large one would not
        // have been called yet.
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        assert_eq!((small.calls(), large.calls()), (k, k), "request {k}");
        let r = pending.await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-tandem-role"), "large");
        assert_eq!(header(&r, "x-tandem-tiers-called"), "2");
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], "the answer is 4");
        assert_eq!(v["tandem"]["escalated"], true);
        gw.gateway.flush().await.unwrap();
        // The first pair taught the router; the second was not to be learned from.
        assert_eq!(learned(&gw), 1, "after request {k}");
    }
    // The large call ran without an S4L draft: none existed when it was sent.
    assert_eq!(large.bodies()[0]["messages"].as_array().unwrap().len(), 1);
    gw.stop().await;
}

/// Route-before's cheap pick is settled before any call: its answer streams straight from the
/// small model (the upstream is asked to stream), while a cascade's draft must first be judged
/// whole. A pick of the large model streams as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_before_streams_the_model_it_picked() {
    setup_env();
    let (small, s_url) = mock(small_reply()).await;
    let (large, l_url) = mock(large_reply()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}[[route]]\nname = \"cheap\"\nkind = \"route_before\"\nsmall = \"small\"\nlarge = \"large\"\ntarget_share = 0.0\nexplore = 0.0\n\
         [[route]]\nname = \"dear\"\nkind = \"route_before\"\nsmall = \"small\"\nlarge = \"large\"\ntarget_share = 1.0\nexplore = 0.0\n\
         [[route]]\nname = \"c\"\nkind = \"cascade\"\nsmall = \"small\"\nlarge = \"large\"\nthreshold = 1.0\nexplore = 0.0\ngate = \"learned\"\n",
        upstreams(&s_url, &l_url, "token:10:30")
    );
    let gw = start(&cfg, dir.path()).await;
    for (route, role, mock_called, streamed) in [
        ("cheap", "small", &small, true),
        ("dear", "large", &large, true),
        ("c", "small", &small, false),
    ] {
        let before = mock_called.calls();
        let mut body = chat_body(route, "easy sum");
        body["stream"] = json!(true);
        let r = post_chat(&gw.url, &body).await;
        assert_eq!(r.status(), 200, "{route}");
        assert!(header(&r, "content-type").starts_with("text/event-stream"));
        assert_eq!(header(&r, "x-tandem-role"), role, "{route}");
        assert_eq!(header(&r, "x-tandem-tiers-called"), "1", "{route}");
        let text = r.text().await.unwrap();
        assert!(text.trim_end().ends_with("data: [DONE]"), "{route}: {text}");
        let content: String = text
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(String::from)
            })
            .collect();
        assert_eq!(content, "the answer is 4", "{route}");
        assert_eq!(mock_called.calls(), before + 1, "{route}");
        let sent = mock_called.bodies().last().cloned().unwrap();
        assert_eq!(sent["stream"] == json!(true), streamed, "{route}: {sent}");
    }
    assert_eq!(large.calls(), 1);
    gw.stop().await;
}

/// Three mocks as tiers t0 (sure of easy prompts), t1 (the same) and t2 (the top), priced
/// cheapest first, and their upstream config; route `t` over them gets `route_extra`.
async fn three_tiers(route_extra: &str) -> ([std::sync::Arc<Mock>; 3], String) {
    let up = |name: &str, url: &str, price: &str| {
        format!(
            "[[upstream]]\nname = \"{name}\"\nkind = \"openai\"\nbase_url = \"{url}\"\nmodel = \"{name}-model\"\nlogprobs = true\nprice = \"{price}\"\ntimeout_ms = 2000\n"
        )
    };
    let (t0, u0) = mock(small_reply()).await;
    let (t1, u1) = mock(small_reply()).await;
    let (t2, u2) = mock(large_reply()).await;
    let cfg = format!(
        "{}{}{}[[route]]\nname = \"t\"\nkind = \"cascade\"\ntiers = [\"t0\", \"t1\", \"t2\"]\nthreshold = 1.0\nexplore = 0.0\n{route_extra}",
        up("t0", &u0, "token:0.1:0.1"),
        up("t1", &u1, "token:1:2"),
        up("t2", &u2, "token:10:30")
    );
    ([t0, t1, t2], cfg)
}

/// A forced request on a cascade of tiers still says which tier served and how many were called:
/// the top for `large`, the cheapest for `small`, and both when the cheapest fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_request_on_tiers_names_its_tier() {
    setup_env();
    let ([t0, t1, t2], cfg) = three_tiers("").await;
    let dir = tempfile::tempdir().unwrap();
    let gw = start(&cfg, dir.path()).await;
    for (force, stream, fail_cheapest, tier, called, role) in [
        ("large", false, false, "2", "1", "large"),
        ("large", true, false, "2", "1", "large"),
        ("small", false, false, "0", "1", "small"),
        ("small", true, false, "0", "1", "small"),
        ("small", false, true, "2", "2", "large"),
    ] {
        t0.mode
            .store(if fail_cheapest { FAIL_500 } else { OK }, Ordering::SeqCst);
        let mut body = chat_body("t", "hard proof");
        body["tandem"] = json!({"force": force});
        body["stream"] = json!(stream);
        let r = post_chat(&gw.url, &body).await;
        let what = format!("force {force}, stream {stream}, cheapest failing {fail_cheapest}");
        assert_eq!(r.status(), 200, "{what}");
        assert_eq!(header(&r, "x-tandem-tier-index"), tier, "{what}");
        assert_eq!(header(&r, "x-tandem-tiers-called"), called, "{what}");
        assert_eq!(header(&r, "x-tandem-role"), role, "{what}");
        let _ = r.text().await.unwrap();
    }
    // Forcing skips the walk: the middle tier is never asked; the top answered three times.
    assert_eq!(t1.calls(), 0);
    assert_eq!(t2.calls(), 3);
    gw.stop().await;
}

/// A cascade whose cheapest tier is down and whose budget refuses every tier above it answers
/// with the cheapest tier's error at once: the walk never goes back to a tier that failed (it
/// once did, in a loop that logged without end).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_cheapest_tier_under_a_refusing_budget_fails_fast() {
    setup_env();
    // One micro-dollar: no step up ever fits.
    let ([t0, t1, t2], cfg) = three_tiers("[route.budget]\nmax_usd = 0.000001\n").await;
    t0.mode.store(FAIL_500, Ordering::SeqCst);
    let dir = tempfile::tempdir().unwrap();
    let gw = start(&cfg, dir.path()).await;
    for stream in [false, true] {
        let mut body = chat_body("t", "hard proof");
        body["stream"] = json!(stream);
        let r = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            post_chat(&gw.url, &body),
        )
        .await
        .expect("the request ends");
        assert!(r.status().is_server_error(), "{}", r.status());
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["type"], "upstream_error", "{e}");
    }
    assert_eq!((t1.calls(), t2.calls()), (0, 0));
    gw.stop().await;
}

/// A route-before route starts from a prior (`tandem train`): from its first requests it sends
/// the prompts the prior learned need the large model there, and the others to the small one.
/// A prior the route cannot use is refused at start, naming the field and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_starts_from_its_prior() {
    use tandem_core::policy::router::GainRouter;
    use tandem_core::policy::{Observation, RouteScorer};
    use tandem_core::prior::{Prior, PriorInfo, PRIOR_VERSION};
    setup_env();
    let (small, s_url) = mock(small_reply()).await;
    let (large, l_url) = mock(large_reply()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut router = GainRouter::new(tandem_server::route::router_config(None)).unwrap();
    for i in 0..400 {
        let proof = i % 2 == 0;
        let text = if proof {
            format!("give a proof of lemma {i}")
        } else {
            format!("name the capital of country {i}")
        };
        let q = tandem_core::Query::text(format!("t{i}"), text);
        router.learn(
            &q,
            &Observation {
                weak: Some(if proof { 0.0 } else { 1.0 }),
                strong: Some(1.0),
            },
        );
    }
    let info = PriorInfo {
        version: PRIOR_VERSION,
        router: None,
        cascade: None,
        trained_on: vec![],
        embedder: None,
        epochs: 1,
        seed: 0,
    };
    let prior = Prior {
        info: info.clone(),
        router: Some(router),
        cascade: None,
    };
    prior.save(&dir.path().join("rb.prior")).unwrap();
    let ups = upstreams(&s_url, &l_url, "token:10:30");
    let cfg = format!(
        "{ups}[[route]]\nname = \"rb\"\nkind = \"route_before\"\nsmall = \"small\"\nlarge = \"large\"\ntarget_share = 0.5\nexplore = 0.0\nprior = \"rb.prior\"\n"
    );
    let gw = start(&cfg, dir.path()).await;
    let mut wrong = 0;
    for i in 0..40 {
        let proof = i % 2 == 0;
        let text = if proof {
            format!("give a proof of theorem {}", 1000 + i)
        } else {
            format!("name the capital of state {}", 1000 + i)
        };
        let r = post_chat(&gw.url, &chat_body("rb", &text)).await;
        assert_eq!(r.status(), 200);
        let large_served = header(&r, "x-tandem-role") == "large";
        // The share controller needs a few scores before it holds its share.
        if i >= 6 && large_served != proof {
            wrong += 1;
        }
    }
    assert!(wrong <= 2, "{wrong} of 34 routed against the prior");
    assert!(small.calls() >= 15 && large.calls() >= 15);
    gw.stop().await;

    // Priors the route cannot use.
    let cascade_only = Prior {
        info,
        router: None,
        cascade: Some(
            tandem_core::policy::cascade::ResponseCascade::new(
                tandem_server::route::cascade_config(),
            )
            .unwrap(),
        ),
    };
    cascade_only.save(&dir.path().join("c.prior")).unwrap();
    let wide = Prior {
        router: Some(
            GainRouter::new(tandem_core::policy::router::RouterConfig {
                bits: 12,
                ..tandem_server::route::router_config(None)
            })
            .unwrap(),
        ),
        ..cascade_only.clone()
    };
    wide.save(&dir.path().join("wide.prior")).unwrap();
    // `tandem train --no-metadata`, alone and with other bits; a cascade scorer of other bits.
    let router_with = |bits: u32, use_metadata: bool| Prior {
        router: Some(
            GainRouter::new(tandem_core::policy::router::RouterConfig {
                bits,
                use_metadata,
                ..tandem_server::route::router_config(None)
            })
            .unwrap(),
        ),
        ..cascade_only.clone()
    };
    router_with(18, false)
        .save(&dir.path().join("nometa.prior"))
        .unwrap();
    router_with(12, false)
        .save(&dir.path().join("both.prior"))
        .unwrap();
    let wide_cascade = Prior {
        router: None,
        cascade: Some(
            tandem_core::policy::cascade::ResponseCascade::new(
                tandem_core::policy::cascade::CascadeConfig {
                    bits: 12,
                    ..tandem_server::route::cascade_config()
                },
            )
            .unwrap(),
        ),
        ..cascade_only.clone()
    };
    wide_cascade.save(&dir.path().join("wc.prior")).unwrap();
    // `tandem train --embed` on files with responses: a cascade scorer that reads vectors.
    let vector_cascade = Prior {
        router: None,
        cascade: Some(
            tandem_core::policy::cascade::ResponseCascade::new(
                tandem_server::route::cascade_config().with_embeddings(384),
            )
            .unwrap(),
        ),
        ..cascade_only.clone()
    };
    vector_cascade.save(&dir.path().join("vc.prior")).unwrap();
    std::fs::write(
        dir.path().join("junk.prior"),
        "{\"not\": \"a prior at all\"}",
    )
    .unwrap();
    let route = |kind: &str, extra: &str, prior: &str| {
        format!(
            "{ups}[[route]]\nname = \"r\"\nkind = \"{kind}\"\nsmall = \"small\"\nlarge = \"large\"\n{extra}prior = \"{prior}\"\n"
        )
    };
    for (text, needles) in [
        (
            route("route_before", "target_share = 0.5\n", "missing.prior"),
            vec!["route[0].prior", "missing.prior", "cannot read"],
        ),
        (
            route("route_before", "target_share = 0.5\n", "junk.prior"),
            vec!["route[0].prior", "not a prior file"],
        ),
        (
            route("route_before", "target_share = 0.5\n", "c.prior"),
            vec!["route[0].prior", "holds no router"],
        ),
        (
            route("route_before", "target_share = 0.5\n", "wide.prior"),
            vec![
                "route[0].prior",
                "trained with `--bits 12` and this one has 18: train it with `--bits 18`",
            ],
        ),
        (
            route("route_before", "target_share = 0.5\n", "nometa.prior"),
            vec![
                "route[0].prior",
                "nometa.prior: its router does not match the gateway's: it was trained with `--no-metadata`",
                "train it without `--no-metadata`",
            ],
        ),
        (
            route("route_before", "target_share = 0.5\n", "both.prior"),
            vec![
                "route[0].prior",
                "train it with `--bits 18`; it was trained with `--no-metadata`",
            ],
        ),
        (
            route(
                "cascade",
                "threshold = 0.5\ngate = \"learned\"\n",
                "wc.prior",
            ),
            vec!["route[0].prior", "its cascade scorer", "train it with `--bits 18`"],
        ),
        (
            route(
                "cascade",
                "threshold = 0.5\ngate = \"learned\"\n",
                "rb.prior",
            ),
            vec!["route[0].prior", "holds no cascade scorer"],
        ),
        (
            route(
                "cascade",
                "threshold = 0.5\ngate = \"learned\"\n",
                "vc.prior",
            ),
            vec![
                "route[0].prior",
                "reads sentence vectors",
                "without --embed",
            ],
        ),
        (
            route(
                "cascade",
                "threshold = 0.5\ngate = \"logprob\"\n",
                "rb.prior",
            ),
            vec!["route[0].prior", "applies to route_before routes"],
        ),
    ] {
        let cfg: tandem_server::ServerConfig = toml::from_str(&text).unwrap();
        let e = cfg
            .validate(Path::new("test.toml"), dir.path().to_path_buf())
            .err()
            .unwrap()
            .to_string();
        for n in needles {
            assert!(e.contains(n), "expected {n:?} in: {e}");
        }
        assert!(!e.contains("Config {"), "a Rust struct in: {e}");
    }
}

/// On a route that refuses when its budget is spent, an exploration the budget cannot pay for
/// still serves the small answer it already paid for: exploring is the gateway's wish, not the
/// client's. A large pick the budget refuses is still a 429, before anything is called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_exploration_serves_the_small_answer_on_a_refusing_route() {
    setup_env();
    let (small, s_url) = mock(small_reply()).await;
    let (large, l_url) = mock(large_reply()).await;
    let dir = tempfile::tempdir().unwrap();
    let ups = upstreams(&s_url, &l_url, "token:10:30");
    let cfg = format!(
        "{ups}[[route]]\nname = \"explore\"\nkind = \"route_before\"\nsmall = \"small\"\nlarge = \"large\"\ntarget_share = 1.0\nexplore = 1.0\non_exhausted = \"refuse\"\n[route.budget]\nmax_calls = 1\n\
         [[route]]\nname = \"large\"\nkind = \"route_before\"\nsmall = \"small\"\nlarge = \"large\"\ntarget_share = 1.0\nexplore = 0.0\non_exhausted = \"refuse\"\n[route.budget]\nmax_calls = 1\n"
    );
    let gw = start(&cfg, dir.path()).await;
    for (route, second_status, second_role) in [("explore", 200, "small"), ("large", 429, "")] {
        let (s0, l0) = (small.calls(), large.calls());
        let r = post_chat(&gw.url, &chat_body(route, "hard proof")).await;
        assert_eq!(r.status(), 200, "{route}");
        assert_eq!(header(&r, "x-tandem-role"), "large", "{route}");
        let r = post_chat(&gw.url, &chat_body(route, "hard proof")).await;
        assert_eq!(r.status(), second_status, "{route}");
        assert_eq!(header(&r, "x-tandem-role"), second_role, "{route}");
        // One large call each; the small model is asked only where its answer can serve.
        assert_eq!(large.calls() - l0, 1, "{route}");
        let small_calls = if route == "explore" { 2 } else { 0 };
        assert_eq!(small.calls() - s0, small_calls, "{route}");
    }
    gw.stop().await;
}

/// A two-model route's learned state is about its two models: restarted with other models, its
/// state file is refused (the route's large model closed, `/health` says why), as a cascade of
/// tiers' is, instead of routing the new models by what was learned about the old ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_model_route_restarted_on_other_models_refuses_its_state() {
    setup_env();
    let (_s, s_url) = mock(small_reply()).await;
    let (_l, l_url) = mock(large_reply()).await;
    let dir = tempfile::tempdir().unwrap();
    let ups = upstreams(&s_url, &l_url, "token:10:30");
    let cfg = |kind: &str, small: &str, large: &str| {
        format!(
            "[server]\nstate_dir = \"state\"\n{ups}[[route]]\nname = \"r\"\nkind = \"{kind}\"\nsmall = \"{small}\"\nlarge = \"{large}\"\ntarget_share = 0.5\n"
        )
    };
    for kind in ["route_before", "cascade"] {
        let _ = std::fs::remove_dir_all(dir.path().join("state"));
        let extra = if kind == "cascade" {
            "gate = \"learned\"\n"
        } else {
            ""
        };
        let first = cfg(kind, "small", "large") + extra;
        let gw = start(&first, dir.path()).await;
        assert_eq!(
            post_chat(&gw.url, &chat_body("r", "hi")).await.status(),
            200
        );
        gw.stop().await;
        // The same models: restored.
        let gw = start(&first, dir.path()).await;
        let health: Value = reqwest::get(format!("{}/health", gw.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(health["status"], "ok", "{kind}: {health}");
        gw.stop().await;
        // Other models (here the two swapped): refused, naming both.
        let gw = start(&(cfg(kind, "large", "small") + extra), dir.path()).await;
        let health: Value = reqwest::get(format!("{}/health", gw.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let why = health["routes"]["r"]["state_refused"]
            .as_str()
            .unwrap_or_default();
        assert!(
            why.contains("tiers [small, large]") && why.contains("now has tiers [large, small]"),
            "{kind}: {health}"
        );
        gw.stop().await;
    }
}

/// A route-before route with `cost_weight` weighs the large call's price per prompt: where the
/// router expects the same gain everywhere, the short (cheap) prompts get the large model and
/// the long (dear) ones the small one. Without it the gain alone decides: here it favours the
/// long prompts (more of their words were seen gaining), so the knob turns the choice round.
/// Measured: with it, 25 of 25 short prompts and 0 of 25 long ones went large; without, 0 and 25.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cost_weighted_router_sends_the_cheap_prompts_up() {
    use tandem_core::policy::router::GainRouter;
    use tandem_core::policy::{Observation, RouteScorer};
    use tandem_core::prior::{Prior, PriorInfo, PRIOR_VERSION};
    setup_env();
    let (_s, s_url) = mock(small_reply()).await;
    let (_l, l_url) = mock(large_reply()).await;
    let dir = tempfile::tempdir().unwrap();
    let long = |i: usize| format!("question {i} {}", "with many words of context ".repeat(60));
    let short = |i: usize| format!("question {i}");
    // The large model always gains: short or long, the router expects the same.
    let mut router = GainRouter::new(tandem_server::route::router_config(None)).unwrap();
    for i in 0..400 {
        let text = if i % 2 == 0 { short(i) } else { long(i) };
        let q = tandem_core::Query::text(format!("t{i}"), text);
        router.learn(
            &q,
            &Observation {
                weak: Some(0.0),
                strong: Some(1.0),
            },
        );
    }
    let prior = Prior {
        info: PriorInfo {
            version: PRIOR_VERSION,
            router: None,
            cascade: None,
            trained_on: vec![],
            embedder: None,
            epochs: 1,
            seed: 0,
        },
        router: Some(router),
        cascade: None,
    };
    prior.save(&dir.path().join("gain.prior")).unwrap();
    let ups = upstreams(&s_url, &l_url, "token:10:30");
    let route = |name: &str, extra: &str| {
        format!("[[route]]\nname = \"{name}\"\nkind = \"route_before\"\nsmall = \"small\"\nlarge = \"large\"\ntarget_share = 0.5\nexplore = 0.0\nprior = \"gain.prior\"\n{extra}")
    };
    let cfg = format!(
        "{ups}{}{}",
        route("priced", "cost_weight = 1.0\n"),
        route("plain", "")
    );
    let gw = start(&cfg, dir.path()).await;
    let mut large = std::collections::HashMap::new();
    for name in ["priced", "plain"] {
        let (mut short_up, mut long_up) = (0, 0);
        for i in 0..60 {
            let is_long = i % 2 == 1;
            let text = if is_long {
                long(1000 + i)
            } else {
                short(1000 + i)
            };
            let r = post_chat(&gw.url, &chat_body(name, &text)).await;
            assert_eq!(r.status(), 200);
            // After the share controller's first scores.
            if i >= 10 && header(&r, "x-tandem-role") == "large" {
                if is_long {
                    long_up += 1;
                } else {
                    short_up += 1;
                }
            }
        }
        large.insert(name, (short_up, long_up));
    }
    eprintln!("large calls (short, long): {large:?}");
    let (short_up, long_up) = large["priced"];
    assert!(
        short_up >= 20 && long_up <= 5,
        "priced: {short_up} of 25 short prompts went large, {long_up} of 25 long ones"
    );
    let (plain_short, plain_long) = large["plain"];
    assert!(
        plain_long > plain_short,
        "plain: {plain_short} short, {plain_long} long"
    );
    gw.stop().await;
    // The knob belongs to route_before routes, between 0 and 1.
    for (extra, kind, needle) in [
        ("cost_weight = 1.5\n", "route_before", "between 0"),
        (
            "cost_weight = 0.5\nthreshold = 1.0\n",
            "cascade",
            "applies to route_before",
        ),
    ] {
        let text = format!(
            "{ups}[[route]]\nname = \"r\"\nkind = \"{kind}\"\nsmall = \"small\"\nlarge = \"large\"\n{}{extra}",
            if kind == "route_before" { "target_share = 0.5\n" } else { "" }
        );
        let cfg: tandem_server::ServerConfig = toml::from_str(&text).unwrap();
        let e = cfg
            .validate(Path::new("test.toml"), dir.path().to_path_buf())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("route[0].cost_weight") && e.contains(needle),
            "{e}"
        );
    }
}

/// Feedback with a bad field answers 400 naming that field in `error.param` (and the response
/// keeps waiting for good feedback); an unknown response names `response_id`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_feedback_names_its_field() {
    setup_env();
    let (_s, s_url) = mock(small_reply()).await;
    let (_l, l_url) = mock(large_reply()).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}[[route]]\nname = \"rb\"\nkind = \"route_before\"\nsmall = \"small\"\nlarge = \"large\"\ntarget_share = 0.5\n",
        upstreams(&s_url, &l_url, "token:10:30")
    );
    let gw = start(&cfg, dir.path()).await;
    let v: Value = post_chat(&gw.url, &chat_body("rb", "hi"))
        .await
        .json()
        .await
        .unwrap();
    let id = v["id"].as_str().unwrap();
    let cases = [
        (
            json!({"response_id": id, "score": 7}),
            400,
            "score",
            "got 7",
        ),
        (
            json!({"response_id": id, "score": -0.5}),
            400,
            "score",
            "got -0.5",
        ),
        (
            json!({"response_id": id, "reference": "  "}),
            400,
            "reference",
            "must not be empty",
        ),
        (
            json!({"response_id": id, "correct": true, "reward": 1.0}),
            400,
            "reward",
            "go with `episode_id`",
        ),
        (
            json!({"response_id": id, "correct": true, "done": true}),
            400,
            "done",
            "go with `episode_id`",
        ),
        (
            json!({"episode_id": "e1", "score": 0.5}),
            400,
            "score",
            "episode feedback takes",
        ),
        (
            json!({"response_id": "chatcmpl-nope", "correct": true}),
            404,
            "response_id",
            "is unknown",
        ),
    ];
    let c = reqwest::Client::new();
    for (body, status, param, needle) in cases {
        let r = c
            .post(format!("{}/v1/feedback", gw.url))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{body}");
        let e: Value = r.json().await.unwrap();
        assert_eq!(e["error"]["param"], param, "{body}: {e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(needle),
            "{body}: {e}"
        );
    }
    let r = c
        .post(format!("{}/v1/feedback", gw.url))
        .json(&json!({"response_id": id, "score": 0.5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "bad feedback did not consume the response");
    gw.stop().await;
}
