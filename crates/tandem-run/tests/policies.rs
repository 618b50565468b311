//! Each policy's decision rule on hand-made logits, and the hard budget under every policy:
//! scripted tiers whose answers are fixed per text, through the real live cascade.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::time::Duration;
use tandem_core::{BudgetLimits, Price};
use tandem_models::classifier::{Classifier, ModelError, Prediction};
use tandem_run::config::{PolicyConfig, PolicyKind, RunConfig};
use tandem_run::live::{self, Progress, RunOptions, RunState};
use tandem_run::stream::{Item, Stream};
use tandem_run::tiers::{TierModel, TierSetup};

/// Answers each text with the logits given for it; counts what it learns.
struct Scripted {
    logits: HashMap<String, Vec<f32>>,
    updates: u64,
}

impl Classifier for Scripted {
    fn predict(&mut self, text: &str) -> Result<Prediction, ModelError> {
        let logits = self.logits[text].clone();
        let mut probs = logits.clone();
        tandem_core::learner::softmax_in_place(&mut probs);
        Ok(Prediction {
            probs,
            logits,
            compute: Duration::from_micros(1),
        })
    }
    fn learn(&mut self, _: &str, _: usize, _: f32) -> Result<(), ModelError> {
        self.updates += 1;
        Ok(())
    }
    fn learns(&self) -> bool {
        true
    }
    fn updates(&self) -> u64 {
        self.updates
    }
}

fn tier(name: &str, logits: HashMap<String, Vec<f32>>, price: &str) -> TierSetup {
    TierSetup {
        name: name.into(),
        model: TierModel::Learner(Box::new(Scripted { logits, updates: 0 })),
        price: Price::parse(price).unwrap(),
        threshold: 0.9,
        warmup: 5,
    }
}

fn cfg(kind: PolicyKind, target: Option<f64>) -> RunConfig {
    let text = "labels = [\"neg\", \"pos\"]\n[[tier]]\nname = \"c\"\nkind = \"hashed\"\n[[tier]]\nname = \"t\"\nkind = \"gguf\"\nasset = \"smollm2-135m\"\ninstruction = \"{text}\"\n";
    let mut c = RunConfig::parse(std::path::Path::new("c.toml"), text).unwrap();
    c.policy = PolicyConfig {
        kind,
        target_top_share: target,
        ..Default::default()
    };
    c
}

/// A stream of `n` items whose texts cycle through `kinds`; the top tier always says "pos".
fn stream(n: usize, kinds: &[(&str, Vec<f32>)]) -> (Stream, Vec<TierSetup>) {
    let items = (0..n)
        .map(|i| Item {
            id: i.to_string(),
            text: kinds[i % kinds.len()].0.to_string(),
            gold: Some(1),
        })
        .collect();
    let cheap: HashMap<String, Vec<f32>> = kinds
        .iter()
        .map(|(t, l)| (t.to_string(), l.clone()))
        .collect();
    let top: HashMap<String, Vec<f32>> = kinds
        .iter()
        .map(|(t, _)| (t.to_string(), vec![0.0, 9.0]))
        .collect();
    let s = Stream {
        name: "hand-made".into(),
        items,
        truncated: 0,
    };
    (
        s,
        vec![
            tier("cheap", cheap, "call:0"),
            tier("top", top, "call:0.001"),
        ],
    )
}

/// Runs and returns the state plus, per text, how often the top tier answered it.
fn run(
    c: &RunConfig,
    s: &Stream,
    tiers: &mut [TierSetup],
    limits: BudgetLimits,
) -> (RunState, HashMap<String, (u64, u64)>) {
    let mut cascade = live::cascade_for(c, tiers, 7).unwrap();
    let opts = RunOptions {
        output: None,
        state_dir: None,
        resume: false,
        checkpoint_every: u64::MAX,
        lookahead: 1,
        teach_gold: c.policy.teach == tandem_run::config::Teach::Gold,
    };
    let mut by_text: HashMap<String, (u64, u64)> = HashMap::new();
    let mut seen = |p: &Progress| {
        // Past the warm-up only: the decisions the rule made.
        if p.done > 20 {
            let e = by_text
                .entry(s.items[p.done as usize - 1].text.clone())
                .or_default();
            e.0 += u64::from(p.last.tier == 1);
            e.1 += 1;
        }
    };
    let state = live::run(
        s,
        &c.labels,
        tiers,
        &mut cascade,
        limits,
        "t",
        &opts,
        &mut seen,
    )
    .unwrap();
    (state, by_text)
}

fn up_share(by: &HashMap<String, (u64, u64)>, text: &str) -> f64 {
    let (u, n) = by[text];
    u as f64 / n as f64
}

#[test]
fn confidence_shunt_answers_at_its_threshold() {
    let (s, mut tiers) = stream(400, &[("sure", vec![0.0, 4.0]), ("unsure", vec![0.0, 0.5])]);
    let (_, by) = run(
        &cfg(PolicyKind::Confidence, None),
        &s,
        &mut tiers,
        BudgetLimits::default(),
    );
    assert_eq!(up_share(&by, "sure"), 0.0);
    assert_eq!(up_share(&by, "unsure"), 1.0);
}

#[test]
fn max_prob_gate_sends_the_least_confident_share_up() {
    let kinds = [
        ("a", vec![0.0, 4.0]),
        ("b", vec![0.0, 3.0]),
        ("c", vec![0.0, 1.0]),
        ("d", vec![0.0, 0.2]),
    ];
    let (s, mut tiers) = stream(2000, &kinds);
    let (state, by) = run(
        &cfg(PolicyKind::MaxProb, Some(0.5)),
        &s,
        &mut tiers,
        BudgetLimits::default(),
    );
    assert!(
        up_share(&by, "a") < 0.05 && up_share(&by, "b") < 0.1,
        "{by:?}"
    );
    assert!(
        up_share(&by, "c") > 0.9 && up_share(&by, "d") > 0.9,
        "{by:?}"
    );
    let share = state.tiers[1].answered as f64 / 2000.0;
    assert!((share - 0.5).abs() < 0.05, "{share}");
}

#[test]
fn energy_gate_reads_the_scale_of_the_logits_that_max_prob_cannot() {
    // Same margin, so the same top probability; the small logits have the higher energy
    // E = −logsumexp(f): the model has little evidence for any class.
    let kinds = [("loud", vec![6.0, 6.5]), ("quiet", vec![0.0, 0.5])];
    let (s, mut tiers) = stream(2000, &kinds);
    let (_, by) = run(
        &cfg(PolicyKind::Energy, Some(0.5)),
        &s,
        &mut tiers,
        BudgetLimits::default(),
    );
    assert!(up_share(&by, "quiet") > 0.9, "{by:?}");
    assert!(up_share(&by, "loud") < 0.1, "{by:?}");
    // Max probability sees two identical items and can only split them at random.
    let (s, mut tiers) = stream(2000, &kinds);
    let (_, by) = run(
        &cfg(PolicyKind::MaxProb, Some(0.5)),
        &s,
        &mut tiers,
        BudgetLimits::default(),
    );
    assert!(
        (up_share(&by, "quiet") - up_share(&by, "loud")).abs() < 0.15,
        "{by:?}"
    );
}

#[test]
fn random_deferral_holds_its_share_whatever_the_confidence() {
    let (s, mut tiers) = stream(
        3000,
        &[("sure", vec![0.0, 4.0]), ("unsure", vec![0.0, 0.1])],
    );
    let (_, by) = run(
        &cfg(PolicyKind::Random, Some(0.3)),
        &s,
        &mut tiers,
        BudgetLimits::default(),
    );
    for t in ["sure", "unsure"] {
        assert!((up_share(&by, t) - 0.3).abs() < 0.05, "{t}: {by:?}");
    }
}

#[test]
fn ocl_learns_to_defer_where_the_cheap_tier_disagrees_with_the_top() {
    // The cheap tier says "neg" (disagreeing with the top) exactly on the "tricky" items, with
    // a confidence that sits between those of its two kinds of right answers: only learning
    // which confidences disagree, not ranking by confidence alone, sends them up.
    let kinds = [
        ("easy", vec![0.0, 3.0]),
        ("tricky", vec![1.2, 0.0]),
        ("plain", vec![0.0, 0.8]),
    ];
    let (s, mut tiers) = stream(3000, &kinds);
    let c = cfg(PolicyKind::Ocl, Some(0.34));
    let (state, by) = run(&c, &s, &mut tiers, BudgetLimits::default());
    assert!(up_share(&by, "tricky") > 0.8, "{by:?}");
    assert!(up_share(&by, "easy") < 0.2, "{by:?}");
    assert!(state.correct as f64 / 3000.0 > 0.9);
}

#[test]
fn the_budget_cap_holds_under_every_policy() {
    let limits = BudgetLimits {
        max_calls: Some(50),
        max_micros: None,
    };
    for kind in [
        PolicyKind::Confidence,
        PolicyKind::Ocl,
        PolicyKind::Energy,
        PolicyKind::MaxProb,
        PolicyKind::Random,
    ] {
        let target = (kind != PolicyKind::Confidence).then_some(0.5);
        let (s, mut tiers) = stream(600, &[("sure", vec![0.0, 4.0]), ("unsure", vec![0.0, 0.1])]);
        let (state, _) = run(&cfg(kind, target), &s, &mut tiers, limits);
        assert_eq!(state.top_calls, 50, "{kind:?}");
        assert_eq!(state.tiers[1].answered, 50, "{kind:?}");
        assert!(state.budget_refused > 0, "{kind:?}");
        assert_eq!(state.items_done, 600, "{kind:?}: every item still answered");
    }
}
