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
pub mod listen;
pub mod openai;
pub mod persist;
pub mod resilience;
pub mod route;
pub mod scrub;
pub mod shared;
pub mod snapshot;
pub mod upstream;

pub use config::{ServerConfig, Validated};
pub use error::GatewayError;
pub use gateway::Gateway;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

/// Serves until `shutdown` completes, then persists what was learned. `server` is the validated
/// `[server]` section.
///
/// The accept loop ([`listen::run`]) protects the gateway: a header read timeout (a client that
/// trickles its request line is dropped; also the keep-alive idle timeout), a cap on open
/// connections (past it, 503 `overloaded` at once rather than a wait in the listen queue), and a
/// shutdown with a deadline — idle connections close at once, requests in flight get
/// `shutdown_grace_s` to finish, then whatever is left is dropped and the state is saved,
/// whatever a client does. Bind `listener` with [`listen::bind`] for a deep listen queue.
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
        cors: server.cors.clone(),
        body_timeout: Duration::from_millis(server.body_read_timeout_ms),
        max_in_flight: server.max_in_flight,
    });
    let limits = listen::Limits {
        header_read_timeout: Duration::from_millis(server.header_read_timeout_ms),
        max_connections: listen::fit_connections(
            server.max_connections,
            listen::raise_open_file_limit(),
        ),
        shutdown_grace: Duration::from_secs(server.shutdown_grace_s),
    };
    listen::run(listener, app, limits, shutdown).await;
    gateway
        .flush()
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))
}
