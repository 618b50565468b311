//! Recorded answers of an LLM tier, keyed by the model file's sha256 and the exact prompt, so a
//! recording made with another model or another instruction is never reused: it simply misses.
//! Hits are replayed (with the compute time measured when they were recorded); misses run the
//! model, loaded on the first miss, and are appended.

use crate::error::{io, RunError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tandem_models::classifier::{Classifier, LlmClassifier, ModelError, Prediction};
use tandem_models::gguf::GgufLm;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordedAnswer {
    pub key: String,
    pub model_sha256: String,
    pub label: usize,
    pub probs: Vec<f32>,
    pub logits: Vec<f32>,
    pub compute_us: u64,
}

pub struct RecordingLlm {
    model_path: PathBuf,
    model_sha256: String,
    instruction: String,
    verbalizers: Vec<String>,
    inner: Option<LlmClassifier>,
    entries: HashMap<String, Prediction>,
    /// Appended one whole line per write, so concurrent runs sharing a recording never interleave
    /// inside a line.
    out: Option<(PathBuf, std::fs::File)>,
    pub hits: u64,
    pub misses: u64,
    /// Entries of the recording made with another model file.
    pub stale: u64,
    /// The recording ended in a torn line (an interrupted write), which was dropped.
    pub torn: bool,
}

impl RecordingLlm {
    pub fn new(
        model_path: PathBuf,
        model_sha256: String,
        instruction: String,
        verbalizers: Vec<String>,
        recording: Option<&Path>,
    ) -> Result<Self, RunError> {
        let mut r = RecordingLlm {
            model_path,
            model_sha256,
            instruction,
            verbalizers,
            inner: None,
            entries: HashMap::new(),
            out: None,
            hits: 0,
            misses: 0,
            stale: 0,
            torn: false,
        };
        if let Some(path) = recording {
            if path.exists() {
                r.read(path)?;
            }
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(io(dir))?;
            }
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(io(path))?;
            r.out = Some((path.to_path_buf(), f));
        }
        Ok(r)
    }

    fn read(&mut self, path: &Path) -> Result<(), RunError> {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        // A run killed mid-write leaves a last line without its newline: drop that torn tail (it is
        // recomputed), but nothing else.
        let complete = match text.rfind('\n') {
            Some(end) if end + 1 < text.len() => {
                self.torn = true;
                end + 1
            }
            Some(_) => text.len(),
            None => {
                self.torn = !text.is_empty();
                0
            }
        };
        if self.torn {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io(path))?;
            f.set_len(complete as u64).map_err(io(path))?;
        }
        for (i, line) in text[..complete].lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let a: RecordedAnswer = serde_json::from_str(line).map_err(|e| RunError::Input {
                source_name: path.display().to_string(),
                line: i + 1,
                message: format!("not a recorded answer: {e}"),
            })?;
            if a.model_sha256 != self.model_sha256 {
                self.stale += 1;
                continue;
            }
            self.entries.insert(
                a.key,
                Prediction {
                    probs: a.probs,
                    logits: a.logits,
                    compute: Duration::from_micros(a.compute_us),
                },
            );
        }
        Ok(())
    }

    pub fn key(&self, text: &str) -> String {
        self.key_with_hint(text, "")
    }

    /// The key of the prompt with `hint` appended (S4L): a hinted answer is its own recording.
    pub fn key_with_hint(&self, text: &str, hint: &str) -> String {
        let mut h = Sha256::new();
        h.update(self.model_sha256.as_bytes());
        h.update(b"\n");
        h.update(self.instruction.replace("{text}", text).as_bytes());
        h.update(hint.as_bytes());
        h.update(b"\n");
        h.update(self.verbalizers.join("\u{1f}").as_bytes());
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    fn model(&mut self) -> Result<&mut LlmClassifier, ModelError> {
        if self.inner.is_none() {
            let lm = GgufLm::load(&self.model_path)?;
            self.inner = Some(LlmClassifier::new(
                lm,
                self.instruction.clone(),
                self.verbalizers.clone(),
            ));
        }
        match self.inner.as_mut() {
            Some(m) => Ok(m),
            None => Err(ModelError::Checkpoint {
                path: self.model_path.display().to_string(),
                message: "model not loaded".into(),
            }),
        }
    }

    pub fn flush(&mut self) -> Result<(), RunError> {
        if let Some((path, w)) = &mut self.out {
            w.flush().map_err(io(path))?;
        }
        Ok(())
    }
}

impl RecordingLlm {
    /// Classifies with `hint` appended to the prompt (empty: the plain prompt), replaying a
    /// recorded answer when there is one.
    pub fn predict_with_hint(&mut self, text: &str, hint: &str) -> Result<Prediction, ModelError> {
        let key = self.key_with_hint(text, hint);
        if let Some(p) = self.entries.get(&key) {
            self.hits += 1;
            return Ok(p.clone());
        }
        self.misses += 1;
        let p = self.model()?.predict_with_hint(text, hint)?;
        if let Some((path, w)) = &mut self.out {
            let a = RecordedAnswer {
                key: key.clone(),
                model_sha256: self.model_sha256.clone(),
                label: p.label(),
                probs: p.probs.clone(),
                logits: p.logits.clone(),
                compute_us: p.compute.as_micros() as u64,
            };
            let mut line = serde_json::to_string(&a).unwrap_or_default();
            line.push('\n');
            w.write_all(line.as_bytes())
                .map_err(|e| ModelError::Checkpoint {
                    path: path.display().to_string(),
                    message: e.to_string(),
                })?;
        }
        self.entries.insert(key, p.clone());
        Ok(p)
    }
}

impl Classifier for RecordingLlm {
    fn predict(&mut self, text: &str) -> Result<Prediction, ModelError> {
        self.predict_with_hint(text, "")
    }

    fn learn(&mut self, _: &str, _: usize, _: f32) -> Result<(), ModelError> {
        Ok(())
    }

    fn learns(&self) -> bool {
        false
    }

    fn updates(&self) -> u64 {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, sha: &str) -> String {
        serde_json::to_string(&RecordedAnswer {
            key: key.into(),
            model_sha256: sha.into(),
            label: 1,
            probs: vec![0.2, 0.8],
            logits: vec![-2.0, -0.5],
            compute_us: 7,
        })
        .unwrap()
    }

    fn open(path: &Path) -> RecordingLlm {
        RecordingLlm::new(
            PathBuf::from("/nonexistent.gguf"),
            "abc".into(),
            "Say {text}".into(),
            vec!["n".into(), "p".into()],
            Some(path),
        )
        .unwrap()
    }

    #[test]
    fn replays_hits_skips_stale_entries_and_drops_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rec.jsonl");
        let probe = open(&dir.path().join("probe.jsonl"));
        let key = probe.key("hello");
        std::fs::write(
            &path,
            format!(
                "{}\n{}\n{{\"key\":\"tor",
                entry(&key, "abc"),
                entry(&key, "other-model")
            ),
        )
        .unwrap();
        let mut r = open(&path);
        assert!(r.torn);
        assert_eq!(r.stale, 1);
        let p = r.predict("hello").unwrap();
        assert_eq!(
            (p.probs.clone(), p.compute),
            (vec![0.2, 0.8], Duration::from_micros(7))
        );
        assert_eq!((r.hits, r.misses), (1, 0));
        // A miss needs the model, which is not there: a clear error, not a silent answer.
        assert!(r.predict("something else").is_err());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.ends_with('\n') && !text.contains("tor\""),
            "torn tail removed"
        );
        // The key covers the model, the prompt and the labels.
        assert_ne!(probe.key("hello"), probe.key("hello!"));
    }

    #[test]
    fn a_corrupt_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rec.jsonl");
        std::fs::write(&path, "{\"key\": 1}\n").unwrap();
        let e = RecordingLlm::new(
            PathBuf::from("/x.gguf"),
            "abc".into(),
            "{text}".into(),
            vec![],
            Some(&path),
        )
        .err()
        .unwrap();
        assert!(
            e.to_string().contains("rec.jsonl:1: not a recorded answer"),
            "{e}"
        );
    }
}
