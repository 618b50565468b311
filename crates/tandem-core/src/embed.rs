//! Sentence embeddings as routing evidence: the [`Embedder`] a front end supplies (MiniLM in
//! `tandem-models`, a precomputed [`EmbeddingTable`] in `tandem eval`), the online
//! nearest-neighbour estimate over past queries' vectors ([`KnnMemory`]), and the online stacker
//! that mixes it with the linear model's estimate ([`Stacker`]).
//!
//! The core never encodes text itself, so the engine and `tandem eval` do not depend on a model
//! runtime. Vectors are unit-norm `f32`s; similarity is their dot product (cosine).

use crate::error::CoreError;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::Arc;

/// A sentence encoder as the router sees it.
pub trait Embedder: Send + Sync {
    /// The encoder and its settings (e.g. `all-MiniLM-L6-v2/128`): a router that learned on one
    /// encoder's vectors refuses another's.
    fn name(&self) -> &str;
    /// Vector length.
    fn dim(&self) -> usize;
    /// The unit-norm vector of `text`; `None` when it cannot be had (the router then decides on
    /// its n-grams alone, and says so in its counters rather than failing the request).
    fn embed(&self, text: &str) -> Option<Arc<[f32]>>;
}

impl std::fmt::Debug for dyn Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Embedder({}, dim {})", self.name(), self.dim())
    }
}

/// The key vectors are cached under: a 64-bit hash of the text.
pub fn text_key(text: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(text.as_bytes(), 0x656d_6265)
}

/// Vectors computed beforehand, looked up by text hash: what `tandem eval` hands the router so that
/// a recorded file is encoded once, not once per run.
#[derive(Debug, Clone)]
pub struct EmbeddingTable {
    name: String,
    dim: usize,
    map: HashMap<u64, Arc<[f32]>>,
}

impl EmbeddingTable {
    pub fn new(name: impl Into<String>, dim: usize) -> Result<Self, CoreError> {
        if !(1..=4096).contains(&dim) {
            return Err(CoreError::config(
                "embedding dim",
                dim,
                "must be between 1 and 4096",
            ));
        }
        Ok(EmbeddingTable {
            name: name.into(),
            dim,
            map: HashMap::new(),
        })
    }

    /// Adds `text`'s vector, normalised to unit length.
    ///
    /// Errors: a vector of another length, or one that is zero or not finite.
    pub fn insert(&mut self, text: &str, vector: &[f32]) -> Result<(), CoreError> {
        if vector.len() != self.dim {
            return Err(CoreError::config(
                "embedding",
                vector.len(),
                "vector length differs from the table's dim",
            ));
        }
        let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        if !(norm.is_finite() && norm > 0.0) {
            return Err(CoreError::config(
                "embedding",
                norm,
                "vector is zero or not finite",
            ));
        }
        let v: Arc<[f32]> = vector.iter().map(|x| x / norm).collect();
        self.map.insert(text_key(text), v);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Adds another table's vectors.
    ///
    /// Errors: the other table is another encoder's, or of another length.
    pub fn extend(&mut self, other: EmbeddingTable) -> Result<(), CoreError> {
        if other.name != self.name || other.dim != self.dim {
            return Err(CoreError::config(
                "embedding",
                format!("{} ({})", other.name, other.dim),
                "tables of different encoders cannot be merged",
            ));
        }
        self.map.extend(other.map);
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl Embedder for EmbeddingTable {
    fn name(&self) -> &str {
        &self.name
    }
    fn dim(&self) -> usize {
        self.dim
    }
    fn embed(&self, text: &str) -> Option<Arc<[f32]>> {
        self.map.get(&text_key(text)).cloned()
    }
}

/// An online k-nearest-neighbour estimate of an outcome in [0, 1]: the similarity-weighted mean
/// of the outcomes of the `k` most similar past queries, shrunk towards the running mean of all
/// outcomes when the neighbours are few or far. Memory is a ring of the last `capacity` vectors
/// (older ones are forgotten, which also tracks drift).
///
/// Search: an exact scan of 4,096 vectors of 384 floats reads 6 MB and took about 0.25 ms here,
/// bound by memory bandwidth. So each vector also keeps a 256-bit sign code (signed random
/// projections, Charikar 2002, with very sparse projections, Li et al. 2006); a query ranks the
/// memory by Hamming distance to its code (32 bytes a row) and computes exact cosines only on the
/// [`SHORTLIST_PER_K`]`× k` nearest codes. Memories of at most that many vectors are scanned
/// exactly.
///
/// Source: the online kNN router of the prototype; RouteLLM (Ong et al. 2024, §4.2)
/// reports similarity-weighted ranking over labelled neighbours as one of its routers.
#[derive(Debug, Clone)]
pub struct KnnMemory {
    dim: usize,
    capacity: usize,
    k: usize,
    vectors: Vec<f32>,
    /// Each vector's sign code (derived: rebuilt on load).
    codes: Vec<[u64; CODE_WORDS]>,
    outcomes: Vec<f32>,
    next: usize,
    len: usize,
    sum: f64,
    seen: u64,
    projection: Arc<SignProjection>,
}

/// Bits of a vector's sign code, in 64-bit words.
const CODE_WORDS: usize = 4;
/// Exact cosines are computed on this many times `k` rows nearest by code.
pub const SHORTLIST_PER_K: usize = 4;
/// Fixed, so a memory's codes are the same in every process (they are not saved).
const PROJECTION_SEED: u64 = 0x7461_6e64_656d_6b6e;

/// Very sparse random projections (Li, Hastie, Church 2006): each of the code's bits is the sign
/// of a sum of about √dim coordinates with random signs.
#[derive(Debug)]
struct SignProjection {
    /// Per bit, `per_bit` (coordinate, ±1) pairs, bit after bit.
    taps: Vec<(u32, f32)>,
    per_bit: usize,
}

impl SignProjection {
    fn new(dim: usize) -> Self {
        let per_bit = ((dim as f64).sqrt().ceil() as usize).clamp(1, dim);
        let mut state = PROJECTION_SEED ^ dim as u64;
        // splitmix64: a fixed, well-mixed sequence without a generator dependency.
        let mut next = move || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let taps = (0..CODE_WORDS * 64 * per_bit)
            .map(|_| {
                let r = next();
                let sign = if r >> 63 == 1 { -1.0 } else { 1.0 };
                ((r % dim as u64) as u32, sign)
            })
            .collect();
        SignProjection { taps, per_bit }
    }

    /// `v`'s code; `v` has the memory's length (coordinates past its end read as 0).
    fn code(&self, v: &[f32]) -> [u64; CODE_WORDS] {
        let mut code = [0u64; CODE_WORDS];
        let at = |&(i, sign): &(u32, f32)| sign * v.get(i as usize).copied().unwrap_or(0.0);
        for (bit, taps) in self.taps.chunks_exact(self.per_bit).enumerate() {
            // Four running sums: one chain of dependent float adds per bit was most of the time.
            let mut acc = [0.0f32; 4];
            let quads = taps.chunks_exact(4);
            let tail: f32 = quads.remainder().iter().map(at).sum();
            for q in quads {
                for (a, t) in acc.iter_mut().zip(q) {
                    *a += at(t);
                }
            }
            let s = acc[0] + acc[1] + acc[2] + acc[3] + tail;
            if s > 0.0 {
                code[bit / 64] |= 1 << (bit % 64);
            }
        }
        code
    }
}

/// Neighbours closer than this weigh `e` times more than one this much further (cosine units).
const KNN_TEMPERATURE: f32 = 0.05;
/// Pseudo-count of the running mean in the estimate.
const KNN_SHRINK: f32 = 1.0;

impl KnnMemory {
    pub fn new(dim: usize, capacity: usize, k: usize) -> Result<Self, CoreError> {
        if dim == 0 || capacity == 0 || k == 0 || k > capacity {
            return Err(CoreError::config(
                "knn",
                format!("dim {dim}, capacity {capacity}, k {k}"),
                "dim, capacity and k must be positive, and k at most the capacity",
            ));
        }
        Ok(KnnMemory {
            dim,
            capacity,
            k,
            vectors: Vec::new(),
            codes: Vec::new(),
            outcomes: Vec::new(),
            next: 0,
            len: 0,
            sum: 0.0,
            seen: 0,
            projection: Arc::new(SignProjection::new(dim)),
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Vector length.
    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The running mean of every outcome remembered so far (0.5 before the first).
    pub fn mean(&self) -> f32 {
        if self.seen == 0 {
            0.5
        } else {
            (self.sum / self.seen as f64) as f32
        }
    }

    /// Remembers `v`'s outcome `y` (clamped to [0, 1]); a vector of another length is ignored.
    pub fn add(&mut self, v: &[f32], y: f32) {
        self.push(v, y);
    }

    /// [`Self::add`], returning the row written (`None`: ignored).
    fn push(&mut self, v: &[f32], y: f32) -> Option<usize> {
        if v.len() != self.dim || !y.is_finite() {
            return None;
        }
        let row = self.next;
        let y = y.clamp(0.0, 1.0);
        let code = self.projection.code(v);
        if self.len < self.capacity {
            self.vectors.extend_from_slice(v);
            self.codes.push(code);
            self.outcomes.push(y);
            self.len += 1;
        } else {
            let at = self.next * self.dim;
            self.vectors[at..at + self.dim].copy_from_slice(v);
            self.codes[self.next] = code;
            self.outcomes[self.next] = y;
        }
        self.next = (self.next + 1) % self.capacity;
        self.sum += f64::from(y);
        self.seen += 1;
        Some(row)
    }

    /// The estimate for `v`, and the summed weight of the neighbours behind it (0 when the memory
    /// is empty: the estimate is then the running mean).
    pub fn estimate(&self, v: &[f32]) -> (f32, f32) {
        self.estimate_with(v, false)
    }

    /// [`Self::estimate`] by an exact scan of every vector (what the code shortlist
    /// approximates), for checks and benchmarks.
    pub fn estimate_exact(&self, v: &[f32]) -> (f32, f32) {
        self.estimate_with(v, true)
    }

    /// `exact`: scan every vector.
    fn estimate_with(&self, v: &[f32], exact: bool) -> (f32, f32) {
        let prior = self.mean();
        let best = self.nearest(v, exact);
        let top = best.first().map_or(0.0, |b| b.0);
        let (mut wy, mut w) = (0.0f32, 0.0f32);
        for &(s, row) in &best {
            let weight = neighbour_weight(s, top);
            wy += weight * self.outcomes[row];
            w += weight;
        }
        ((wy + KNN_SHRINK * prior) / (w + KNN_SHRINK), w)
    }

    /// The `k` remembered rows most similar to `v`, as (cosine, row), most similar first; none
    /// when `v` has another length. `exact`: scan every vector rather than the code shortlist.
    fn nearest(&self, v: &[f32], exact: bool) -> Vec<(f32, usize)> {
        if v.len() != self.dim || self.len == 0 {
            return Vec::new();
        }
        // The k best similarities, kept sorted descending in a small array.
        let mut best: Vec<(f32, usize)> = Vec::with_capacity(self.k + 1);
        let mut consider = |row: usize| {
            let s = dot(&self.vectors[row * self.dim..(row + 1) * self.dim], v);
            if best.len() == self.k {
                if let Some(&(worst, _)) = best.last() {
                    if s <= worst {
                        return;
                    }
                }
                best.pop();
            }
            let at = best.partition_point(|&(b, _)| b >= s);
            best.insert(at, (s, row));
        };
        let shortlist = self.k.saturating_mul(SHORTLIST_PER_K);
        if exact || self.len <= shortlist {
            (0..self.len).for_each(&mut consider);
        } else {
            self.shortlist(v, shortlist).into_iter().for_each(consider);
        }
        best
    }

    /// The `n` rows (at least; ties at the cut are kept) whose codes are nearest `v`'s.
    fn shortlist(&self, v: &[f32], n: usize) -> Vec<usize> {
        let c = self.projection.code(v);
        // Counting sort on the distances (0..=256): the cut is the smallest distance with n rows
        // at or below it.
        let mut histogram = [0usize; CODE_WORDS * 64 + 1];
        let distance: Vec<u16> = self
            .codes
            .iter()
            .map(|r| {
                let d = (r[0] ^ c[0]).count_ones()
                    + (r[1] ^ c[1]).count_ones()
                    + (r[2] ^ c[2]).count_ones()
                    + (r[3] ^ c[3]).count_ones();
                histogram[d as usize] += 1;
                d as u16
            })
            .collect();
        let mut cut = histogram.len() - 1;
        let mut below = 0;
        for (d, &count) in histogram.iter().enumerate() {
            below += count;
            if below >= n {
                cut = d;
                break;
            }
        }
        distance
            .iter()
            .enumerate()
            .filter(|&(_, &d)| usize::from(d) <= cut)
            .map(|(row, _)| row)
            .collect()
    }

    fn save(&self, w: &mut impl Write) -> std::io::Result<()> {
        for n in [self.dim, self.capacity, self.k, self.len, self.next] {
            w.write_all(&(n as u64).to_le_bytes())?;
        }
        w.write_all(&self.sum.to_le_bytes())?;
        w.write_all(&self.seen.to_le_bytes())?;
        for x in self.vectors.iter().chain(&self.outcomes) {
            w.write_all(&x.to_le_bytes())?;
        }
        Ok(())
    }

    fn load(r: &mut impl Read) -> Result<Self, CoreError> {
        let bad = |what: &str| CoreError::config("knn memory", what, "damaged checkpoint");
        let mut u = [0u8; 8];
        let mut next_u64 = |r: &mut dyn Read| -> Result<u64, CoreError> {
            r.read_exact(&mut u).map_err(|_| bad("truncated header"))?;
            Ok(u64::from_le_bytes(u))
        };
        let mut n = [0usize; 5];
        for x in &mut n {
            *x = usize::try_from(next_u64(r)?).map_err(|_| bad("size"))?;
        }
        let [dim, capacity, k, len, next] = n;
        let sum = f64::from_bits(next_u64(r)?);
        let seen = next_u64(r)?;
        let mut m = KnnMemory::new(dim, capacity, k).map_err(|_| bad("sizes"))?;
        if len > capacity || next >= capacity || dim > 4096 {
            return Err(bad("sizes"));
        }
        let mut read_f32s = |count: usize, out: &mut Vec<f32>| -> Result<(), CoreError> {
            let mut b = vec![0u8; count * 4];
            r.read_exact(&mut b).map_err(|_| bad("truncated vectors"))?;
            out.extend(
                b.chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
            Ok(())
        };
        read_f32s(len * dim, &mut m.vectors)?;
        read_f32s(len, &mut m.outcomes)?;
        // A NaN would spread through every estimate it is a neighbour in.
        if !(m.vectors.iter().chain(&m.outcomes).all(|x| x.is_finite()) && sum.is_finite()) {
            return Err(bad("a value that is not a finite number"));
        }
        m.codes = m
            .vectors
            .chunks_exact(dim)
            .map(|v| m.projection.code(v))
            .collect();
        m.len = len;
        m.next = next;
        m.sum = sum;
        m.seen = seen;
        Ok(m)
    }
}

/// A neighbour's weight: `e` times less per [`KNN_TEMPERATURE`] below the nearest one's cosine
/// `top`, and none when it points away.
fn neighbour_weight(s: f32, top: f32) -> f32 {
    ((s - top) / KNN_TEMPERATURE).exp() * s.max(0.0)
}

/// A nearest-neighbour classifier over a ring of labelled vectors: the class probabilities are the
/// similarity-weighted votes of the `k` nearest, smoothed towards uniform by one pseudo-vote, so
/// that it is confident only where close neighbours agree. Search as [`KnnMemory`]'s.
///
/// Source: the kNN-LM-style memory of cascades over embeddings (answer where the labelled
/// neighbours agree), e.g. the nearest-neighbour tier of issue 15's stream cascade.
#[derive(Debug, Clone)]
pub struct LabelMemory {
    memory: KnnMemory,
    labels: Vec<u32>,
    classes: usize,
}

/// What a saved label memory starts with.
pub const LABEL_MEMORY_MAGIC: &[u8; 8] = b"TNDLBL01";

impl LabelMemory {
    /// Errors: a size is 0, `k` exceeds the capacity, or fewer than two classes.
    pub fn new(dim: usize, capacity: usize, k: usize, classes: usize) -> Result<Self, CoreError> {
        if classes < 2 {
            return Err(CoreError::config(
                "classes",
                classes,
                "a classifier needs at least two",
            ));
        }
        Ok(LabelMemory {
            memory: KnnMemory::new(dim, capacity, k)?,
            labels: Vec::new(),
            classes,
        })
    }

    /// Labelled vectors remembered.
    pub fn len(&self) -> usize {
        self.memory.len()
    }

    pub fn is_empty(&self) -> bool {
        self.memory.is_empty()
    }

    /// Remembers `v` with `label`; a vector of another length or a label out of range is ignored.
    pub fn add(&mut self, v: &[f32], label: usize) {
        if label >= self.classes {
            return;
        }
        if let Some(row) = self.memory.push(v, 0.0) {
            if row == self.labels.len() {
                self.labels.push(label as u32);
            } else if let Some(l) = self.labels.get_mut(row) {
                *l = label as u32;
            }
        }
    }

    /// Class probabilities for `v` into `out` (length: the classes); returns the neighbours'
    /// summed weight (0: no neighbours, uniform probabilities).
    pub fn probabilities(&self, v: &[f32], out: &mut [f32]) -> f32 {
        let uniform = 1.0 / self.classes as f32;
        out.iter_mut().for_each(|p| *p = KNN_SHRINK * uniform);
        let best = self.memory.nearest(v, false);
        let top = best.first().map_or(0.0, |b| b.0);
        let mut w = 0.0;
        for &(s, row) in &best {
            let weight = neighbour_weight(s, top);
            if let Some(p) = self.labels.get(row).and_then(|&l| out.get_mut(l as usize)) {
                *p += weight;
                w += weight;
            }
        }
        out.iter_mut().for_each(|p| *p /= w + KNN_SHRINK);
        w
    }

    pub fn save(&self, w: &mut impl Write) -> std::io::Result<()> {
        w.write_all(LABEL_MEMORY_MAGIC)?;
        w.write_all(&(self.classes as u64).to_le_bytes())?;
        self.memory.save(w)?;
        for l in &self.labels {
            w.write_all(&l.to_le_bytes())?;
        }
        Ok(())
    }

    /// Errors: not a label memory, damaged, or of another vector length or class count.
    pub fn load(r: &mut impl Read, dim: usize, classes: usize) -> Result<Self, CoreError> {
        let bad = |what: &str| CoreError::config("label memory", what, "damaged checkpoint");
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic).map_err(|_| bad("truncated"))?;
        if &magic != LABEL_MEMORY_MAGIC {
            return Err(bad("wrong magic"));
        }
        r.read_exact(&mut magic).map_err(|_| bad("truncated"))?;
        if u64::from_le_bytes(magic) != classes as u64 {
            return Err(CoreError::config(
                "label memory",
                format!("{} classes, not {classes}", u64::from_le_bytes(magic)),
                "saved for another number of classes",
            ));
        }
        let memory = KnnMemory::load(r)?;
        if memory.dim() != dim {
            return Err(CoreError::config(
                "label memory",
                format!("vectors of {}, not {dim}", memory.dim()),
                "saved for vectors of another length",
            ));
        }
        let mut labels = Vec::with_capacity(memory.len());
        let mut b = [0u8; 4];
        for _ in 0..memory.len() {
            r.read_exact(&mut b).map_err(|_| bad("truncated labels"))?;
            let l = u32::from_le_bytes(b);
            if l as usize >= classes {
                return Err(bad("label out of range"));
            }
            labels.push(l);
        }
        Ok(LabelMemory {
            memory,
            labels,
            classes,
        })
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent sums let the compiler vectorise the loop.
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for ((a, x), y) in acc.iter_mut().zip(x).zip(y) {
            *a += x * y;
        }
    }
    let tail: f32 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Online stacking of two probability estimates of one outcome: p = σ(a + b·logit(p₁) +
/// c·logit(p₂)), fitted by online gradient steps on each outcome *before* the estimates learn it
/// (progressive validation), so the mix weighs each estimate by how well it predicted unseen
/// queries. Starts as p₁ alone (b = 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stacker {
    w: [f32; 3],
    acc: [f32; 3],
}

const STACK_RATE: f32 = 0.05;

impl Default for Stacker {
    fn default() -> Self {
        Stacker {
            w: [0.0, 1.0, 0.0],
            acc: [1.0; 3],
        }
    }
}

fn logit(p: f32) -> f32 {
    let p = p.clamp(1e-3, 1.0 - 1e-3);
    (p / (1.0 - p)).ln()
}

impl Stacker {
    pub fn mix(&self, p1: f32, p2: f32) -> f32 {
        let z = self.w[0] + self.w[1] * logit(p1) + self.w[2] * logit(p2);
        1.0 / (1.0 + (-z).exp())
    }

    /// One AdaGrad step on the log-loss of the mix towards `y` in [0, 1].
    pub fn learn(&mut self, p1: f32, p2: f32, y: f32) {
        let g = self.mix(p1, p2) - y.clamp(0.0, 1.0);
        let x = [1.0, logit(p1), logit(p2)];
        for ((w, acc), xi) in self.w.iter_mut().zip(&mut self.acc).zip(x) {
            let gi = g * xi;
            *acc += gi * gi;
            *w -= STACK_RATE * gi / acc.sqrt();
        }
    }

    /// The weights (intercept, first estimate, second estimate).
    pub fn weights(&self) -> [f32; 3] {
        self.w
    }
}

/// What a router learns beside its linear models when it reads embeddings: one kNN memory and one
/// stacker per model (weak, strong). Saved after the linear models.
#[derive(Debug, Clone)]
pub struct NeighbourEvidence {
    pub memory: [KnnMemory; 2],
    pub stack: [Stacker; 2],
}

/// What a saved neighbour memory starts with.
pub const EVIDENCE_MAGIC: &[u8; 8] = b"TNDKNN01";

impl NeighbourEvidence {
    pub fn new(dim: usize, capacity: usize, k: usize) -> Result<Self, CoreError> {
        Ok(NeighbourEvidence {
            memory: [
                KnnMemory::new(dim, capacity, k)?,
                KnnMemory::new(dim, capacity, k)?,
            ],
            stack: [Stacker::default(); 2],
        })
    }

    pub fn save(&self, w: &mut impl Write) -> std::io::Result<()> {
        w.write_all(EVIDENCE_MAGIC)?;
        for s in &self.stack {
            for x in s.w.iter().chain(&s.acc) {
                w.write_all(&x.to_le_bytes())?;
            }
        }
        for m in &self.memory {
            m.save(w)?;
        }
        Ok(())
    }

    pub fn load(r: &mut impl Read) -> Result<Self, CoreError> {
        let bad = |what: &str| CoreError::config("neighbour evidence", what, "damaged checkpoint");
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)
            .map_err(|_| bad("missing (saved without embeddings?)"))?;
        if &magic != EVIDENCE_MAGIC {
            return Err(bad("wrong magic (saved without embeddings?)"));
        }
        let mut stack = [Stacker::default(); 2];
        for s in &mut stack {
            let mut b = [0u8; 24];
            r.read_exact(&mut b).map_err(|_| bad("truncated stacker"))?;
            let f: Vec<f32> = b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if !f.iter().all(|x| x.is_finite()) {
                return Err(bad("a stacker weight that is not a finite number"));
            }
            s.w.copy_from_slice(&f[..3]);
            s.acc.copy_from_slice(&f[3..]);
        }
        let memory = [KnnMemory::load(r)?, KnnMemory::load(r)?];
        Ok(NeighbourEvidence { memory, stack })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn the_table_normalises_and_refuses_bad_vectors() {
        let mut t = EmbeddingTable::new("test", 3).unwrap();
        t.insert("a", &[3.0, 0.0, 4.0]).unwrap();
        let v = t.embed("a").unwrap();
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[2] - 0.8).abs() < 1e-6);
        assert!(t.embed("b").is_none());
        assert!(t.insert("c", &[1.0, 2.0]).is_err());
        assert!(t.insert("c", &[0.0, 0.0, 0.0]).is_err());
        assert!(t.insert("c", &[f32::NAN, 0.0, 1.0]).is_err());
        assert!(EmbeddingTable::new("x", 0).is_err());
    }

    #[test]
    fn neighbours_decide_the_estimate() {
        let mut m = KnnMemory::new(2, 100, 5).unwrap();
        assert_eq!(m.estimate(&[1.0, 0.0]), (0.5, 0.0));
        // Two clusters: near (1, 0) the outcome is 1, near (0, 1) it is 0.
        for i in 0..40 {
            let e = (i as f32) * 0.005;
            m.add(&unit(&[1.0, e]), 1.0);
            m.add(&unit(&[e, 1.0]), 0.0);
        }
        let (hi, w) = m.estimate(&unit(&[1.0, 0.1]));
        let (lo, _) = m.estimate(&unit(&[0.1, 1.0]));
        assert!(hi > 0.8 && lo < 0.2 && w > 1.0, "hi {hi} lo {lo} w {w}");
        assert!((m.mean() - 0.5).abs() < 1e-6);
    }

    #[test]
    fn the_ring_forgets_the_oldest() {
        let mut m = KnnMemory::new(2, 4, 1).unwrap();
        for _ in 0..4 {
            m.add(&[1.0, 0.0], 0.0);
        }
        for _ in 0..4 {
            m.add(&[1.0, 0.0], 1.0);
        }
        assert_eq!(m.len(), 4);
        // Every remembered neighbour now says 1; only the running mean remembers the zeros.
        let (p, _) = m.estimate(&[1.0, 0.0]);
        assert!(p > 0.6, "{p}");
        assert!(KnnMemory::new(2, 4, 5).is_err());
    }

    /// Memories of noisy copies of `clusters` random directions in `dim` dimensions, each cluster
    /// with its own outcome; and queries near the same directions.
    fn clustered(
        dim: usize,
        clusters: usize,
        rows: usize,
        seed: u64,
    ) -> (KnnMemory, Vec<Vec<f32>>) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut gauss = |rng: &mut rand_chacha::ChaCha8Rng| -> f32 {
            // Sum of uniforms: close enough to normal for directions.
            (0..6).map(|_| rng.gen::<f32>()).sum::<f32>() - 3.0
        };
        let centres: Vec<Vec<f32>> = (0..clusters)
            .map(|_| unit(&(0..dim).map(|_| gauss(&mut rng)).collect::<Vec<_>>()))
            .collect();
        let outcome: Vec<f32> = (0..clusters).map(|c| (c % 2) as f32).collect();
        let mut m = KnnMemory::new(dim, rows, 16).unwrap();
        let near = |rng: &mut rand_chacha::ChaCha8Rng,
                    c: &[f32],
                    gauss: &mut dyn FnMut(&mut rand_chacha::ChaCha8Rng) -> f32| {
            unit(&c.iter().map(|x| x + 0.04 * gauss(rng)).collect::<Vec<_>>())
        };
        for i in 0..rows {
            let c = i % clusters;
            let v = near(&mut rng, &centres[c], &mut gauss);
            // One outcome in five is flipped, so estimates are not all 0 or 1.
            let flip = rng.gen::<f32>() < 0.2;
            m.add(&v, if flip { 1.0 - outcome[c] } else { outcome[c] });
        }
        let queries = (0..200)
            .map(|i| near(&mut rng, &centres[i % clusters], &mut gauss))
            .collect();
        (m, queries)
    }

    #[test]
    fn the_code_shortlist_estimates_what_an_exact_scan_does() {
        for (dim, clusters, seed) in [(384, 64, 1), (384, 300, 2), (64, 40, 3), (100, 500, 4)] {
            let (m, queries) = clustered(dim, clusters, 2000, seed);
            assert!(m.len() > 16 * SHORTLIST_PER_K);
            let mut worst = 0.0f32;
            for q in &queries {
                let fast = m.estimate(q).0;
                let exact = m.estimate_with(q, true).0;
                worst = worst.max((fast - exact).abs());
            }
            assert!(
                worst < 0.05,
                "dim {dim}, {clusters} clusters: worst gap {worst}"
            );
        }
    }

    #[test]
    fn a_loaded_memory_rebuilds_its_codes() {
        let (m, queries) = clustered(48, 30, 600, 7);
        let mut e = NeighbourEvidence::new(48, 600, 16).unwrap();
        e.memory[0] = m;
        let mut buf = Vec::new();
        e.save(&mut buf).unwrap();
        let back = NeighbourEvidence::load(&mut buf.as_slice()).unwrap();
        for q in &queries {
            assert_eq!(back.memory[0].estimate(q), e.memory[0].estimate(q));
        }
    }

    #[test]
    fn a_label_memory_is_sure_only_where_close_neighbours_agree() {
        let mut m = LabelMemory::new(2, 100, 8, 3).unwrap();
        let mut p = [0.0f32; 3];
        assert_eq!(m.probabilities(&[1.0, 0.0], &mut p), 0.0);
        assert!(p.iter().all(|&x| (x - 1.0 / 3.0).abs() < 1e-6), "{p:?}");
        // Class 2 near (1, 0); near (0, 1), classes 0 and 1 mixed half and half.
        for i in 0..20 {
            let e = (i as f32) * 0.005;
            m.add(&unit(&[1.0, e]), 2);
            m.add(&unit(&[e, 1.0]), i % 2);
        }
        m.add(&[1.0, 0.0], 7); // out of range: ignored
        assert_eq!(m.len(), 40);
        m.probabilities(&unit(&[1.0, 0.05]), &mut p);
        assert!(p[2] > 0.85, "{p:?}");
        m.probabilities(&unit(&[0.05, 1.0]), &mut p);
        assert!(p[2] < 0.05 && p[0] < 0.7 && p[1] < 0.7, "{p:?}");
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        // Round trip, and refusals naming what differs.
        let mut buf = Vec::new();
        m.save(&mut buf).unwrap();
        let back = LabelMemory::load(&mut buf.as_slice(), 2, 3).unwrap();
        let mut q = [0.0f32; 3];
        back.probabilities(&unit(&[0.05, 1.0]), &mut q);
        assert_eq!(p, q);
        let e = LabelMemory::load(&mut buf.as_slice(), 2, 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("3 classes, not 4"), "{e}");
        let e = LabelMemory::load(&mut buf.as_slice(), 5, 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vectors of 2, not 5"), "{e}");
        assert!(LabelMemory::load(&mut &buf[..buf.len() - 2], 2, 3).is_err());
        assert!(LabelMemory::new(2, 10, 4, 1).is_err());
    }

    #[test]
    fn the_stacker_learns_to_trust_the_better_estimate() {
        let mut s = Stacker::default();
        // The second estimate is right, the first is noise.
        for i in 0..3000 {
            let y = (i % 2) as f32;
            let good = if y > 0.5 { 0.8 } else { 0.2 };
            let noise = if (i / 2) % 2 == 0 { 0.7 } else { 0.3 };
            s.learn(noise, good, y);
        }
        let w = s.weights();
        assert!(w[2] > w[1].abs(), "{w:?}");
        assert!(s.mix(0.7, 0.8) > 0.6 && s.mix(0.7, 0.2) < 0.4);
    }

    #[test]
    fn evidence_round_trips_and_refuses_damage() {
        let mut e = NeighbourEvidence::new(2, 8, 2).unwrap();
        e.memory[1].add(&[1.0, 0.0], 1.0);
        e.stack[0].learn(0.3, 0.9, 1.0);
        let mut buf = Vec::new();
        e.save(&mut buf).unwrap();
        let back = NeighbourEvidence::load(&mut buf.as_slice()).unwrap();
        assert_eq!(back.stack, e.stack);
        assert_eq!(
            back.memory[1].estimate(&[1.0, 0.0]),
            e.memory[1].estimate(&[1.0, 0.0])
        );
        assert!(NeighbourEvidence::load(&mut &buf[..buf.len() - 1]).is_err());
        assert!(NeighbourEvidence::load(&mut &b"TNDKNN00"[..]).is_err());
        // Non-finite values: a stacker weight and accumulator, the second memory's sum, its
        // vector and its outcome (magic 8, stackers 48, an empty memory 56, then 56 of header).
        let mem1 = 8 + 48 + 56;
        for (at, width) in [
            (8, 4),
            (8 + 20, 4),
            (mem1 + 40, 8),
            (mem1 + 56, 4),
            (mem1 + 64, 4),
        ] {
            for bad in [f64::NAN, f64::INFINITY] {
                let mut b = buf.clone();
                if width == 8 {
                    b[at..at + 8].copy_from_slice(&bad.to_le_bytes());
                } else {
                    b[at..at + 4].copy_from_slice(&(bad as f32).to_le_bytes());
                }
                let e = NeighbourEvidence::load(&mut b.as_slice()).err();
                assert!(
                    e.is_some_and(|e| e.to_string().contains("not a finite number")),
                    "byte {at}: {bad}"
                );
            }
        }
    }
}
