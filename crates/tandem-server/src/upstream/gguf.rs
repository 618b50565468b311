//! A GGUF model from the installed assets, run in-process on a blocking thread, answering in
//! OpenAI's shapes (log-probabilities included when asked). One generation at a time per model:
//! on a CPU, concurrent generations only slow each other down.

use super::{usage_json, Answered, Call, Piece, Pieces, Timeouts};
use crate::config::UpstreamConfig;
use crate::error::GatewayError;
use serde_json::{json, Map, Value};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_core::Usage;
use tandem_models::assets::{find, Store};
use tandem_models::gguf::{GenOptions, GgufLm, TokenLogprob};
use tokio::sync::Semaphore;

pub(super) struct GgufBackend {
    lm: Arc<GgufLm>,
    model: String,
    max_output_tokens: u32,
    one_at_a_time: Arc<Semaphore>,
}

/// OpenAI's `logprobs.content` entries for generated tokens.
fn logprob_entries(tokens: &[TokenLogprob]) -> Vec<Value> {
    tokens
        .iter()
        .map(|t| {
            json!({
                "token": t.token,
                "logprob": t.logprob,
                "bytes": t.bytes,
                "top_logprobs": t.top.iter().map(|x| json!({
                    "token": x.token, "logprob": x.logprob, "bytes": x.bytes,
                })).collect::<Vec<_>>(),
            })
        })
        .collect()
}

impl GgufBackend {
    pub(super) fn load(u: &UpstreamConfig) -> Result<Self, GatewayError> {
        let id = u.asset.as_deref().unwrap_or_default();
        let bad = |why: String| {
            GatewayError::Internal(format!("upstream `{}` (asset `{id}`): {why}", u.name))
        };
        let asset = find(id).map_err(|e| bad(e.to_string()))?;
        let file = asset
            .files
            .iter()
            .find(|f| f.out.ends_with(".gguf"))
            .ok_or_else(|| bad("not a GGUF model".into()))?;
        let out = file.out.rsplit('/').next().unwrap_or(file.out);
        let path = Store::default_home()
            .path(id, out)
            .map_err(|e| bad(format!("{e}; install it with `scripts/setup {id}`")))?;
        let lm = GgufLm::load(&path).map_err(|e| bad(e.to_string()))?;
        Ok(GgufBackend {
            lm: Arc::new(lm),
            model: id.to_string(),
            max_output_tokens: u.max_output_tokens,
            one_at_a_time: Arc::new(Semaphore::new(1)),
        })
    }

    fn messages(call: &Call) -> Vec<tandem_core::Message> {
        call.messages()
            .iter()
            .map(|m| tandem_core::Message {
                role: m.role.clone(),
                content: m.text(),
            })
            .collect()
    }

    /// Generation options from the call: its token cap, and log-probabilities when it asks.
    fn options(&self, name: &str, call: &Call) -> Result<GenOptions, GatewayError> {
        if call.n() > 1 {
            return Err(GatewayError::UpstreamRejected(Box::new(
                crate::error::Rejected {
                    upstream: name.to_string(),
                    status: 400,
                    kind: Some("invalid_request_error".into()),
                    code: None,
                    param: Some("n".into()),
                    message:
                        "an in-process model answers one choice (greedy decoding): n must be 1"
                            .into(),
                    retry_after: None,
                },
            )));
        }
        let logprobs = call.get("logprobs").and_then(Value::as_bool) == Some(true);
        Ok(GenOptions {
            max_tokens: call
                .token_cap()
                .unwrap_or(u64::from(self.max_output_tokens))
                .min(u64::from(self.max_output_tokens)) as usize,
            top_logprobs: if logprobs {
                call.get("top_logprobs")
                    .and_then(Value::as_u64)
                    .unwrap_or(0)
                    .min(20) as usize
            } else {
                0
            },
            logprobs,
        })
    }

    async fn permit(
        &self,
        deadline: Instant,
        timed_out: impl Fn() -> GatewayError,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, GatewayError> {
        // Waiting for the model counts against the timeout too.
        tokio::time::timeout_at(deadline.into(), self.one_at_a_time.clone().acquire_owned())
            .await
            .map_err(|_| timed_out())?
            .map_err(|_| GatewayError::Internal("the model's queue was closed".into()))
    }

    /// Streams chunks as tokens are generated; generation stops when the reader goes away. The
    /// wait for the model is bounded by the first-token timeout, the stream by its cap if set.
    pub(super) async fn stream(
        &self,
        name: &str,
        call: &Call,
        t: Timeouts,
    ) -> Result<Pieces, GatewayError> {
        let opts = self.options(name, call)?;
        let up = name.to_string();
        let timed_out = move |d: Duration| GatewayError::UpstreamTimeout {
            upstream: up.clone(),
            ms: d.as_millis() as u64,
        };
        let ft = t.first_token;
        let permit = self.permit(Instant::now() + ft, || timed_out(ft)).await?;
        let deadline = t.stream.map(|d| Instant::now() + d);
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let lm = self.lm.clone();
        let messages = Self::messages(call);
        let (model, name) = (self.model.clone(), name.to_string());
        let created = crate::gateway::unix_now();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let chunk = |choice: Value| -> Map<String, Value> {
                let mut m = Map::new();
                m.insert("object".into(), json!("chat.completion.chunk"));
                m.insert("created".into(), json!(created));
                m.insert("model".into(), json!(model));
                m.insert("choices".into(), json!([choice]));
                m
            };
            let first = chunk(
                json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null}),
            );
            if tx.blocking_send(Ok(Piece::Chunk(first))).is_err() {
                return;
            }
            let with_lp = opts.logprobs;
            let mut send = |text: &str, toks: &[TokenLogprob]| {
                let mut c = json!({"index": 0, "delta": {"content": text}, "finish_reason": null});
                if with_lp {
                    c["logprobs"] = json!({"content": logprob_entries(toks)});
                }
                tx.blocking_send(Ok(Piece::Chunk(chunk(c)))).is_ok()
            };
            let out = lm.generate_with(&messages, &opts, deadline, &mut send);
            let last = match out {
                Ok(g) if g.timed_out => Err(timed_out(t.stream.unwrap_or_default())),
                Ok(g) => {
                    let usage = Usage {
                        input_tokens: g.prompt_tokens as u64,
                        output_tokens: g.tokens.len() as u64,
                    };
                    let finish = if g.finished { "stop" } else { "length" };
                    let end = chunk(json!({"index": 0, "delta": {}, "finish_reason": finish}));
                    let mut u = chunk(json!(null));
                    u.insert("choices".into(), json!([]));
                    u.insert("usage".into(), usage_json(usage));
                    if tx.blocking_send(Ok(Piece::Chunk(end))).is_err()
                        || tx.blocking_send(Ok(Piece::Chunk(u))).is_err()
                    {
                        return;
                    }
                    Ok(Piece::Done { usage: Some(usage) })
                }
                Err(e) => Err(GatewayError::Upstream {
                    upstream: name,
                    reason: e.to_string(),
                    sent: true,
                }),
            };
            let _ = tx.blocking_send(last);
        });
        Ok(rx)
    }

    pub(super) async fn complete(
        &self,
        name: &str,
        call: &Call,
        timeout: Duration,
    ) -> Result<Answered, GatewayError> {
        let opts = self.options(name, call)?;
        let deadline = Instant::now() + timeout;
        let timed_out = || GatewayError::UpstreamTimeout {
            upstream: name.to_string(),
            ms: timeout.as_millis() as u64,
        };
        let permit = self.permit(deadline, timed_out).await?;
        let lm = self.lm.clone();
        let messages = Self::messages(call);
        let t0 = Instant::now();
        let g = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            lm.generate_with(&messages, &opts, Some(deadline), &mut |_, _| true)
                .map(|g| (g, opts))
        })
        .await
        .map_err(|e| GatewayError::Internal(format!("generation task failed: {e}")))?
        .map_err(|e| GatewayError::Upstream {
            upstream: name.to_string(),
            reason: e.to_string(),
            sent: true,
        });
        let (g, opts) = g?;
        if g.timed_out {
            return Err(timed_out());
        }
        let usage = Usage {
            input_tokens: g.prompt_tokens as u64,
            output_tokens: g.tokens.len() as u64,
        };
        let logprobs = if opts.logprobs {
            json!({"content": logprob_entries(&g.token_details)})
        } else {
            Value::Null
        };
        let body = json!({
            "object": "chat.completion",
            "created": crate::gateway::unix_now(),
            "model": self.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": g.text},
                "logprobs": logprobs,
                "finish_reason": if g.finished { "stop" } else { "length" },
            }],
            "usage": usage_json(usage),
        });
        Ok(Answered {
            body: body.as_object().cloned().unwrap_or_default(),
            usage: Some(usage),
            token_logprobs: Some(g.token_logprobs),
            token_energies: Some(g.token_energies),
            elapsed: t0.elapsed(),
        })
    }
}
