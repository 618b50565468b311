//! MiniLM as a router's [`Embedder`]: one in-process encoder behind a lock, and the vectors of
//! recent texts cached by text hash (least recently used out first), so a prompt the gateway has
//! seen, or that a router scores and then learns, is encoded once.

use crate::assets::Store;
use crate::classifier::ModelError;
use crate::embed_cache::{minilm_cache, minilm_name};
use crate::minilm::MiniLm;
use lru::LruCache;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tandem_core::embed::{text_key, Embedder};

/// Tokens a text is cut to before encoding (MiniLM was trained on 128).
pub const MAX_TOKENS: usize = 128;

pub struct MiniLmEmbedder {
    name: String,
    dim: usize,
    encoder: Mutex<MiniLm>,
    cache: Mutex<LruCache<u64, Arc<[f32]>>>,
    /// Texts encoded (cache misses), and encodings that failed.
    pub encoded: AtomicU64,
    pub failed: AtomicU64,
}

impl MiniLmEmbedder {
    /// Loads the `minilm` asset from `store`; keeps the vectors of the last `capacity` texts.
    ///
    /// Errors: the asset is not installed, or its files do not load.
    pub fn load(store: &Store, capacity: usize) -> Result<Self, ModelError> {
        let (_, dir) = minilm_cache(store, "router", MAX_TOKENS)?;
        let encoder = MiniLm::load(&dir, MAX_TOKENS)?;
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        Ok(MiniLmEmbedder {
            name: minilm_name(MAX_TOKENS),
            dim: encoder.dim,
            encoder: Mutex::new(encoder),
            cache: Mutex::new(LruCache::new(capacity)),
            encoded: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        })
    }

    /// Whether `text`'s vector is cached (a call to [`Embedder::embed`] would not encode).
    pub fn is_cached(&self, text: &str) -> bool {
        self.cache
            .lock()
            .map(|c| c.contains(&text_key(text)))
            .unwrap_or(false)
    }
}

impl Embedder for MiniLmEmbedder {
    fn name(&self) -> &str {
        &self.name
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn embed(&self, text: &str) -> Option<Arc<[f32]>> {
        let key = text_key(text);
        if let Some(v) = self.cache.lock().ok()?.get(&key) {
            return Some(v.clone());
        }
        let v = self
            .encoder
            .lock()
            .ok()
            .and_then(|mut e| e.embed(&[text]).ok())
            .and_then(|mut v| v.pop());
        let Some(v) = v else {
            self.failed.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        self.encoded.fetch_add(1, Ordering::Relaxed);
        let v: Arc<[f32]> = v.into();
        self.cache.lock().ok()?.put(key, v.clone());
        Some(v)
    }
}
