//! Speed of the local tiers on this machine: `cargo bench -p tandem-models --bench models`.
//! Needs the installed assets (scripts/setup). Prints medians of repeated runs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;
use tandem_core::Message;
use tandem_models::assets::Store;
use tandem_models::gguf::model::{Cache, Logits};
use tandem_models::gguf::GgufLm;
use tandem_models::minilm::MiniLm;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn snippets(store: &Store, n: usize) -> Vec<String> {
    let p = store
        .path("snippets", "movieReviewSnippets_GroundTruth.txt")
        .unwrap();
    let bytes = std::fs::read(p).unwrap();
    let text: String = bytes.iter().map(|&b| b as char).collect();
    text.lines()
        .skip(1)
        .filter_map(|l| l.splitn(3, '\t').nth(2).map(str::to_string))
        .take(n)
        .collect()
}

fn main() {
    let store = Store::default_home();
    let texts = snippets(&store, 512);
    let dir = store
        .path("minilm", "config.json")
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let mut enc = MiniLm::load(&dir, 128).unwrap();
    for batch in [1usize, 32] {
        let mut rates = Vec::new();
        for _ in 0..3 {
            let mut sorted: Vec<&str> = texts.iter().map(String::as_str).collect();
            sorted.sort_by_key(|t| t.len());
            let t0 = Instant::now();
            for chunk in sorted.chunks(batch) {
                enc.embed(chunk).unwrap();
            }
            rates.push(sorted.len() as f64 / t0.elapsed().as_secs_f64());
        }
        println!(
            "minilm (f32, candle)       batch {batch:>3}: {:>7.1} sentences/s",
            median(rates)
        );
    }
    for (id, file) in [
        ("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf"),
        (
            "qwen2.5-coder-0.5b",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        ),
    ] {
        let lm = GgufLm::load(&store.path(id, file).unwrap()).unwrap();
        let ids: Vec<u32> =
            lm.tokenizer.encode_prompt(&texts[..40].join(" ")).unwrap()[..60].to_vec();
        let mut pre = Vec::new();
        let mut step = Vec::new();
        for _ in 0..5 {
            let t0 = Instant::now();
            let (_, cache) = lm
                .model
                .forward(&ids, &Cache::default(), Logits::Last)
                .unwrap();
            pre.push(t0.elapsed().as_secs_f64());
            let t0 = Instant::now();
            lm.model.forward(&[ids[0]], &cache, Logits::Last).unwrap();
            step.push(t0.elapsed().as_secs_f64());
        }
        let labels = ["negative".to_string(), "positive".to_string()];
        let mut cls = Vec::new();
        for t in texts.iter().take(10) {
            let m = vec![Message { role: "user".into(), content: format!("Is the sentiment of this movie review positive or negative? Answer with one word.\nReview: {t}") }];
            let t0 = Instant::now();
            lm.classify(&m, &labels).unwrap();
            cls.push(t0.elapsed().as_secs_f64());
        }
        println!(
            "{id:<26} 60-token prompt {:>6.3} s | next token {:>6.1} ms | classify a snippet {:>6.3} s",
            median(pre),
            1000.0 * median(step),
            median(cls)
        );
    }
}
