//! Gold labels teach the cheap tiers (`teach = "gold"`, DS+'s small model trained on labelled
//! data) and `--pretrain` warms them up before the stream (`live::pretrain`): a hashed tier
//! under a top tier that is wrong on a third of the items learns the truth, not the top's errors.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;
use tandem_core::features::TextFeatures;
use tandem_core::{BudgetLimits, Price};
use tandem_models::classifier::{Classifier, HashedClassifier, ModelError, Prediction};
use tandem_run::config::{PolicyConfig, RunConfig, Teach};
use tandem_run::live::{self, RunOptions, RunState};
use tandem_run::stream::{Item, Stream};
use tandem_run::tiers::{TierModel, TierSetup};

/// The top tier: right, except on texts about "plot", where it always says "neg".
struct Top;

impl Classifier for Top {
    fn predict(&mut self, text: &str) -> Result<Prediction, ModelError> {
        let pos = text.contains("good") && !text.contains("plot");
        let logits = if pos { vec![0.0, 5.0] } else { vec![5.0, 0.0] };
        let mut probs = logits.clone();
        tandem_core::learner::softmax_in_place(&mut probs);
        Ok(Prediction {
            probs,
            logits,
            compute: Duration::from_micros(1),
        })
    }
    fn learn(&mut self, _: &str, _: usize, _: f32) -> Result<(), ModelError> {
        Ok(())
    }
    fn learns(&self) -> bool {
        false
    }
    fn updates(&self) -> u64 {
        0
    }
}

fn items(n: usize, from: usize) -> Vec<Item> {
    let topics = ["acting", "music", "plot"];
    (from..from + n)
        .map(|i| {
            let good = (i * 7919) % 2 == 0;
            let word = if good { "good" } else { "bad" };
            Item {
                id: i.to_string(),
                text: format!("a {word} {} number {i}", topics[i % 3]),
                gold: Some(usize::from(good)),
            }
        })
        .collect()
}

fn tiers() -> Vec<TierSetup> {
    let text = TextFeatures {
        word_ngrams: 2,
        char_min: 0,
        char_max: 0,
    };
    vec![
        TierSetup {
            name: "hashed".into(),
            model: TierModel::Learner(Box::new(HashedClassifier::new(2, 16, text, 0.5).unwrap())),
            price: Price::parse("call:0").unwrap(),
            threshold: 0.8,
            warmup: 50,
        },
        TierSetup {
            name: "top".into(),
            model: TierModel::Learner(Box::new(Top)),
            price: Price::parse("call:0.001").unwrap(),
            threshold: 1.0,
            warmup: 0,
        },
    ]
}

fn run(teach: Teach, pretrain: bool) -> RunState {
    let text = "labels = [\"neg\", \"pos\"]\n[[tier]]\nname = \"c\"\nkind = \"hashed\"\n[[tier]]\nname = \"t\"\nkind = \"gguf\"\nasset = \"smollm2-135m\"\ninstruction = \"{text}\"\n";
    let mut cfg = RunConfig::parse(std::path::Path::new("c.toml"), text).unwrap();
    cfg.policy = PolicyConfig {
        teach,
        ..Default::default()
    };
    let mut t = tiers();
    if pretrain {
        let mut seen = 0;
        let done = live::pretrain(&mut t, &items(600, 10_000), &mut |k| seen = k).unwrap();
        assert_eq!((done.learned, done.unlabelled, seen), (600, 0, 600));
    }
    let s = Stream {
        name: "hand-made".into(),
        items: items(600, 0),
        truncated: 0,
    };
    let mut cascade = live::cascade_for(&cfg, &t, 3).unwrap();
    let opts = RunOptions {
        output: None,
        state_dir: None,
        resume: false,
        checkpoint_every: u64::MAX,
        lookahead: 1,
        teach_gold: teach == Teach::Gold,
    };
    live::run(
        &s,
        &cfg.labels,
        &mut t,
        &mut cascade,
        BudgetLimits::default(),
        "digest",
        &opts,
        &mut |_| {},
    )
    .unwrap()
}

fn accuracy(s: &RunState) -> f64 {
    s.correct as f64 / s.with_gold as f64
}

#[test]
fn gold_labels_teach_the_truth_and_a_warm_start_answers_from_the_first_item() {
    let top = run(Teach::Top, false);
    let gold = run(Teach::Gold, false);
    let warm = run(Teach::Gold, true);
    let (a_top, a_gold, a_warm) = (accuracy(&top), accuracy(&gold), accuracy(&warm));
    let share = |s: &RunState| s.tiers[1].answered as f64 / s.items_done as f64;
    eprintln!(
        "accuracy (top share): taught by the top {a_top:.3} ({:.2}), by gold {a_gold:.3} ({:.2}), warm {a_warm:.3} ({:.2})",
        share(&top),
        share(&gold),
        share(&warm)
    );
    // Imitating the top copies its "plot" errors; the gold labels do not.
    assert!(a_gold > a_top + 0.05, "gold {a_gold}, top {a_top}");
    // Warm from the labelled set: fewer top calls, no less accurate.
    assert!(
        share(&warm) < share(&gold) - 0.05,
        "{} vs {}",
        share(&warm),
        share(&gold)
    );
    assert!(a_warm >= a_gold - 0.02, "warm {a_warm}, gold {a_gold}");
}
