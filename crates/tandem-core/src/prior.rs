//! A router trained beforehand (warm start): the route-before router and the cascade scorer fit
//! on recorded outcomes (`tandem train`), saved to one file that `tandem eval --prior`,
//! `tandem serve` (`prior = "…"` on a route) and others start from, then keep learning online.
//!
//! File layout (little-endian): the magic `TNDMPRI1`; a u64 length and that many bytes of JSON
//! header ([`PriorInfo`]: format version, each model's configuration, what it was trained on);
//! then the router's weights if it has one, then the cascade scorer's. Nothing may follow.
//! A file of another format version is refused with a message naming both versions.

use crate::error::CoreError;
use crate::policy::cascade::{CascadeConfig, ResponseCascade};
use crate::policy::router::{GainRouter, RouterConfig};
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::path::Path;

const MAGIC: &[u8; 8] = b"TNDMPRI1";
/// The header's format version this build writes and reads.
pub const PRIOR_VERSION: u32 = 1;
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
    /// its header or weights are damaged, or bytes follow them.
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
        let (head, mut rest) = r.split_at(len as usize);
        // The version first, so a newer file is refused by version, not by an unknown field.
        let version = serde_json::from_slice::<serde_json::Value>(head)
            .ok()
            .and_then(|v| v.get("version").and_then(serde_json::Value::as_u64))
            .ok_or_else(|| err("its header is not valid".into()))?;
        if version != u64::from(PRIOR_VERSION) {
            return Err(err(format!(
                "format version {version}; this build reads version {PRIOR_VERSION}"
            )));
        }
        let info: PriorInfo = serde_json::from_slice(head)
            .map_err(|e| err(format!("its header is not valid: {e}")))?;
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
            (good[..good.len() - 3].to_vec(), "router does not load"),
            ([good.clone(), vec![0, 1]].concat(), "bytes follow"),
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
}
