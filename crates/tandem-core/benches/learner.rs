//! Throughput of the hashed online learner: `cargo bench -p tandem-core --bench learner`.
//! Prints the median of 5 repetitions for: featurising a text, one AdaGrad update on features
//! already hashed (the learner alone), and predict + update from raw text (a cheap tier's step).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;
use tandem_core::features::{ns, FeatureVec, Featurizer, TextFeatures};
use tandem_core::learner::{LearnerConfig, OnlineSoftmax};

fn texts(n: usize) -> Vec<(String, usize)> {
    let words: Vec<String> = (0..5000).map(|i| format!("w{i:x}")).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    (0..n)
        .map(|_| {
            let y = rng.gen_range(0..2);
            let len = rng.gen_range(8..30);
            let t: Vec<&str> = (0..len)
                .map(|_| words[rng.gen_range(0..words.len()) / 2 * 2 + y].as_str())
                .collect();
            (t.join(" "), y)
        })
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let data = texts(20_000);
    for (label, cfg) in [
        (
            "words 1-2",
            TextFeatures {
                word_ngrams: 2,
                char_min: 0,
                char_max: 0,
            },
        ),
        (
            "words 1-2 + chars 3-5",
            TextFeatures {
                word_ngrams: 2,
                char_min: 3,
                char_max: 5,
            },
        ),
    ] {
        let mut f = Featurizer::new(20).unwrap();
        let xs: Vec<FeatureVec> = data
            .iter()
            .map(|(t, _)| {
                let mut x = FeatureVec::default();
                f.add_bias(&mut x);
                f.add_text(ns::PROMPT, t, cfg, 1.0, &mut x);
                x
            })
            .collect();
        let nnz = xs.iter().map(|x| x.len()).sum::<usize>() as f64 / xs.len() as f64;
        let (mut feat, mut upd, mut full) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..5 {
            let mut x = FeatureVec::default();
            let t0 = Instant::now();
            for (t, _) in &data {
                x.clear();
                f.add_text(ns::PROMPT, t, cfg, 1.0, &mut x);
            }
            feat.push(data.len() as f64 / t0.elapsed().as_secs_f64());

            let mut m = OnlineSoftmax::new(LearnerConfig {
                bits: 20,
                classes: 2,
                learning_rate: 0.2,
                l2: 0.0,
            })
            .unwrap();
            let mut p = [0.0f32; 2];
            let t0 = Instant::now();
            for (x, (_, y)) in xs.iter().zip(&data) {
                m.learn(x, *y, 1.0, &mut p);
            }
            upd.push(data.len() as f64 / t0.elapsed().as_secs_f64());

            let mut m = OnlineSoftmax::new(LearnerConfig {
                bits: 20,
                classes: 2,
                learning_rate: 0.2,
                l2: 0.0,
            })
            .unwrap();
            let t0 = Instant::now();
            for (t, y) in &data {
                x.clear();
                f.add_bias(&mut x);
                f.add_text(ns::PROMPT, t, cfg, 1.0, &mut x);
                m.learn(&x, *y, 1.0, &mut p);
            }
            full.push(data.len() as f64 / t0.elapsed().as_secs_f64());
        }
        println!(
            "{label:<24} {nnz:>6.0} features/text | featurise {:>9.0}/s | predict+update (hashed) {:>9.0}/s | text -> update {:>9.0}/s",
            median(feat),
            median(upd),
            median(full)
        );
    }
}
