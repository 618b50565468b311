//! What the tests share.

use std::path::{Path, PathBuf};

/// A recorded RouteLLM file in `../shared` beside the checkout, or None (said on stderr) when it
/// is absent: the tests that need it skip.
pub fn shared(name: &str) -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/routellm")
        .join(name);
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "skipping: {} is absent (the recorded RouteLLM answers live in ../shared beside the checkout)",
            p.display()
        );
        None
    }
}
