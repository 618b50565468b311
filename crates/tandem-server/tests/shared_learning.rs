//! Is learning through the shared stream as good as one learner? Replicas each apply their own
//! events at once and the others' a little later (the stream is read every 100 ms), so their
//! learners see the same events in a different order. On RouteLLM's recorded MMLU answers, three
//! replicas sharing that way must decide like one learner that saw every event in order (held-out
//! decisions at a 30% strong share, and the quality they reach), while replicas that did not share
//! learn from a third of the traffic each.
//!
//! Needs `../shared/data/routellm/mmlu.jsonl`; skips with a message when it is absent.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::VecDeque;
use tandem_core::policy::{Observation, RouteScorer};
use tandem_core::Query;
use tandem_server::route::router_config;

struct Item {
    query: Query,
    weak: f32,
    strong: f32,
}

fn load() -> Option<Vec<Item>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/routellm/mmlu.jsonl");
    let Ok(text) = std::fs::read_to_string(&path) else {
        eprintln!("skipped: {} is absent", path.display());
        return None;
    };
    let mut items: Vec<Item> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let c = &v["correct"];
            Item {
                query: Query::text(v["id"].as_str().unwrap(), v["prompt"].as_str().unwrap()),
                weak: f32::from(u8::from(c["mixtral-8x7b-instruct"].as_bool().unwrap())),
                strong: f32::from(u8::from(c["gpt-4-1106-preview"].as_bool().unwrap())),
            }
        })
        .collect();
    items.shuffle(&mut rand::rngs::StdRng::seed_from_u64(0));
    Some(items)
}

fn router() -> tandem_server::route::Learned {
    tandem_server::route::Learned::Router(Box::new(
        tandem_core::policy::router::GainRouter::new(router_config(None)).unwrap(),
    ))
}

fn learn(r: &mut tandem_server::route::Learned, it: &Item) {
    if let tandem_server::route::Learned::Router(g) = r {
        g.learn(
            &it.query,
            &Observation {
                weak: Some(it.weak),
                strong: Some(it.strong),
            },
        );
    }
}

fn scores(r: &mut tandem_server::route::Learned, test: &[Item]) -> Vec<f32> {
    match r {
        tandem_server::route::Learned::Router(g) => {
            test.iter().map(|t| g.score(&t.query)).collect()
        }
        _ => unreachable!(),
    }
}

/// Which held-out items go strong at a `share` of strong calls (the highest scores).
fn strong_set(scores: &[f32], share: f64) -> Vec<bool> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let k = (scores.len() as f64 * share).round() as usize;
    let mut out = vec![false; scores.len()];
    for &i in &idx[..k] {
        out[i] = true;
    }
    out
}

fn quality(test: &[Item], strong: &[bool]) -> f64 {
    test.iter()
        .zip(strong)
        .map(|(t, &s)| f64::from(if s { t.strong } else { t.weak }))
        .sum::<f64>()
        / test.len() as f64
}

#[test]
fn replicas_sharing_the_stream_decide_like_one_learner() {
    let Some(items) = load() else { return };
    let (train, test) = items.split_at(10_000);
    let share = 0.3;

    // One learner in front of every replica.
    let mut one = router();
    for it in train {
        learn(&mut one, it);
    }
    let one_strong = strong_set(&scores(&mut one, test), share);

    // Three replicas, round robin; each applies its own events at once and the others' `lag`
    // events later (100 ms of traffic at 1,000 requests/s is 100).
    let replicated = |lag: usize| {
        let mut reps = [router(), router(), router()];
        let mut inflight: VecDeque<(usize, usize)> = VecDeque::new();
        for (i, it) in train.iter().enumerate() {
            let origin = i % 3;
            learn(&mut reps[origin], it);
            inflight.push_back((i, origin));
            while inflight.len() > lag {
                let (j, o) = inflight.pop_front().unwrap();
                for (r, rep) in reps.iter_mut().enumerate() {
                    if r != o {
                        learn(rep, &train[j]);
                    }
                }
            }
        }
        for (j, o) in inflight {
            for (r, rep) in reps.iter_mut().enumerate() {
                if r != o {
                    learn(rep, &train[j]);
                }
            }
        }
        reps
    };
    let agree = |a: &[bool], b: &[bool]| {
        a.iter().zip(b).filter(|(x, y)| x == y).count() as f64 / a.len() as f64
    };
    let q_one = quality(test, &one_strong);
    println!("one learner: quality {q_one:.4} at {share} strong");
    for lag in [100, 1_000] {
        let mut reps = replicated(lag);
        for (r, rep) in reps.iter_mut().enumerate() {
            let s = strong_set(&scores(rep, test), share);
            let (a, q) = (agree(&s, &one_strong), quality(test, &s));
            println!("shared, lag {lag}: replica {r} agrees {a:.4}, quality {q:.4}");
            assert!(a >= 0.95, "lag {lag}, replica {r}: agreement {a}");
            assert!(
                (q - q_one).abs() <= 0.005,
                "lag {lag}, replica {r}: {q} vs {q_one}"
            );
        }
    }
    // Not sharing: each replica learns from its own third only.
    let mut alone = router();
    for it in train.iter().step_by(3) {
        learn(&mut alone, it);
    }
    let s = strong_set(&scores(&mut alone, test), share);
    println!(
        "not shared: agrees {:.4}, quality {:.4}",
        agree(&s, &one_strong),
        quality(test, &s)
    );
}
