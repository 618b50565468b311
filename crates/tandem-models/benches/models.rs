//! Speed of the local tiers on this machine: `cargo bench -p tandem-models --bench models`.
//! Needs the installed assets (scripts/setup); the ONNX Runtime rows and the Python onnxruntime
//! reference beside them need scripts/setup-onnx (ENCODER.md). Prints medians of repeated runs;
//! TANDEM_BENCH_MMLU=N sets how many MMLU prompts are embedded (default 2000).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
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

/// Every 7th prompt of the recorded MMLU file (../shared beside the checkout), at most `n`.
fn mmlu(n: usize) -> Option<Vec<String>> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/routellm/mmlu.jsonl");
    let Ok(text) = std::fs::read_to_string(&p) else {
        println!("(no {}: the MMLU rows are skipped)", p.display());
        return None;
    };
    let rows = text.lines().filter(|l| !l.trim().is_empty()).step_by(7);
    let prompts = rows.map(|l| {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        v["prompt"].as_str().unwrap().to_string()
    });
    Some(prompts.take(n).collect())
}

/// Sentences/s over `texts` in length-sorted batches (as embed_cache does), median of `runs`,
/// and the vectors in input order.
fn rate(enc: &mut MiniLm, texts: &[String], batch: usize, runs: usize) -> (f64, Vec<Vec<f32>>) {
    let mut order: Vec<usize> = (0..texts.len()).collect();
    order.sort_by_key(|&i| texts[i].len());
    let mut rates = Vec::new();
    let mut out = vec![Vec::new(); texts.len()];
    for _ in 0..runs {
        let t0 = Instant::now();
        for chunk in order.chunks(batch) {
            let batch: Vec<&str> = chunk.iter().map(|&i| texts[i].as_str()).collect();
            for (&i, v) in chunk.iter().zip(enc.embed(&batch).unwrap()) {
                out[i] = v;
            }
        }
        rates.push(texts.len() as f64 / t0.elapsed().as_secs_f64());
    }
    (median(rates), out)
}

#[cfg(feature = "ort")]
fn cosines(a: &[Vec<f32>], b: &[Vec<f32>]) -> String {
    let c: Vec<f32> = a
        .iter()
        .zip(b)
        .map(|(x, y)| tandem_models::minilm::cosine(x, y))
        .collect();
    let min = c.iter().copied().fold(f32::INFINITY, f32::min);
    let mean = c.iter().sum::<f32>() / c.len().max(1) as f32;
    format!("cosine to candle min {min:.4} mean {mean:.4}")
}

/// The Python onnxruntime reference (scripts/bench-minilm-ort.py) on the same texts, when
/// scripts/setup-onnx has made its venv.
fn python_reference(store: &Store, dir: &Path, set: &str, texts: &[String], runs: usize) {
    let onnx = tandem_models::minilm::onnx_dir(dir);
    let pythonpath = store.home().join("py/onnx");
    let file = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../../target/minilm-bench-{set}.jsonl"));
    let lines: String = texts
        .iter()
        .map(|t| serde_json::to_string(t).unwrap() + "\n")
        .collect();
    std::fs::write(&file, lines).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench-minilm-ort.py");
    let cmd = format!(
        "PYTHONPATH={} python3 {} {} {} {} --runs {runs}",
        pythonpath.display(),
        script.display(),
        dir.display(),
        onnx.join("model.onnx").display(),
        file.display()
    );
    if !pythonpath.is_dir() || !onnx.join("model.onnx").is_file() {
        println!("  python reference: not installed (scripts/setup-onnx); it would run: {cmd}");
        return;
    }
    println!("  $ {cmd}");
    let out = std::process::Command::new("python3")
        .env("PYTHONPATH", &pythonpath)
        .arg(&script)
        .arg(dir)
        .arg(onnx.join("model.onnx"))
        .arg(&file)
        .args(["--runs", &runs.to_string()])
        .output()
        .unwrap();
    print!("  {}", String::from_utf8_lossy(&out.stdout));
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
    let mut candle = MiniLm::load_candle(&dir, 128).unwrap();
    let (r1, _) = rate(&mut candle, &texts[..128], 1, 3);
    println!("minilm candle f32, batch 1, 128 snippets: {r1:>7.1} sentences/s");
    let n_mmlu = std::env::var("TANDEM_BENCH_MMLU")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let mut sets = vec![("snippets", texts.clone(), 3)];
    if let Some(m) = mmlu(n_mmlu) {
        sets.push(("mmlu", m, 1));
    }
    for (set, texts, runs) in &sets {
        println!(
            "minilm on {} {set} (128-token cap, batches of 32 sorted by length, median of {runs}):",
            texts.len()
        );
        #[cfg_attr(not(feature = "ort"), allow(unused_variables))]
        let (base, reference) = rate(&mut candle, texts, 32, *runs);
        println!("  candle f32                 {base:>7.1} sentences/s");
        #[cfg(feature = "ort")]
        for (label, load) in [
            (
                "ort f32 (rust)            ",
                MiniLm::load_ort_f32 as fn(&Path, usize) -> _,
            ),
            ("ort int8 (rust, opt-in)   ", MiniLm::load_ort),
        ] {
            match load(&dir, 128) {
                Ok(mut enc) => {
                    let (r, v) = rate(&mut enc, texts, 32, *runs);
                    println!(
                        "  {label} {r:>7.1} sentences/s ({:.2}x candle) {}",
                        r / base,
                        cosines(&v, &reference)
                    );
                }
                Err(e) => println!("  {label} skipped: {e}"),
            }
        }
        python_reference(&store, &dir, set, texts, *runs);
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
