//! An OpenAI-compatible HTTP upstream over one pooled reqwest client (rustls, TCP_NODELAY).

use super::{energy_of_top, Call, Completion};
use crate::config::UpstreamConfig;
use crate::error::GatewayError;
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

    pub(super) async fn complete(
        &self,
        name: &str,
        call: &Call,
        timeout: Duration,
    ) -> Result<Completion, GatewayError> {
        let mut body = call.extra.clone();
        body.insert("model".into(), json!(self.model));
        body.insert("messages".into(), json!(call.messages));
        body.insert("max_tokens".into(), json!(call.max_tokens));
        body.insert("stream".into(), json!(false));
        if call.logprobs {
            body.insert("logprobs".into(), json!(true));
            body.insert("top_logprobs".into(), json!(5));
        }
        let mut req = self.client.post(&self.url).timeout(timeout).json(&body);
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        let t0 = std::time::Instant::now();
        let fail = |e: reqwest::Error| {
            if e.is_timeout() {
                GatewayError::UpstreamTimeout {
                    upstream: name.to_string(),
                    ms: timeout.as_millis() as u64,
                }
            } else {
                // Without the URL: it may carry credentials.
                GatewayError::Upstream {
                    upstream: name.to_string(),
                    reason: e.without_url().to_string(),
                }
            }
        };
        let resp = req.send().await.map_err(fail)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(fail)?;
        let elapsed = t0.elapsed();
        if !status.is_success() {
            let msg = serde_json::from_slice::<Value>(&bytes)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
            return Err(GatewayError::UpstreamStatus {
                upstream: name.to_string(),
                status: status.as_u16(),
                reason: msg.chars().take(300).collect(),
            });
        }
        parse(name, &bytes, elapsed)
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
