//! tandem's engine: the types every part of tandem shares (queries, tiers, answers), the online
//! learners, the N-tier cascade engine and its policies (one file each), the two-model routing policies, share calibration, hard budgets, the cost ledger and
//! RouteLLM's quality metrics. Backends, the gateway and the evaluator build on these.

pub mod answer;
pub mod budget;
pub mod calibrate;
pub mod embed;
pub mod engine;
pub mod error;
pub mod features;
pub mod learner;
pub mod ledger;
pub mod londi;
pub mod metrics;
pub mod money;
pub mod policy;
pub mod prior;
pub mod query;
pub mod stats;
pub mod tier;

pub use answer::{Answer, Output, Usage};
pub use budget::{Budget, BudgetLimits, Reservation};
pub use error::CoreError;
pub use ledger::Ledger;
pub use money::Micros;
pub use query::{Input, Message, Query};
pub use tier::{Price, Tier, TierId};
