//! The route-before router's neighbour search: `cargo bench -p tandem-core --bench knn`.
//! A memory of 4,096 vectors of 384 floats (MiniLM's size; clustered like sentence vectors of a
//! few hundred topics), then the median µs of one estimate by an exact scan and by the sign-code
//! shortlist, and of one router decision (n-grams + a cached vector + both models' neighbours).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use std::time::Instant;
use tandem_core::embed::{EmbeddingTable, KnnMemory};
use tandem_core::policy::router::{GainRouter, RouterConfig};
use tandem_core::policy::{Observation, RouteScorer};
use tandem_core::query::Query;

const DIM: usize = 384;
const MEMORY: usize = 4096;

fn unit(v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / n).collect()
}

fn vectors(n: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<f32>> {
    let centres: Vec<Vec<f32>> = (0..300)
        .map(|_| unit((0..DIM).map(|_| rng.gen::<f32>() - 0.5).collect()))
        .collect();
    (0..n)
        .map(|_| {
            let c = &centres[rng.gen_range(0..centres.len())];
            unit(
                c.iter()
                    .map(|x| x + 0.05 * (rng.gen::<f32>() - 0.5))
                    .collect(),
            )
        })
        .collect()
}

fn median_us(mut f: impl FnMut(usize), n: usize) -> f64 {
    let mut t: Vec<f64> = (0..n)
        .map(|i| {
            let t0 = Instant::now();
            f(i);
            t0.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn main() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let data = vectors(MEMORY + 1000, &mut rng);
    let mut m = KnnMemory::new(DIM, MEMORY, 32).unwrap();
    for v in &data[..MEMORY] {
        m.add(v, f32::from(rng.gen::<bool>()));
    }
    let queries = &data[MEMORY..];
    let mut sink = 0.0f32;
    let exact = median_us(|i| sink += m.estimate_exact(&queries[i]).0, queries.len());
    let fast = median_us(|i| sink += m.estimate(&queries[i]).0, queries.len());
    let gap = queries
        .iter()
        .map(|q| (m.estimate(q).0 - m.estimate_exact(q).0).abs())
        .fold(0.0f32, f32::max);
    println!("knn estimate, {MEMORY} x {DIM}: exact scan {exact:.1} µs, sign-code shortlist {fast:.1} µs (median; worst gap {gap:.4})");

    // One router decision with a cached vector: n-grams, the table lookup, both neighbours.
    let mut table = EmbeddingTable::new("bench", DIM).unwrap();
    let texts: Vec<String> = (0..data.len())
        .map(|i| format!("question {i} about topic {}", i % 97))
        .collect();
    for (t, v) in texts.iter().zip(&data) {
        table.insert(t, v).unwrap();
    }
    let cfg = RouterConfig::default().with_embeddings(DIM);
    let mut r = GainRouter::new(cfg)
        .unwrap()
        .with_embedder(Arc::new(table))
        .unwrap();
    for (i, t) in texts[..MEMORY].iter().enumerate() {
        let q = Query::text(format!("{i}"), t.clone());
        r.score(&q);
        r.learn(
            &q,
            &Observation {
                weak: Some(f32::from(i % 3 == 0)),
                strong: Some(1.0),
            },
        );
    }
    let decide = median_us(
        |i| {
            let q = Query::text(format!("d{i}"), texts[MEMORY + i].clone());
            sink += r.score(&q);
        },
        1000,
    );
    println!("router decision with a cached vector (n-grams + 2 x {MEMORY}-vector memories): {decide:.1} µs (median)");
    if sink.is_nan() {
        println!("(nan)");
    }
}
