//! Evaluation of tandem's policies on recorded answers of real models: replay tiers that answer
//! from a recorded file, the online runner (each decision made before its outcome is learned), the
//! side-by-side report with RouteLLM's metrics, and the quality/share plot.

pub mod data;
pub mod error;
pub mod eval;
pub mod ntier;
pub mod plot;
pub mod replay;
pub mod report;
pub mod runner;
mod sweep;
pub mod train;

pub use data::{Dataset, LoadOptions};
pub use error::EvalError;
pub use eval::{evaluate, EvalConfig, PolicySpec};
pub use ntier::{evaluate_ladder, Ladder, LadderConfig, LadderPolicy, LadderSpec};
pub use report::{EvalReport, LadderReport, PolicyRow};
pub use sweep::stream_order;
