//! Cost-aware routing on the recorded MMLU answers (../shared beside the checkout; skipped with a
//! message when absent): at 30% strong calls, the router weighing price (weight 0.5) spends no
//! more than random routing at the same share, at higher quality; weighing it fully spends less
//! still. Measured (seed 0, full feedback): random 71.98% for $12.74; cost weight 0 74.76% for
//! $18.16; 0.5 74.29% for $9.39; 1 73.76% for $6.54.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::shared;
use std::sync::Arc;
use tandem_core::policy::cascade::CascadeConfig;
use tandem_core::policy::router::RouterConfig;
use tandem_core::policy::FeedbackMode;
use tandem_core::{BudgetLimits, Price};
use tandem_eval::runner::{Models, PolicyKind};
use tandem_eval::{evaluate, Dataset, EvalConfig, LoadOptions, PolicySpec};

#[test]
fn weighing_price_spends_less_than_random_at_higher_quality() {
    let Some(path) = shared("mmlu.jsonl") else {
        return;
    };
    let data = Arc::new(Dataset::load(&path, &LoadOptions::default()).unwrap());
    let models = Models {
        weak: data.model_index("mixtral-8x7b-instruct").unwrap(),
        strong: data.model_index("gpt-4-1106-preview").unwrap(),
        data,
        weak_price: Price::parse("token:0.24").unwrap(),
        strong_price: Price::parse("token:24.7").unwrap(),
        default_output_tokens: 1,
    };
    let run = |cost_weight: f32| {
        let cfg = EvalConfig {
            seed: 0,
            target_share: 0.3,
            explore: 0.1,
            grid: 3,
            window: 1000,
            budget: BudgetLimits::default(),
            threads: 2,
            limit: None,
            policies: vec![
                PolicySpec {
                    kind: PolicyKind::Random,
                    feedback: FeedbackMode::None,
                },
                PolicySpec {
                    kind: PolicyKind::Router,
                    feedback: FeedbackMode::Full,
                },
            ],
            router: RouterConfig::default(),
            cascade: CascadeConfig::default(),
            prior: None,
            cost_weight,
            embedder: None,
        };
        let r = evaluate(&models, &cfg, &|_| {}).unwrap();
        let row = |n: &str| {
            let p = r.policies.iter().find(|p| p.name == n).unwrap();
            (p.quality, p.cost_usd, p.strong_share)
        };
        (row("random"), row("router"))
    };
    let (random, gain) = run(0.0);
    let (_, half) = run(0.5);
    let (_, full) = run(1.0);
    // Gain alone buys its quality with the long, dear prompts: it spends more than random.
    assert!(gain.1 > random.1, "gain alone {gain:?}, random {random:?}");
    for (w, r) in [(0.5, half), (1.0, full)] {
        assert!((r.2 - 0.3).abs() < 0.02, "weight {w}: strong share {}", r.2);
        assert!(
            r.1 <= random.1 * 0.9 && r.0 >= random.0 + 0.01,
            "weight {w}: {r:?} against random {random:?}"
        );
    }
    assert!(
        full.1 < half.1,
        "weighing price fully spends less: {full:?} {half:?}"
    );
}
