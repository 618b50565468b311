//! Who answered what, at which cost: calls, micro-dollars and tokens per tier.

use crate::answer::Usage;
use crate::money::Micros;
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TierAccount {
    pub calls: u64,
    pub micros: Micros,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Ledger {
    tiers: BTreeMap<String, TierAccount>,
}

impl Ledger {
    pub fn record(&mut self, tier: &str, cost: Micros, usage: Usage) {
        let a = match self.tiers.get_mut(tier) {
            Some(a) => a,
            None => self.tiers.entry(tier.to_string()).or_default(),
        };
        a.calls += 1;
        a.micros = a.micros.saturating_add(cost);
        a.input_tokens += usage.input_tokens;
        a.output_tokens += usage.output_tokens;
    }

    pub fn tier(&self, tier: &str) -> TierAccount {
        self.tiers.get(tier).copied().unwrap_or_default()
    }

    pub fn total_micros(&self) -> Micros {
        self.tiers.values().map(|a| a.micros).sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &TierAccount)> {
        self.tiers.iter().map(|(k, v)| (k.as_str(), v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_per_tier() {
        let mut l = Ledger::default();
        l.record(
            "weak",
            2,
            Usage {
                input_tokens: 10,
                output_tokens: 1,
            },
        );
        l.record(
            "strong",
            250,
            Usage {
                input_tokens: 10,
                output_tokens: 1,
            },
        );
        l.record("weak", 3, Usage::default());
        assert_eq!(l.tier("weak").calls, 2);
        assert_eq!(l.tier("weak").micros, 5);
        assert_eq!(l.tier("strong").input_tokens, 10);
        assert_eq!(l.total_micros(), 255);
        assert_eq!(l.tier("none"), TierAccount::default());
    }
}
