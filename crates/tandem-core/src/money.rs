//! Money is integer micro-dollars everywhere: sums never drift and budgets compare exactly.

/// An amount in micro-dollars (1e-6 USD).
pub type Micros = u64;

pub const MICROS_PER_USD: u64 = 1_000_000;

/// Converts dollars given by a user (e.g. on the command line) to micro-dollars, rounding to the
/// nearest micro-dollar. Negative or non-finite amounts are rejected by the caller's validation.
pub fn usd_to_micros(usd: f64) -> Option<Micros> {
    if !usd.is_finite() || usd < 0.0 || usd > (u64::MAX / 2) as f64 / MICROS_PER_USD as f64 {
        return None;
    }
    Some((usd * MICROS_PER_USD as f64).round() as u64)
}

pub fn micros_to_usd(m: Micros) -> f64 {
    m as f64 / MICROS_PER_USD as f64
}

/// Cost of `tokens` at `per_million` micro-dollars per million tokens, rounded up so that a budget
/// reservation never underestimates.
pub fn token_cost(tokens: u64, per_million: Micros) -> Micros {
    let num = tokens as u128 * per_million as u128;
    num.div_ceil(1_000_000) as Micros
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_cost_rounds_up() {
        // GPT-4-1106 at $24.7 per million tokens: 24.7 micro-dollars a token.
        assert_eq!(token_cost(1, 24_700_000), 25);
        assert_eq!(token_cost(10, 24_700_000), 247);
        assert_eq!(token_cost(0, 24_700_000), 0);
    }

    #[test]
    fn usd_conversion() {
        assert_eq!(usd_to_micros(1.5), Some(1_500_000));
        assert_eq!(usd_to_micros(-1.0), None);
        assert_eq!(usd_to_micros(f64::NAN), None);
        assert!((micros_to_usd(2_500_000) - 2.5).abs() < 1e-12);
    }
}
