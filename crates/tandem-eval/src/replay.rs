//! Replay tiers: a model answered from a recorded file. The tier returns what the model said (its
//! recorded response, when there is one) and what it would have cost; whether it was right stays in
//! the dataset, out of reach of the policies, and is only revealed through feedback. A cost the file
//! records for the answer is charged as recorded; otherwise the tier's price is applied to the
//! answer's estimated tokens.

use crate::data::Dataset;
use std::sync::Arc;
use std::time::Duration;
use tandem_core::tier::estimate_tokens;
use tandem_core::{Answer, CoreError, Micros, Output, Price, Query, Tier, Usage};

pub struct ReplayTier {
    id: String,
    model: usize,
    price: Price,
    /// Output tokens charged when no response text was recorded (e.g. a one-letter MMLU answer).
    default_output_tokens: u64,
    data: Arc<Dataset>,
}

impl ReplayTier {
    pub fn new(
        data: Arc<Dataset>,
        model: usize,
        price: Price,
        default_output_tokens: u64,
    ) -> Result<Self, CoreError> {
        let id = data.models.get(model).cloned().ok_or_else(|| {
            CoreError::config("model", model, "no such model in the recorded file")
        })?;
        Ok(ReplayTier {
            id,
            model,
            price,
            default_output_tokens,
            data,
        })
    }

    fn usage(&self, query: &Query, response: Option<&str>) -> Usage {
        Usage {
            input_tokens: estimate_tokens(query.char_len()),
            output_tokens: response.map_or(self.default_output_tokens, |r| {
                estimate_tokens(r.chars().count())
            }),
        }
    }
}

impl Tier for ReplayTier {
    fn id(&self) -> &str {
        &self.id
    }

    fn price(&self) -> Price {
        self.price
    }

    fn estimate_cost(&self, query: &Query) -> Micros {
        // A replayed answer's length (or recorded cost) is known, so the estimate is exact; live
        // tiers estimate.
        let row = self.data.row_of(&query.id);
        if let Some(c) = row.and_then(|r| r.cost.get(self.model).copied().flatten()) {
            return c;
        }
        let response = row.and_then(|r| r.response.get(self.model).cloned().flatten());
        self.price.cost(self.usage(query, response.as_deref()))
    }

    fn answer(&mut self, query: &Query) -> Result<Answer, CoreError> {
        let row = self.data.row_of(&query.id).ok_or_else(|| CoreError::Tier {
            tier: self.id.clone(),
            reason: format!("no recorded answer for query {:?}", query.id),
        })?;
        let text = row.response.get(self.model).cloned().flatten();
        let usage = self.usage(query, text.as_deref());
        let cost = row
            .cost
            .get(self.model)
            .copied()
            .flatten()
            .unwrap_or_else(|| self.price.cost(usage));
        Ok(Answer {
            tier: self.id.clone(),
            output: Output::Text {
                text: text.unwrap_or_default(),
                token_logprobs: None,
            },
            usage,
            cost,
            compute: Duration::ZERO,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::LoadOptions;
    use std::path::Path;

    #[test]
    fn answers_from_the_record_and_prices_it() {
        let text = r#"{"id":"a","prompt":"12345678","correct":{"w":true,"s":false},"response":{"w":"abcd","s":"x"}}"#;
        let ds = Arc::new(
            Dataset::parse(Path::new("t"), text.as_bytes(), &LoadOptions::default()).unwrap(),
        );
        let price = Price::Token {
            input_per_million: 1_000_000,
            output_per_million: 2_000_000,
        };
        let mut t = ReplayTier::new(ds.clone(), ds.model_index("w").unwrap(), price, 1).unwrap();
        let q = ds.rows[0].query.clone();
        let a = t.answer(&q).unwrap();
        assert_eq!(a.text(), Some("abcd"));
        assert_eq!(
            a.usage,
            Usage {
                input_tokens: 2,
                output_tokens: 1
            }
        );
        assert_eq!(a.cost, 2 + 2);
        assert_eq!(t.estimate_cost(&q), a.cost);
        assert!(t.answer(&Query::text("zzz", "?")).is_err());
    }

    #[test]
    fn a_recorded_cost_is_charged_as_recorded() {
        let text = r#"{"id":"a","prompt":"p","correct":{"w":true,"s":false},"cost":{"w":0.0025}}"#;
        let ds = Arc::new(
            Dataset::parse(Path::new("t"), text.as_bytes(), &LoadOptions::default()).unwrap(),
        );
        let price = Price::Call { micros: 7 };
        let (w, s) = (ds.model_index("w").unwrap(), ds.model_index("s").unwrap());
        let q = ds.rows[0].query.clone();
        let mut tw = ReplayTier::new(ds.clone(), w, price, 1).unwrap();
        assert_eq!(tw.answer(&q).unwrap().cost, 2500);
        assert_eq!(tw.estimate_cost(&q), 2500);
        let mut ts = ReplayTier::new(ds.clone(), s, price, 1).unwrap();
        assert_eq!(ts.answer(&q).unwrap().cost, 7);
        assert!(ds.has_costs(w) && !ds.has_costs(s));
    }
}
