//! `tandem run`: a stream of texts through a cascade of local tiers described in TOML. Cheap tiers
//! answer when confident; the top tier answers the rest, and every answer of the top tier trains
//! the cheap tiers online. Budgets cap the top tier; learned state checkpoints and resumes.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod live;
pub mod plot;
pub mod recording;
pub mod report;
pub mod stream;
pub mod tiers;

pub use config::RunConfig;
pub use error::RunError;
