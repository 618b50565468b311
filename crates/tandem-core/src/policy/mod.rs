//! Policies decide which tier answers. A *route* policy scores a query before any model runs
//! (route-before-generation); a *cascade* policy scores the cheap tier's answer and accepts it or
//! escalates (cascade-after-generation). Scorers only score and learn; the [`gate::Gate`] turns
//! scores into decisions that hold a target share, explore and respect the budget, so every policy
//! gets calibration and hard caps from one place.

pub mod cascade;
pub mod deferral;
pub mod gate;
pub mod response;
pub mod router;
pub mod signals;

use crate::answer::Answer;
use crate::query::Query;
use serde::{Deserialize, Serialize};

/// What a policy is told after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeedbackMode {
    /// Both models' outcomes, whatever was called: the optimistic bound.
    Full,
    /// Only the outcome of what a deployment served (both when it explored).
    Partial,
    /// Nothing: fixed policies.
    None,
}

impl FeedbackMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FeedbackMode::Full => "full",
            FeedbackMode::Partial => "partial",
            FeedbackMode::None => "none",
        }
    }
}

/// Outcomes revealed after a decision: the quality of each model's answer in [0, 1] (1 = correct),
/// or None when it was not revealed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Observation {
    pub weak: Option<f32>,
    pub strong: Option<f32>,
}

/// Scores a query before generation: the higher, the more the strong model is expected to gain.
pub trait RouteScorer: Send {
    fn score(&mut self, query: &Query) -> f32;
    fn learn(&mut self, query: &Query, observed: &Observation);
}

/// Scores the weak model's answer after generation: the higher, the more escalation is warranted.
pub trait CascadeScorer: Send {
    fn score(&mut self, query: &Query, weak: &Answer) -> f32;
    fn learn(&mut self, query: &Query, weak: &Answer, observed: &Observation);
}
