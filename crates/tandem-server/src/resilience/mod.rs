//! Staying up when upstreams do not: a route's role (small, large, or a fixed route's upstream)
//! names a [`Group`] of upstreams — deployments of one model at several providers, or a cheaper
//! stand-in — tried in order or by weight. Each upstream has a retry policy ([`retry`]), a circuit
//! breaker ([`breaker`]) and an optional concurrency limit ([`Health`]). [`Attempts`] walks a
//! group for one request: a failure moves at once to the next upstream that may serve, and comes
//! back to a failed one only after its backoff (or its `Retry-After`).

pub mod breaker;
pub mod group;
pub mod retry;

pub use breaker::{Admit, Breaker, BreakerConfig, BreakerState};
pub use group::{Attempts, Group, Health, Ticket};
pub use retry::{Cure, RetryConfig};
