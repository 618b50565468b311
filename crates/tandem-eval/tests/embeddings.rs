//! Sentence vectors reach the router and the cascade scorer through `tandem eval` (../shared's
//! MMLU and GSM8K, skipped with a message when absent). The vectors here are stand-in encoders':
//! for the router, built from each MMLU record's subject, which the router is *not* given as
//! metadata: the router that reads them routes better than the one reading n-grams alone (on
//! 6,000 items, seeds 0–1); for the cascade scorer, GSM8K weak answers' vectors that say, for
//! half of them, whether the answer is right. A prior trained on vectors needs them again.
//! (MiniLM's real vectors: `tandem eval --embed`, figures in the README.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::shared;
use std::sync::Arc;
use tandem_core::embed::{Embedder, EmbeddingTable};
use tandem_core::policy::cascade::CascadeConfig;
use tandem_core::policy::router::RouterConfig;
use tandem_eval::train::{train, TrainConfig, TrainSet};
use tandem_eval::{evaluate, Dataset, EvalConfig, LoadOptions};

fn cfg(seed: u64, embedder: Option<Arc<dyn Embedder>>) -> EvalConfig {
    EvalConfig {
        router: RouterConfig {
            use_metadata: false,
            ..RouterConfig::default()
        },
        embedder,
        ..common::router_eval(seed, Some(6000))
    }
}

/// A vector per prompt: its subject's direction, plus a little of a direction of its own.
fn subject_vectors(data: &Dataset) -> Arc<dyn Embedder> {
    let mut subjects: Vec<&str> = data
        .rows
        .iter()
        .map(|r| r.query.metadata["subject"].as_str())
        .collect();
    subjects.sort();
    subjects.dedup();
    let dim = 64;
    let mut t = EmbeddingTable::new("subjects", dim).unwrap();
    for r in &data.rows {
        let s = subjects
            .iter()
            .position(|x| *x == r.query.metadata["subject"])
            .unwrap();
        let mut v = vec![0.0f32; dim];
        v[s % dim] = 1.0;
        let h = xxhash_rust::xxh3::xxh3_64(r.query.id.as_bytes()) as usize;
        v[(h >> 8) % dim] += 0.3;
        t.insert(r.query.routing_text(), &v).unwrap();
    }
    Arc::new(t)
}

#[test]
fn vectors_carry_what_the_words_miss() {
    let Some(path) = shared("mmlu.jsonl") else {
        return;
    };
    let data = Arc::new(Dataset::load(&path, &LoadOptions::default()).unwrap());
    let models = common::mmlu_models(data.clone());
    let vectors = subject_vectors(&data);
    let apgr = |e: Option<Arc<dyn Embedder>>| {
        let mut sum = [0.0f64; 2];
        for seed in 0..2 {
            let r = evaluate(&models, &cfg(seed, e.clone()), &|_| {}).unwrap();
            for (k, row) in r.policies.iter().enumerate() {
                sum[k] += row.apgr.unwrap() / 2.0;
            }
        }
        sum
    };
    let (words, with) = (apgr(None), apgr(Some(vectors.clone())));
    eprintln!("APGR (full, partial): words {words:.3?}, words and vectors {with:.3?}");
    // Measured (seeds 0-1, 6,000 items): 0.621 -> 0.648 full, 0.573 -> 0.591 partial.
    for (k, (mode, gain)) in [("full", 0.015), ("partial", 0.008)].iter().enumerate() {
        assert!(
            with[k] > words[k] + gain,
            "{mode} feedback: APGR with vectors {:.3}, words alone {:.3}",
            with[k],
            words[k]
        );
    }

    // A prior trained on vectors names its encoder and cannot run without one.
    let set = TrainSet {
        data: data.clone(),
        weak: models.weak,
        strong: models.strong,
    };
    let prior = train(
        &[set],
        &TrainConfig {
            epochs: 2,
            seed: 0,
            router: RouterConfig {
                use_metadata: false,
                ..RouterConfig::default()
            },
            cascade: CascadeConfig::default(),
            embedder: Some(vectors.clone()),
        },
    )
    .unwrap();
    assert_eq!(prior.info.embedder.as_deref(), Some("subjects"));
    let prior = Arc::new(prior);
    let without = EvalConfig {
        prior: Some(prior.clone()),
        ..cfg(0, None)
    };
    let e = evaluate(&models, &without, &|_| {})
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("sentence vectors"), "{e}");
    let with_prior = EvalConfig {
        prior: Some(prior),
        ..cfg(0, Some(vectors))
    };
    let r = evaluate(&models, &with_prior, &|_| {}).unwrap();
    assert!(
        r.policies[0].apgr.unwrap() > with[0],
        "a prior trained on every item routes them better"
    );
}

/// Stand-in vectors for GSM8K: each prompt a direction of its own; each weak answer, for a
/// hash-chosen half of the items, a direction that says whether it is right (the other half a
/// direction of its own), so the vectors carry the outcome where the words may not.
fn answer_vectors(data: &Dataset, weak: usize) -> Arc<dyn Embedder> {
    let dim = 32;
    let mut t = EmbeddingTable::new("answers", dim).unwrap();
    for r in &data.rows {
        let h = xxhash_rust::xxh3::xxh3_64(r.query.id.as_bytes()) as usize;
        let mut p = vec![0.0f32; dim];
        p[2 + h % (dim - 2)] = 1.0;
        t.insert(r.query.routing_text(), &p).unwrap();
        let mut a = vec![0.0f32; dim];
        if h & (1 << 16) == 0 {
            a[usize::from(r.quality[weak] < 0.5)] = 1.0;
        }
        a[2 + (h >> 24) % (dim - 2)] += 0.5;
        t.insert(r.response[weak].as_deref().unwrap(), &a).unwrap();
    }
    Arc::new(t)
}

#[test]
fn the_cascade_reads_the_answers_vector() {
    use tandem_core::policy::FeedbackMode;
    use tandem_eval::runner::PolicyKind;
    let Some(path) = shared("gsm8k.jsonl") else {
        return;
    };
    let data = Arc::new(Dataset::load(&path, &LoadOptions::default()).unwrap());
    // GSM8K's recordings are of the same two models as MMLU's.
    let models = common::mmlu_models(data.clone());
    let vectors = answer_vectors(&data, models.weak);
    let cfg = |e: Option<Arc<dyn Embedder>>| EvalConfig {
        policies: vec![tandem_eval::PolicySpec {
            kind: PolicyKind::Cascade,
            feedback: FeedbackMode::Full,
        }],
        embedder: e,
        ..common::router_eval(0, None)
    };
    let apgr = |c: &EvalConfig| {
        evaluate(&models, c, &|_| {}).unwrap().policies[0]
            .apgr
            .unwrap()
    };
    let (words, with) = (apgr(&cfg(None)), apgr(&cfg(Some(vectors.clone()))));
    eprintln!("GSM8K cascade APGR (full): words {words:.3}, with the answers' vectors {with:.3}");
    // Measured (seed 0, grid 11): 0.716 -> 0.864.
    assert!(
        with > words + 0.08,
        "APGR with vectors {with:.3}, words alone {words:.3}"
    );

    // A prior's cascade scorer trained on vectors needs them again, and starts from them.
    let set = TrainSet {
        data: data.clone(),
        weak: models.weak,
        strong: models.strong,
    };
    let prior = train(
        &[set],
        &TrainConfig {
            epochs: 2,
            seed: 0,
            router: RouterConfig::default(),
            cascade: CascadeConfig::default(),
            embedder: Some(vectors.clone()),
        },
    )
    .unwrap();
    assert!(prior.cascade.as_ref().unwrap().config().reads_embeddings());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gsm8k.prior");
    prior.save(&file).unwrap();
    let prior = Arc::new(tandem_core::prior::Prior::load(&file).unwrap());
    let e = evaluate(
        &models,
        &EvalConfig {
            prior: Some(prior.clone()),
            ..cfg(None)
        },
        &|_| {},
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("sentence vectors"), "{e}");
    let warm = apgr(&EvalConfig {
        prior: Some(prior),
        ..cfg(Some(vectors))
    });
    assert!(
        warm > with,
        "a prior trained on every item: {warm:.3}, from scratch {with:.3}"
    );
}
