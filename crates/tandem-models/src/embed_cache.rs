//! Encoder outputs kept on disk: a benchmark embeds a dataset once and reuses the vectors (and the
//! time each took, which is still charged to the tier) in every run. The file name carries what
//! the vectors depend on (encoder file and token limit); a file that does not parse is rebuilt.

use crate::assets::Store;
use crate::classifier::{EmbeddingCache, ModelError};
use crate::minilm::MiniLm;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tandem_core::embed::EmbeddingTable;

const MAGIC: &[u8; 8] = b"TNDMEMB1";
/// While encoding, the cache file is rewritten at least this often.
const SAVE_EVERY: Duration = Duration::from_secs(60);

fn err(path: &Path, message: impl ToString) -> ModelError {
    ModelError::Checkpoint {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

/// Reads a cache file; `None` when it is absent or unreadable (it is then rebuilt, never trusted).
pub fn read(path: &Path) -> Option<EmbeddingCache> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .read_to_end(&mut bytes)
        .ok()?;
    let mut r = bytes.as_slice();
    let mut take = |n: usize| -> Option<&[u8]> {
        if r.len() < n {
            return None;
        }
        let (a, b) = r.split_at(n);
        r = b;
        Some(a)
    };
    if take(8)? != MAGIC {
        return None;
    }
    let u32_at = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let dim = u32_at(take(4)?) as usize;
    let count = u32_at(take(4)?) as usize;
    let mut out = EmbeddingCache::with_capacity(count);
    for _ in 0..count {
        let len = u32_at(take(4)?) as usize;
        let text = String::from_utf8(take(len)?.to_vec()).ok()?;
        let mut ns = [0u8; 8];
        ns.copy_from_slice(take(8)?);
        let v: Vec<f32> = take(4 * dim)?
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.insert(text, (v, Duration::from_nanos(u64::from_le_bytes(ns))));
    }
    take(1).is_none().then_some(out)
}

/// Writes atomically (temporary file, then rename).
pub fn write(path: &Path, cache: &EmbeddingCache) -> Result<(), ModelError> {
    let dim = cache.values().next().map_or(0, |(v, _)| v.len());
    let mut buf = Vec::with_capacity(16 + cache.len() * (4 * dim + 80));
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&(dim as u32).to_le_bytes());
    buf.extend_from_slice(&(cache.len() as u32).to_le_bytes());
    let mut keys: Vec<&String> = cache.keys().collect();
    keys.sort();
    for k in keys {
        let (v, d) = &cache[k];
        if v.len() != dim {
            return Err(err(path, "embeddings of different sizes"));
        }
        buf.extend_from_slice(&(k.len() as u32).to_le_bytes());
        buf.extend_from_slice(k.as_bytes());
        buf.extend_from_slice(&(d.as_nanos() as u64).to_le_bytes());
        for x in v {
            buf.extend_from_slice(&x.to_le_bytes());
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| err(&tmp, e))?;
    f.write_all(&buf).map_err(|e| err(&tmp, e))?;
    f.sync_all().map_err(|e| err(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| err(path, e))
}

/// The cached embeddings of `texts`: read from `path`, the missing ones computed (in
/// length-sorted batches) and the file rewritten. `progress(done, todo)` follows the computing.
pub fn load_or_build(
    path: &Path,
    encoder: &mut dyn FnMut() -> Result<MiniLm, ModelError>,
    texts: &[&str],
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EmbeddingCache, ModelError> {
    let mut cache = read(path).unwrap_or_default();
    let mut todo: Vec<&str> = texts
        .iter()
        .copied()
        .filter(|t| !cache.contains_key(*t))
        .collect();
    if todo.is_empty() {
        return Ok(cache);
    }
    todo.sort_by_key(|t| t.len());
    todo.dedup();
    let mut enc = encoder()?;
    let mut done = 0;
    let mut saved = Instant::now();
    for chunk in todo.chunks(batch.max(1)) {
        let t0 = Instant::now();
        let embs = enc.embed(chunk)?;
        let each = t0.elapsed() / chunk.len().max(1) as u32;
        for (t, e) in chunk.iter().zip(embs) {
            cache.insert((*t).to_string(), (e, each));
        }
        done += chunk.len();
        progress(done, todo.len());
        // An interrupted run keeps what it computed.
        if saved.elapsed() >= SAVE_EVERY {
            write(path, &cache)?;
            saved = Instant::now();
        }
    }
    write(path, &cache)?;
    Ok(cache)
}

/// Where MiniLM's vectors of the texts of `name` (a dataset) are cached: the file name carries the
/// encoder's weights (their sha256's start) and the token limit, so another encoder never reads
/// them. Also returns the encoder's directory.
///
/// Errors: the `minilm` asset is not installed.
pub fn minilm_cache(
    store: &Store,
    name: &str,
    max_tokens: usize,
) -> Result<(PathBuf, PathBuf), ModelError> {
    let file = store.path("minilm", "model.safetensors")?;
    let sha = crate::assets::find("minilm")?
        .files
        .iter()
        .find(|f| f.out.ends_with("model.safetensors"))
        .map_or("unknown", |f| f.sha256);
    // The ONNX Runtime encoder's vectors differ slightly from candle's: named apart.
    let backend = match crate::minilm::backend_choice()? {
        "candle" => String::new(),
        other => format!("-{other}"),
    };
    let path = store.home().join("embeddings").join(format!(
        "{name}-minilm-{}-{max_tokens}{backend}.bin",
        &sha[..12.min(sha.len())]
    ));
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok((path, dir))
}

/// The name routers know MiniLM's vectors by (a prior trained on them refuses others): the
/// token limit, and the backend when it is not candle's f32.
pub fn minilm_name(max_tokens: usize) -> String {
    match crate::minilm::backend_choice() {
        Ok("candle") | Err(_) => format!("all-MiniLM-L6-v2/{max_tokens}"),
        Ok(other) => format!("all-MiniLM-L6-v2/{max_tokens}/{other}"),
    }
}

/// The tokens [`minilm_table`] encodes of each text.
pub const TABLE_MAX_TOKENS: usize = 128;

/// The name of [`minilm_table`]'s vectors, known before any is computed (so a front end can
/// check a prior against it first).
pub fn minilm_table_name() -> String {
    minilm_name(TABLE_MAX_TOKENS)
}

/// MiniLM's vectors of `texts` as a lookup table for the router (`tandem eval --embed`), computed
/// once and cached under `name` ([`minilm_cache`]). `progress(done, todo)` follows the encoding.
pub fn minilm_table(
    store: &Store,
    name: &str,
    texts: &[&str],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EmbeddingTable, ModelError> {
    const MAX_TOKENS: usize = TABLE_MAX_TOKENS;
    let (path, dir) = minilm_cache(store, name, MAX_TOKENS)?;
    let mut load = || MiniLm::load(&dir, MAX_TOKENS).map_err(ModelError::from);
    let cache = load_or_build(&path, &mut load, texts, 32, progress)?;
    let dim = cache.values().next().map_or(384, |(v, _)| v.len());
    let mut table =
        EmbeddingTable::new(minilm_name(MAX_TOKENS), dim).map_err(|e| err(&path, e.to_string()))?;
    for t in texts {
        if let Some((v, _)) = cache.get(*t) {
            table
                .insert(t, v)
                .map_err(|e| err(&path, format!("{t:?}: {e}")))?;
        }
    }
    Ok(table)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_a_torn_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("e.bin");
        let mut c = EmbeddingCache::new();
        c.insert(
            "good film".into(),
            (vec![0.5, -1.0], Duration::from_micros(7)),
        );
        c.insert("été".into(), (vec![1.5, 2.0], Duration::from_micros(9)));
        write(&p, &c).unwrap();
        assert_eq!(read(&p).unwrap(), c);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        assert!(read(&p).is_none());
        std::fs::write(&p, b"not a cache").unwrap();
        assert!(read(&p).is_none());
    }
}
