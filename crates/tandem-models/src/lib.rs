//! Local model backends: the hashed n-gram learner, the MiniLM encoder with an online head, and
//! GGUF LLMs run in-process with candle; plus the pinned assets they load.

pub mod assets;
pub mod classifier;
pub mod embed_cache;
pub mod embedder;
pub mod gguf;
pub mod minilm;
