//! An OpenAI-compatible HTTP upstream over one pooled reqwest client (rustls, TCP_NODELAY).

use super::{energy_of_top, Call, Completion, Piece, Pieces, Timeouts};
use crate::config::UpstreamConfig;
use crate::error::GatewayError;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::Duration;
use tandem_core::Usage;

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
    url: String,
    model: String,
    key: Option<String>,
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
        let base = u.base_url.clone().unwrap_or_default();
        Ok(HttpBackend {
            url: format!("{}/chat/completions", base.trim_end_matches('/')),
            model: u.model.clone().unwrap_or_default(),
            key,
            client,
        })
    }

    fn request(&self, call: &Call, stream: bool, timeout: Duration) -> reqwest::RequestBuilder {
        let mut body = call.extra.clone();
        body.insert("model".into(), json!(self.model));
        body.insert("messages".into(), json!(call.messages));
        body.insert("max_tokens".into(), json!(call.max_tokens));
        body.insert("stream".into(), json!(stream));
        if stream {
            body.insert("stream_options".into(), json!({"include_usage": true}));
        } else {
            body.remove("stream_options");
        }
        if call.logprobs {
            body.insert("logprobs".into(), json!(true));
            body.insert("top_logprobs".into(), json!(5));
        }
        let mut req = self.client.post(&self.url).timeout(timeout).json(&body);
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        req
    }

    pub(super) async fn complete(
        &self,
        name: &str,
        call: &Call,
        timeout: Duration,
    ) -> Result<Completion, GatewayError> {
        let t0 = std::time::Instant::now();
        let fail = |e: reqwest::Error| failure(name, timeout, e);
        let resp = self
            .request(call, false, timeout)
            .send()
            .await
            .map_err(fail)?;
        let resp = check_status(name, resp, timeout).await?;
        let bytes = resp.bytes().await.map_err(fail)?;
        parse(name, &bytes, t0.elapsed())
    }

    /// Streams from the upstream's SSE, bounding the wait for the first piece of text and between
    /// pieces; a stream that ends without its finish is reported as cut.
    pub(super) async fn stream(
        &self,
        name: &str,
        call: &Call,
        t: Timeouts,
    ) -> Result<Pieces, GatewayError> {
        let resp = tokio::time::timeout(t.first_token, self.request(call, true, t.total).send())
            .await
            .map_err(|_| timeout_err(name, t.first_token))?
            .map_err(|e| failure(name, t.total, e))?;
        let resp = check_status(name, resp, t.total).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let name = name.to_string();
        tokio::spawn(async move {
            let mut body = resp.bytes_stream();
            let mut sse = SseReader::default();
            let mut got_text = false;
            loop {
                let wait = if got_text { t.idle } else { t.first_token };
                let item = match tokio::time::timeout(wait, body.next()).await {
                    Err(_) => Err(timeout_err(&name, wait)),
                    Ok(None) => Err(sse.end(&name)),
                    Ok(Some(Err(e))) => Err(failure(&name, t.total, e)),
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
                    let last = !matches!(piece, Ok(Piece::Text(_)));
                    got_text |= matches!(piece, Ok(Piece::Text(_)));
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
        // Without the URL: it may carry credentials.
        GatewayError::Upstream {
            upstream: name.to_string(),
            reason: e.without_url().to_string(),
        }
    }
}

/// Passes a 2xx response on; turns any other into an error carrying the upstream's message.
async fn check_status(
    name: &str,
    resp: reqwest::Response,
    timeout: Duration,
) -> Result<reqwest::Response, GatewayError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let bytes = resp.bytes().await.map_err(|e| failure(name, timeout, e))?;
    let msg = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
    Err(GatewayError::UpstreamStatus {
        upstream: name.to_string(),
        status: status.as_u16(),
        reason: msg.chars().take(300).collect(),
    })
}

/// Reads OpenAI's server-sent events: `data: {chunk}` lines, then `data: [DONE]`.
#[derive(Default)]
struct SseReader {
    buf: Vec<u8>,
    finish_reason: Option<String>,
    usage: Option<Usage>,
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
                out.push(Ok(self.done_piece()));
                return out;
            }
            let bad = |why: String| GatewayError::Upstream {
                upstream: name.to_string(),
                reason: format!("malformed stream: {why}"),
            };
            let v: Value = match serde_json::from_str(data) {
                Ok(v) => v,
                Err(e) => {
                    out.push(Err(bad(e.to_string())));
                    return out;
                }
            };
            if let Some(msg) = v["error"]["message"].as_str() {
                out.push(Err(bad(format!("the upstream sent an error: {msg}"))));
                return out;
            }
            if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                self.usage = Some(Usage {
                    input_tokens: u["prompt_tokens"].as_u64().unwrap_or(0),
                    output_tokens: u["completion_tokens"].as_u64().unwrap_or(0),
                });
            }
            if let Some(c) = v["choices"].get(0) {
                if let Some(t) = c["delta"]["content"].as_str().filter(|t| !t.is_empty()) {
                    out.push(Ok(Piece::Text(t.to_string())));
                }
                if let Some(f) = c["finish_reason"].as_str() {
                    self.finish_reason = Some(f.to_string());
                }
            }
        }
        out
    }

    fn done_piece(&self) -> Piece {
        Piece::Done {
            finish_reason: self.finish_reason.clone().unwrap_or_else(|| "stop".into()),
            usage: self.usage,
        }
    }

    /// The end of a stream that reported its finish reason but not `[DONE]`.
    fn finished(&self) -> Option<Piece> {
        (!self.done && self.finish_reason.is_some()).then(|| self.done_piece())
    }

    fn end(&self, name: &str) -> GatewayError {
        GatewayError::Upstream {
            upstream: name.to_string(),
            reason: "the stream ended before its finish".into(),
        }
    }
}

/// Reads the first choice of an OpenAI chat completion.
fn parse(name: &str, bytes: &[u8], elapsed: Duration) -> Result<Completion, GatewayError> {
    let bad = |why: String| GatewayError::Upstream {
        upstream: name.to_string(),
        reason: format!("malformed response: {why}"),
    };
    let v: Value = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
    let choice = v["choices"]
        .get(0)
        .ok_or_else(|| bad("no `choices[0]`".into()))?;
    let text = match &choice["message"]["content"] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => return Err(bad(format!("`choices[0].message.content` is {other}"))),
    };
    let finish_reason = choice["finish_reason"]
        .as_str()
        .unwrap_or("stop")
        .to_string();
    let usage = Usage {
        input_tokens: v["usage"]["prompt_tokens"].as_u64().unwrap_or(0),
        output_tokens: v["usage"]["completion_tokens"].as_u64().unwrap_or(0),
    };
    let (mut lps, mut energies) = (Vec::new(), Vec::new());
    if let Some(items) = choice["logprobs"]["content"].as_array() {
        for it in items {
            let Some(lp) = it["logprob"].as_f64() else {
                return Err(bad("a token without `logprob`".into()));
            };
            lps.push(lp as f32);
            if let Some(top) = it["top_logprobs"].as_array().filter(|t| !t.is_empty()) {
                let t: Vec<f32> = top
                    .iter()
                    .filter_map(|x| x["logprob"].as_f64())
                    .map(|x| x as f32)
                    .collect();
                energies.push(energy_of_top(&t));
            }
        }
    }
    let has_energy = !energies.is_empty() && energies.len() == lps.len();
    Ok(Completion {
        text,
        finish_reason,
        usage,
        token_logprobs: (!lps.is_empty()).then_some(lps),
        token_energies: has_energy.then_some(energies),
        elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_usage_and_logprobs() {
        let body = br#"{"choices":[{"message":{"role":"assistant","content":"hi"},"finish_reason":"stop",
            "logprobs":{"content":[{"token":"hi","logprob":-0.5,"top_logprobs":[{"token":"hi","logprob":-0.5},{"token":"yo","logprob":-1.0}]}]}}],
            "usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
        let c = parse("u", body, Duration::ZERO).unwrap();
        assert_eq!(c.text, "hi");
        assert_eq!(c.usage.input_tokens, 3);
        assert_eq!(c.token_logprobs, Some(vec![-0.5]));
        let e = c.token_energies.unwrap()[0];
        let want = -((-0.5f32).exp() + (-1.0f32).exp()).ln();
        assert!((e - want).abs() < 1e-5);
    }

    #[test]
    fn sse_pieces_across_chunk_boundaries() {
        let mut r = SseReader::default();
        let a = r.feed("u", b"data: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"he");
        assert!(a.is_empty());
        let b = r.feed("u", b"llo\"}}]}\n\n: keep-alive\n\ndata: {\"choices\":[{\"delta\":{},\"finish_reason\":\"length\"}]}\n\n");
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].as_ref().unwrap(), &Piece::Text("hello".into()));
        let c = r.feed("u", b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\ndata: [DONE]\n\n");
        match &c[0] {
            Ok(Piece::Done {
                finish_reason,
                usage,
            }) => {
                assert_eq!(finish_reason, "length");
                assert_eq!(usage.unwrap().output_tokens, 2);
            }
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
            let e = parse("u", body, Duration::ZERO).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("`u`"), "{e}");
        }
    }
}
