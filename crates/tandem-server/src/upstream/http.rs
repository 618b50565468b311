//! An OpenAI-compatible HTTP upstream over one pooled reqwest client (rustls, TCP_NODELAY). The
//! body sent is the client's ([`Call::outgoing`]); the answer kept is the upstream's, whole.

use super::{has_answer, logprob_signals, usage_of, Answered, Call, Piece, Pieces, Timeouts};
use crate::config::UpstreamConfig;
use crate::error::GatewayError;
use crate::scrub::{register_secret, scrub};
use futures_util::StreamExt;
use serde_json::{json, Map, Value};
use std::time::Duration;

/// One client for all HTTP upstreams, so connections are pooled and kept alive.
pub(super) fn client(ups: &[crate::config::Upstream]) -> Result<reqwest::Client, GatewayError> {
    let connect = ups
        .iter()
        .map(|u| u.cfg.connect_timeout_ms)
        .max()
        .unwrap_or(2_000);
    reqwest::Client::builder()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_millis(connect))
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
        .map_err(|e| GatewayError::Internal(format!("cannot build the HTTP client: {e}")))
}

pub(super) struct HttpBackend {
    /// Parsed once: parsing it per request was a few percent of the gateway's CPU.
    url: reqwest::Url,
    model: Value,
    /// `Bearer <key>`, marked sensitive (kept out of debug output).
    auth: Option<reqwest::header::HeaderValue>,
    stream_usage: bool,
    client: reqwest::Client,
}

impl HttpBackend {
    pub(super) fn new(u: &UpstreamConfig, client: reqwest::Client) -> Result<Self, GatewayError> {
        let key = match &u.api_key_env {
            None => None,
            Some(var) => Some(std::env::var(var).map_err(|_| {
                GatewayError::Internal(format!(
                    "upstream `{}`: the environment variable {var} (api_key_env) is not set",
                    u.name
                ))
            })?),
        };
        if let Some(k) = &key {
            register_secret(k);
        }
        let base = u.base_url.clone().unwrap_or_default();
        let url = format!("{}/chat/completions", base.trim_end_matches('/'));
        let url = reqwest::Url::parse(&url)
            .map_err(|e| GatewayError::Internal(format!("upstream `{}`: base_url: {e}", u.name)))?;
        let auth = match &key {
            None => None,
            Some(k) => {
                let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {k}"))
                    .map_err(|_| {
                        GatewayError::Internal(format!(
                            "upstream `{}`: the API key is not a valid header value",
                            u.name
                        ))
                    })?;
                v.set_sensitive(true);
                Some(v)
            }
        };
        Ok(HttpBackend {
            url,
            model: json!(u.model.clone().unwrap_or_default()),
            auth,
            stream_usage: u.stream_usage,
            client,
        })
    }

    fn request(&self, call: &Call, stream: bool) -> reqwest::RequestBuilder {
        let mut extra = vec![("model", self.model.clone())];
        if stream {
            extra.push(("stream", json!(true)));
            if self.stream_usage {
                // Declared supported: ask for usage whatever the client asked, keeping its other
                // stream options.
                let mut opts = call
                    .get("stream_options")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                opts.insert("include_usage".into(), json!(true));
                extra.push(("stream_options", Value::Object(opts)));
            }
        } else if call.get("stream").is_some() || call.get("stream_options").is_some() {
            // A streamed request answered whole (a cascade's draft): no stream options either.
            extra.push(("stream", json!(false)));
        }
        // `stream_options` is only valid with `stream: true`.
        let unstreamed;
        let call = if !stream && call.get("stream_options").is_some() {
            unstreamed = call.clone().with("stream_options", None);
            &unstreamed
        } else {
            call
        };
        let body = serde_json::to_vec(&call.outgoing(&extra)).unwrap_or_default();
        let mut req = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(a) = &self.auth {
            req = req.header(reqwest::header::AUTHORIZATION, a.clone());
        }
        req
    }

    pub(super) async fn complete(
        &self,
        name: &str,
        call: &Call,
        timeout: Duration,
    ) -> Result<Answered, GatewayError> {
        let t0 = std::time::Instant::now();
        let fail = |e: reqwest::Error| failure(name, timeout, e);
        let resp = self
            .request(call, false)
            .timeout(timeout)
            .send()
            .await
            .map_err(fail)?;
        let resp = check_status(name, resp, timeout).await?;
        let bytes = resp.bytes().await.map_err(fail)?;
        parse(name, &bytes, t0.elapsed())
    }

    /// Streams from the upstream's SSE. The wait for the first piece of the answer is bounded by
    /// `first_token`, the wait between pieces by `idle`, and the whole stream only by `stream`
    /// when set: a stream that keeps producing is never cut by the whole-call timeout.
    pub(super) async fn stream(
        &self,
        name: &str,
        call: &Call,
        t: Timeouts,
    ) -> Result<Pieces, GatewayError> {
        let started = tokio::time::Instant::now();
        let resp = tokio::time::timeout(t.first_token, self.request(call, true).send())
            .await
            .map_err(|_| timeout_err(name, t.first_token))?
            .map_err(|e| failure(name, t.first_token, e))?;
        let resp = check_status(name, resp, t.first_token).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let name = name.to_string();
        tokio::spawn(async move {
            let mut body = resp.bytes_stream();
            let mut sse = SseReader::default();
            let mut answering = false;
            loop {
                let mut wait = if answering { t.idle } else { t.first_token };
                let mut capped = false;
                if let Some(total) = t.stream {
                    let left = total.saturating_sub(started.elapsed());
                    if left < wait {
                        wait = left;
                        capped = true;
                    }
                }
                let item = match tokio::time::timeout(wait, body.next()).await {
                    Err(_) if capped => Err(GatewayError::UpstreamTimeout {
                        upstream: name.clone(),
                        ms: t.stream.map_or(0, |d| d.as_millis() as u64),
                    }),
                    Err(_) => Err(timeout_err(&name, wait)),
                    Ok(None) => Err(sse.end(&name)),
                    Ok(Some(Err(e))) => Err(failure(&name, wait, e)),
                    Ok(Some(Ok(bytes))) => Ok(bytes),
                };
                let bytes = match item {
                    Ok(b) => b,
                    Err(e) => {
                        // A stream that finished but skipped `[DONE]` is still whole.
                        let done = sse.finished();
                        let _ = tx.send(done.map(Ok).unwrap_or(Err(e))).await;
                        return;
                    }
                };
                for piece in sse.feed(&name, &bytes) {
                    let last = !matches!(piece, Ok(Piece::Chunk(_)));
                    if let Ok(Piece::Chunk(c)) = &piece {
                        answering |= has_answer(c);
                    }
                    if tx.send(piece).await.is_err() || last {
                        // The client left, or the stream is over: drop the upstream connection.
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

fn timeout_err(name: &str, t: Duration) -> GatewayError {
    GatewayError::UpstreamTimeout {
        upstream: name.to_string(),
        ms: t.as_millis() as u64,
    }
}

fn failure(name: &str, timeout: Duration, e: reqwest::Error) -> GatewayError {
    if e.is_timeout() {
        timeout_err(name, timeout)
    } else {
        // Without the URL: it may carry credentials. A connection never made sent nothing.
        GatewayError::Upstream {
            upstream: name.to_string(),
            sent: !e.is_connect(),
            reason: scrub(&e.without_url().to_string()),
        }
    }
}

/// Passes a 2xx response on. A 4xx keeps its meaning (status, OpenAI type, code, param,
/// Retry-After); a 5xx is the upstream's failure. Every message is scrubbed of keys.
async fn check_status(
    name: &str,
    resp: reqwest::Response,
    timeout: Duration,
) -> Result<reqwest::Response, GatewayError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().chars().take(64).collect::<String>())
        .filter(|v| !v.is_empty());
    let bytes = resp.bytes().await.map_err(|e| failure(name, timeout, e))?;
    let parsed = serde_json::from_slice::<Value>(&bytes).ok();
    let err = parsed.as_ref().map(|v| &v["error"]);
    let field = |k: &str| -> Option<String> {
        match err.map(|e| &e[k]) {
            Some(Value::String(s)) => Some(scrub(s)),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        }
    };
    let msg = field("message")
        .or_else(|| err.and_then(Value::as_str).map(scrub))
        .unwrap_or_else(|| scrub(&String::from_utf8_lossy(&bytes)));
    let msg: String = msg.chars().take(500).collect();
    if status.is_client_error() {
        return Err(GatewayError::UpstreamRejected(Box::new(
            crate::error::Rejected {
                upstream: name.to_string(),
                status: status.as_u16(),
                kind: field("type"),
                code: field("code"),
                param: field("param"),
                message: if msg.is_empty() {
                    format!("HTTP {}", status.as_u16())
                } else {
                    msg
                },
                retry_after,
            },
        )));
    }
    Err(GatewayError::UpstreamStatus {
        upstream: name.to_string(),
        status: status.as_u16(),
        reason: msg,
        retry_after,
    })
}

/// Reads OpenAI's server-sent events: `data: {chunk}` lines, then `data: [DONE]`.
#[derive(Default)]
struct SseReader {
    buf: Vec<u8>,
    finished: bool,
    usage: Option<tandem_core::Usage>,
    done: bool,
}

impl SseReader {
    fn feed(&mut self, name: &str, bytes: &[u8]) -> Vec<Result<Piece, GatewayError>> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim().strip_prefix("data:") else {
                continue; // blank separators, comments, `event:` lines
            };
            let data = data.trim();
            if data == "[DONE]" {
                self.done = true;
                out.push(Ok(Piece::Done { usage: self.usage }));
                return out;
            }
            let bad = |why: String| GatewayError::Upstream {
                upstream: name.to_string(),
                reason: format!("malformed stream: {}", scrub(&why)),
                sent: true,
            };
            let v: Map<String, Value> = match serde_json::from_str(data) {
                Ok(v) => v,
                Err(e) => {
                    out.push(Err(bad(e.to_string())));
                    return out;
                }
            };
            if let Some(e) = v.get("error") {
                let msg = e["message"].as_str().unwrap_or("(no message)");
                out.push(Err(bad(format!("the upstream sent an error: {msg}"))));
                return out;
            }
            if let Some(u) = usage_of(v.get("usage")) {
                self.usage = Some(u);
            }
            if let Some(cs) = v.get("choices").and_then(Value::as_array) {
                if cs.iter().any(|c| c["finish_reason"].is_string()) {
                    self.finished = true;
                }
            }
            out.push(Ok(Piece::Chunk(v)));
        }
        out
    }

    /// The end of a stream that reported its finish reason but not `[DONE]`.
    fn finished(&self) -> Option<Piece> {
        (!self.done && self.finished).then_some(Piece::Done { usage: self.usage })
    }

    fn end(&self, name: &str) -> GatewayError {
        GatewayError::Upstream {
            upstream: name.to_string(),
            reason: "the stream ended before its finish".into(),
            sent: true,
        }
    }
}

/// Reads an OpenAI chat completion: kept whole, with the first choice's token signals.
fn parse(name: &str, bytes: &[u8], elapsed: Duration) -> Result<Answered, GatewayError> {
    let bad = |why: String| GatewayError::Upstream {
        upstream: name.to_string(),
        reason: format!("malformed response: {}", scrub(&why)),
        sent: true,
    };
    let body: Map<String, Value> = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    let choice = body
        .get("choices")
        .and_then(|c| c.get(0))
        .ok_or_else(|| bad("no `choices[0]`".into()))?;
    match &choice["message"]["content"] {
        Value::String(_) | Value::Null | Value::Array(_) => {}
        other => return Err(bad(format!("`choices[0].message.content` is {other}"))),
    }
    let (token_logprobs, token_energies) = logprob_signals(&choice["logprobs"]).map_err(bad)?;
    Ok(Answered {
        usage: usage_of(body.get("usage")),
        body,
        token_logprobs,
        token_energies,
        elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_whole_answers_with_usage_and_logprobs() {
        let body = br#"{"choices":[{"message":{"role":"assistant","content":"hi","future":1},"finish_reason":"stop",
            "logprobs":{"content":[{"token":"hi","logprob":-0.5,"top_logprobs":[{"token":"hi","logprob":-0.5},{"token":"yo","logprob":-1.0}]}]}}],
            "usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4},"system_fingerprint":"fp"}"#;
        let a = parse("u", body, Duration::ZERO).unwrap();
        assert_eq!(a.body["choices"][0]["message"]["future"], 1);
        assert_eq!(a.body["system_fingerprint"], "fp");
        assert_eq!(a.usage.unwrap().input_tokens, 3);
        assert_eq!(a.token_logprobs, Some(vec![-0.5]));
        let e = a.token_energies.unwrap()[0];
        let want = -((-0.5f32).exp() + (-1.0f32).exp()).ln();
        assert!((e - want).abs() < 1e-5);
        let a = parse(
            "u",
            br#"{"choices":[{"message":{"content":null}}],"usage":null}"#,
            Duration::ZERO,
        )
        .unwrap();
        assert!(a.usage.is_none());
    }

    #[test]
    fn sse_chunks_pass_whole_across_boundaries() {
        let mut r = SseReader::default();
        let a = r.feed("u", b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"he");
        assert_eq!(a.len(), 1);
        let b = r.feed("u", b"llo\",\"x\":1}}]}\n\n: keep-alive\n\ndata: {\"choices\":[{\"delta\":{},\"finish_reason\":\"length\"}]}\n\n");
        assert_eq!(b.len(), 2);
        match &b[0] {
            Ok(Piece::Chunk(c)) => assert_eq!(c["choices"][0]["delta"]["x"], 1),
            other => panic!("{other:?}"),
        }
        let c = r.feed("u", b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n");
        match &c[1] {
            Ok(Piece::Done { usage }) => assert_eq!(usage.unwrap().output_tokens, 2),
            other => panic!("{other:?}"),
        }
        let mut r = SseReader::default();
        let e = r.feed("u", b"data: {oops\n");
        assert!(e[0]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("malformed stream"));
    }

    #[test]
    fn malformed_bodies_are_named() {
        for (body, want) in [
            (&b"not json"[..], "malformed response"),
            (br#"{"choices":[]}"#, "choices[0]"),
            (
                br#"{"choices":[{"message":{"content":5}}]}"#,
                "content` is 5",
            ),
        ] {
            let e = parse("u", body, Duration::ZERO).err().unwrap().to_string();
            assert!(e.contains(want) && e.contains("`u`"), "{e}");
        }
    }
}
