//! `tandem serve`: an OpenAI-compatible gateway. Each request names a route (`model`); the route
//! decides between a small and a large upstream — before generation with a learned router, or
//! after the small model's answer with a log-probability, energy or learned gate — within a hard
//! budget, and learns online from what it sees and from `POST /v1/feedback`.
//!
//! Stages, one module each: [`config`] (parse, validate) → [`http`] (auth, body, shapes) →
//! [`gateway`] (route, decide, budget, call) → [`upstream`] (HTTP or in-process GGUF) →
//! [`learner`] (off the request path) → [`persist`] (atomic checkpoints); [`journal`] keeps
//! budget spend crash-safe.

pub mod bench;
pub mod budget;
pub mod chunks;
pub mod config;
pub mod error;
pub mod feedback;
pub mod gateway;
pub mod http;
pub mod journal;
pub mod learner;
pub mod openai;
pub mod persist;
pub mod resilience;
pub mod route;
pub mod scrub;
pub mod shared;
pub mod upstream;

pub use config::{ServerConfig, Validated};
pub use error::GatewayError;
pub use gateway::Gateway;

use axum::serve::ListenerExt;
use std::future::Future;
use std::sync::Arc;

/// Serves until `shutdown` completes, then persists what was learned. `server` is the validated
/// `[server]` section (body limit, CORS).
pub async fn serve(
    gateway: Arc<Gateway>,
    listener: tokio::net::TcpListener,
    server: config::ServerSection,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = http::router(http::AppState {
        gateway: gateway.clone(),
        max_body: server.max_body_bytes,
        metrics: http::metrics_handle(),
        cors: server.cors,
    });
    // Without TCP_NODELAY, small responses on kept-alive connections wait on Nagle's algorithm.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    gateway
        .flush()
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
}
