//! An open-loop load generator: requests are sent on a fixed schedule whatever the server's pace,
//! and each latency is measured from the moment its request was due, so a server that falls
//! behind shows it in the tail (no coordinated omission).

use serde::Serialize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Serialize)]
pub struct LoadResult {
    pub target: String,
    /// Requests per second asked for.
    pub rate: f64,
    /// Completed (2xx) requests per second over the measured window.
    pub achieved: f64,
    pub ok: u64,
    pub errors: u64,
    /// Requests not sent because too many were already in flight (the server fell far behind).
    pub shed: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// The q-quantile of sorted values (nearest rank).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

pub struct Load<'a> {
    pub target: &'a str,
    pub url: &'a str,
    pub body: bytes::Bytes,
    pub rate: f64,
    pub duration: Duration,
    pub max_in_flight: usize,
}

pub async fn run(client: &reqwest::Client, load: Load<'_>) -> LoadResult {
    let lat = Arc::new(Mutex::new(Vec::<f64>::new()));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut shed = 0u64;
    let n = (load.rate * load.duration.as_secs_f64()).round() as u64;
    let start = Instant::now() + Duration::from_millis(5);
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let due = start + Duration::from_secs_f64(i as f64 / load.rate);
        // Timers tick in milliseconds: requests due within the same tick go out together.
        if due > Instant::now() + Duration::from_micros(500) {
            tokio::time::sleep_until(due.into()).await;
        }
        if in_flight.load(std::sync::atomic::Ordering::Relaxed) >= load.max_in_flight {
            shed += 1;
            continue;
        }
        in_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let req = client
            .post(load.url)
            .header("content-type", "application/json")
            .body(load.body.clone());
        let (lat, errors, in_flight) = (lat.clone(), errors.clone(), in_flight.clone());
        tasks.push(tokio::spawn(async move {
            let ok = match req.send().await {
                Ok(r) => {
                    let good = r.status().is_success();
                    // Read the body: a response is done when its last byte is in.
                    good && r.bytes().await.is_ok()
                }
                Err(_) => false,
            };
            let ms = due.elapsed().as_secs_f64() * 1e3;
            if ok {
                lat.lock().unwrap_or_else(|e| e.into_inner()).push(ms);
            } else {
                errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            in_flight.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }));
    }
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
    }
    let elapsed = start.elapsed().as_secs_f64().max(1e-9);
    let mut v = std::mem::take(&mut *lat.lock().unwrap_or_else(|e| e.into_inner()));
    v.sort_by(f64::total_cmp);
    LoadResult {
        target: load.target.to_string(),
        rate: load.rate,
        achieved: v.len() as f64 / elapsed,
        ok: v.len() as u64,
        errors: errors.load(std::sync::atomic::Ordering::Relaxed),
        shed,
        p50_ms: quantile(&v, 0.5),
        p99_ms: quantile(&v, 0.99),
        max_ms: v.last().copied().unwrap_or(f64::NAN),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
