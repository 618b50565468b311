//! A router trained beforehand (warm start): the route-before router and the cascade scorer fit
//! on recorded outcomes (`tandem train`), saved to one file that `tandem eval --prior`,
//! `tandem serve` (`prior = "…"` on a route) and others start from, then keep learning online.
//!
//! File layout (little-endian): the magic `TNDMPRI1`; a u64 length and that many bytes of JSON
//! header ([`PriorInfo`]: format version, each model's configuration, what it was trained on);
//! then the router's weights if it has one, then the cascade scorer's; then the SHA-256 of every
//! byte before it (since version 2). Nothing may follow. A file of another format version is
//! refused with a message naming both versions; one whose checksum does not match, or whose
//! weights are not finite, as damaged.

use crate::error::CoreError;
use crate::policy::cascade::{CascadeConfig, ResponseCascade};
use crate::policy::router::{GainRouter, RouterConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::Path;

const MAGIC: &[u8; 8] = b"TNDMPRI1";
/// The header's format version this build writes and reads (2: a SHA-256 trailer).
pub const PRIOR_VERSION: u32 = 2;
/// Bytes of the trailing checksum.
const CHECKSUM_LEN: usize = 32;
/// A header larger than this is not a prior's (a corrupt or foreign file).
const MAX_HEADER: u64 = 1 << 20;

/// One recorded file a prior was trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainedOn {
    /// The file's name as given to `tandem train`.
    pub file: String,
    pub items: u64,
    /// The models whose outcomes it learned: the weak (cheap) and the strong one.
    pub weak: String,
    pub strong: String,
    /// Whether the weak model's responses were recorded (the cascade scorer learns from them).
    pub responses: bool,
}

/// What a prior holds and where it comes from: the file's JSON header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriorInfo {
    pub version: u32,
    /// The route-before router's configuration, when the prior has one.
    pub router: Option<RouterConfig>,
    /// The cascade scorer's configuration, when the prior has one.
    pub cascade: Option<CascadeConfig>,
    pub trained_on: Vec<TrainedOn>,
    /// The sentence encoder whose vectors the router and the cascade scorer read (e.g.
    /// `all-MiniLM-L6-v2/128`); a front end attaches the same one, or refuses the prior.
    #[serde(default)]
    pub embedder: Option<String>,
    /// Passes over the shuffled records, and the shuffle's seed.
    pub epochs: u32,
    pub seed: u64,
}

/// A trained router and cascade scorer, either of which may be absent (a cascade scorer needs
/// recorded weak responses to learn from).
#[derive(Clone)]
pub struct Prior {
    pub info: PriorInfo,
    pub router: Option<GainRouter>,
    pub cascade: Option<ResponseCascade>,
}

/// The weights are megabytes: a prior shows as what it holds.
impl std::fmt::Debug for Prior {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prior")
            .field("info", &self.info)
            .field("router", &self.router.is_some())
            .field("cascade", &self.cascade.is_some())
            .finish()
    }
}

impl Prior {
    /// Writes the prior to `path` (through a temporary file, so a reader never sees half of it).
    pub fn save(&self, path: &Path) -> Result<(), CoreError> {
        let err = |reason: String| CoreError::Prior {
            path: path.display().to_string(),
            reason,
        };
        let mut info = self.info.clone();
        info.version = PRIOR_VERSION;
        info.router = self.router.as_ref().map(GainRouter::config);
        info.cascade = self.cascade.as_ref().map(ResponseCascade::config);
        let header = serde_json::to_vec(&info).map_err(|e| err(e.to_string()))?;
        let mut buf = Vec::new();
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&(header.len() as u64).to_le_bytes());
        buf.extend_from_slice(&header);
        if let Some(r) = &self.router {
            r.save(&mut buf).map_err(|e| err(e.to_string()))?;
        }
        if let Some(c) = &self.cascade {
            c.save(&mut buf).map_err(|e| err(e.to_string()))?;
        }
        seal(&mut buf);
        let tmp = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| err(format!("cannot write: {e}")))
    }

    /// Reads a prior written by [`Prior::save`].
    ///
    /// Errors: the file cannot be read; it is not a prior (magic); it is another format version;
    /// its checksum does not match (a changed, cut or padded file); its header or weights do not
    /// load, or a weight is not finite.
    pub fn load(path: &Path) -> Result<Prior, CoreError> {
        let err = |reason: String| CoreError::Prior {
            path: path.display().to_string(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let mut r = bytes.as_slice();
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)
            .map_err(|_| err("too short to be a prior".into()))?;
        if &magic != MAGIC {
            return Err(err(
                "not a prior file (write one with `tandem train`)".into()
            ));
        }
        let mut len = [0u8; 8];
        r.read_exact(&mut len)
            .map_err(|_| err("its header is cut short".into()))?;
        let len = u64::from_le_bytes(len);
        if len > MAX_HEADER || len > r.len() as u64 {
            return Err(err(format!(
                "its header claims {len} bytes, more than the file holds"
            )));
        }
        let (head, _) = r.split_at(len as usize);
        // The version first, so a newer (or older) file is refused by version, not as damaged
        // by a checksum it does not have or an unknown field.
        let version = serde_json::from_slice::<serde_json::Value>(head)
            .ok()
            .and_then(|v| v.get("version").and_then(serde_json::Value::as_u64));
        match version {
            Some(v) if v < u64::from(PRIOR_VERSION) => {
                return Err(err(format!(
                    "format version {v}, written before priors carried a checksum; this build reads version {PRIOR_VERSION}: train it again with `tandem train`"
                )))
            }
            Some(v) if v != u64::from(PRIOR_VERSION) => {
                return Err(err(format!(
                    "format version {v}; this build reads version {PRIOR_VERSION}"
                )))
            }
            _ => {}
        }
        let body = unseal(&bytes).ok_or_else(|| {
            err("its checksum does not match its contents: the file is damaged (changed, cut short or padded); train it again or restore a copy".into())
        })?;
        if version.is_none() {
            return Err(err("its header is not valid".into()));
        }
        let info: PriorInfo = serde_json::from_slice(head)
            .map_err(|e| err(format!("its header is not valid: {e}")))?;
        let mut rest = body
            .get(MAGIC.len() + 8 + head.len()..)
            .ok_or_else(|| err("its header runs into its checksum".into()))?;
        let router = match info.router {
            Some(cfg) => Some(
                GainRouter::load(cfg, &mut rest)
                    .map_err(|e| err(format!("its router does not load: {e}")))?,
            ),
            None => None,
        };
        let cascade = match info.cascade {
            Some(cfg) => Some(
                ResponseCascade::load(cfg, &mut rest)
                    .map_err(|e| err(format!("its cascade scorer does not load: {e}")))?,
            ),
            None => None,
        };
        if !rest.is_empty() {
            return Err(err(format!(
                "{} bytes follow its weights (a damaged or foreign file)",
                rest.len()
            )));
        }
        Ok(Prior {
            info,
            router,
            cascade,
        })
    }
}

/// Appends the SHA-256 of `buf` to it.
fn seal(buf: &mut Vec<u8>) {
    let sum = Sha256::digest(buf.as_slice());
    buf.extend_from_slice(&sum);
}

/// `bytes` less its trailing SHA-256, if that matches the rest.
fn unseal(bytes: &[u8]) -> Option<&[u8]> {
    let cut = bytes.len().checked_sub(CHECKSUM_LEN)?;
    let (body, sum) = bytes.split_at(cut);
    (Sha256::digest(body).as_slice() == sum).then_some(body)
}

/// The settings on which a prior's router (`have`) differs from the one a front end would start
/// from it (`want`), each in `tandem train`'s terms with the change to its command that matches;
/// empty when they agree.
pub fn router_differences(have: &RouterConfig, want: &RouterConfig) -> Vec<String> {
    let mut out = Vec::new();
    bits_difference(have.bits, want.bits, &mut out);
    match (have.use_metadata, want.use_metadata) {
        (false, true) => out.push(
            "it was trained with `--no-metadata` and this one reads metadata: train it without `--no-metadata`".into(),
        ),
        (true, false) => out.push(
            "it reads metadata and this one does not: train it with `--no-metadata`".into(),
        ),
        _ => {}
    }
    vectors_difference(
        (
            have.embedding_dim,
            have.embedding,
            have.knn,
            have.knn_memory,
        ),
        (
            want.embedding_dim,
            want.embedding,
            want.knn,
            want.knn_memory,
        ),
        &mut out,
    );
    if have.text != want.text || have.learning_rate != want.learning_rate {
        out.push(format!(
            "its text features or learning rate ({}, rate {}) are not this build's ({}, rate {}): train it again with this build's `tandem train`",
            text_terms(&have.text),
            have.learning_rate,
            text_terms(&want.text),
            want.learning_rate
        ));
    }
    out
}

/// As [`router_differences`], for a cascade scorer.
pub fn cascade_differences(have: &CascadeConfig, want: &CascadeConfig) -> Vec<String> {
    let mut out = Vec::new();
    bits_difference(have.bits, want.bits, &mut out);
    vectors_difference(
        (
            have.embedding_dim,
            have.embedding,
            have.knn,
            have.knn_memory,
        ),
        (
            want.embedding_dim,
            want.embedding,
            want.knn,
            want.knn_memory,
        ),
        &mut out,
    );
    if have.prompt_text != want.prompt_text
        || have.response_text != want.response_text
        || have.learning_rate != want.learning_rate
    {
        out.push(format!(
            "its text features or learning rate (prompt {}, answer {}, rate {}) are not this build's (prompt {}, answer {}, rate {}): train it again with this build's `tandem train`",
            text_terms(&have.prompt_text),
            text_terms(&have.response_text),
            have.learning_rate,
            text_terms(&want.prompt_text),
            text_terms(&want.response_text),
            want.learning_rate
        ));
    }
    out
}

fn bits_difference(have: u32, want: u32, out: &mut Vec<String>) {
    if have != want {
        out.push(format!(
            "it was trained with `--bits {have}` and this one has {want}: train it with `--bits {want}`"
        ));
    }
}

/// Sentence-vector settings: (length, weight, neighbours, memory).
fn vectors_difference(
    have: (u32, f32, u32, u32),
    want: (u32, f32, u32, u32),
    out: &mut Vec<String>,
) {
    match (have.0 > 0, want.0 > 0) {
        (true, false) => out.push(
            "it reads sentence vectors (`--embed`) and this one does not: train it without `--embed`".into(),
        ),
        (false, true) => out.push(
            "it reads no sentence vectors and this one does: train it with `--embed`".into(),
        ),
        (true, true) if have != want => out.push(format!(
            "its sentence-vector settings (length {}, {} neighbours) are not this one's (length {}, {} neighbours): train it again with this build's `tandem train --embed`",
            have.0, have.2, want.0, want.2
        )),
        _ => {}
    }
}

fn text_terms(t: &crate::features::TextFeatures) -> String {
    let chars = if t.char_max > 0 {
        format!(", character {}-{}-grams", t.char_min, t.char_max)
    } else {
        String::new()
    };
    format!("word n-grams up to {}{chars}", t.word_ngrams)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{CascadeScorer, Observation, RouteScorer};
    use crate::query::Query;

    fn trained() -> Prior {
        let mut router = GainRouter::new(RouterConfig {
            bits: 12,
            ..RouterConfig::default()
        })
        .unwrap();
        for i in 0..40 {
            let q = Query::text(format!("q{i}"), format!("prove lemma {i}"));
            router.learn(
                &q,
                &Observation {
                    weak: Some(0.0),
                    strong: Some(1.0),
                },
            );
        }
        Prior {
            info: PriorInfo {
                version: PRIOR_VERSION,
                router: None,
                cascade: None,
                trained_on: vec![TrainedOn {
                    file: "x.jsonl".into(),
                    items: 40,
                    weak: "w".into(),
                    strong: "s".into(),
                    responses: false,
                }],
                embedder: None,
                epochs: 1,
                seed: 0,
            },
            router: Some(router),
            cascade: None,
        }
    }

    /// A saved prior loads with the same scores; damaged, foreign, newer or padded files are
    /// refused with the reason named.
    #[test]
    fn round_trip_and_bad_files_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.prior");
        let p = trained();
        p.save(&path).unwrap();
        let mut back = Prior::load(&path).unwrap();
        assert_eq!(back.info.trained_on, p.info.trained_on);
        assert!(back.info.router.is_some() && back.cascade.is_none());
        let q = Query::text("t", "prove lemma 7");
        let mut a = p.router.clone().unwrap();
        let b = back.router.as_mut().unwrap();
        assert_eq!(a.score(&q), b.score(&q));
        let good = std::fs::read(&path).unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"hello world, not a prior".to_vec(), "not a prior file"),
            (good[..5].to_vec(), "too short"),
            (good[..good.len() - 3].to_vec(), "checksum does not match"),
            (
                [good.clone(), vec![0, 1]].concat(),
                "checksum does not match",
            ),
            (
                {
                    // Same length: only the version's digit changes.
                    let at = good.windows(10).position(|w| w == b"\"version\":").unwrap();
                    let mut b = good.clone();
                    b[at + 10] = b'7';
                    b
                },
                "format version 7",
            ),
        ];
        for (bytes, needle) in cases {
            std::fs::write(&path, &bytes).unwrap();
            let e = Prior::load(&path).err().unwrap().to_string();
            assert!(e.contains(needle) && e.contains("p.prior"), "{needle}: {e}");
        }
        std::fs::write(&path, &good).unwrap();
        assert!(Prior::load(&dir.path().join("missing"))
            .err()
            .unwrap()
            .to_string()
            .contains("cannot read"));
        // The cascade scorer saves and loads too.
        let mut c = ResponseCascade::new(CascadeConfig {
            bits: 12,
            ..CascadeConfig::default()
        })
        .unwrap();
        let q = Query::text("c", "2+2?");
        let weak = crate::Answer {
            tier: "w".into(),
            output: crate::Output::Text {
                text: "5".into(),
                token_logprobs: None,
            },
            usage: crate::Usage::default(),
            cost: 0,
            compute: std::time::Duration::ZERO,
        };
        c.learn(
            &q,
            &weak,
            &Observation {
                weak: Some(0.0),
                strong: Some(1.0),
            },
        );
        let p = Prior {
            cascade: Some(c.clone()),
            ..trained()
        };
        p.save(&path).unwrap();
        let mut back = Prior::load(&path).unwrap();
        assert_eq!(
            back.cascade.as_mut().unwrap().score(&q, &weak),
            c.score(&q, &weak)
        );
    }

    /// Bytes of `good` (a sealed prior) from its body's start: past the magic, length and header.
    fn body_start(good: &[u8]) -> usize {
        let len = u64::from_le_bytes(good[8..16].try_into().unwrap()) as usize;
        16 + len
    }

    /// Any changed byte, header or weights, is refused as damage, naming the file.
    #[test]
    fn a_changed_byte_anywhere_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.prior");
        trained().save(&path).unwrap();
        let good = std::fs::read(&path).unwrap();
        let body = body_start(&good);
        // In the header's digits, the first weight, deep in the weights, the checksum itself.
        let items = good.windows(8).position(|w| w == b"\"items\":").unwrap() + 8;
        for at in [
            items,
            body + 40,
            body + (good.len() - body) / 2,
            good.len() - 40,
            good.len() - 1,
        ] {
            for flip in [0x01u8, 0x80] {
                let mut bytes = good.clone();
                bytes[at] ^= flip;
                std::fs::write(&path, &bytes).unwrap();
                let e = Prior::load(&path)
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                assert!(
                    e.contains("p.prior") && e.contains("checksum does not match"),
                    "byte {at} ^ {flip:#x}: {e:?}"
                );
            }
        }
    }

    /// Non-finite weights are refused even under a matching checksum (a writer that saved a
    /// diverged model), and a version-1 file (no checksum) is refused by its version.
    #[test]
    fn non_finite_weights_and_old_versions_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.prior");
        trained().save(&path).unwrap();
        let good = std::fs::read(&path).unwrap();
        let unsealed = &good[..good.len() - CHECKSUM_LEN];
        let body = body_start(&good);
        // The weak learner: 32 bytes of its own header, then its weights, then accumulators.
        let classes = u32::from_le_bytes(good[body + 12..body + 16].try_into().unwrap()) as usize;
        let n = (1usize << 12) * classes;
        let weight = |i: usize| body + 32 + 4 * i;
        for (at, value, needle) in [
            (weight(5), f32::NAN, "weight 5 is NaN"),
            (weight(n - 1), f32::INFINITY, "is inf"),
            (weight(0), f32::NEG_INFINITY, "weight 0 is -inf"),
            (weight(n + 3), f32::NAN, "accumulator 3 is NaN"),
        ] {
            let mut bytes = unsealed.to_vec();
            bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
            seal(&mut bytes);
            std::fs::write(&path, &bytes).unwrap();
            let e = Prior::load(&path)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(
                e.contains("p.prior") && e.contains(needle),
                "{needle}: {e:?}"
            );
        }
        // What version 1 wrote: the same layout with version 1 and no checksum.
        let mut old = unsealed.to_vec();
        let v = old.windows(10).position(|w| w == b"\"version\":").unwrap();
        old[v + 10] = b'1';
        std::fs::write(&path, &old).unwrap();
        let e = Prior::load(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            e.contains("format version 1") && e.contains("train it again"),
            "{e:?}"
        );
    }

    /// Each differing setting is named once, in `tandem train`'s terms, with the matching fix.
    #[test]
    fn differences_name_settings_and_fixes() {
        let want = RouterConfig {
            bits: 18,
            ..RouterConfig::default()
        };
        assert!(router_differences(&want, &want).is_empty());
        let cases: Vec<(RouterConfig, Vec<&str>)> = vec![
            (
                RouterConfig {
                    use_metadata: false,
                    ..want
                },
                vec!["train it without `--no-metadata`"],
            ),
            (
                RouterConfig { bits: 20, ..want },
                vec!["trained with `--bits 20` and this one has 18: train it with `--bits 18`"],
            ),
            (
                RouterConfig {
                    bits: 12,
                    use_metadata: false,
                    ..want
                },
                vec!["`--bits 18`", "without `--no-metadata`"],
            ),
            (
                want.with_embeddings(384),
                vec!["train it without `--embed`"],
            ),
            (
                RouterConfig {
                    learning_rate: 0.1,
                    ..want
                },
                vec!["rate 0.1) are not this build's (word n-grams up to 2, rate 0.05): train it again with this build's `tandem train`"],
            ),
        ];
        for (have, needles) in cases {
            let d = router_differences(&have, &want);
            assert_eq!(d.len(), needles.len(), "{d:?}");
            let text = d.join("; ");
            for n in needles {
                assert!(text.contains(n), "{n:?} not in {text}");
            }
            assert!(!text.contains("RouterConfig"), "{text}");
        }
        // The other way round: the front end reads metadata or vectors the prior lacks.
        let no_meta = RouterConfig {
            use_metadata: false,
            ..want
        };
        assert!(router_differences(&want, &no_meta)[0].contains("train it with `--no-metadata`"));
        assert!(router_differences(&want, &want.with_embeddings(384))[0]
            .contains("train it with `--embed`"));
        let c = CascadeConfig {
            bits: 18,
            ..CascadeConfig::default()
        };
        assert!(cascade_differences(&c, &c).is_empty());
        let d = cascade_differences(&CascadeConfig::default(), &c);
        assert_eq!(d.len(), 1);
        assert!(
            d[0].contains("`--bits 20`") && d[0].contains("`--bits 18`"),
            "{d:?}"
        );
    }
}
