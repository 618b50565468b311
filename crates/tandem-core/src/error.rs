use thiserror::Error;

/// Errors of the engine. Each names the value at fault so a caller can print it as is.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum CoreError {
    #[error("invalid configuration: {field} = {value}: {reason}")]
    InvalidConfig {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("tier `{tier}` failed: {reason}")]
    Tier { tier: String, reason: String },
    #[error("budget exhausted: {0}")]
    BudgetExhausted(String),
    /// A prior file (a router trained beforehand) that cannot be read, written or used.
    #[error("prior {path}: {reason}")]
    Prior { path: String, reason: String },
}

impl CoreError {
    pub fn config(field: &'static str, value: impl ToString, reason: &'static str) -> Self {
        CoreError::InvalidConfig {
            field,
            value: value.to_string(),
            reason,
        }
    }
}
