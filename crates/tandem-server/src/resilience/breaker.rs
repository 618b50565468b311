//! A circuit breaker per upstream: closed (calls pass), open (calls refused until a cool-down
//! passes), half-open (a few probe calls decide). It opens after `consecutive_failures` failures
//! in a row, or when the share of failed calls over a rolling window reaches `error_rate` (with at
//! least `min_calls` calls in it); probes that succeed close it, a probe that fails opens it again.
//! Time is passed in (tokio's clock), so tests run it on virtual time.

use serde::Deserialize;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// `[upstream.breaker]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Failures in a row that open the breaker. Default 5.
    #[serde(default = "d_consecutive")]
    pub consecutive_failures: u32,
    /// Share of failed calls over `window_s` that opens it (0 < rate ≤ 1). Default 0.5.
    #[serde(default = "d_rate")]
    pub error_rate: f64,
    /// The rolling window the error rate is measured over, in seconds. Default 30.
    #[serde(default = "d_window")]
    pub window_s: u64,
    /// Calls the window must hold before its error rate counts. Default 20.
    #[serde(default = "d_min_calls")]
    pub min_calls: u32,
    /// How long an open breaker refuses calls before letting probes through, in ms. Default 10,000.
    #[serde(default = "d_open")]
    pub open_ms: u64,
    /// Probe calls let through at once when half-open; that many successes close it. Default 1.
    #[serde(default = "d_probes")]
    pub half_open_probes: u32,
}

fn d_consecutive() -> u32 {
    5
}
fn d_rate() -> f64 {
    0.5
}
fn d_window() -> u64 {
    30
}
fn d_min_calls() -> u32 {
    20
}
fn d_open() -> u64 {
    10_000
}
fn d_probes() -> u32 {
    1
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: d_consecutive(),
            error_rate: d_rate(),
            window_s: d_window(),
            min_calls: d_min_calls(),
            open_ms: d_open(),
            half_open_probes: d_probes(),
        }
    }
}

impl BreakerConfig {
    /// The first field at fault, with its value and why.
    pub fn check(&self) -> Result<(), (&'static str, String, &'static str)> {
        if self.consecutive_failures == 0 {
            return Err(("consecutive_failures", "0".into(), "must be at least 1"));
        }
        if !(self.error_rate.is_finite() && self.error_rate > 0.0 && self.error_rate <= 1.0) {
            return Err((
                "error_rate",
                self.error_rate.to_string(),
                "must be a share above 0 and at most 1",
            ));
        }
        if !(1..=86_400).contains(&self.window_s) {
            return Err((
                "window_s",
                self.window_s.to_string(),
                "must be 1 to 86400 seconds",
            ));
        }
        if !(1..=86_400_000).contains(&self.open_ms) {
            return Err((
                "open_ms",
                self.open_ms.to_string(),
                "must be 1 to 86400000 (a day)",
            ));
        }
        if !(1..=1_000).contains(&self.half_open_probes) {
            return Err((
                "half_open_probes",
                self.half_open_probes.to_string(),
                "must be 1 to 1000",
            ));
        }
        if self.min_calls == 0 {
            return Err(("min_calls", "0".into(), "must be at least 1"));
        }
        if self.consecutive_failures > 1_000_000 {
            return Err((
                "consecutive_failures",
                self.consecutive_failures.to_string(),
                "must be 1 to 1000000",
            ));
        }
        Ok(())
    }
}

/// The breaker's state, as `/health` and `/metrics` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn name(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }

    /// The value of the `tandem_upstream_breaker_state` gauge: 0 closed, 1 half-open, 2 open.
    pub fn gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::HalfOpen => 1.0,
            BreakerState::Open => 2.0,
        }
    }
}

/// Whether a call may go to the upstream now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Yes; `probe` when the breaker is half-open and this call decides.
    Yes { probe: bool },
    /// No: the breaker is open (or its probes are out) for about this long.
    No { retry_in: Duration },
}

/// Buckets the rolling window is cut into.
const BUCKETS: u64 = 10;

#[derive(Debug)]
pub struct Breaker {
    cfg: BreakerConfig,
    state: State,
    consecutive: u32,
    /// (bucket index since `origin`, calls, failures), oldest first.
    window: VecDeque<(u64, u32, u32)>,
    origin: Instant,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen {
        out: u32,
        successes: u32,
        /// When the oldest probe still out was let through: a probe never recorded (its request
        /// was cancelled) frees its slot after `open_ms`.
        since: Instant,
    },
}

impl Breaker {
    pub fn new(cfg: BreakerConfig, now: Instant) -> Breaker {
        Breaker {
            cfg,
            state: State::Closed,
            consecutive: 0,
            window: VecDeque::new(),
            origin: now,
        }
    }

    pub fn state(&self, now: Instant) -> BreakerState {
        match self.state {
            State::Closed => BreakerState::Closed,
            State::Open { until } if now < until => BreakerState::Open,
            State::Open { .. } | State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    fn open_for(&self) -> Duration {
        Duration::from_millis(self.cfg.open_ms)
    }

    /// Asks to make a call; a `Yes` must be followed by [`Breaker::record`] or
    /// [`Breaker::cancel`].
    pub fn admit(&mut self, now: Instant) -> Admit {
        match self.state {
            State::Closed => Admit::Yes { probe: false },
            State::Open { until } if now < until => Admit::No {
                retry_in: until - now,
            },
            State::Open { .. } => {
                self.state = State::HalfOpen {
                    out: 1,
                    successes: 0,
                    since: now,
                };
                Admit::Yes { probe: true }
            }
            State::HalfOpen {
                out,
                successes,
                since,
            } => {
                let stale = now.saturating_duration_since(since) >= self.open_for();
                if out < self.cfg.half_open_probes || stale {
                    self.state = State::HalfOpen {
                        out: if stale { 1 } else { out + 1 },
                        successes,
                        since: if stale || out == 0 { now } else { since },
                    };
                    Admit::Yes { probe: true }
                } else {
                    Admit::No {
                        retry_in: (since + self.open_for()).saturating_duration_since(now),
                    }
                }
            }
        }
    }

    /// A probe that ended without an outcome (its request was cancelled) frees its slot.
    pub fn cancel(&mut self, probe: bool) {
        if let (true, State::HalfOpen { out, .. }) = (probe, &mut self.state) {
            *out = out.saturating_sub(1);
        }
    }

    /// The outcome of an admitted call: `ok` false for a failure of the upstream's own (never
    /// for a request the upstream rightly refused).
    pub fn record(&mut self, ok: bool, probe: bool, now: Instant) {
        self.count(ok, now);
        if ok {
            self.consecutive = 0;
        } else {
            self.consecutive = self.consecutive.saturating_add(1);
        }
        match self.state {
            State::HalfOpen {
                out,
                successes,
                since,
            } if probe => {
                if ok {
                    let successes = successes + 1;
                    if successes >= self.cfg.half_open_probes {
                        self.close();
                    } else {
                        self.state = State::HalfOpen {
                            out: out.saturating_sub(1),
                            successes,
                            since,
                        };
                    }
                } else {
                    self.trip(now);
                }
            }
            // Late outcomes of calls let through before the breaker opened change nothing.
            State::HalfOpen { .. } | State::Open { .. } => {}
            State::Closed => {
                if !ok && (self.consecutive >= self.cfg.consecutive_failures || self.rate_over()) {
                    self.trip(now);
                }
            }
        }
    }

    fn close(&mut self) {
        self.state = State::Closed;
        self.consecutive = 0;
        self.window.clear();
    }

    fn trip(&mut self, now: Instant) {
        self.state = State::Open {
            until: now + self.open_for(),
        };
    }

    fn bucket_len(&self) -> Duration {
        Duration::from_millis((self.cfg.window_s.saturating_mul(1000) / BUCKETS).max(1))
    }

    fn count(&mut self, ok: bool, now: Instant) {
        let len = self.bucket_len().as_millis().max(1);
        let idx = (now.saturating_duration_since(self.origin).as_millis() / len) as u64;
        while self
            .window
            .front()
            .is_some_and(|&(i, _, _)| i + BUCKETS <= idx)
        {
            self.window.pop_front();
        }
        match self.window.back_mut() {
            Some(b) if b.0 == idx => {
                b.1 += 1;
                b.2 += u32::from(!ok);
            }
            _ => self.window.push_back((idx, 1, u32::from(!ok))),
        }
    }

    fn rate_over(&self) -> bool {
        let (calls, fails) = self.window.iter().fold((0u64, 0u64), |(c, f), b| {
            (c + u64::from(b.1), f + u64::from(b.2))
        });
        calls >= u64::from(self.cfg.min_calls.max(1))
            && fails as f64 >= self.cfg.error_rate * calls as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            error_rate: 0.5,
            window_s: 10,
            min_calls: 10,
            open_ms: 1_000,
            half_open_probes: 2,
        }
    }

    fn call(b: &mut Breaker, ok: bool, now: Instant) -> bool {
        match b.admit(now) {
            Admit::Yes { probe } => {
                b.record(ok, probe, now);
                true
            }
            Admit::No { .. } => false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_failures_in_a_row_then_probes_close_it() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(), t0);
        assert!(call(&mut b, false, t0));
        assert!(call(&mut b, true, t0), "a success resets the run");
        for _ in 0..3 {
            assert!(call(&mut b, false, t0));
        }
        assert_eq!(b.state(t0), BreakerState::Open);
        assert!(!call(&mut b, true, t0), "open: refused");
        tokio::time::advance(Duration::from_millis(999)).await;
        assert_eq!(
            b.admit(Instant::now()),
            Admit::No {
                retry_in: Duration::from_millis(1)
            }
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        let now = Instant::now();
        assert_eq!(b.state(now), BreakerState::HalfOpen);
        assert_eq!(b.admit(now), Admit::Yes { probe: true });
        assert_eq!(b.admit(now), Admit::Yes { probe: true });
        assert!(
            matches!(b.admit(now), Admit::No { .. }),
            "two probes at most"
        );
        b.record(true, true, now);
        assert_eq!(b.state(now), BreakerState::HalfOpen, "one success of two");
        b.record(true, true, now);
        assert_eq!(b.state(now), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_it_again() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(), t0);
        for _ in 0..3 {
            call(&mut b, false, t0);
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        let now = Instant::now();
        assert!(call(&mut b, false, now));
        assert_eq!(b.state(now), BreakerState::Open);
        assert!(
            matches!(b.admit(now), Admit::No { retry_in } if retry_in == Duration::from_secs(1))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_error_rate_over_the_window_opens_it() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(), t0);
        // Alternating: never 3 in a row, but half of the calls fail.
        for i in 0..9 {
            assert!(call(&mut b, i % 2 == 0, Instant::now()));
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        assert_eq!(
            b.state(Instant::now()),
            BreakerState::Closed,
            "9 calls < min_calls"
        );
        assert!(call(&mut b, false, Instant::now()));
        assert_eq!(
            b.state(Instant::now()),
            BreakerState::Open,
            "5 of 10 failed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn old_failures_leave_the_window() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg(), t0);
        for _ in 0..8 {
            call(&mut b, true, Instant::now());
            call(&mut b, false, Instant::now());
            call(&mut b, true, Instant::now());
        }
        assert_eq!(
            b.state(Instant::now()),
            BreakerState::Closed,
            "1 in 3 failed"
        );
        tokio::time::advance(Duration::from_secs(11)).await;
        // 9 failures of 19 calls would trip on the old window; the new one holds only these.
        for _ in 0..4 {
            call(&mut b, false, Instant::now());
            call(&mut b, true, Instant::now());
        }
        assert_eq!(
            b.state(Instant::now()),
            BreakerState::Closed,
            "8 calls < min_calls"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_probe_frees_its_slot() {
        let t0 = Instant::now();
        let mut b = Breaker::new(
            BreakerConfig {
                half_open_probes: 1,
                ..cfg()
            },
            t0,
        );
        for _ in 0..3 {
            call(&mut b, false, t0);
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        let now = Instant::now();
        assert_eq!(b.admit(now), Admit::Yes { probe: true });
        assert!(matches!(b.admit(now), Admit::No { .. }));
        b.cancel(true);
        assert_eq!(b.admit(now), Admit::Yes { probe: true });
        // A probe lost without even a cancel frees its slot after open_ms.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(b.admit(Instant::now()), Admit::Yes { probe: true });
    }

    #[test]
    fn bad_settings_name_their_field() {
        let c = BreakerConfig {
            error_rate: f64::NAN,
            ..BreakerConfig::default()
        };
        assert_eq!(c.check().unwrap_err().0, "error_rate");
        let c = BreakerConfig {
            open_ms: 0,
            ..BreakerConfig::default()
        };
        assert_eq!(c.check().unwrap_err().0, "open_ms");
        for w in [0, 86_401, u64::MAX / 100] {
            let c = BreakerConfig {
                window_s: w,
                ..BreakerConfig::default()
            };
            assert_eq!(c.check().unwrap_err().0, "window_s", "{w}");
        }
        assert!(BreakerConfig::default().check().is_ok());
    }
}
