//! The fault bench as a test: upstreams that fail at random (5xx, 429, resets, hangs, garbage,
//! cut bodies) behind groups of two; nothing is lost, nearly everything is served, and every
//! dollar the mocks billed is counted once.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use tandem_server::bench::faults::{run, FaultOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_upstreams_lose_nothing_and_spend_is_counted_once() {
    for seed in [1u64, 2] {
        let r = run(
            FaultOptions {
                requests: 400,
                rate: 200.0,
                fault_rate: 0.3,
                both_rate: 0.1,
                seed,
            },
            |_| {},
        )
        .await
        .unwrap();
        for row in &r.rows {
            let what = format!("seed {seed}, {}: {row:?}", row.scenario);
            assert_eq!(row.lost, 0, "{what}");
            assert!(row.faults_injected > 10, "faults were injected: {what}");
            assert!(row.served_share >= 0.995, "{what}");
            assert_eq!(row.served + row.openai_errors, row.requests, "{what}");
            assert!(
                (row.billed_usd - row.counted_usd).abs() < 1e-9,
                "counted as billed: {what}"
            );
            assert!(
                (row.billed_large_usd - row.budget_usd).abs() < 1e-9,
                "the budgets counted the large calls billed: {what}"
            );
            assert!(row.billed_usd > 0.0, "{what}");
        }
    }
}
