use crate::answer::{Answer, Usage};
use crate::error::CoreError;
use crate::money::{token_cost, Micros};
use crate::query::Query;
use serde::{Deserialize, Serialize};

/// A tier's name, as configured ("mixtral-8x7b-instruct", "minilm-head", ...).
pub type TierId = String;

/// How a tier is priced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "per", rename_all = "snake_case", deny_unknown_fields)]
pub enum Price {
    /// A fixed amount per call.
    Call { micros: Micros },
    /// Per million tokens, input and output priced separately (as providers bill).
    Token {
        input_per_million: Micros,
        output_per_million: Micros,
    },
}

impl Price {
    /// Parses `call:USD` (dollars a call) or `token:IN[:OUT]` (dollars per million tokens).
    pub fn parse(s: &str) -> Result<Price, String> {
        let usd = |v: &str| -> Result<Micros, String> {
            let x: f64 = v.parse().map_err(|_| format!("{v:?} is not a number"))?;
            crate::money::usd_to_micros(x)
                .ok_or_else(|| format!("{v:?} must be a non-negative amount"))
        };
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            ["call", v] => Ok(Price::Call { micros: usd(v)? }),
            ["token", v] => Ok(Price::Token {
                input_per_million: usd(v)?,
                output_per_million: usd(v)?,
            }),
            ["token", i, o] => Ok(Price::Token {
                input_per_million: usd(i)?,
                output_per_million: usd(o)?,
            }),
            _ => Err(
                "expected `token:IN[:OUT]` (dollars per million tokens) or `call:USD`".to_string(),
            ),
        }
    }

    pub fn cost(&self, usage: Usage) -> Micros {
        match *self {
            Price::Call { micros } => micros,
            Price::Token {
                input_per_million,
                output_per_million,
            } => token_cost(usage.input_tokens, input_per_million)
                .saturating_add(token_cost(usage.output_tokens, output_per_million)),
        }
    }
}

/// Rough token count of a text when no tokenizer is at hand: about four characters a token for
/// English, never zero for non-empty text. Used for cost estimates of replayed and remote answers.
pub fn estimate_tokens(chars: usize) -> u64 {
    (chars as u64).div_ceil(4)
}

/// A model that answers queries at a cost. Replay tiers, local models and remote endpoints all
/// implement this; policies never call a tier themselves, the runner does, so budgets are checked
/// in one place.
pub trait Tier {
    fn id(&self) -> &str;
    fn price(&self) -> Price;
    /// The cost the tier will most likely charge for `query`, reserved against a budget before
    /// the call; the real cost is settled from the answer's usage afterwards.
    fn estimate_cost(&self, query: &Query) -> Micros;
    fn answer(&mut self, query: &Query) -> Result<Answer, CoreError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices() {
        let usage = Usage {
            input_tokens: 1000,
            output_tokens: 10,
        };
        assert_eq!(Price::Call { micros: 7 }.cost(usage), 7);
        let p = Price::Token {
            input_per_million: 24_700_000,
            output_per_million: 24_700_000,
        };
        assert_eq!(p.cost(usage), 24_700 + 247);
        assert_eq!(estimate_tokens(0), 0);
        assert_eq!(estimate_tokens(1), 1);
        assert_eq!(estimate_tokens(9), 3);
        assert_eq!(
            Price::parse("call:0.5"),
            Ok(Price::Call { micros: 500_000 })
        );
        assert_eq!(
            Price::parse("token:1:2"),
            Ok(Price::Token {
                input_per_million: 1_000_000,
                output_per_million: 2_000_000
            })
        );
        assert!(Price::parse("token:-1").is_err());
        assert!(Price::parse("tokens:1").is_err());
    }
}
