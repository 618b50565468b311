//! A GGUF model from the installed assets, run in-process on a blocking thread. One generation at
//! a time per model: on a CPU, concurrent generations only slow each other down.

use super::{Call, Completion, Piece, Pieces};
use crate::config::UpstreamConfig;
use crate::error::GatewayError;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tandem_core::Usage;
use tandem_models::assets::{find, Store};
use tandem_models::gguf::GgufLm;
use tokio::sync::Semaphore;

pub(super) struct GgufBackend {
    lm: Arc<GgufLm>,
    one_at_a_time: Arc<Semaphore>,
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
            one_at_a_time: Arc::new(Semaphore::new(1)),
        })
    }

    fn messages(call: &Call) -> Vec<tandem_core::Message> {
        call.messages
            .iter()
            .map(|m| tandem_core::Message {
                role: m.role.clone(),
                content: m.text(),
            })
            .collect()
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

    /// Streams tokens as they are generated; generation stops when the reader goes away.
    pub(super) async fn stream(
        &self,
        name: &str,
        call: &Call,
        timeout: Duration,
    ) -> Result<Pieces, GatewayError> {
        let deadline = Instant::now() + timeout;
        let up = name.to_string();
        let timed_out = move || GatewayError::UpstreamTimeout {
            upstream: up.clone(),
            ms: timeout.as_millis() as u64,
        };
        let permit = self.permit(deadline, timed_out.clone()).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let lm = self.lm.clone();
        let messages = Self::messages(call);
        let max_tokens = call.max_tokens as usize;
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let mut send = |t: &str| tx.blocking_send(Ok(Piece::Text(t.to_string()))).is_ok();
            let last = match lm.generate_streaming(&messages, max_tokens, Some(deadline), &mut send)
            {
                Ok(g) if g.timed_out => Err(timed_out()),
                Ok(g) => Ok(Piece::Done {
                    finish_reason: if g.finished { "stop" } else { "length" }.into(),
                    usage: Some(Usage {
                        input_tokens: g.prompt_tokens as u64,
                        output_tokens: g.tokens.len() as u64,
                    }),
                }),
                Err(e) => Err(GatewayError::Upstream {
                    upstream: name,
                    reason: e.to_string(),
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
    ) -> Result<Completion, GatewayError> {
        let deadline = Instant::now() + timeout;
        let timed_out = || GatewayError::UpstreamTimeout {
            upstream: name.to_string(),
            ms: timeout.as_millis() as u64,
        };
        let permit = self.permit(deadline, timed_out).await?;
        let lm = self.lm.clone();
        let messages = Self::messages(call);
        let max_tokens = call.max_tokens as usize;
        let t0 = Instant::now();
        let g = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            lm.generate_until(&messages, max_tokens, Some(deadline))
        })
        .await
        .map_err(|e| GatewayError::Internal(format!("generation task failed: {e}")))?
        .map_err(|e| GatewayError::Upstream {
            upstream: name.to_string(),
            reason: e.to_string(),
        })?;
        if g.timed_out {
            return Err(timed_out());
        }
        Ok(Completion {
            text: g.text,
            finish_reason: if g.finished { "stop" } else { "length" }.into(),
            usage: Usage {
                input_tokens: g.prompt_tokens as u64,
                output_tokens: g.tokens.len() as u64,
            },
            token_logprobs: Some(g.token_logprobs),
            token_energies: Some(g.token_energies),
            elapsed: t0.elapsed(),
        })
    }
}
