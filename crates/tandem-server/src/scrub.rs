//! Keeps secrets out of what the gateway says: upstream error text (which often repeats the key it
//! was sent, whole or masked) is scrubbed of every key the process was configured with and of
//! anything shaped like a bearer token before it reaches a client or a log line.

use regex::Regex;
use std::sync::{OnceLock, RwLock};

static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Registers a key read from the environment (an upstream's, a gateway client's), so that it is
/// scrubbed wherever it appears. Keys shorter than 8 bytes are registered too: better a mangled
/// message than a leaked key.
pub fn register_secret(key: &str) {
    let key = key.trim();
    if key.is_empty() {
        return;
    }
    let mut s = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    if !s.iter().any(|k| k == key) {
        s.push(key.to_string());
        // Longest first, so a key that contains another is removed whole.
        s.sort_by_key(|k| std::cmp::Reverse(k.len()));
    }
}

fn token_shapes() -> Option<&'static Regex> {
    static RE: OnceLock<Option<Regex>> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(concat!(
            // `Bearer xyz`, `Basic xyz`, `api-key: xyz` (case-insensitive).
            r"\b(?i:bearer|basic)\s+[A-Za-z0-9._~+/=*-]{6,}",
            r"|\b(?i:api[-_]?key|x-api-key|authorization)\b\s*[:=]\s*(?:(?i:bearer|basic)\s+)?[^\s,;]{6,}",
            // Vendor prefixes: OpenAI `sk-…` (and masked `sk-ab***yz`), Anthropic `sk-ant-…`,
            // Google `AIza…`, GitHub, Slack, Hugging Face, AWS access key ids.
            r"|\b(?:sk|pk|rk)-[A-Za-z0-9_*.-]{6,}",
            r"|\bAIza[0-9A-Za-z_-]{20,}",
            r"|\b(?:ghp|gho|ghs|github_pat|xox[abpr]|hf)_[A-Za-z0-9_]{10,}",
            r"|\bAKIA[0-9A-Z]{12,}",
            // Anything long and key-like: 32+ characters of letters and digits mixed.
            r"|\b[A-Za-z0-9_-]*(?:[0-9][A-Za-z_-]|[A-Za-z_-][0-9])[A-Za-z0-9_-]*\b",
        ))
        .ok()
    })
    .as_ref()
}

/// `text` with every registered key and every token-shaped run replaced by `[redacted]`.
pub fn scrub(text: &str) -> String {
    let mut out = text.to_string();
    {
        let s = SECRETS.read().unwrap_or_else(|e| e.into_inner());
        for k in s.iter() {
            if out.contains(k.as_str()) {
                out = out.replace(k.as_str(), "[redacted]");
            }
        }
    }
    let Some(re) = token_shapes() else {
        return out;
    };
    re.replace_all(&out, |c: &regex::Captures| {
        let m = &c[0];
        // The catch-all alternative matches any word with a digit next to a letter; only long
        // ones are key-like ("gpt-4o" and "HTTP2" are not).
        let vendor = m.len() < 32
            && (m.to_ascii_lowercase().starts_with("bearer")
                || m.to_ascii_lowercase().starts_with("basic")
                || m.contains(':')
                || m.contains('=')
                || m.starts_with("sk-")
                || m.starts_with("pk-")
                || m.starts_with("rk-")
                || m.starts_with("AIza")
                || m.starts_with("AKIA")
                || m.contains('_') && m.len() >= 12);
        if m.len() >= 32 || vendor {
            "[redacted]".to_string()
        } else {
            m.to_string()
        }
    })
    .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_token_shapes_are_removed() {
        register_secret("my-very-own-key-123");
        let cases = [
            (
                "Incorrect API key provided: my-very-own-key-123.",
                "my-very-own-key-123",
            ),
            ("got Bearer abc.def-ghi_jkl", "abc.def-ghi_jkl"),
            (
                "Incorrect API key provided: sk-proj-abc***********xyz9",
                "sk-proj-abc",
            ),
            ("key sk-ant-api03-AAAAAAAAAAAAAAAAAAAAAAAA", "sk-ant-api03"),
            ("x-api-key: 0123456789abcdef", "0123456789abcdef"),
            ("Authorization: Bearer tok-en12", "tok-en12"),
            (
                "token a1b2c3d4e5f6a1b2c3d4e5f6a1b2c3d4e5f6 here",
                "a1b2c3d4e5f6a1b2c3d4",
            ),
            ("google AIzaSyA1234567890abcdefghijklmnop", "AIzaSyA"),
        ];
        for (text, secret) in cases {
            let s = scrub(text);
            assert!(!s.contains(secret), "{text} -> {s}");
            assert!(s.contains("[redacted]"), "{s}");
        }
    }

    #[test]
    fn ordinary_error_text_is_left_alone() {
        for text in [
            "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens.",
            "Invalid value for 'temperature': must be between 0 and 2 (gpt-4o, HTTP2).",
            "The model `gpt-4o-mini-2024-07-18` does not exist",
        ] {
            assert_eq!(scrub(text), text);
        }
    }
}
