//! Retries: which failures another attempt can cure, how long to wait before one (exponential
//! backoff with jitter, or the upstream's `Retry-After`), and when to move on instead.

use crate::error::GatewayError;
use rand::Rng;
use serde::Deserialize;
use std::time::{Duration, SystemTime};

/// `[upstream.retry]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts on this upstream per request, the first included (1: no retry). Default 2.
    #[serde(default = "d_attempts")]
    pub attempts: u32,
    /// Backoff before the second attempt, in ms; it doubles per attempt, with jitter (a wait
    /// drawn between half and all of it). Default 100.
    #[serde(default = "d_backoff")]
    pub backoff_ms: u64,
    /// The backoff's cap, in ms. Default 2,000.
    #[serde(default = "d_max_backoff")]
    pub max_backoff_ms: u64,
    /// The longest `Retry-After` honoured by waiting, in ms; an upstream that asks for longer
    /// is not retried for this request (another upstream of the group may serve). Default 5,000.
    #[serde(default = "d_max_retry_after")]
    pub max_retry_after_ms: u64,
}

fn d_attempts() -> u32 {
    2
}
fn d_backoff() -> u64 {
    100
}
fn d_max_backoff() -> u64 {
    2_000
}
fn d_max_retry_after() -> u64 {
    5_000
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: d_attempts(),
            backoff_ms: d_backoff(),
            max_backoff_ms: d_max_backoff(),
            max_retry_after_ms: d_max_retry_after(),
        }
    }
}

impl RetryConfig {
    /// The first field at fault, with its value and why.
    pub fn check(&self) -> Result<(), (&'static str, String, &'static str)> {
        if !(1..=10).contains(&self.attempts) {
            return Err(("attempts", self.attempts.to_string(), "must be 1 to 10"));
        }
        for (f, v, max) in [
            ("backoff_ms", self.backoff_ms, 60_000),
            ("max_backoff_ms", self.max_backoff_ms, 300_000),
            ("max_retry_after_ms", self.max_retry_after_ms, 300_000),
        ] {
            if v > max {
                return Err((f, v.to_string(), "is over its bound (backoff_ms 60000, max_backoff_ms and max_retry_after_ms 300000): a request would wait minutes"));
            }
        }
        if self.max_backoff_ms < self.backoff_ms {
            return Err((
                "max_backoff_ms",
                self.max_backoff_ms.to_string(),
                "must be at least backoff_ms",
            ));
        }
        Ok(())
    }

    /// The wait before attempt `n + 1` on an upstream that failed `n` ≥ 1 times: `backoff_ms ·
    /// 2^(n−1)` capped at `max_backoff_ms`, drawn uniformly from its upper half (jitter keeps
    /// retries of many requests from arriving together).
    pub fn backoff(&self, n: u32, rng: &mut impl Rng) -> Duration {
        let exp = n.saturating_sub(1).min(20);
        let full = self
            .backoff_ms
            .saturating_mul(1u64 << exp)
            .min(self.max_backoff_ms);
        Duration::from_millis(rng.gen_range(full / 2..=full))
    }
}

/// What a failed attempt leaves open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cure {
    /// A transient failure (timeout, reset, garbage, 5xx, 408, 409, 429): this upstream may
    /// serve on a later attempt, another one now.
    Retry,
    /// This upstream cannot serve the request (401, 403, 404, 501: its key, its model, its
    /// features) but another one may.
    Elsewhere,
    /// The request itself is at fault (400, 413, 422, ...) or the failure is tandem's: no other
    /// attempt would do better.
    Stop,
}

impl Cure {
    pub fn of(e: &GatewayError) -> Cure {
        match e {
            GatewayError::UpstreamTimeout { .. } | GatewayError::Upstream { .. } => Cure::Retry,
            GatewayError::UpstreamStatus { status: 501, .. } => Cure::Elsewhere,
            GatewayError::UpstreamStatus { .. } => Cure::Retry,
            GatewayError::UpstreamRejected(r) => match r.status {
                408 | 409 | 429 => Cure::Retry,
                401 | 403 | 404 => Cure::Elsewhere,
                _ => Cure::Stop,
            },
            _ => Cure::Stop,
        }
    }

    /// Whether the failure is the upstream's own (it counts against its breaker).
    pub fn blames_upstream(self) -> bool {
        self != Cure::Stop
    }
}

/// The wait an upstream asked for in `Retry-After` (seconds, or an HTTP date), from `now`.
pub fn retry_after(e: &GatewayError, now: SystemTime) -> Option<Duration> {
    let v = match e {
        GatewayError::UpstreamRejected(r) => r.retry_after.as_deref(),
        GatewayError::UpstreamStatus { retry_after, .. } => retry_after.as_deref(),
        _ => None,
    }?
    .trim();
    if let Ok(s) = v.parse::<f64>() {
        return (s.is_finite() && s >= 0.0).then(|| Duration::from_secs_f64(s.min(86_400.0)));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Rejected;
    use rand::SeedableRng;

    fn rejected(status: u16, retry_after: Option<&str>) -> GatewayError {
        GatewayError::UpstreamRejected(Box::new(Rejected {
            upstream: "u".into(),
            status,
            kind: None,
            code: None,
            param: None,
            message: "m".into(),
            retry_after: retry_after.map(str::to_string),
        }))
    }

    fn status(s: u16) -> GatewayError {
        GatewayError::UpstreamStatus {
            upstream: "u".into(),
            status: s,
            reason: "r".into(),
            retry_after: None,
        }
    }

    #[test]
    fn failures_are_sorted_by_what_can_cure_them() {
        let timeout = GatewayError::UpstreamTimeout {
            upstream: "u".into(),
            ms: 5,
        };
        let reset = GatewayError::Upstream {
            upstream: "u".into(),
            reason: "connection reset".into(),
            sent: true,
        };
        for e in [
            timeout,
            reset,
            status(500),
            status(502),
            status(503),
            rejected(429, None),
            rejected(408, None),
        ] {
            assert_eq!(Cure::of(&e), Cure::Retry, "{e}");
        }
        for e in [
            rejected(401, None),
            rejected(403, None),
            rejected(404, None),
            status(501),
        ] {
            assert_eq!(Cure::of(&e), Cure::Elsewhere, "{e}");
        }
        for e in [
            rejected(400, None),
            rejected(413, None),
            rejected(422, None),
            GatewayError::Internal("x".into()),
            GatewayError::BadRequest("x".into()),
        ] {
            assert_eq!(Cure::of(&e), Cure::Stop, "{e}");
            assert!(!Cure::of(&e).blames_upstream());
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let c = RetryConfig::default();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for (n, full) in [(1u32, 100u64), (2, 200), (3, 400), (6, 2_000), (40, 2_000)] {
            for _ in 0..50 {
                let d = c.backoff(n, &mut rng).as_millis() as u64;
                assert!((full / 2..=full).contains(&d), "attempt {n}: {d} ms");
            }
        }
    }

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            retry_after(&rejected(429, Some("2")), now),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            retry_after(&rejected(429, Some(" 0.5 ")), now),
            Some(Duration::from_millis(500))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            retry_after(&rejected(503, Some(&date)), now),
            Some(Duration::from_secs(30))
        );
        let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
        assert_eq!(
            retry_after(&rejected(429, Some(&past)), now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&rejected(429, Some("soon")), now), None);
        assert_eq!(retry_after(&rejected(429, Some("-3")), now), None);
        assert_eq!(retry_after(&status(503), now), None);
    }
}
