//! Conformance with issue 12 (spec12): requests and responses pass through whole, tool calls are
//! routed, errors keep their meaning, budgets cannot be bypassed, streams keep their timeouts —
//! each kind with several inputs, plain and streamed, on fixed and cascade routes, against the
//! scripted mock upstream of `common`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

const KEY: &str = "sk-large-upstream-secret-123";

fn setup_env() {
    // Read by the large upstream's api_key_env; must never appear in a response.
    std::env::set_var("TANDEM_TEST_LARGE_KEY", KEY);
}

// ---------------------------------------------------------------------------------------------
// Config builders
// ---------------------------------------------------------------------------------------------

fn upstream(name: &str, url: &str, model: &str, extra: &str) -> String {
    format!(
        "[[upstream]]\nname = \"{name}\"\nkind = \"openai\"\nbase_url = \"{url}\"\nmodel = \"{model}\"\n{extra}\n"
    )
}

/// The usual large upstream's settings: the test key, $10/$30 per million tokens.
const LARGE: &str =
    "api_key_env = \"TANDEM_TEST_LARGE_KEY\"\nprice = \"token:10:30\"\ntimeout_ms = 2000\n";

/// `LARGE` without retries or breaker: the tests of how one upstream error reaches the client
/// count calls and send many errors in a row (retries, failover and breakers have their own
/// tests in resilience.rs).
const LARGE_ONCE: &str = "api_key_env = \"TANDEM_TEST_LARGE_KEY\"\nprice = \"token:10:30\"\ntimeout_ms = 2000\n[upstream.retry]\nattempts = 1\n[upstream.breaker]\nconsecutive_failures = 1000\nmin_calls = 1000\n";

/// "small" (declares logprobs, so a logprob cascade may use it) and "large" with `large_extra`.
fn ups(s_url: &str, l_url: &str, large_extra: &str) -> String {
    format!(
        "{}{}",
        upstream(
            "small",
            s_url,
            "small-model",
            "price = \"token:0.1:0.1\"\ntimeout_ms = 2000\nlogprobs = true\n"
        ),
        upstream("large", l_url, "large-model", large_extra)
    )
}

fn fixed(name: &str, up: &str, extra: &str) -> String {
    format!("[[route]]\nname = \"{name}\"\nkind = \"fixed\"\nupstream = \"{up}\"\n{extra}\n")
}

/// A logprob cascade escalating when the mean −logprob of the small answer is over 1.0.
fn cascade(name: &str, small: &str, large: &str, extra: &str) -> String {
    format!(
        "[[route]]\nname = \"{name}\"\nkind = \"cascade\"\nsmall = \"{small}\"\nlarge = \"{large}\"\nthreshold = 1.0\nexplore = 0.0\n{extra}\n"
    )
}

/// A small mock (sure of "easy", unsure of "hard") and a large mock, both unscripted.
async fn two_mocks() -> (Arc<Mock>, String, Arc<Mock>, String) {
    let (small, s_url) = mock(reply(|p| {
        if p.contains("hard") {
            ("maybe 7".into(), -3.0)
        } else {
            ("the answer is 4".into(), -0.05)
        }
    }))
    .await;
    let (large, l_url) = mock(reply(|_| ("the answer is 4".into(), -0.01))).await;
    (small, s_url, large, l_url)
}

// ---------------------------------------------------------------------------------------------
// Client side
// ---------------------------------------------------------------------------------------------

struct Resp {
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
    body: Value,
}

impl Resp {
    fn h(&self, k: &str) -> Option<String> {
        self.headers.get(k).map(|v| v.to_str().unwrap().to_string())
    }

    /// The data events of a stream: the JSON chunks, and whether `[DONE]` ended it.
    fn sse(&self) -> (Vec<Value>, bool) {
        let mut events = Vec::new();
        let mut done = false;
        for block in self.text.split("\n\n") {
            for line in block.lines() {
                if let Some(d) = line.strip_prefix("data:") {
                    let d = d.trim();
                    if d == "[DONE]" {
                        done = true;
                    } else {
                        events.push(
                            serde_json::from_str(d)
                                .unwrap_or_else(|e| panic!("bad event {d}: {e}")),
                        );
                    }
                }
            }
        }
        (events, done)
    }
}

async fn send(url: &str, body: &Value) -> Resp {
    send_with_key(url, body, None).await
}

async fn send_with_key(url: &str, body: &Value, key: Option<&str>) -> Resp {
    let mut r = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(body);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    let r = r.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Resp {
        status,
        headers,
        text,
        body,
    }
}

fn req(route: &str, text: &str) -> Value {
    json!({"model": route, "messages": [{"role": "user", "content": text}]})
}

fn streamed(mut b: Value) -> Value {
    b["stream"] = json!(true);
    b
}

fn with(mut b: Value, k: &str, v: Value) -> Value {
    b[k] = v;
    b
}

/// What the upstream should receive for `client`: the same body less `tandem`, with its model.
fn forwarded(client: &Value, model: &str) -> Value {
    let mut b = client.clone();
    b.as_object_mut().unwrap().remove("tandem");
    b["model"] = json!(model);
    b
}

/// The paths at which two JSON values differ.
fn diff(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for k in x.keys().chain(y.keys().filter(|k| !x.contains_key(*k))) {
                let p = format!("{path}.{k}");
                match (x.get(k), y.get(k)) {
                    (Some(u), Some(v)) => diff(u, v, &p, out),
                    (Some(u), None) => out.push(format!("{p}: got {u}, not expected")),
                    (None, Some(v)) => out.push(format!("{p}: missing, expected {v}")),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                diff(u, v, &format!("{path}[{i}]"), out);
            }
        }
        _ if a != b => out.push(format!("{path}: got {a}, expected {b}")),
        _ => {}
    }
}

/// `got == want`, or a panic naming the paths that differ.
#[track_caller]
fn assert_same(got: &Value, want: &Value, what: &str) {
    let mut d = Vec::new();
    diff(got, want, "$", &mut d);
    assert!(d.is_empty(), "{what}: differs at\n  {}", d.join("\n  "));
}

/// A cascade's small call compared without `stream`: its draft is judged whole, so whether it
/// is fetched streamed or not is the gateway's business (spec12 does not say).
fn small_call(v: &Value) -> Value {
    without(v, &["stream"])
}

fn without(v: &Value, keys: &[&str]) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        for k in keys {
            o.remove(*k);
        }
    }
    v
}

/// `logprobs: null` and a missing `logprobs` mean the same ("not returned"): drop the nulls.
fn drop_null_logprobs(v: &mut Value) {
    if let Some(cs) = v["choices"].as_array_mut() {
        for c in cs {
            if let Some(o) = c.as_object_mut() {
                if o.get("logprobs").is_some_and(Value::is_null) {
                    o.remove("logprobs");
                }
            }
        }
    }
}

/// A chunk compared with what the upstream sent: `id` and `model` are tandem's (`created` is
/// checked by `created_passes_through_plain_and_streamed`).
fn chunk_core(c: &Value) -> Value {
    // `created` has its own test.
    let mut c = without(c, &["id", "model", "created"]);
    drop_null_logprobs(&mut c);
    c
}

fn content_of(events: &[Value]) -> String {
    events
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect()
}

fn finish_of(events: &[Value]) -> Option<String> {
    events
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
        .next_back()
        .map(str::to_string)
}

/// Reassembles streamed tool-call deltas as a client's stream helper does.
fn assemble_tool_calls(events: &[Value]) -> Vec<Value> {
    let mut calls: Vec<Value> = Vec::new();
    for c in events {
        let Some(tcs) = c["choices"][0]["delta"]["tool_calls"].as_array() else {
            continue;
        };
        for tc in tcs {
            let i = tc["index"]
                .as_u64()
                .expect("a tool-call delta has its index") as usize;
            while calls.len() <= i {
                calls.push(
                    json!({"id": null, "type": null, "function": {"name": null, "arguments": ""}}),
                );
            }
            let call = &mut calls[i];
            if tc["id"].is_string() {
                call["id"] = tc["id"].clone();
            }
            if tc["type"].is_string() {
                call["type"] = tc["type"].clone();
            }
            if tc["function"]["name"].is_string() {
                call["function"]["name"] = tc["function"]["name"].clone();
            }
            if let Some(a) = tc["function"]["arguments"].as_str() {
                let joined = format!("{}{a}", call["function"]["arguments"].as_str().unwrap());
                call["function"]["arguments"] = json!(joined);
            }
        }
    }
    calls
}

/// The error event of a stream, if any.
fn error_event(events: &[Value]) -> Option<Value> {
    events.iter().find(|e| e.get("error").is_some()).cloned()
}

// ---------------------------------------------------------------------------------------------
// Upstream side
// ---------------------------------------------------------------------------------------------

fn tools() -> Value {
    json!([
        {"type": "function", "function": {
            "name": "get_weather", "description": "Current weather in a city",
            "parameters": {"type": "object",
                           "properties": {"city": {"type": "string"},
                                          "unit": {"type": "string", "enum": ["c", "f"]}},
                           "required": ["city"]}}},
        {"type": "function", "function": {
            "name": "get_time", "description": "Current time in a time zone",
            "parameters": {"type": "object", "properties": {"tz": {"type": "string"}},
                           "required": ["tz"]}}}
    ])
}

fn tool_call(id: &str, name: &str, args: &str) -> Value {
    json!({"id": id, "type": "function", "function": {"name": name, "arguments": args}})
}

fn tool_msg(calls: &[Value]) -> Value {
    json!({"role": "assistant", "content": null, "tool_calls": calls})
}

fn text_msg(text: &str) -> Value {
    json!({"role": "assistant", "content": text})
}

/// OpenAI-shaped logprobs of `tokens`, each at `lp` with `top` alternatives (itself first).
fn lp_content(tokens: &[&str], lp: f64, top: usize) -> Value {
    json!({"content": tokens.iter().map(|t| json!({
        "token": t, "logprob": lp, "bytes": t.as_bytes(),
        "top_logprobs": (0..top).map(|j| if j == 0 {
            json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
        } else {
            let alt = format!("alt{j}");
            json!({"token": alt, "logprob": lp - j as f64, "bytes": alt.as_bytes()})
        }).collect::<Vec<_>>(),
    })).collect::<Vec<_>>(), "refusal": null})
}

/// A small-model answer with token log-probabilities of `lp` (−0.01: sure, −3.0: unsure).
fn small_answer(message: Value, finish: &str, lp: f64) -> Scripted {
    Scripted::Answer {
        message,
        finish_reason: json!(finish),
        logprobs: lp_content(&["a", "b", "c"], lp, 5),
        usage: Some(json!({"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8})),
        extra: json!({}),
    }
}

fn upstream_chunk(delta: Value, finish: Value) -> Value {
    json!({"id": "up-1", "object": "chat.completion.chunk", "created": 1, "model": "large-model",
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
}

fn err_body(message: &str, kind: &str, code: Value, param: Value) -> Value {
    json!({"error": {"message": message, "type": kind, "code": code, "param": param}})
}

fn spent(gw: &Running, route: usize) -> (u64, u64) {
    let s = gw.gateway.routes()[route].budget.spent();
    (s.calls, s.micros)
}

/// Waits (up to 2 s) for a route's spend to move past `before` (a stream settles at its end).
async fn spent_after(gw: &Running, route: usize, before: (u64, u64)) -> (u64, u64) {
    for _ in 0..40 {
        let now = spent(gw, route);
        if now != before {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    spent(gw, route)
}

// ---------------------------------------------------------------------------------------------
// Tool calls
// ---------------------------------------------------------------------------------------------

fn tool_call_sets() -> Vec<Vec<Value>> {
    vec![
        vec![tool_call("call_a", "get_weather", "{\"city\":\"Paris\"}")],
        // Parallel calls.
        vec![
            tool_call(
                "call_a",
                "get_weather",
                "{\"city\": \"Paris\", \"unit\": \"c\"}",
            ),
            tool_call("call_b", "get_time", "{\"tz\":\"Europe/Paris\"}"),
        ],
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_pass_through_plain_on_fixed_and_cascade_routes() {
    setup_env();
    let (small, s_url, large, l_url) = two_mocks().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}{}{}",
        ups(&s_url, &l_url, LARGE),
        fixed("f", "large", ""),
        cascade("c", "small", "large", "")
    );
    let gw = start(&cfg, dir.path()).await;
    for calls in tool_call_sets() {
        let want = tool_msg(&calls);
        let ask = |route: &str| with(req(route, "weather in Paris?"), "tools", tools());
        // Fixed route.
        large.push(Scripted::answer(want.clone(), "tool_calls"));
        let r = send(&gw.url, &ask("f")).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["choices"][0]["message"], want, "fixed: {}", r.text);
        assert_eq!(r.body["choices"][0]["message"]["tool_calls"], json!(calls));
        assert!(r.body["choices"][0]["message"]["content"].is_null());
        assert_eq!(r.body["choices"][0]["finish_reason"], "tool_calls");
        // Cascade, the small model's valid call accepted.
        let large_before = large.calls();
        small.push(small_answer(want.clone(), "tool_calls", -0.01));
        let r = send(&gw.url, &ask("c")).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.h("x-tandem-role").as_deref(), Some("small"), "{}", r.text);
        assert_eq!(
            large.calls(),
            large_before,
            "a valid, sure call is served small"
        );
        assert_eq!(
            r.body["choices"][0]["message"], want,
            "cascade small: {}",
            r.text
        );
        assert_eq!(r.body["choices"][0]["finish_reason"], "tool_calls");
        // Cascade, escalated: the large model's call.
        small.push(small_answer(text_msg("maybe"), "stop", -3.0));
        large.push(Scripted::answer(want.clone(), "tool_calls"));
        let r = send(&gw.url, &ask("c")).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.h("x-tandem-role").as_deref(), Some("large"));
        assert_eq!(
            r.body["choices"][0]["message"], want,
            "cascade large: {}",
            r.text
        );
        assert_eq!(r.body["choices"][0]["finish_reason"], "tool_calls");
    }
    gw.stop().await;
}

/// Raw upstream chunks of `calls`, each call's arguments in several fragments, fragments of
/// different calls interleaved.
fn tool_call_stream(calls: &[Value]) -> Vec<Value> {
    let mut out = vec![upstream_chunk(
        json!({"role": "assistant", "content": null}),
        Value::Null,
    )];
    for (i, c) in calls.iter().enumerate() {
        out.push(upstream_chunk(
            json!({"tool_calls": [{"index": i, "id": c["id"], "type": "function",
                                   "function": {"name": c["function"]["name"], "arguments": ""}}]}),
            Value::Null,
        ));
    }
    let frags: Vec<Vec<String>> = calls
        .iter()
        .map(|c| {
            let a: Vec<char> = c["function"]["arguments"]
                .as_str()
                .unwrap()
                .chars()
                .collect();
            a.chunks(4).map(|p| p.iter().collect()).collect()
        })
        .collect();
    let longest = frags.iter().map(Vec::len).max().unwrap_or(0);
    for j in 0..longest {
        for (i, f) in frags.iter().enumerate() {
            if let Some(p) = f.get(j) {
                out.push(upstream_chunk(
                    json!({"tool_calls": [{"index": i, "function": {"arguments": p}}]}),
                    Value::Null,
                ));
            }
        }
    }
    out.push(upstream_chunk(json!({}), json!("tool_calls")));
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_stream_through_as_deltas_that_reassemble() {
    setup_env();
    let (small, s_url, large, l_url) = two_mocks().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}{}{}",
        ups(&s_url, &l_url, LARGE),
        fixed("f", "large", ""),
        cascade("c", "small", "large", "")
    );
    let gw = start(&cfg, dir.path()).await;
    for calls in tool_call_sets() {
        let ask = |route: &str| streamed(with(req(route, "weather in Paris?"), "tools", tools()));
        let chunks = tool_call_stream(&calls);
        // Fixed route, then an escalated cascade: the upstream's chunks arrive whole.
        for route in ["f", "c"] {
            if route == "c" {
                small.push(small_answer(text_msg("maybe"), "stop", -3.0));
            }
            large.push(Scripted::sse(chunks.clone(), 0));
            let r = send(&gw.url, &ask(route)).await;
            assert_eq!(r.status, 200, "{}", r.text);
            assert_eq!(r.h("x-tandem-role").as_deref(), Some("large"));
            let (events, done) = r.sse();
            assert!(done, "{route}: no [DONE]: {}", r.text);
            let got: Vec<Value> = events.iter().map(chunk_core).collect();
            let sent: Vec<Value> = chunks.iter().map(chunk_core).collect();
            assert_same(
                &json!(got),
                &json!(sent),
                &format!("{route}: chunks changed on the way"),
            );
            assert_eq!(assemble_tool_calls(&events), calls, "{route}");
            assert_eq!(finish_of(&events).as_deref(), Some("tool_calls"));
            assert!(events
                .iter()
                .all(|e| e["object"] == "chat.completion.chunk" && e["model"] == route));
        }
        // Cascade, the small model's call accepted: synthesised as tool-call deltas.
        let large_before = large.calls();
        small.push(small_answer(tool_msg(&calls), "tool_calls", -0.01));
        let r = send(&gw.url, &ask("c")).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.h("x-tandem-role").as_deref(), Some("small"), "{}", r.text);
        assert_eq!(large.calls(), large_before);
        let (events, done) = r.sse();
        assert!(done, "no [DONE]: {}", r.text);
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(assemble_tool_calls(&events), calls, "{}", r.text);
        assert_eq!(finish_of(&events).as_deref(), Some("tool_calls"));
        assert_eq!(content_of(&events), "");
    }
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Responses pass through whole
// ---------------------------------------------------------------------------------------------

fn rich_usage() -> Value {
    json!({"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15,
           "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 0},
           "completion_tokens_details": {"reasoning_tokens": 2, "accepted_prediction_tokens": 0}})
}

/// Whole upstream answers with fields tandem does not know (or knows but must not touch).
fn rich_answers() -> Vec<Value> {
    let completion = |choice: Value, top: Value| {
        let mut c = json!({"id": "up-1", "object": "chat.completion", "created": 1_700_000_000,
                           "model": "large-model", "choices": [choice], "usage": rich_usage()});
        for (k, v) in top.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    vec![
        completion(
            json!({"index": 0, "finish_reason": "stop", "logprobs": null, "future_field": {"x": 1},
                   "message": {"role": "assistant", "content": "Hello.", "refusal": null,
                               "reasoning_content": "Let me think.",
                               "annotations": [{"type": "url_citation", "url_citation": {
                                   "url": "https://example.com", "title": "Example",
                                   "start_index": 0, "end_index": 5}}],
                               "future_field": {"x": 1}}}),
            json!({"system_fingerprint": "fp_abc123", "service_tier": "default",
                   "future_field": {"x": 1}}),
        ),
        completion(
            json!({"index": 0, "finish_reason": "content_filter", "x_choice_extra": [1, 2, 3],
                   "message": {"role": "assistant", "content": null,
                               "refusal": "I can't help with that."}}),
            json!({"system_fingerprint": null, "service_tier": "flex", "x_top": "y"}),
        ),
        completion(
            json!({"index": 0, "finish_reason": "length",
                   "message": {"role": "assistant", "content": "trunc",
                               "audio": {"id": "aud_1", "data": "AAAA", "expires_at": 1,
                                         "transcript": "trunc"}}}),
            json!({"system_fingerprint": "fp_2", "prompt_filter_results": [{"prompt_index": 0}]}),
        ),
    ]
}

/// The client's answer against the upstream's: equal but for `id`, `model`, `tandem` (and a
/// choice's `logprobs` when the client did not ask for them).
#[track_caller]
fn assert_passed_through(r: &Resp, upstream: &Value, route: &str, what: &str) {
    assert_eq!(r.status, 200, "{what}: {}", r.text);
    // `created` has its own test.
    let mut got = without(&r.body, &["id", "model", "tandem", "created"]);
    let mut want = without(upstream, &["id", "model", "created"]);
    for c in want["choices"].as_array_mut().unwrap() {
        c.as_object_mut().unwrap().remove("logprobs");
    }
    drop_null_logprobs(&mut got);
    assert_same(&got, &want, what);
    assert!(
        r.body["id"].as_str().unwrap().starts_with("chatcmpl-"),
        "{what}: {}",
        r.body["id"]
    );
    assert_eq!(r.body["model"], route, "{what}");
    assert_eq!(r.body["tandem"]["route"], route, "{what}");
    assert!(r.body["tandem"].is_object(), "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_extra_fields_pass_through_plain() {
    setup_env();
    let (small, s_url, large, l_url) = two_mocks().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}{}{}",
        ups(&s_url, &l_url, LARGE),
        fixed("f", "large", ""),
        cascade("c", "small", "large", "")
    );
    let gw = start(&cfg, dir.path()).await;
    for (i, up) in rich_answers().into_iter().enumerate() {
        // Fixed route.
        large.push(Scripted::json(up.clone()));
        let r = send(&gw.url, &req("f", "hi")).await;
        assert_passed_through(&r, &up, "f", &format!("fixed #{i}"));
        assert_eq!(r.body["tandem"]["tier"], "large");
        assert_eq!(r.body["tandem"]["role"], "large");
        assert_eq!(r.body["tandem"]["tried"], 1);
        assert_eq!(r.body["tandem"]["escalated"], false);
        assert_eq!(r.h("x-tandem-route").as_deref(), Some("f"));
        assert_eq!(r.h("x-tandem-tier").as_deref(), Some("large"));
        assert_eq!(r.h("x-tandem-role").as_deref(), Some("large"));
        assert!(r.h("x-tandem-cost-usd").is_some());
        // Cascade, escalated (the small draft unsure).
        small.push(small_answer(text_msg("maybe"), "stop", -3.0));
        large.push(Scripted::json(up.clone()));
        let r = send(&gw.url, &req("c", "hi")).await;
        assert_passed_through(&r, &up, "c", &format!("cascade large #{i}"));
        assert_eq!(r.body["tandem"]["role"], "large");
        assert_eq!(r.body["tandem"]["escalated"], true);
        assert_eq!(r.body["tandem"]["tried"], 2);
    }
    // Cascade, the small answer accepted (only the non-refusing ones: a refusal escalates).
    for (i, mut up) in rich_answers().into_iter().enumerate() {
        if up["choices"][0]["message"]["refusal"].is_string() {
            continue;
        }
        up["model"] = json!("small-model");
        up["choices"][0]["logprobs"] = lp_content(&["a", "b"], -0.01, 5);
        let large_before = large.calls();
        small.push(Scripted::json(up.clone()));
        let r = send(&gw.url, &req("c", "hi")).await;
        assert_passed_through(&r, &up, "c", &format!("cascade small #{i}"));
        assert_eq!(r.body["tandem"]["role"], "small");
        assert_eq!(r.body["tandem"]["tier"], "small");
        assert_eq!(r.body["tandem"]["tried"], 1);
        assert_eq!(large.calls(), large_before);
        assert!(
            r.body["choices"][0]["logprobs"].is_null(),
            "the gate's logprobs leaked to a client that did not ask"
        );
    }
    gw.stop().await;
}

/// Upstream streams with fields tandem does not know; the second has a usage chunk.
fn rich_streams() -> Vec<(Vec<Value>, Option<Value>)> {
    let top = |mut c: Value| {
        c["system_fingerprint"] = json!("fp_abc123");
        c["service_tier"] = json!("default");
        c["future_field"] = json!({"x": 1});
        c
    };
    let first = vec![
        top(upstream_chunk(
            json!({"role": "assistant", "content": "", "refusal": null}),
            Value::Null,
        )),
        top(upstream_chunk(
            json!({"reasoning_content": "Let me think."}),
            Value::Null,
        )),
        top(upstream_chunk(
            json!({"content": "Hel", "future_field": {"x": 1}}),
            Value::Null,
        )),
        top(upstream_chunk(json!({"content": "lo."}), Value::Null)),
        top(upstream_chunk(
            json!({"annotations": [{"type": "url_citation", "url_citation": {
                "url": "https://example.com", "title": "Example", "start_index": 0, "end_index": 5}}]}),
            Value::Null,
        )),
        top(upstream_chunk(json!({}), json!("stop"))),
    ];
    let mut first = first;
    first[0]["choices"][0]["future_field"] = json!({"x": 1});
    let second = vec![
        upstream_chunk(
            json!({"role": "assistant", "content": null, "refusal": ""}),
            Value::Null,
        ),
        upstream_chunk(json!({"refusal": "I can't"}), Value::Null),
        upstream_chunk(json!({"refusal": " help with that."}), Value::Null),
        upstream_chunk(json!({}), json!("content_filter")),
    ];
    let usage = json!({"id": "up-1", "object": "chat.completion.chunk", "created": 1,
                       "model": "large-model", "choices": [], "usage": rich_usage(),
                       "system_fingerprint": "fp_abc123"});
    vec![(first, None), (second, Some(usage))]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_extra_fields_pass_through_streamed() {
    setup_env();
    let (small, s_url, large, l_url) = two_mocks().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}{}{}",
        ups(&s_url, &l_url, LARGE),
        fixed("f", "large", ""),
        cascade("c", "small", "large", "")
    );
    let gw = start(&cfg, dir.path()).await;
    for (i, (chunks, usage)) in rich_streams().into_iter().enumerate() {
        for route in ["f", "c"] {
            let what = format!("{route} stream #{i}");
            let mut body = streamed(req(route, "hi"));
            if usage.is_some() {
                body["stream_options"] = json!({"include_usage": true});
            }
            if route == "c" {
                small.push(small_answer(text_msg("maybe"), "stop", -3.0));
            }
            let mut all = chunks.clone();
            all.extend(usage.clone());
            large.push(Scripted::sse(all, 0));
            let r = send(&gw.url, &body).await;
            assert_eq!(r.status, 200, "{what}: {}", r.text);
            let (events, done) = r.sse();
            assert!(done, "{what}: no [DONE]");
            let (usage_events, rest): (Vec<Value>, Vec<Value>) =
                events.into_iter().partition(|e| e["usage"].is_object());
            let got: Vec<Value> = rest.iter().map(chunk_core).collect();
            let sent: Vec<Value> = chunks.iter().map(chunk_core).collect();
            assert_same(
                &json!(got),
                &json!(sent),
                &format!("{what}: chunks changed on the way"),
            );
            match &usage {
                Some(u) => {
                    assert_eq!(usage_events.len(), 1, "{what}");
                    assert_eq!(
                        usage_events[0]["usage"], u["usage"],
                        "{what}: usage details"
                    );
                    assert!(usage_events[0]["tandem"].is_object(), "{what}");
                    assert_eq!(usage_events[0]["tandem"]["usage_estimated"], false);
                }
                None => assert!(usage_events.is_empty(), "{what}: usage not asked"),
            }
        }
    }
    // Cascade, the small answer accepted and synthesised: other message fields in a delta.
    let msg = json!({"role": "assistant", "content": "Hello there.", "refusal": null,
                     "reasoning_content": "Let me think.", "future_field": {"x": 1}});
    small.push(small_answer(msg, "stop", -0.01));
    let r = send(&gw.url, &streamed(req("c", "hi"))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.h("x-tandem-role").as_deref(), Some("small"));
    let (events, done) = r.sse();
    assert!(done);
    assert_eq!(content_of(&events), "Hello there.");
    let deltas: Vec<&Value> = events.iter().map(|e| &e["choices"][0]["delta"]).collect();
    assert!(
        deltas
            .iter()
            .any(|d| d["reasoning_content"] == "Let me think."),
        "{}",
        r.text
    );
    assert!(
        deltas.iter().any(|d| d["future_field"] == json!({"x": 1})),
        "{}",
        r.text
    );
    assert_eq!(finish_of(&events).as_deref(), Some("stop"));
    assert!(
        events.iter().all(|e| e["choices"][0]["logprobs"].is_null()),
        "the gate's logprobs leaked into a stream: {}",
        r.text
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_passes_through_plain_and_streamed() {
    setup_env();
    let (small, s_url, large, l_url) = two_mocks().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}{}{}",
        ups(&s_url, &l_url, LARGE),
        fixed("f", "large", ""),
        cascade("c", "small", "large", "")
    );
    let gw = start(&cfg, dir.path()).await;
    let mut fails = Vec::new();
    for (route, created) in [("f", 1_700_000_000u64), ("c", 1_600_000_123)] {
        let mut up = rich_answers()[0].clone();
        up["created"] = json!(created);
        if route == "c" {
            small.push(small_answer(text_msg("maybe"), "stop", -3.0));
        }
        large.push(Scripted::json(up));
        let r = send(&gw.url, &req(route, "hi")).await;
        assert_eq!(r.status, 200, "{}", r.text);
        if r.body["created"] != created {
            fails.push(format!(
                "{route} plain: created {} (upstream {created})",
                r.body["created"]
            ));
        }
        if route == "c" {
            small.push(small_answer(text_msg("maybe"), "stop", -3.0));
        }
        let chunks: Vec<Value> = pieces(3)
            .into_iter()
            .map(|mut c| {
                c["created"] = json!(created);
                c
            })
            .collect();
        large.push(Scripted::sse(chunks, 0));
        let r = send(&gw.url, &streamed(req(route, "hi"))).await;
        let (events, done) = r.sse();
        assert!(done, "{}", r.text);
        let seen: Vec<&Value> = events.iter().map(|e| &e["created"]).collect();
        if seen.iter().any(|c| **c != created) {
            fails.push(format!(
                "{route} stream: created {seen:?} (upstream {created})"
            ));
        }
    }
    assert!(
        fails.is_empty(),
        "spec12: every field but id and model passes through:\n{}",
        fails.join("\n")
    );
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Requests pass through whole
// ---------------------------------------------------------------------------------------------

fn rich_requests(route: &str) -> Vec<Value> {
    vec![
        json!({
            "model": route,
            "messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": "what is 2+2"}],
            "max_completion_tokens": 64,
            "temperature": 0.3, "top_p": 0.9, "seed": 42,
            "presence_penalty": 0.1, "frequency_penalty": -0.2,
            "response_format": {"type": "json_schema", "json_schema": {
                "name": "answer", "strict": true,
                "schema": {"type": "object", "properties": {"a": {"type": "integer"}},
                           "required": ["a"], "additionalProperties": false}}},
            "tools": tools(), "tool_choice": "auto", "parallel_tool_calls": false,
            "user": "user-1234", "metadata": {"trace": "t-1", "team": "x"}, "store": false,
            "stop": ["END", "\n\n"], "logit_bias": {"50256": -100, "1234": 5},
            "reasoning_effort": "low",
            "x_vendor_option": {"a": [1, 2.5, "z", null], "b": true},
            "tandem": {"no_learn": true}
        }),
        // A tool conversation in progress, content parts, the other cap field.
        json!({
            "model": route,
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "weather in Paris?"}]},
                {"role": "assistant", "content": null,
                 "tool_calls": [tool_call("call_a", "get_weather", "{\"city\":\"Paris\"}")]},
                {"role": "tool", "tool_call_id": "call_a", "content": "{\"temp\": 21}"},
                {"role": "user", "content": "and now?", "name": "bob"}
            ],
            "max_tokens": 30,
            "tools": tools(),
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "stop": "END",
            "top_logprobs": null
        }),
        // Nothing to add to: no cap, no logprobs, no stream options.
        json!({"model": route, "messages": [{"role": "user", "content": "hi"}]}),
        json!({"model": route, "messages": [{"role": "user", "content": "hi"}], "stream": true}),
        json!({"model": route, "messages": [{"role": "developer", "content": "x"},
                                            {"role": "user", "content": "hi"}],
               "temperature": 0, "modalities": ["text"], "prediction": null,
               "tandem": {"force": "large"}}),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_the_upstream_whole() {
    setup_env();
    let (small, s_url, large, l_url) = two_mocks().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}{}{}",
        ups(&s_url, &l_url, LARGE),
        fixed("f", "large", ""),
        cascade("c", "small", "large", "")
    );
    let gw = start(&cfg, dir.path()).await;
    large.set_always(Some(Scripted::text("4")));
    // Fixed route: exactly the client's body, less `tandem`, with the upstream's model.
    for (i, body) in rich_requests("f").into_iter().enumerate() {
        let n = large.calls();
        let r = send(&gw.url, &body).await;
        assert_eq!(r.status, 200, "#{i}: {}", r.text);
        assert_eq!(large.calls(), n + 1);
        let got = large.bodies().last().unwrap().clone();
        assert_same(
            &got,
            &forwarded(&body, "large-model"),
            &format!("fixed #{i}"),
        );
    }
    // Cascade: the small call adds only what the gate needs; the large call adds nothing.
    for (i, body) in rich_requests("c").into_iter().enumerate() {
        if body["tandem"]["force"].is_string() {
            continue;
        }
        for sure in [true, false] {
            let (ns, nl) = (small.calls(), large.calls());
            let lp = if sure { -0.01 } else { -3.0 };
            // A draft that obeys the request's tool_choice.
            let draft = if body["tool_choice"].is_object() {
                tool_msg(&[tool_call("call_a", "get_weather", "{\"city\":\"Paris\"}")])
            } else {
                text_msg("4")
            };
            small.push(small_answer(draft, "stop", lp));
            let r = send(&gw.url, &body).await;
            assert_eq!(r.status, 200, "cascade #{i}: {}", r.text);
            assert_eq!(small.calls(), ns + 1);
            assert_eq!(
                large.calls(),
                nl + usize::from(!sure),
                "cascade #{i} sure={sure}"
            );
            let mut want_small = forwarded(&body, "small-model");
            want_small["logprobs"] = json!(true);
            want_small["top_logprobs"] = json!(5);
            assert_same(
                &small_call(small.bodies().last().unwrap()),
                &small_call(&want_small),
                &format!("cascade small call #{i}"),
            );
            if !sure {
                assert_same(
                    large.bodies().last().unwrap(),
                    &forwarded(&body, "large-model"),
                    &format!("cascade large call #{i}"),
                );
            }
        }
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_cap_lowers_the_clients_own_field_and_is_added_only_when_configured() {
    setup_env();
    let (_small, s_url, large, l_url) = two_mocks().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}{}{}{}{}",
        ups(&s_url, &l_url, LARGE),
        upstream(
            "large_mct",
            &l_url,
            "large-model-2",
            "price = \"token:10:30\"\ntoken_param = \"max_completion_tokens\"\n"
        ),
        fixed("capped", "large", "max_tokens = 100"),
        fixed("capped_mct", "large_mct", "max_tokens = 100"),
        fixed("uncapped", "large", "")
    );
    let gw = start(&cfg, dir.path()).await;
    large.set_always(Some(Scripted::text("4")));
    // (route, client's cap field and value, expected field and value upstream)
    type Cap<'a> = Option<(&'a str, u64)>;
    let cases: Vec<(&str, Cap, Cap, bool)> = vec![
        (
            "capped",
            Some(("max_completion_tokens", 500)),
            Some(("max_completion_tokens", 100)),
            false,
        ),
        (
            "capped",
            Some(("max_tokens", 500)),
            Some(("max_tokens", 100)),
            false,
        ),
        (
            "capped",
            Some(("max_tokens", 50)),
            Some(("max_tokens", 50)),
            false,
        ),
        (
            "capped",
            Some(("max_completion_tokens", 64)),
            Some(("max_completion_tokens", 64)),
            false,
        ),
        ("capped", None, Some(("max_tokens", 100)), false),
        (
            "capped_mct",
            None,
            Some(("max_completion_tokens", 100)),
            false,
        ),
        (
            "capped_mct",
            Some(("max_tokens", 500)),
            Some(("max_tokens", 100)),
            false,
        ),
        (
            "capped",
            Some(("max_completion_tokens", 500)),
            Some(("max_completion_tokens", 100)),
            true,
        ),
        ("capped", None, Some(("max_tokens", 100)), true),
        ("uncapped", None, None, false),
        ("uncapped", None, None, true),
        (
            "uncapped",
            Some(("max_completion_tokens", 5000)),
            Some(("max_completion_tokens", 5000)),
            false,
        ),
    ];
    for (route, client, want, stream) in cases {
        let mut body = req(route, "hi");
        if let Some((k, v)) = client {
            body[k] = json!(v);
        }
        if stream {
            body = streamed(body);
        }
        let r = send(&gw.url, &body).await;
        assert_eq!(r.status, 200, "{route} {client:?}: {}", r.text);
        let model = if route == "capped_mct" {
            "large-model-2"
        } else {
            "large-model"
        };
        let mut expect = forwarded(&body, model);
        let o = expect.as_object_mut().unwrap();
        o.remove("max_tokens");
        o.remove("max_completion_tokens");
        if let Some((k, v)) = want {
            o.insert(k.into(), json!(v));
        }
        assert_same(
            large.bodies().last().unwrap(),
            &expect,
            &format!("{route} client {client:?} stream={stream}"),
        );
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_options_are_added_only_for_upstreams_declaring_stream_usage() {
    setup_env();
    let (_small, s_url, large, l_url) = two_mocks().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}{}{}{}",
        ups(&s_url, &l_url, LARGE),
        upstream(
            "large_su",
            &l_url,
            "large-model",
            "price = \"token:10:30\"\nstream_usage = true\n"
        ),
        fixed("plain", "large", "[route.budget]\nmax_usd = 10.0"),
        fixed("su", "large_su", "[route.budget]\nmax_usd = 10.0")
    );
    let gw = start(&cfg, dir.path()).await;
    // Usage 5 in + 3 out at $10/$30 per million: 140 micro-dollars.
    large.set_always(Some(Scripted::text("four")));
    let usage_events = |r: &Resp| {
        let (events, done) = r.sse();
        assert!(done, "{}", r.text);
        events
            .into_iter()
            .filter(|e| e.get("usage").is_some_and(|u| !u.is_null()) || e["choices"] == json!([]))
            .collect::<Vec<_>>()
    };
    // Not declared, not asked: nothing added.
    let body = streamed(req("plain", "hi"));
    let r = send(&gw.url, &body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_same(
        large.bodies().last().unwrap(),
        &forwarded(&body, "large-model"),
        "forwarded",
    );
    assert!(usage_events(&r).is_empty());
    // Not declared, asked by the client: the client's own field, its usage chunk shown.
    let body = with(
        streamed(req("plain", "hi")),
        "stream_options",
        json!({"include_usage": true}),
    );
    let r = send(&gw.url, &body).await;
    assert_same(
        large.bodies().last().unwrap(),
        &forwarded(&body, "large-model"),
        "forwarded",
    );
    let u = usage_events(&r);
    assert_eq!(u.len(), 1, "{}", r.text);
    assert_eq!(u[0]["usage"]["completion_tokens"], 3);
    // Declared, not asked: added upstream, the usage chunk kept from the client, the budget
    // charged from it.
    let before = spent(&gw, 1);
    let body = streamed(req("su", "hi"));
    let r = send(&gw.url, &body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut want = forwarded(&body, "large-model");
    want["stream_options"] = json!({"include_usage": true});
    assert_same(large.bodies().last().unwrap(), &want, "forwarded");
    assert!(
        usage_events(&r).is_empty(),
        "usage chunk shown unasked: {}",
        r.text
    );
    assert_eq!(content_of(&r.sse().0), "four");
    let after = spent_after(&gw, 1, before).await;
    assert_eq!(after.0, before.0 + 1);
    assert_eq!(after.1, before.1 + 140, "charged from the upstream's usage");
    // Declared and asked.
    let body = with(
        streamed(req("su", "hi")),
        "stream_options",
        json!({"include_usage": true}),
    );
    let r = send(&gw.url, &body).await;
    assert_same(
        large.bodies().last().unwrap(),
        &forwarded(&body, "large-model"),
        "forwarded",
    );
    let u = usage_events(&r);
    assert_eq!(u.len(), 1, "{}", r.text);
    assert_eq!(u[0]["usage"]["prompt_tokens"], 5);
    assert_eq!(u[0]["tandem"]["usage_estimated"], false);
    // Declared, but not a stream: nothing added.
    let body = req("su", "hi");
    let r = send(&gw.url, &body).await;
    assert_eq!(r.status, 200);
    assert_same(
        large.bodies().last().unwrap(),
        &forwarded(&body, "large-model"),
        "forwarded",
    );
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The client's logprobs
// ---------------------------------------------------------------------------------------------

fn top_counts(logprobs: &Value) -> Vec<usize> {
    logprobs["content"]
        .as_array()
        .unwrap_or_else(|| panic!("no logprobs.content: {logprobs}"))
        .iter()
        .map(|t| t["top_logprobs"].as_array().unwrap().len())
        .collect()
}

/// `got` is `full` with each token's alternatives cut to the first `k`.
fn assert_trimmed(got: &Value, full: &Value, k: usize, what: &str) {
    let g = got["content"]
        .as_array()
        .unwrap_or_else(|| panic!("{what}: {got}"));
    let f = full["content"].as_array().unwrap();
    assert_eq!(g.len(), f.len(), "{what}");
    for (a, b) in g.iter().zip(f) {
        assert_eq!(a["token"], b["token"], "{what}");
        assert_eq!(a["logprob"], b["logprob"], "{what}");
        let want: Vec<Value> = b["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .take(k)
            .cloned()
            .collect();
        assert_eq!(a["top_logprobs"], json!(want), "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_logprobs_are_returned_when_asked_and_only_then() {
    setup_env();
    let (small, s_url, large, l_url) = two_mocks().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}{}{}",
        ups(&s_url, &l_url, LARGE),
        fixed("f", "large", ""),
        cascade("c", "small", "large", "")
    );
    let gw = start(&cfg, dir.path()).await;
    let toks = ["The", " answer", " is", " 4"];
    let answer_lp = |lp: Value| Scripted::Answer {
        message: text_msg("The answer is 4"),
        finish_reason: json!("stop"),
        logprobs: lp,
        usage: Some(json!({"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9})),
        extra: json!({}),
    };
    let ask = |route: &str, k: Option<u64>| {
        let mut b = req(route, "2+2?");
        b["logprobs"] = json!(true);
        if let Some(k) = k {
            b["top_logprobs"] = json!(k);
        }
        b
    };
    // Fixed: the upstream honours k = 3, the answer carries its logprobs unchanged.
    let lp3 = lp_content(&toks, -0.2, 3);
    large.push(answer_lp(lp3.clone()));
    let r = send(&gw.url, &ask("f", Some(3))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(large.bodies().last().unwrap()["top_logprobs"], 3);
    assert_eq!(large.bodies().last().unwrap()["logprobs"], true);
    assert_eq!(r.body["choices"][0]["logprobs"], lp3);
    // Fixed: the upstream gives more alternatives than asked: at most k reach the client.
    let lp6 = lp_content(&toks, -0.2, 6);
    large.push(answer_lp(lp6.clone()));
    let r = send(&gw.url, &ask("f", Some(2))).await;
    assert_trimmed(&r.body["choices"][0]["logprobs"], &lp6, 2, "fixed k=2");
    // Cascade: the gate asks the small model for 5, the client gets its 3.
    let lp5 = lp_content(&toks, -0.01, 5);
    small.push(answer_lp(lp5.clone()));
    let r = send(&gw.url, &ask("c", Some(3))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.h("x-tandem-role").as_deref(), Some("small"));
    let sent = small.bodies().last().unwrap().clone();
    assert_eq!(
        (sent["logprobs"].clone(), sent["top_logprobs"].clone()),
        (json!(true), json!(5))
    );
    assert!(top_counts(&r.body["choices"][0]["logprobs"])
        .iter()
        .all(|&n| n <= 3));
    assert_trimmed(&r.body["choices"][0]["logprobs"], &lp5, 3, "cascade k=3");
    // Cascade: a client asking for more than the gate's 5 gets them asked for.
    let lp7 = lp_content(&toks, -0.01, 7);
    small.push(answer_lp(lp7.clone()));
    let r = send(&gw.url, &ask("c", Some(7))).await;
    assert_eq!(small.bodies().last().unwrap()["top_logprobs"], 7);
    assert_trimmed(&r.body["choices"][0]["logprobs"], &lp7, 7, "cascade k=7");
    // Cascade: a client that did not ask gets none, though the gate asked.
    small.push(answer_lp(lp5.clone()));
    let r = send(&gw.url, &req("c", "2+2?")).await;
    assert_eq!(r.h("x-tandem-role").as_deref(), Some("small"));
    assert_eq!(small.bodies().last().unwrap()["logprobs"], true);
    assert!(r.body["choices"][0]["logprobs"].is_null(), "{}", r.text);
    // Cascade escalated: the large call carries the client's own request, and its logprobs
    // come back; without the client asking, no logprobs at all.
    small.push(answer_lp(lp_content(&toks, -3.0, 5)));
    large.push(answer_lp(lp3.clone()));
    let r = send(&gw.url, &ask("c", Some(3))).await;
    assert_eq!(r.h("x-tandem-role").as_deref(), Some("large"));
    assert_eq!(large.bodies().last().unwrap()["top_logprobs"], 3);
    assert_eq!(r.body["choices"][0]["logprobs"], lp3);
    small.push(answer_lp(lp_content(&toks, -3.0, 5)));
    large.push(answer_lp(Value::Null));
    let r = send(&gw.url, &req("c", "2+2?")).await;
    assert_eq!(r.h("x-tandem-role").as_deref(), Some("large"));
    let sent = large.bodies().last().unwrap().clone();
    assert!(
        sent.get("logprobs").is_none() && sent.get("top_logprobs").is_none(),
        "{sent}"
    );
    assert!(r.body["choices"][0]["logprobs"].is_null());
    // Streams: the client's logprobs ride on the chunks; none when not asked.
    large.push(answer_lp(lp3.clone()));
    let r = send(&gw.url, &streamed(ask("f", Some(3)))).await;
    let (events, _) = r.sse();
    let lps: Vec<&Value> = events
        .iter()
        .map(|e| &e["choices"][0]["logprobs"])
        .filter(|l| !l.is_null())
        .collect();
    assert_eq!(lps, vec![&lp3], "{}", r.text);
    small.push(answer_lp(lp5.clone()));
    let r = send(&gw.url, &streamed(req("c", "2+2?"))).await;
    assert_eq!(r.h("x-tandem-role").as_deref(), Some("small"));
    let (events, done) = r.sse();
    assert!(done);
    assert_eq!(content_of(&events), "The answer is 4");
    assert!(
        events.iter().all(|e| e["choices"][0]["logprobs"].is_null()),
        "{}",
        r.text
    );
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Cascades judge tool-call drafts
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cascade_escalates_invalid_drafts_whatever_their_logprobs() {
    setup_env();
    let (small, s_url, large, l_url) = two_mocks().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}{}",
        ups(&s_url, &l_url, LARGE),
        cascade("c", "small", "large", "")
    );
    let gw = start(&cfg, dir.path()).await;
    large.set_always(Some(Scripted::text("large answer")));
    let weather = |args: &str| tool_msg(&[tool_call("call_a", "get_weather", args)]);
    let named = |name: &str| json!({"type": "function", "function": {"name": name}});
    // (case, tool_choice, the small draft, finish_reason, escalates)
    let cases: Vec<(&str, Option<Value>, Value, &str, bool)> = vec![
        (
            "tool not offered",
            None,
            tool_msg(&[tool_call("call_a", "delete_everything", "{}")]),
            "tool_calls",
            true,
        ),
        (
            "arguments not JSON",
            None,
            weather("{city: Paris"),
            "tool_calls",
            true,
        ),
        (
            "arguments not an object",
            None,
            weather("\"Paris\""),
            "tool_calls",
            true,
        ),
        (
            "required key missing",
            None,
            weather("{\"unit\":\"c\"}"),
            "tool_calls",
            true,
        ),
        (
            "wrong type",
            None,
            weather("{\"city\": 42}"),
            "tool_calls",
            true,
        ),
        (
            "enum violated",
            None,
            weather("{\"city\": \"Paris\", \"unit\": \"k\"}"),
            "tool_calls",
            true,
        ),
        (
            "second of two calls invalid",
            None,
            tool_msg(&[
                tool_call("call_a", "get_weather", "{\"city\":\"Paris\"}"),
                tool_call("call_b", "get_time", "{}"),
            ]),
            "tool_calls",
            true,
        ),
        (
            "empty: null content, no calls",
            None,
            json!({"role": "assistant", "content": null}),
            "stop",
            true,
        ),
        (
            "empty: empty tool_calls list",
            None,
            json!({"role": "assistant", "content": null, "tool_calls": []}),
            "stop",
            true,
        ),
        (
            "refusal",
            None,
            json!({"role": "assistant", "content": null, "refusal": "I can't help with that."}),
            "stop",
            true,
        ),
        (
            "required but text",
            Some(json!("required")),
            text_msg("It is sunny."),
            "stop",
            true,
        ),
        (
            "named function but text",
            Some(named("get_weather")),
            text_msg("It is sunny."),
            "stop",
            true,
        ),
        (
            "named function but another called",
            Some(named("get_time")),
            weather("{\"city\":\"Paris\"}"),
            "tool_calls",
            true,
        ),
        (
            "none but a call",
            Some(json!("none")),
            weather("{\"city\":\"Paris\"}"),
            "tool_calls",
            true,
        ),
        // Valid drafts, sure: served small.
        (
            "valid call",
            None,
            weather("{\"city\":\"Paris\"}"),
            "tool_calls",
            false,
        ),
        (
            "valid call, required",
            Some(json!("required")),
            weather("{\"city\":\"Paris\",\"unit\":\"f\"}"),
            "tool_calls",
            false,
        ),
        (
            "valid call, named",
            Some(named("get_weather")),
            weather("{\"city\":\"Oslo\"}"),
            "tool_calls",
            false,
        ),
        (
            "valid parallel calls",
            None,
            tool_msg(&[
                tool_call("call_a", "get_weather", "{\"city\":\"Paris\"}"),
                tool_call("call_b", "get_time", "{\"tz\":\"UTC\"}"),
            ]),
            "tool_calls",
            false,
        ),
        (
            "text, tools offered",
            None,
            text_msg("It is sunny."),
            "stop",
            false,
        ),
        (
            "text, tool_choice none",
            Some(json!("none")),
            text_msg("It is sunny."),
            "stop",
            false,
        ),
    ];
    let mut failures = Vec::new();
    for stream in [false, true] {
        for (name, choice, draft, finish, escalates) in &cases {
            let mut body = with(req("c", "weather in Paris?"), "tools", tools());
            if let Some(c) = choice {
                body["tool_choice"] = c.clone();
            }
            if stream {
                body = streamed(body);
            }
            let (ns, nl) = (small.calls(), large.calls());
            small.push(small_answer(draft.clone(), finish, -0.01));
            let r = send(&gw.url, &body).await;
            let role = r.h("x-tandem-role").unwrap_or_default();
            let want = if *escalates { "large" } else { "small" };
            let ok = r.status == 200
                && role == want
                && small.calls() == ns + 1
                && large.calls() == nl + usize::from(*escalates);
            if !ok {
                failures.push(format!(
                    "{name} (stream={stream}): status {} role {role:?} want {want}, small +{} large +{}",
                    r.status,
                    small.calls() - ns,
                    large.calls() - nl
                ));
            } else if !*escalates && !stream {
                assert_eq!(&r.body["choices"][0]["message"], draft, "{name}");
            }
        }
    }
    // Drain a draft left unconsumed by a failing case.
    small.script.lock().unwrap().clear();
    assert!(
        failures.is_empty(),
        "wrong judgements:\n{}",
        failures.join("\n")
    );
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Errors keep their meaning
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_4xx_keep_status_type_code_and_param_after_one_call() {
    setup_env();
    let (_small, s_url, large, l_url) = two_mocks().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}{}",
        ups(&s_url, &l_url, LARGE_ONCE),
        fixed("f", "large", "")
    );
    let gw = start(&cfg, dir.path()).await;
    // (status, type, code, param, x-should-retry)
    let cases: Vec<(u16, &str, Value, Value, &str)> = vec![
        (
            400,
            "invalid_request_error",
            json!("context_length_exceeded"),
            json!("messages"),
            "false",
        ),
        (
            400,
            "invalid_request_error",
            Value::Null,
            json!("temperature"),
            "false",
        ),
        (
            401,
            "invalid_request_error",
            json!("invalid_api_key"),
            Value::Null,
            "false",
        ),
        (
            403,
            "permission_error",
            json!("unsupported_country_region_territory"),
            Value::Null,
            "false",
        ),
        (
            404,
            "invalid_request_error",
            json!("model_not_found"),
            json!("model"),
            "false",
        ),
        (
            408,
            "timeout_error",
            json!("request_timeout"),
            Value::Null,
            "true",
        ),
        (
            409,
            "conflict_error",
            json!("conflict"),
            Value::Null,
            "true",
        ),
        (
            422,
            "invalid_request_error",
            json!("unprocessable_entity"),
            json!("tools[0]"),
            "false",
        ),
    ];
    for stream in [false, true] {
        for (status, kind, code, param, retry) in &cases {
            let what = format!("{status} {code} stream={stream}");
            let message = format!("upstream says no ({status})");
            large.push(Scripted::error(
                *status,
                err_body(&message, kind, code.clone(), param.clone()),
            ));
            let n = large.calls();
            let mut body = req("f", "hi");
            if stream {
                body = streamed(body);
            }
            let r = send(&gw.url, &body).await;
            assert_eq!(r.status, *status, "{what}: {}", r.text);
            assert_eq!(large.calls(), n + 1, "{what}: exactly one upstream call");
            let e = &r.body["error"];
            assert_eq!(e["type"], *kind, "{what}: {}", r.text);
            assert_eq!(e["code"], *code, "{what}: {}", r.text);
            assert_eq!(e["param"], *param, "{what}: {}", r.text);
            let m = e["message"].as_str().unwrap_or_default();
            assert!(m.contains(&message) && m.contains("large"), "{what}: {m}");
            assert_eq!(r.h("x-should-retry").as_deref(), Some(*retry), "{what}");
        }
    }
    // A 4xx whose body is not OpenAI's shape keeps its status too.
    large.push(Scripted::Raw {
        status: 400,
        headers: vec![],
        body: "Bad Request: temperature out of range".into(),
    });
    let r = send(&gw.url, &req("f", "hi")).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.h("x-should-retry").as_deref(), Some("false"));
    assert!(r.body["error"]["message"].is_string());
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_429_keeps_retry_after_and_5xx_are_retryable_502() {
    setup_env();
    let (_small, s_url, large, l_url) = two_mocks().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}{}",
        ups(&s_url, &l_url, LARGE_ONCE),
        fixed("f", "large", "")
    );
    let gw = start(&cfg, dir.path()).await;
    for stream in [false, true] {
        let body = if stream {
            streamed(req("f", "hi"))
        } else {
            req("f", "hi")
        };
        for secs in ["7", "30"] {
            large.push(Scripted::Json {
                status: 429,
                headers: vec![("retry-after".into(), secs.into())],
                body: err_body(
                    "Rate limit reached",
                    "requests",
                    json!("rate_limit_exceeded"),
                    Value::Null,
                ),
            });
            let n = large.calls();
            let r = send(&gw.url, &body).await;
            assert_eq!(r.status, 429, "{}", r.text);
            assert_eq!(r.h("retry-after").as_deref(), Some(secs), "stream={stream}");
            assert_eq!(r.h("x-should-retry").as_deref(), Some("true"));
            assert_eq!(r.body["error"]["type"], "requests");
            assert_eq!(r.body["error"]["code"], "rate_limit_exceeded");
            assert_eq!(large.calls(), n + 1);
        }
        for status in [500u16, 502, 503] {
            large.push(Scripted::error(
                status,
                err_body("overloaded", "server_error", Value::Null, Value::Null),
            ));
            let r = send(&gw.url, &body).await;
            assert_eq!(r.status, 502, "{status} stream={stream}: {}", r.text);
            assert_eq!(r.h("x-should-retry").as_deref(), Some("true"));
            assert!(r.body["error"]["message"].is_string());
        }
        // Malformed answers.
        for raw in ["{\"choices\": [oops", "not json at all"] {
            large.push(Scripted::Raw {
                status: 200,
                headers: vec![("content-type".into(), "application/json".into())],
                body: raw.into(),
            });
            let r = send(&gw.url, &body).await;
            if stream {
                // Either refused before the stream or an error event in it.
                let failed = r.status == 502 || error_event(&r.sse().0).is_some();
                assert!(failed, "malformed stream {raw:?}: {} {}", r.status, r.text);
            } else {
                assert_eq!(r.status, 502, "{raw:?}: {}", r.text);
                assert_eq!(r.h("x-should-retry").as_deref(), Some("true"));
            }
        }
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_small_model_hands_the_request_to_the_large_one() {
    setup_env();
    let (small, s_url, large, l_url) = two_mocks().await;
    let dir = tempfile::tempdir().unwrap();
    // The small upstream times out at 400 ms.
    let cfg = format!(
        "{}{}{}",
        upstream(
            "small",
            &s_url,
            "small-model",
            "price = \"token:0.1:0.1\"\ntimeout_ms = 400\nlogprobs = true\n[upstream.retry]\nattempts = 1\n[upstream.breaker]\nconsecutive_failures = 1000\nmin_calls = 1000\n"
        ),
        upstream("large", &l_url, "large-model", LARGE),
        cascade("c", "small", "large", "")
    );
    let gw = start(&cfg, dir.path()).await;
    large.set_always(Some(Scripted::text("large answer")));
    let failures: Vec<(&str, Scripted)> = vec![
        (
            "400 context_length_exceeded",
            Scripted::error(
                400,
                err_body(
                    "too long",
                    "invalid_request_error",
                    json!("context_length_exceeded"),
                    json!("messages"),
                ),
            ),
        ),
        (
            "400 logprobs unsupported",
            Scripted::error(
                400,
                err_body(
                    "logprobs not supported",
                    "invalid_request_error",
                    Value::Null,
                    json!("logprobs"),
                ),
            ),
        ),
        (
            "404 model_not_found",
            Scripted::error(
                404,
                err_body(
                    "no such model",
                    "invalid_request_error",
                    json!("model_not_found"),
                    json!("model"),
                ),
            ),
        ),
        (
            "429",
            Scripted::Json {
                status: 429,
                headers: vec![("retry-after".into(), "7".into())],
                body: err_body(
                    "slow down",
                    "requests",
                    json!("rate_limit_exceeded"),
                    Value::Null,
                ),
            },
        ),
        (
            "500",
            Scripted::error(
                500,
                err_body("down", "server_error", Value::Null, Value::Null),
            ),
        ),
        (
            "503",
            Scripted::error(
                503,
                err_body("overloaded", "server_error", Value::Null, Value::Null),
            ),
        ),
        (
            "garbage",
            Scripted::Raw {
                status: 200,
                headers: vec![],
                body: "{\"choices\": [oops".into(),
            },
        ),
    ];
    for stream in [false, true] {
        for (name, fail) in &failures {
            let (ns, nl) = (small.calls(), large.calls());
            small.push(fail.clone());
            let body = if stream {
                streamed(req("c", "easy"))
            } else {
                req("c", "easy")
            };
            let r = send(&gw.url, &body).await;
            let what = format!("{name} stream={stream}");
            assert_eq!(r.status, 200, "{what}: {}", r.text);
            assert_eq!(r.h("x-tandem-role").as_deref(), Some("large"), "{what}");
            assert_eq!(
                (small.calls() - ns, large.calls() - nl),
                (1, 1),
                "{what}: one call each"
            );
            if stream {
                assert_eq!(content_of(&r.sse().0), "large answer", "{what}");
            } else {
                assert_eq!(
                    r.body["choices"][0]["message"]["content"], "large answer",
                    "{what}"
                );
                assert_eq!(r.body["tandem"]["tried"], 2, "{what}");
            }
        }
    }
    // A small timeout.
    small.delay_ms.store(1000, Ordering::SeqCst);
    let r = send(&gw.url, &req("c", "easy")).await;
    assert_eq!(r.status, 200, "small timeout: {}", r.text);
    assert_eq!(r.h("x-tandem-role").as_deref(), Some("large"));
    small.delay_ms.store(0, Ordering::SeqCst);
    // Both fail: the large one's error is returned.
    large.set_always(None);
    small.push(Scripted::error(
        500,
        err_body("down", "server_error", Value::Null, Value::Null),
    ));
    large.push(Scripted::error(
        400,
        err_body(
            "large refuses",
            "invalid_request_error",
            json!("context_length_exceeded"),
            json!("messages"),
        ),
    ));
    let r = send(&gw.url, &req("c", "easy")).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.body["error"]["code"], "context_length_exceeded");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("large"),
        "{}",
        r.text
    );
    small.push(Scripted::error(
        400,
        err_body(
            "small refuses",
            "invalid_request_error",
            Value::Null,
            Value::Null,
        ),
    ));
    large.push(Scripted::Json {
        status: 429,
        headers: vec![("retry-after".into(), "7".into())],
        body: err_body(
            "slow down",
            "requests",
            json!("rate_limit_exceeded"),
            Value::Null,
        ),
    });
    let r = send(&gw.url, &req("c", "easy")).await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(r.h("retry-after").as_deref(), Some("7"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_route_answers_429_with_its_window() {
    setup_env();
    let (_small, s_url, _large, l_url) = two_mocks().await;
    let dir = tempfile::tempdir().unwrap();
    let refuse = |window: bool| {
        format!(
            "on_exhausted = \"refuse\"\n[route.budget]\nmax_calls = 1\n{}",
            if window { "window_s = 3600\n" } else { "" }
        )
    };
    let cfg = format!(
        "{}{}{}{}",
        ups(&s_url, &l_url, LARGE),
        fixed("win", "large", &refuse(true)),
        fixed("forever", "large", &refuse(false)),
        cascade("cwin", "small", "large", &refuse(true))
    );
    let gw = start(&cfg, dir.path()).await;
    let check_429 = |r: &Resp, windowed: bool, what: &str| {
        assert_eq!(r.status, 429, "{what}: {}", r.text);
        assert_eq!(r.body["error"]["code"], "insufficient_quota", "{what}");
        if windowed {
            let s: u64 = r
                .h("retry-after")
                .unwrap_or_else(|| panic!("{what}: no retry-after"))
                .parse()
                .unwrap();
            assert!((1..=3600).contains(&s), "{what}: retry-after {s}");
            assert_eq!(r.h("x-should-retry").as_deref(), Some("true"), "{what}");
        } else {
            assert_eq!(r.h("retry-after"), None, "{what}");
            assert_eq!(r.h("x-should-retry").as_deref(), Some("false"), "{what}");
        }
    };
    for (route, windowed) in [("win", true), ("forever", false)] {
        assert_eq!(send(&gw.url, &req(route, "hi")).await.status, 200);
        check_429(&send(&gw.url, &req(route, "hi")).await, windowed, route);
        check_429(
            &send(&gw.url, &streamed(req(route, "hi"))).await,
            windowed,
            route,
        );
    }
    // A refusing cascade: a sure small answer needs no budget; an escalation does.
    let r = send(&gw.url, &req("cwin", "hard one")).await;
    assert_eq!(r.h("x-tandem-role").as_deref(), Some("large"));
    assert_eq!(send(&gw.url, &req("cwin", "easy one")).await.status, 200);
    check_429(&send(&gw.url, &req("cwin", "hard one")).await, true, "cwin");
    gw.stop().await;
}

/// A request whose worst case (input plus its whole output cap at the large price) is above the
/// route's whole dollar cap can never be served by the large model: a refusing route says so with
/// 400 `request_over_budget` (not a 429 that invites waiting for a window), naming the cap and
/// what to lower; the same route still serves requests that fit, and a cascade that does not
/// refuse serves its small model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_can_never_fit_the_cap_is_told_so() {
    setup_env();
    let (_small, s_url, large, l_url) = two_mocks().await;
    let dir = tempfile::tempdir().unwrap();
    let cap = "on_exhausted = \"refuse\"\n[route.budget]\nmax_usd = 0.05\nwindow_s = 3600\n";
    let cfg = format!(
        "{}{}{}{}",
        ups(&s_url, &l_url, LARGE_ONCE),
        fixed("tight", "large", cap),
        cascade("ctight", "small", "large", cap),
        cascade(
            "cserve",
            "small",
            "large",
            "[route.budget]\nmax_usd = 0.05\n"
        )
    );
    let gw = start(&cfg, dir.path()).await;
    // $30 per million output tokens: 2,000 fit in $0.06 no longer; 1,000 do.
    for (field, n) in [
        ("max_tokens", 2_000),
        ("max_completion_tokens", 100_000),
        ("max_tokens", 1_000_000),
    ] {
        for (route, text) in [("tight", "hi"), ("ctight", "hard one")] {
            let calls = large.calls();
            let mut body = req(route, text);
            body[field] = json!(n);
            for b in [body.clone(), streamed(body)] {
                let r = send(&gw.url, &b).await;
                let what = format!("{route} {field}={n} stream={}", b["stream"]);
                assert_eq!(r.status, 400, "{what}: {}", r.text);
                assert_eq!(r.body["error"]["code"], "request_over_budget", "{what}");
                assert_eq!(r.h("x-should-retry").as_deref(), Some("false"), "{what}");
                let msg = r.body["error"]["message"].as_str().unwrap_or_default();
                assert!(
                    msg.contains(route) && msg.contains("$0.05") && msg.contains("max_tokens"),
                    "{what}: {msg}"
                );
            }
            assert_eq!(large.calls(), calls, "no large call for {route}");
        }
    }
    let mut fits = req("tight", "hi");
    fits["max_tokens"] = json!(500);
    assert_eq!(send(&gw.url, &fits).await.status, 200);
    // A cascade that does not refuse serves its small model instead.
    let mut body = req("cserve", "hard one");
    body["max_tokens"] = json!(1_000_000);
    let r = send(&gw.url, &body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.h("x-tandem-role").as_deref(), Some("small"));
    assert_eq!(r.h("x-tandem-capped").as_deref(), Some("true"));
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_error_text_is_scrubbed_of_keys() {
    setup_env();
    let gw_key = "gwkey-client-0123456789abcdef";
    std::env::set_var("TANDEM_TEST_CONF_GW_KEYS", format!("{gw_key}, other-key"));
    let (small, s_url, large, l_url) = two_mocks().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "[server]\napi_keys_env = \"TANDEM_TEST_CONF_GW_KEYS\"\n{}{}{}",
        ups(&s_url, &l_url, LARGE_ONCE),
        fixed("f", "large", ""),
        cascade("c", "small", "large", "")
    );
    let gw = start(&cfg, dir.path()).await;
    let proj = "sk-proj-AbCdEf0123456789AbCdEf0123456789xyz";
    let leaky = [
        format!("Incorrect API key provided: {KEY}. You can find your API key at https://platform.example/account."),
        format!("Authorization header was 'Bearer {KEY}'"),
        format!("key {proj} is revoked; also tried {KEY}"),
        format!("client key {gw_key} seen"),
        "Bearer abcdefghijklmnopqrstuvwxyz012345 rejected".to_string(),
    ];
    let secrets = [
        KEY,
        "upstream-secret-123",
        proj,
        "AbCdEf0123456789",
        gw_key,
        "0123456789abcdef",
        "abcdefghijklmnopqrstuvwxyz012345",
    ];
    let assert_clean = |r: &Resp, what: &str| {
        for s in secrets {
            assert!(!r.text.contains(s), "{what}: `{s}` leaked: {}", r.text);
        }
        let hs = format!("{:?}", r.headers);
        assert!(!hs.contains(KEY), "{what}: key in headers");
    };
    for (i, msg) in leaky.iter().enumerate() {
        for (status, stream) in [
            (401u16, false),
            (401, true),
            (403, false),
            (400, false),
            (429, false),
            (500, false),
        ] {
            let what = format!("#{i} {status} stream={stream}");
            large.push(Scripted::error(
                status,
                err_body(
                    msg,
                    "invalid_request_error",
                    json!("invalid_api_key"),
                    Value::Null,
                ),
            ));
            let body = if stream {
                streamed(req("f", "hi"))
            } else {
                req("f", "hi")
            };
            let r = send_with_key(&gw.url, &body, Some(gw_key)).await;
            assert_eq!(
                r.status,
                if status == 500 { 502 } else { status },
                "{what}: {}",
                r.text
            );
            assert!(r.body["error"]["message"].is_string(), "{what}");
            assert_clean(&r, &what);
        }
    }
    // The upstream did get the key (so the scrubbing above is what kept it out).
    assert_eq!(
        large.last_header("authorization").as_deref(),
        Some(format!("Bearer {KEY}").as_str())
    );
    // In a cascade: both fail, the large one's key-laden 401 is returned scrubbed.
    small.push(Scripted::error(
        401,
        err_body(&leaky[2], "invalid_request_error", Value::Null, Value::Null),
    ));
    large.push(Scripted::error(
        401,
        err_body(
            &leaky[0],
            "invalid_request_error",
            json!("invalid_api_key"),
            Value::Null,
        ),
    ));
    let r = send_with_key(&gw.url, &req("c", "hi"), Some(gw_key)).await;
    assert_eq!(r.status, 401, "{}", r.text);
    assert_clean(&r, "cascade");
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Budgets can't be bypassed
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_null_usage_is_charged_an_estimate() {
    setup_env();
    let (_small, s_url, large, l_url) = two_mocks().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}{}",
        ups(&s_url, &l_url, LARGE),
        fixed("f", "large", "[route.budget]\nmax_usd = 100.0")
    );
    let gw = start(&cfg, dir.path()).await;
    let answer = |message: Value, finish: &str, usage: Option<Value>| Scripted::Answer {
        message,
        finish_reason: json!(finish),
        logprobs: Value::Null,
        usage,
        extra: json!({}),
    };
    let weather = "{\"city\":\"Paris\"}";
    // (case, reply, bytes of the returned text)
    let cases: Vec<(&str, Scripted, u64)> = vec![
        (
            "usage omitted",
            answer(text_msg("hello world"), "stop", None),
            11,
        ),
        (
            "usage null",
            answer(text_msg("abc"), "stop", Some(Value::Null)),
            3,
        ),
        (
            "tool call, usage omitted",
            answer(
                tool_msg(&[tool_call("call_a", "get_weather", weather)]),
                "tool_calls",
                None,
            ),
            ("get_weather".len() + weather.len()) as u64,
        ),
        (
            "refusal, usage null",
            answer(
                json!({"role": "assistant", "content": null, "refusal": "I can't."}),
                "stop",
                Some(Value::Null),
            ),
            8,
        ),
    ];
    let mut fails = Vec::new();
    for stream in [false, true] {
        for (name, reply, out_bytes) in &cases {
            let what = format!("{name} stream={stream}");
            large.push(reply.clone());
            let mut body = with(req("f", "hi there"), "tools", tools());
            if stream {
                body = with(
                    streamed(body),
                    "stream_options",
                    json!({"include_usage": true}),
                );
            }
            let before = spent(&gw, 0);
            let r = send(&gw.url, &body).await;
            assert_eq!(r.status, 200, "{what}: {}", r.text);
            let (usage, tandem) = if stream {
                let (events, done) = r.sse();
                assert!(done, "{what}");
                let u = events
                    .iter()
                    .find(|e| e["usage"].is_object())
                    .unwrap_or_else(|| panic!("{what}: no usage chunk: {}", r.text))
                    .clone();
                (u["usage"].clone(), u["tandem"].clone())
            } else {
                (r.body["usage"].clone(), r.body["tandem"].clone())
            };
            let after = spent_after(&gw, 0, before).await;
            let (p, c) = (
                usage["prompt_tokens"].as_u64().unwrap_or(0),
                usage["completion_tokens"].as_u64().unwrap_or(0),
            );
            // Input = bytes of the forwarded body (tools included).
            let sent = serde_json::to_vec(large.bodies().last().unwrap())
                .unwrap()
                .len() as u64;
            let checks = [
                (
                    after.0 == before.0 + 1,
                    format!("calls {before:?} -> {after:?}"),
                ),
                (after.1 > before.1, "charged $0".to_string()),
                (
                    tandem["usage_estimated"] == true,
                    format!("usage_estimated = {}", tandem["usage_estimated"]),
                ),
                (
                    c == *out_bytes,
                    format!("completion_tokens {c}, the returned text is {out_bytes} bytes"),
                ),
                (
                    p + 32 >= sent && p <= sent + 32,
                    format!("prompt_tokens {p}, the forwarded body is {sent} bytes"),
                ),
                (
                    after.1 - before.1 == 10 * p + 30 * c,
                    format!(
                        "charged {} micro-dollars, the usage shown costs {}",
                        after.1 - before.1,
                        10 * p + 30 * c
                    ),
                ),
            ];
            for (ok, why) in checks {
                if !ok {
                    fails.push(format!("{what}: {why}"));
                }
            }
        }
    }
    assert!(fails.is_empty(), "estimates:\n{}", fails.join("\n"));
    // A stream ending without usage and a client that did not ask for it: still charged.
    large.push(answer(text_msg("hello"), "stop", None));
    let before = spent(&gw, 0);
    let r = send(&gw.url, &streamed(req("f", "hi"))).await;
    assert!(r.sse().1);
    let after = spent_after(&gw, 0, before).await;
    assert!(
        after.1 > before.1 && after.0 == before.0 + 1,
        "{after:?} vs {before:?}"
    );
    // Reported usage is charged as reported.
    large.push(Scripted::text("four"));
    let before = spent(&gw, 0);
    let r = send(&gw.url, &req("f", "hi")).await;
    assert_eq!(r.body["tandem"]["usage_estimated"], false);
    assert_eq!(spent(&gw, 0).1 - before.1, 140);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_calls_budget_holds_when_usage_is_missing() {
    setup_env();
    let (_small, s_url, large, l_url) = two_mocks().await;
    let dir = tempfile::tempdir().unwrap();
    let refuse = "on_exhausted = \"refuse\"\n[route.budget]\nmax_usd = 0.02";
    let cfg = format!(
        "{}{}{}",
        ups(&s_url, &l_url, LARGE),
        fixed("plain", "large", refuse),
        fixed("streamed", "large", refuse)
    );
    let gw = start(&cfg, dir.path()).await;
    // 400 bytes of text, no usage: each call costs at least its 100 output tokens ($0.003).
    let long = "x".repeat(400);
    large.set_always(Some(Scripted::Answer {
        message: text_msg(&long),
        finish_reason: json!("length"),
        logprobs: Value::Null,
        usage: None,
        extra: json!({}),
    }));
    for (i, route) in ["plain", "streamed"].into_iter().enumerate() {
        let n = large.calls();
        let mut served = 0;
        for _ in 0..20 {
            let mut body = with(req(route, "hi"), "max_tokens", json!(100));
            if route == "streamed" {
                body = streamed(body);
            }
            let r = send(&gw.url, &body).await;
            if r.status == 200 {
                served += 1;
                let _ = r.sse();
            } else {
                assert_eq!(r.status, 429, "{}", r.text);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (calls, micros) = spent(&gw, i);
        eprintln!("{route}: {served} of 20 served, spent {micros} micro-dollars");
        assert!(served >= 1, "{route}: nothing served");
        assert!(
            served <= 6,
            "{route}: {served} of 20 calls on a $0.02 cap at >= $0.003 each"
        );
        assert_eq!(large.calls() - n, served, "{route}");
        assert_eq!(calls, served as u64, "{route}");
        assert!(micros <= 20_000, "{route}: spent {micros}");
    }
    gw.stop().await;
}

/// About 6 KB of tool definitions.
fn big_tools() -> Value {
    let desc = "Looks up a record in the inventory system and returns its fields. ".repeat(6);
    json!((0..14)
        .map(|i| json!({"type": "function", "function": {
            "name": format!("tool_{i}"), "description": desc.as_str(),
            "parameters": {"type": "object", "properties": {"id": {"type": "string"}},
                           "required": ["id"]}}}))
        .collect::<Vec<_>>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_payloads_count_and_64_clients_never_pass_the_cap() {
    setup_env();
    let (_small, s_url, large, l_url) = two_mocks().await;
    let dir = tempfile::tempdir().unwrap();
    // $1/$3 per million tokens; the mock bills one token per forwarded byte (the bound the
    // reservation takes) and the whole 50-token cap.
    let cfg = format!(
        "{}{}",
        ups(
            &s_url,
            &l_url,
            "api_key_env = \"TANDEM_TEST_LARGE_KEY\"\nprice = \"token:1:3\"\ntimeout_ms = 5000\n"
        ),
        fixed(
            "f",
            "large",
            "on_exhausted = \"refuse\"\n[route.budget]\nmax_usd = 0.05"
        )
    );
    let gw = start(&cfg, dir.path()).await;
    large.delay_ms.store(30, Ordering::SeqCst);
    large.set_always(Some(Scripted::with(|req| {
        let p = serde_json::to_vec(req).unwrap().len();
        Scripted::Answer {
            message: text_msg("ok"),
            finish_reason: json!("stop"),
            logprobs: Value::Null,
            usage: Some(
                json!({"prompt_tokens": p, "completion_tokens": 50, "total_tokens": p + 50}),
            ),
            extra: json!({}),
        }
    })));
    let tools = big_tools();
    assert!(
        tools.to_string().len() >= 6000,
        "{}",
        tools.to_string().len()
    );
    let mut tasks = Vec::new();
    for i in 0..64 {
        let url = gw.url.clone();
        let body = json!({"model": "f", "messages": [{"role": "user", "content": format!("look up {i}")}],
                          "tools": tools.clone(), "max_tokens": 50});
        tasks.push(tokio::spawn(async move { send(&url, &body).await.status }));
    }
    let mut served = 0;
    for t in tasks {
        match t.await.unwrap() {
            200 => served += 1,
            429 => {}
            s => panic!("status {s}"),
        }
    }
    let billed: u64 = large
        .bodies()
        .iter()
        .map(|b| serde_json::to_vec(b).unwrap().len() as u64 + 50 * 3)
        .sum();
    let (calls, micros) = spent(&gw, 0);
    eprintln!("64 clients: {served} served, billed {billed}, spent {micros} micro-dollars");
    assert!(served >= 1, "nothing served");
    assert_eq!(large.calls(), served);
    assert!(
        billed <= 50_000,
        "the mock billed {billed} micro-dollars on a 50000 cap ({served} calls)"
    );
    assert_eq!(calls, served as u64);
    assert_eq!(micros, billed, "settled from the usage reported");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_audio_and_file_parts_reserve_image_tokens() {
    setup_env();
    let (small, s_url, large, l_url) = two_mocks().await;
    let dir = tempfile::tempdir().unwrap();
    // 5000 tokens an image at $1 per million: $0.005 an image, whatever its bytes.
    let cfg = format!(
        "{}{}{}{}{}{}",
        ups(
            &s_url,
            &l_url,
            "api_key_env = \"TANDEM_TEST_LARGE_KEY\"\nprice = \"token:1:1\"\ntimeout_ms = 2000\nimage_tokens = 5000\n"
        ),
        fixed("img", "large", "on_exhausted = \"refuse\"\n[route.budget]\nmax_usd = 0.003"),
        fixed("audio", "large", "on_exhausted = \"refuse\"\n[route.budget]\nmax_usd = 0.003"),
        fixed("file", "large", "on_exhausted = \"refuse\"\n[route.budget]\nmax_usd = 0.003"),
        fixed("two", "large", "on_exhausted = \"refuse\"\n[route.budget]\nmax_usd = 0.008"),
        cascade("c", "small", "large", "[route.budget]\nmax_usd = 0.003")
    );
    let gw = start(&cfg, dir.path()).await;
    large.set_always(Some(Scripted::text("seen")));
    let png = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";
    let image = json!({"type": "image_url", "image_url": {"url": png}});
    let audio = json!({"type": "input_audio", "input_audio": {"data": "UklGRiQAAABXQVZFZm10IBAAAAABAAEA", "format": "wav"}});
    let file = json!({"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBERi0xLjQK"}});
    let with_parts = |route: &str, text: &str, parts: &[&Value]| {
        let mut content = vec![json!({"type": "text", "text": text})];
        content.extend(parts.iter().map(|p| (*p).clone()));
        json!({"model": route, "messages": [{"role": "user", "content": content}], "max_tokens": 10})
    };
    for (route, part) in [("img", &image), ("audio", &audio), ("file", &file)] {
        // The text alone fits the cap.
        let n = large.calls();
        let r = send(&gw.url, &with_parts(route, "describe", &[])).await;
        assert_eq!(r.status, 200, "{route} text: {}", r.text);
        // With the part it never can: refused before any call, as over the whole budget.
        let r = send(&gw.url, &with_parts(route, "describe", &[part])).await;
        assert_eq!(r.status, 400, "{route} with its part: {}", r.text);
        assert_eq!(r.body["error"]["code"], "request_over_budget", "{route}");
        assert_eq!(
            large.calls(),
            n + 1,
            "{route}: the part's call must not be made"
        );
        let r = send(&gw.url, &streamed(with_parts(route, "describe", &[part]))).await;
        assert_eq!(r.status, 400, "{route} streamed: {}", r.text);
    }
    // One image fits $0.008, two do not.
    let r = send(&gw.url, &with_parts("two", "compare", &[&image])).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = send(&gw.url, &with_parts("two", "compare", &[&image, &image])).await;
    assert_eq!(r.status, 400, "two images: {}", r.text);
    assert_eq!(r.body["error"]["code"], "request_over_budget");
    // A cascade whose budget fits the text but not the image serves the small draft.
    let n = large.calls();
    small.push(small_answer(text_msg("maybe"), "stop", -3.0));
    small.push(small_answer(text_msg("maybe"), "stop", -3.0));
    let r = send(&gw.url, &with_parts("c", "hard one", &[&image])).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.h("x-tandem-role").as_deref(), Some("small"), "{}", r.text);
    assert_eq!(r.body["tandem"]["capped"], true);
    assert_eq!(large.calls(), n);
    let r = send(&gw.url, &with_parts("c", "hard one", &[])).await;
    assert_eq!(r.h("x-tandem-role").as_deref(), Some("large"), "{}", r.text);
    assert_eq!(large.calls(), n + 1);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Streams and their timeouts
// ---------------------------------------------------------------------------------------------

fn pieces(n: usize) -> Vec<Value> {
    let mut v = vec![upstream_chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    v.extend((0..n).map(|i| upstream_chunk(json!({"content": format!("p{i} ")}), Value::Null)));
    v.push(upstream_chunk(json!({}), json!("stop")));
    v
}

fn pieces_text(n: usize) -> String {
    (0..n).map(|i| format!("p{i} ")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producing_stream_outlives_the_call_timeout_and_stream_timeout_caps_it() {
    setup_env();
    let (small, s_url, large, l_url) = two_mocks().await;
    let dir = tempfile::tempdir().unwrap();
    let timeouts = "timeout_ms = 300\nfirst_token_timeout_ms = 200\nidle_timeout_ms = 150\n";
    let cfg = format!(
        "{}{}{}{}{}",
        ups(
            &s_url,
            &l_url,
            &format!(
                "api_key_env = \"TANDEM_TEST_LARGE_KEY\"\nprice = \"token:10:30\"\n{timeouts}"
            )
        ),
        upstream(
            "large_cap",
            &l_url,
            "large-model",
            &format!("price = \"token:10:30\"\n{timeouts}stream_timeout_ms = 250\n")
        ),
        fixed("f", "large", ""),
        fixed("fcap", "large_cap", ""),
        cascade("c", "small", "large", "")
    );
    let gw = start(&cfg, dir.path()).await;
    // Producing every 50 ms (or 40 ms) for 600-800 ms, past the 300 ms call timeout: whole.
    for (route, n, every) in [("f", 12, 50), ("f", 20, 40), ("c", 12, 50)] {
        if route == "c" {
            small.push(small_answer(text_msg("maybe"), "stop", -3.0));
        }
        large.push(Scripted::sse(pieces(n), every));
        let r = send(&gw.url, &streamed(req(route, "hi"))).await;
        let what = format!("{route} {n}x{every}ms");
        assert_eq!(r.status, 200, "{what}: {}", r.text);
        let (events, done) = r.sse();
        assert!(error_event(&events).is_none(), "{what}: cut: {}", r.text);
        assert!(done, "{what}: no [DONE]");
        assert_eq!(content_of(&events), pieces_text(n), "{what}");
        assert_eq!(finish_of(&events).as_deref(), Some("stop"));
    }
    // stream_timeout_ms = 250 caps the same stream with an error event.
    for (n, every) in [(12, 50), (20, 40)] {
        large.push(Scripted::sse(pieces(n), every));
        let r = send(&gw.url, &streamed(req("fcap", "hi"))).await;
        let (events, _) = r.sse();
        let e =
            error_event(&events).unwrap_or_else(|| panic!("fcap {n}x{every}: not cut: {}", r.text));
        assert!(e["error"]["message"].is_string(), "{e}");
        assert!(
            content_of(&events).len() < pieces_text(n).len(),
            "fcap: all pieces got through"
        );
    }
    // The idle timeout (150 ms) still cuts a stall: after the first piece, or after three.
    for (stall_at, before) in [(2, "p0 "), (4, "p0 p1 p2 ")] {
        let mut timed: Vec<(u64, String)> = pieces(6).iter().map(|c| (20, c.to_string())).collect();
        timed[stall_at].0 = 500;
        large.push(Scripted::SseTimed { chunks: timed });
        let r = send(&gw.url, &streamed(req("f", "hi"))).await;
        let (events, _) = r.sse();
        let e = error_event(&events)
            .unwrap_or_else(|| panic!("stall at {stall_at} not cut: {} {}", r.status, r.text));
        assert_eq!(e["error"]["code"], "upstream_timeout", "{e}");
        assert_eq!(
            content_of(&events),
            before,
            "the pieces before the stall arrive"
        );
    }
    // A plain (non-streamed) call is still bound by timeout_ms.
    large.delay_ms.store(600, Ordering::SeqCst);
    let r = send(&gw.url, &req("f", "hi")).await;
    assert_eq!(r.status, 504, "{}", r.text);
    large.delay_ms.store(0, Ordering::SeqCst);
    gw.stop().await;
}

// ---------------------------------------------------------------------------------------------
// n, and config validation of the gate's needs
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_passes_on_fixed_and_route_before_routes_and_is_refused_by_cascades() {
    setup_env();
    let (small, s_url, large, l_url) = two_mocks().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}{}{}[[route]]\nname = \"rb\"\nkind = \"route_before\"\nsmall = \"small\"\nlarge = \"large\"\ntarget_share = 0.5\n",
        ups(&s_url, &l_url, LARGE),
        fixed("f", "large", ""),
        cascade("c", "small", "large", "")
    );
    let gw = start(&cfg, dir.path()).await;
    let two = json!({"id": "up-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "one"}, "finish_reason": "stop"},
            {"index": 1, "message": {"role": "assistant", "content": null,
                                     "tool_calls": [tool_call("call_a", "get_time", "{\"tz\":\"UTC\"}")]},
             "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}});
    large.push(Scripted::json(two.clone()));
    let body = with(req("f", "hi"), "n", json!(2));
    let r = send(&gw.url, &body).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(large.bodies().last().unwrap()["n"], 2);
    assert_passed_through(&r, &two, "f", "n = 2");
    small.set_always(Some(Scripted::json(two.clone())));
    large.set_always(Some(Scripted::json(two.clone())));
    let r = send(&gw.url, &with(req("rb", "hi"), "n", json!(2))).await;
    assert_eq!(r.status, 200, "route_before n = 2: {}", r.text);
    assert_eq!(r.body["choices"].as_array().map(Vec::len), Some(2));
    let (ns, nl) = (small.calls(), large.calls());
    for n in [2, 3] {
        let r = send(&gw.url, &with(req("c", "hi"), "n", json!(n))).await;
        assert_eq!(r.status, 400, "cascade n = {n}: {}", r.text);
        assert_eq!(r.body["error"]["type"], "invalid_request_error");
    }
    assert_eq!(
        (small.calls(), large.calls()),
        (ns, nl),
        "a refused n makes no call"
    );
    gw.stop().await;
}

#[test]
fn a_logprob_cascade_needs_a_small_upstream_declaring_logprobs() {
    let cfg = |small_extra: &str, gate: &str| {
        format!(
            "{}{}[[route]]\nname = \"c\"\nkind = \"cascade\"\nsmall = \"tiny\"\nlarge = \"big\"\nthreshold = 1.0\ngate = \"{gate}\"\n",
            upstream("tiny", "http://127.0.0.1:9/v1", "m", small_extra),
            upstream("big", "http://127.0.0.1:9/v1", "m", "")
        )
    };
    let check = |text: String| {
        toml::from_str::<tandem_server::ServerConfig>(&text)
            .map_err(|e| e.to_string())
            .and_then(|c| {
                c.validate(std::path::Path::new("t.toml"), std::path::PathBuf::new())
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
    };
    for gate in ["logprob", "energy"] {
        for extra in ["", "logprobs = false\n"] {
            let e = check(cfg(extra, gate))
                .err()
                .unwrap_or_else(|| panic!("{gate} {extra:?} accepted"));
            assert!(e.contains("tiny") && e.contains("logprobs"), "{gate}: {e}");
        }
        check(cfg("logprobs = true\n", gate)).unwrap();
    }
    check(cfg("", "learned")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learned_cascade_asks_no_logprobs_of_a_small_upstream_without_them() {
    setup_env();
    let (small, s_url, large, l_url) = two_mocks().await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "{}{}[[route]]\nname = \"c\"\nkind = \"cascade\"\nsmall = \"small\"\nlarge = \"large\"\ntarget_share = 0.5\ngate = \"learned\"\nexplore = 0.0\n",
        upstream("small", &s_url, "small-model", "price = \"token:0.1:0.1\"\n"),
        upstream("large", &l_url, "large-model", LARGE)
    );
    let gw = start(&cfg, dir.path()).await;
    small.set_always(Some(Scripted::text("4")));
    large.set_always(Some(Scripted::text("4")));
    for stream in [false, true] {
        let body = if stream {
            streamed(req("c", "2+2?"))
        } else {
            req("c", "2+2?")
        };
        let r = send(&gw.url, &body).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(
            small_call(small.bodies().last().unwrap()),
            small_call(&forwarded(&body, "small-model"))
        );
    }
    gw.stop().await;
}
