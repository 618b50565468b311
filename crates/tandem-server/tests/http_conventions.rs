//! The gateway's HTTP conventions against a mock upstream: `GET /v1/models/{id}`, CORS (with and
//! without `[server.cors]`), compressed request bodies and the body limit on what they inflate
//! to, and the `Authorization` scheme matched case-insensitively.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::Write;
use std::sync::Arc;

const CLIENT_KEY: &str = "k-http-conventions";
const MAX_BODY: usize = 4096;

struct Setup {
    gw: Running,
    large: Arc<Mock>,
    _dir: tempfile::TempDir,
}

/// A gateway with client keys, a 4 KiB body limit and two fixed routes (`tandem`, and
/// `team/fast` whose name has a slash); `cors` is the `[server.cors]` body, if any.
async fn setup(cors: Option<&str>) -> Setup {
    std::env::set_var("TANDEM_TEST_LARGE_KEY", "sk-upstream-http-conventions");
    std::env::set_var("TANDEM_TEST_HTTP_KEYS", CLIENT_KEY);
    let (_small, s_url) = mock(reply(|_| ("small says hi".into(), -0.1))).await;
    let (large, l_url) = mock(reply(|p| (format!("echo {}", p.len()), -0.1))).await;
    let dir = tempfile::tempdir().unwrap();
    let cors = cors.map_or(String::new(), |c| format!("[server.cors]\n{c}\n"));
    let cfg = format!(
        "[server]\napi_keys_env = \"TANDEM_TEST_HTTP_KEYS\"\nmax_body_bytes = {MAX_BODY}\n{cors}{}\
         [[route]]\nname = \"tandem\"\nkind = \"fixed\"\nupstream = \"large\"\n\
         [[route]]\nname = \"team/fast\"\nkind = \"fixed\"\nupstream = \"small\"\n",
        upstreams(&s_url, &l_url, "token:10:30")
    );
    Setup {
        gw: start(&cfg, dir.path()).await,
        large,
        _dir: dir,
    }
}

fn header(r: &reqwest::Response, k: &str) -> Option<String> {
    r.headers().get(k).map(|v| v.to_str().unwrap().to_string())
}

/// The response is an OpenAI error with this status, type and code.
async fn openai_error(r: reqwest::Response, status: u16, kind: &str, code: Option<&str>) -> Value {
    assert_eq!(r.status(), status, "{:?}", r.headers());
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert_eq!(v["error"]["code"], json!(code), "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_can_be_retrieved_by_id() {
    let s = setup(None).await;
    let c = reqwest::Client::new();
    let get = |id: &str, key: Option<&str>| {
        let mut r = c.get(format!("{}/v1/models/{id}", s.gw.url));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r.send()
    };
    for (path, id) in [
        ("tandem", "tandem"),
        ("team/fast", "team/fast"),
        ("team%2Ffast", "team/fast"),
    ] {
        let r = get(path, Some(CLIENT_KEY)).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let v: Value = r.json().await.unwrap();
        assert_eq!(
            v,
            json!({"id": id, "object": "model", "created": 0, "owned_by": "tandem"})
        );
    }
    for id in ["nope", "TANDEM", "tandem%20", "team", "gpt-4o"] {
        let r = get(id, Some(CLIENT_KEY)).await.unwrap();
        let v = openai_error(r, 404, "invalid_request_error", Some("model_not_found")).await;
        let shown = id.replace("%20", " ");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(&shown),
            "{v}"
        );
    }
    // The key comes first: without it, known and unknown ids look the same.
    for id in ["tandem", "nope"] {
        for key in [None, Some("wrong-key")] {
            let r = get(id, key).await.unwrap();
            openai_error(r, 401, "authentication_error", Some("invalid_api_key")).await;
        }
    }
    // The list still answers at /v1/models, and a trailing slash is not an id.
    let r = c
        .get(format!("{}/v1/models", s.gw.url))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = get("", Some(CLIENT_KEY)).await.unwrap();
    assert_eq!(r.status(), 404);
    let r = c
        .post(format!("{}/v1/models/tandem", s.gw.url))
        .bearer_auth(CLIENT_KEY)
        .send()
        .await
        .unwrap();
    openai_error(r, 405, "invalid_request_error", None).await;
    s.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive() {
    let s = setup(None).await;
    let c = reqwest::Client::new();
    let models = |auth: String| {
        c.get(format!("{}/v1/models", s.gw.url))
            .header("authorization", auth)
            .send()
    };
    for scheme in [
        "Bearer ",
        "bearer ",
        "BEARER ",
        "bEaReR ",
        "Bearer   ",
        "Bearer\t",
    ] {
        let r = models(format!("{scheme}{CLIENT_KEY}")).await.unwrap();
        assert_eq!(r.status(), 200, "{scheme:?}");
        let r = models(format!("  {scheme}{CLIENT_KEY}  ")).await.unwrap();
        assert_eq!(r.status(), 200, "padded {scheme:?}");
    }
    for bad in [
        CLIENT_KEY.to_string(),
        format!("Bearer{CLIENT_KEY}"),
        format!("Basic {CLIENT_KEY}"),
        format!("Bearerx {CLIENT_KEY}"),
        "Bearer ".to_string(),
        format!("Bearer {CLIENT_KEY}x"),
    ] {
        let r = models(bad.clone()).await.unwrap();
        openai_error(r, 401, "authentication_error", Some("invalid_api_key")).await;
    }
    // The chat endpoint reads the same header.
    let r = c
        .post(format!("{}/v1/chat/completions", s.gw.url))
        .header("authorization", format!("BEARER {CLIENT_KEY}"))
        .json(&chat_body("tandem", "hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    s.gw.stop().await;
}

const ALLOWED: [&str; 2] = ["https://app.example", "http://localhost:5173"];

async fn preflight(url: &str, path: &str, origin: &str, headers: &str) -> reqwest::Response {
    reqwest::Client::new()
        .request(reqwest::Method::OPTIONS, format!("{url}{path}"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", headers)
        .send()
        .await
        .unwrap()
}

fn list(v: Option<String>) -> Vec<String> {
    v.unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_answers_allowed_origins_only() {
    // Configured in a form browsers never send: validation normalises it.
    let s = setup(Some(
        "allow_origins = [\"https://App.Example:443\", \"http://localhost:5173\"]\nmax_age_s = 600",
    ))
    .await;
    // What the OpenAI JS SDK asks for, in a browser.
    let asked = "authorization,content-type,x-stainless-os,x-stainless-retry-count,x-tandem-force,x-tandem-episode";
    for origin in ALLOWED {
        for path in [
            "/v1/chat/completions",
            "/v1/models",
            "/v1/models/tandem",
            "/v1/feedback",
        ] {
            // No key: browsers send none with a preflight.
            let r = preflight(&s.gw.url, path, origin, asked).await;
            assert!(r.status().is_success(), "{path}: {}", r.status());
            assert_eq!(
                header(&r, "access-control-allow-origin").as_deref(),
                Some(origin)
            );
            let methods = list(header(&r, "access-control-allow-methods"));
            for m in ["get", "post", "options"] {
                assert!(methods.contains(&m.to_string()), "{methods:?}");
            }
            let allowed = list(header(&r, "access-control-allow-headers"));
            for h in asked.split(',') {
                assert!(allowed.contains(&h.to_string()), "{h} not in {allowed:?}");
            }
            assert_eq!(header(&r, "access-control-max-age").as_deref(), Some("600"));
            assert!(list(header(&r, "vary")).contains(&"origin".to_string()));
        }
    }
    for origin in [
        "https://evil.example",
        "http://app.example",
        "https://app.example:8443",
        "https://app.example.evil.example",
        "null",
    ] {
        let r = preflight(&s.gw.url, "/v1/chat/completions", origin, "authorization").await;
        assert_eq!(header(&r, "access-control-allow-origin"), None, "{origin}");
    }
    assert_eq!(s.large.calls(), 0, "a preflight never reaches the pipeline");
    s.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_responses_name_the_origin_and_expose_tandem_headers() {
    let s = setup(Some(
        "allow_origins = [\"https://app.example\", \"http://localhost:5173\"]",
    ))
    .await;
    let c = reqwest::Client::new();
    let expected = [
        "x-tandem-route",
        "x-tandem-tier",
        "x-tandem-role",
        "x-tandem-cost-usd",
        "x-tandem-score",
        "x-tandem-capped",
        "retry-after",
        "x-should-retry",
    ];
    for origin in ALLOWED {
        for key in [Some(CLIENT_KEY), None] {
            let mut req = c
                .post(format!("{}/v1/chat/completions", s.gw.url))
                .header("origin", origin)
                .json(&chat_body("tandem", "hello from a browser"));
            if let Some(k) = key {
                req = req.bearer_auth(k);
            }
            let r = req.send().await.unwrap();
            // Errors too: a browser app can only read an error it is allowed to see.
            assert_eq!(r.status(), if key.is_some() { 200 } else { 401 });
            assert_eq!(
                header(&r, "access-control-allow-origin").as_deref(),
                Some(origin)
            );
            let exposed = list(header(&r, "access-control-expose-headers"));
            for h in expected {
                assert!(exposed.contains(&h.to_string()), "{h} not in {exposed:?}");
            }
            if key.is_some() {
                assert_eq!(header(&r, "x-tandem-route").as_deref(), Some("tandem"));
            }
        }
        let r = c
            .get(format!("{}/v1/models/tandem", s.gw.url))
            .header("origin", origin)
            .bearer_auth(CLIENT_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(
            header(&r, "access-control-allow-origin").as_deref(),
            Some(origin)
        );
    }
    let r = c
        .post(format!("{}/v1/chat/completions", s.gw.url))
        .header("origin", "https://evil.example")
        .bearer_auth(CLIENT_KEY)
        .json(&chat_body("tandem", "hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&r, "access-control-allow-origin"), None);
    s.gw.stop().await;

    // `*`: any origin, without credentials (the key is a header, not a cookie).
    let s = setup(Some("allow_origins = [\"*\"]")).await;
    for origin in ["https://anything.example", "http://127.0.0.1:3000"] {
        let r = preflight(&s.gw.url, "/v1/chat/completions", origin, "authorization").await;
        assert!(r.status().is_success());
        assert_eq!(
            header(&r, "access-control-allow-origin").as_deref(),
            Some("*")
        );
        assert_eq!(header(&r, "access-control-allow-credentials"), None);
        let r = c
            .get(format!("{}/v1/models", s.gw.url))
            .header("origin", origin)
            .bearer_auth(CLIENT_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(
            header(&r, "access-control-allow-origin").as_deref(),
            Some("*")
        );
    }
    s.gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cors_config_there_are_no_cors_headers() {
    let s = setup(None).await;
    let c = reqwest::Client::new();
    for path in ["/v1/chat/completions", "/v1/models", "/v1/models/tandem"] {
        let r = preflight(&s.gw.url, path, ALLOWED[0], "authorization").await;
        assert!(
            r.headers()
                .keys()
                .all(|k| !k.as_str().starts_with("access-control-")),
            "{path}: {:?}",
            r.headers()
        );
        // OPTIONS is then a method like any other: 405, OpenAI-shaped, saying what is allowed.
        let allow = list(header(&r, "allow"));
        assert!(
            !allow.is_empty() && !allow.contains(&"options".to_string()),
            "{allow:?}"
        );
        openai_error(r, 405, "invalid_request_error", None).await;
    }
    let r = c
        .post(format!("{}/v1/chat/completions", s.gw.url))
        .header("origin", ALLOWED[0])
        .bearer_auth(CLIENT_KEY)
        .json(&chat_body("tandem", "hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r
        .headers()
        .keys()
        .all(|k| !k.as_str().starts_with("access-control-")));
    s.gw.stop().await;
}

fn compress(coding: &str, data: &[u8]) -> Vec<u8> {
    match coding {
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        // HTTP's `deflate` is the zlib format (RFC 9110 §8.4.1.2).
        "deflate" => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        }
        "br" => {
            let mut e = brotli::CompressorWriter::new(Vec::new(), 4096, 5, 22);
            e.write_all(data).unwrap();
            e.into_inner()
        }
        "zstd" => zstd::encode_all(data, 3).unwrap(),
        "identity" => data.to_vec(),
        other => panic!("no such coding {other}"),
    }
}

async fn post_encoded(
    url: &str,
    coding: &str,
    body: Vec<u8>,
    key: Option<&str>,
) -> reqwest::Response {
    let mut r = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("content-encoding", coding)
        .body(body);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    r.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_request_bodies_are_inflated_within_the_body_limit() {
    let s = setup(None).await;
    let prompt = "a compressed prompt, ".repeat(40);
    let body = serde_json::to_vec(&chat_body("tandem", &prompt)).unwrap();
    assert!(body.len() < MAX_BODY);
    let mut calls = 0;
    for (coding, sent_as) in [
        ("gzip", "gzip"),
        ("deflate", "deflate"),
        ("br", "br"),
        ("zstd", "zstd"),
        ("identity", "identity"),
        ("gzip", "GZIP"),
        ("zstd", " Zstd "),
    ] {
        let packed = compress(coding, &body);
        if coding != "identity" {
            assert!(
                packed.len() < body.len() / 4,
                "{coding} should shrink the body"
            );
        }
        let r = post_encoded(&s.gw.url, sent_as, packed, Some(CLIENT_KEY)).await;
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(status, 200, "{sent_as}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v["choices"][0]["message"]["content"],
            format!("echo {}", prompt.len()),
            "{sent_as}"
        );
        calls += 1;
        assert_eq!(s.large.calls(), calls);
        let last = s.large.last.lock().unwrap().clone();
        assert_eq!(last["messages"][0]["content"], prompt.as_str(), "{sent_as}");
    }

    // Small on the wire, over the limit once inflated: the limit counts what the gateway reads.
    let big = serde_json::to_vec(&chat_body("tandem", &"z".repeat(MAX_BODY * 50))).unwrap();
    for coding in ["gzip", "deflate", "br", "zstd"] {
        let packed = compress(coding, &big);
        assert!(packed.len() < MAX_BODY, "{coding}: {}", packed.len());
        let r = post_encoded(&s.gw.url, coding, packed.clone(), Some(CLIENT_KEY)).await;
        openai_error(r, 413, "invalid_request_error", Some("request_too_large")).await;
        // The key is checked before the body is inflated.
        let r = post_encoded(&s.gw.url, coding, packed, None).await;
        openai_error(r, 401, "authentication_error", Some("invalid_api_key")).await;
    }
    // Just under the limit once inflated still passes.
    let filler = MAX_BODY - serde_json::to_vec(&chat_body("tandem", "")).unwrap().len() - 1;
    let edge = serde_json::to_vec(&chat_body("tandem", &"y".repeat(filler))).unwrap();
    assert!(edge.len() < MAX_BODY);
    let r = post_encoded(&s.gw.url, "gzip", compress("gzip", &edge), Some(CLIENT_KEY)).await;
    assert_eq!(r.status(), 200);

    // Bytes that are not what the header says: a 400 when the body is read, never a hang or 500.
    let junk = b"this is not compressed at all, whatever the header says".to_vec();
    for coding in ["gzip", "deflate", "br", "zstd"] {
        let r = post_encoded(&s.gw.url, coding, junk.clone(), Some(CLIENT_KEY)).await;
        openai_error(r, 400, "invalid_request_error", None).await;
        // A valid stream cut short.
        let mut cut = compress(coding, &body);
        cut.truncate(cut.len() / 2);
        let r = post_encoded(&s.gw.url, coding, cut, Some(CLIENT_KEY)).await;
        openai_error(r, 400, "invalid_request_error", None).await;
    }
    // A coding the gateway does not know: 415 naming it, with what it accepts.
    for coding in ["compress", "snappy", "gzip, br", "x-gzip"] {
        let r = post_encoded(&s.gw.url, coding, body.clone(), Some(CLIENT_KEY)).await;
        let accept = list(header(&r, "accept-encoding"));
        for c in ["gzip", "deflate", "br", "zstd"] {
            assert!(accept.contains(&c.to_string()), "{coding}: {accept:?}");
        }
        let v = openai_error(r, 415, "invalid_request_error", None).await;
        assert!(
            v["error"]["message"].as_str().unwrap().contains(coding),
            "{v}"
        );
    }
    assert_eq!(
        s.large.calls(),
        calls + 1,
        "no failed request reached the upstream"
    );
    s.gw.stop().await;
}
