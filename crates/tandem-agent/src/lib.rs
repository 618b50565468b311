//! Multi-step tasks: a game environment behind a process bridge, a large and a small action
//! policy, episodes in which LONDI's controller (in tandem-core) switches between them, and the
//! `tandem bench londi` benchmark.

pub mod actor;
pub mod bench;
pub mod bridge;
pub mod env;
pub mod error;
pub mod play;

pub use error::AgentError;
