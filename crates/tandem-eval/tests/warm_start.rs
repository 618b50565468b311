//! Warm start on the recorded MMLU answers (../shared, beside the checkout; the test skips with a
//! message when it is absent): a prior trained on one half of the questions (split by a hash of
//! the id) starts the router on the other half, which it has never seen. Early in the stream,
//! where a router from scratch has learned little, the prior's router routes better; and the
//! prior file round-trips (the same decisions from the loaded file).
//!
//! Measured (seeds 0–1, first 1,000 items of the held-out half, grid of 11): APGR 0.666 with the
//! prior against 0.571 from scratch with full feedback, 0.630 against 0.536 with partial
//! feedback; the test asks for a gain of 0.04.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::shared;
use std::path::Path;
use std::sync::Arc;
use tandem_core::policy::cascade::CascadeConfig;
use tandem_core::policy::router::RouterConfig;
use tandem_core::prior::Prior;
use tandem_core::Price;
use tandem_eval::runner::Models;
use tandem_eval::train::{train, TrainConfig, TrainSet};
use tandem_eval::{evaluate, Dataset, EvalConfig, LoadOptions};

/// The file's lines whose id hashes to `half` (0 or 1).
fn half(text: &str, half: u64) -> String {
    text.lines()
        .filter(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let id = v["id"].to_string();
            xxhash_rust::xxh3::xxh3_64(id.as_bytes()) % 2 == half
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

fn eval_cfg(seed: u64, prior: Option<Arc<Prior>>) -> EvalConfig {
    EvalConfig {
        prior,
        ..common::router_eval(seed, Some(1000))
    }
}

#[test]
fn a_prior_from_one_half_routes_the_other_half_better_from_the_start() {
    let Some(path) = shared("mmlu.jsonl") else {
        return;
    };
    let text = std::fs::read_to_string(&path).unwrap();
    let load = |t: String, name: &str| {
        Arc::new(Dataset::parse(Path::new(name), t.as_bytes(), &LoadOptions::default()).unwrap())
    };
    let (seen, unseen) = (load(half(&text, 0), "seen"), load(half(&text, 1), "unseen"));
    let model = |d: &Dataset, m: &str| d.models.iter().position(|x| x == m).unwrap();
    let (weak, strong) = ("mixtral-8x7b-instruct", "gpt-4-1106-preview");
    let prior = train(
        &[TrainSet {
            weak: model(&seen, weak),
            strong: model(&seen, strong),
            data: seen.clone(),
        }],
        &TrainConfig {
            epochs: 3,
            seed: 0,
            router: RouterConfig {
                bits: 18,
                ..RouterConfig::default()
            },
            cascade: CascadeConfig {
                bits: 18,
                ..CascadeConfig::default()
            },
            embedder: None,
        },
    )
    .unwrap();
    // Through a file, as `tandem train` and `tandem eval --prior` pass it.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("mmlu-half.prior");
    prior.save(&file).unwrap();
    let prior = Arc::new(Prior::load(&file).unwrap());
    assert_eq!(prior.info.trained_on[0].items, seen.rows.len() as u64);
    // MMLU's records have no responses: a router, no cascade scorer.
    assert!(prior.router.is_some() && prior.cascade.is_none());

    let models = Models {
        data: unseen.clone(),
        weak: model(&unseen, weak),
        strong: model(&unseen, strong),
        weak_price: Price::parse("token:0.24").unwrap(),
        strong_price: Price::parse("token:24.7").unwrap(),
        default_output_tokens: 1,
    };
    let apgr = |prior: Option<Arc<Prior>>| {
        let mut sum = [0.0f64; 2];
        for seed in 0..2 {
            let r = evaluate(&models, &eval_cfg(seed, prior.clone()), &|_| {}).unwrap();
            for (k, row) in r.policies.iter().enumerate() {
                sum[k] += row.apgr.unwrap() / 2.0;
            }
        }
        sum
    };
    let (scratch, warm) = (apgr(None), apgr(Some(prior.clone())));
    eprintln!("APGR (full, partial): from scratch {scratch:.3?}, with the prior {warm:.3?}");
    for (k, mode) in ["full", "partial"].iter().enumerate() {
        assert!(
            warm[k] > scratch[k] + 0.04,
            "{mode} feedback: APGR with the prior {:.3}, from scratch {:.3}",
            warm[k],
            scratch[k]
        );
    }
    // The same prior twice: the same decisions (it is copied into each run, not shared).
    let again = apgr(Some(prior));
    assert_eq!(again, warm);
}
