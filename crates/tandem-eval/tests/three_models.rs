//! A three-model cascade on a file built from the recorded GSM8K answers (../shared, beside the
//! checkout; the test skips with a message when it is absent).
//!
//! The third model is derived, not recorded. "mid" copies the strong model (GPT-4) — its outcome,
//! and its response text so the token cost is realistic — except on a seeded 35% of the items,
//! where it copies the weak model (Mixtral) instead. So it is exactly as good as the strong model
//! where it agrees with it, between the two on average, and correlated with both as a real mid
//! model would be. Its cost is recorded in the file (`cost.mid`: its response's tokens at $2.47
//! per million, a tenth of GPT-4's price); the other two are priced on the command line as the
//! two-model eval prices them. The assertions are about the cascade, so they hold for any honest
//! mid model between the two, and fail if the engine or the policies misuse the tiers.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::shared;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Map, Value};
use std::path::Path;
use std::sync::Arc;
use tandem_core::policy::FeedbackMode;
use tandem_core::tier::estimate_tokens;
use tandem_core::{BudgetLimits, Price};
use tandem_eval::ntier::default_ladder_policies;
use tandem_eval::{evaluate_ladder, Dataset, Ladder, LadderConfig, LadderReport, LoadOptions};

const WEAK: &str = "mixtral-8x7b-instruct";
const STRONG: &str = "gpt-4-1106-preview";

/// The recorded file with the derived "mid" model added to every line (see the top of the file).
fn with_mid(recorded: &Path, seed: u64, flip: f64) -> String {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mid_price = Price::Token {
        input_per_million: 2_470_000,
        output_per_million: 2_470_000,
    };
    let text = std::fs::read_to_string(recorded).unwrap();
    let mut out = String::with_capacity(text.len() * 3 / 2);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let mut v: Map<String, Value> = serde_json::from_str(line).unwrap();
        // One draw per line, in file order: the construction does not depend on the eval's order.
        let source = if rng.gen::<f64>() < flip {
            WEAK
        } else {
            STRONG
        };
        let ok = v["correct"][source].as_bool().unwrap();
        let response = v["response"][source].as_str().unwrap_or("").to_string();
        let prompt_chars = v["prompt"].as_str().unwrap().chars().count();
        let usage = tandem_core::Usage {
            input_tokens: estimate_tokens(prompt_chars),
            output_tokens: estimate_tokens(response.chars().count()),
        };
        let cost = tandem_core::money::micros_to_usd(mid_price.cost(usage));
        v["correct"]
            .as_object_mut()
            .unwrap()
            .insert("mid".into(), json!(ok));
        v["response"]
            .as_object_mut()
            .unwrap()
            .insert("mid".into(), json!(response));
        v.insert("cost".into(), json!({ "mid": cost }));
        out.push_str(&serde_json::to_string(&v).unwrap());
        out.push('\n');
    }
    out
}

fn prices() -> Vec<(String, Price)> {
    vec![
        (WEAK.into(), Price::parse("token:0.24").unwrap()),
        (STRONG.into(), Price::parse("token:24.7").unwrap()),
    ]
}

fn three_model_report(recorded: &Path) -> LadderReport {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gsm8k-3.jsonl");
    std::fs::write(&path, with_mid(recorded, 7, 0.35)).unwrap();
    let data = Arc::new(Dataset::load(&path, &LoadOptions::default()).unwrap());
    let ladder = Ladder::new(data, &[], &prices(), 1).unwrap();
    assert_eq!(ladder.names(), vec![WEAK, "mid", STRONG], "ordered by cost");
    let cfg = LadderConfig {
        seed: 0,
        target_share: 0.3,
        explore: 0.1,
        grid: 11,
        budget: BudgetLimits::default(),
        threads: 2,
        limit: None,
        policies: default_ladder_policies(),
    };
    evaluate_ladder(&ladder, &cfg, &|_| {}).unwrap()
}

#[test]
fn a_three_model_cascade_on_gsm8k_spans_its_models() {
    let Some(recorded) = shared("gsm8k.jsonl") else {
        return;
    };
    let r = three_model_report(&recorded);
    println!("{}", r.table());
    let q: Vec<f64> = r.models.iter().map(|m| m.quality).collect();
    let cost: Vec<f64> = r.models.iter().map(|m| m.cost_usd).collect();
    assert_eq!(r.models.len(), 3);
    assert!(q[0] < q[1] && q[1] < q[2], "mid lies between: {q:?}");
    assert!(cost[0] < cost[1] && cost[1] < cost[2], "{cost:?}");
    assert!(r.models[1].recorded_cost && !r.models[0].recorded_cost);
    let table = r.table();
    for m in [WEAK, "mid", STRONG] {
        assert!(table.contains(m), "the table names {m}");
    }
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["models"].as_array().unwrap().len(), 3);

    for p in r.policies.iter().filter(|p| !p.frontier.is_empty()) {
        let name = format!("{} ({})", p.name, p.feedback);
        let f = &p.frontier;
        assert_eq!(f.len(), 11, "{name}");
        for pt in f {
            assert_eq!(pt.answered.len(), 3, "{name}");
            assert!(
                (pt.answered.iter().sum::<f64>() - 1.0).abs() < 1e-9,
                "{name}"
            );
        }
        // Full budget: every item reaches the top tier, so the cascade is the top model.
        let full = f.last().unwrap();
        assert!(full.top_share > 0.97, "{name}: {full:?}");
        assert!(
            (full.quality - q[2]).abs() < 0.015,
            "{name}: {full:?} vs {}",
            q[2]
        );
        // Monotone-ish: more top-tier share buys quality (dips within noise allowed).
        for w in f.windows(2) {
            assert!(w[1].quality > w[0].quality - 0.02, "{name}: {w:?}");
            assert!(w[1].cost_usd > w[0].cost_usd - 0.05, "{name}: {w:?}");
        }
        assert!(full.quality > f[0].quality + 0.05, "{name}");
        // Top shares follow their targets. (OCL's share controller undershoots low targets — at
        // 10% it sends under 5% up — which is issue 14 item 5's to fix, in the core.)
        let from = if p.name == "ocl" { 2 } else { 0 };
        for pt in &f[from..] {
            assert!(
                (pt.top_share - pt.target_share).abs() < 0.06,
                "{name}: {pt:?}"
            );
        }
        // The middle tier answers part of the stream at the middle of the frontier.
        let mid = &f[5];
        assert!(
            mid.answered[1] > 0.1,
            "{name}: the middle tier is used: {mid:?}"
        );
        // Cheaper than the top model alone at half its share, and better than the cheapest.
        assert!(mid.cost_usd < 0.75 * cost[2], "{name}: {mid:?}");
        assert!(mid.quality > q[0] + 0.05, "{name}: {mid:?}");
    }
    // At low cost the cascade beats the cheapest model: random deferral at share 0 is the mid
    // model answering everything, for the cheapest and the mid model's price.
    let random = r.policies.iter().find(|p| p.name == "random").unwrap();
    let low = &random.frontier[0];
    assert!((low.quality - q[1]).abs() < 1e-9, "{low:?}");
    assert!(low.answered[1] > 0.999);
    // OCL's operating point (30% top share) uses all three tiers and beats the cheapest model
    // by far. (It does not beat random deferral here, which lets the mid model answer all the
    // rest: the low-share weakness issue 14 item 5 is about.)
    for p in r.policies.iter().filter(|p| p.name == "ocl") {
        assert!(p.answered.iter().all(|&a| a > 0.05), "{p:?}");
        assert!(p.quality > q[0] + 0.1, "{p:?}");
    }
    assert!(r
        .policies
        .iter()
        .any(|p| p.name == "ocl" && p.feedback == FeedbackMode::Partial.as_str()));
    // The oracle (cheapest right model) is a ceiling at a fraction of the top model's cost.
    let oracle = r.policies.iter().find(|p| p.name == "oracle").unwrap();
    assert!(
        oracle.quality >= q[2] && oracle.cost_usd < cost[2],
        "{oracle:?}"
    );
}
