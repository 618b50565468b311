//! The cascade a run uses, from TOML: the label set, the tiers from cheapest to the top one, the
//! policy, the budget and input limits. Unknown keys are errors, and so are keys that do not apply
//! to a tier's kind.

use crate::error::RunError;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use tandem_core::money::usd_to_micros;
use tandem_core::policy::teaching::Teaching;
use tandem_core::{BudgetLimits, Price};

/// DS+'s S4L and L4S, as the core's teaching step defines them.
pub use tandem_core::policy::teaching::{L4s, S4l};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    pub labels: Vec<String>,
    #[serde(rename = "tier")]
    pub tiers: Vec<TierConfig>,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub budget: BudgetConfig,
    #[serde(default)]
    pub input: InputConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TierKind {
    Hashed,
    Minilm,
    /// Nearest neighbours over MiniLM vectors of the items learned (`k`, `memory`).
    Knn,
    Gguf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    pub name: String,
    pub kind: TierKind,
    /// `call:USD` or `token:IN[:OUT]` (dollars per million tokens). Default: free.
    pub price: Option<String>,
    /// A cheap tier answers when its top class probability reaches this. Not for the top tier.
    pub threshold: Option<f32>,
    /// A cheap tier may answer only after learning from this many top-tier labels.
    pub warmup: Option<u64>,
    // hashed
    pub bits: Option<u32>,
    pub learning_rate: Option<f32>,
    // minilm
    pub batch: Option<usize>,
    pub max_tokens: Option<usize>,
    // knn (with minilm's batch and max_tokens)
    /// Neighbours that vote (default 16).
    pub k: Option<usize>,
    /// Labelled items remembered, the oldest forgotten first (default 20,000).
    pub memory: Option<usize>,
    // gguf
    pub asset: Option<String>,
    pub path: Option<PathBuf>,
    pub instruction: Option<String>,
    pub verbalizers: Option<Vec<String>>,
    /// Recorded answers of this tier: replayed when the model and prompt match, appended otherwise.
    pub recording: Option<PathBuf>,
}

impl TierConfig {
    /// A `knn` tier's voting neighbours.
    pub fn knn_k(&self) -> usize {
        self.k.unwrap_or(16)
    }

    /// A `knn` tier's remembered items.
    pub fn knn_memory(&self) -> usize {
        self.memory.unwrap_or(20_000)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    #[serde(default)]
    pub kind: PolicyKind,
    /// OCL: the price of deferring relative to a disagreement with the top tier.
    pub mu: Option<f64>,
    /// OCL: hold this share of items reaching the top tier by adapting μ online.
    pub target_top_share: Option<f64>,
    /// OCL: initial exploration probability (decays with updates).
    pub explore: Option<f64>,
    /// OCL: the deferral models also learn from the input's words (default false).
    pub text_features: Option<bool>,
    /// OCL: use the learned correction only as far as its validated log-loss beats the
    /// calibrated confidence alone (default true).
    pub validate: Option<bool>,
    /// Temperature of the energy signal E(x) = −T·logsumexp(f(x)/T).
    pub temperature: Option<f32>,
    /// S4L (DS+): what the top tier learns of the last cheap tier's answer when an item reaches it.
    #[serde(default)]
    pub s4l: S4l,
    /// Hard S4L: classes to which the cheap tier gives less than this probability are ruled out
    /// of the top tier's answer (default 0.1).
    pub s4l_prune: Option<f32>,
    /// L4S (DS+): how the top tier's answers train the cheap tiers.
    #[serde(default)]
    pub l4s: L4s,
    /// Weighted L4S: the number of top-tier labels imitated at full weight before weighting starts
    /// (default 500).
    pub l4s_imitate_first: Option<u64>,
    /// Who teaches the cheap tiers: `"top"` (default), the top tier's answers (L4S); `"gold"`,
    /// an item's own label when it carries one (the cheap tiers learn it whichever tier
    /// answered, and the deferral policy learns their errors against it), the top tier's answer
    /// otherwise.
    #[serde(default)]
    pub teach: Teach,
}

/// Who teaches the cheap tiers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Teach {
    #[default]
    Top,
    Gold,
}

impl PolicyConfig {
    /// The cascade's teaching step (S4L, L4S) this policy asks for.
    pub fn teaching(&self) -> Teaching {
        let d = Teaching::default();
        Teaching {
            s4l: self.s4l,
            s4l_prune: self.s4l_prune.unwrap_or(d.s4l_prune),
            l4s: self.l4s,
            l4s_imitate_first: self.l4s_imitate_first.unwrap_or(d.l4s_imitate_first),
        }
    }
}

impl PolicyKind {
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Confidence => "confidence",
            PolicyKind::Ocl => "ocl",
            PolicyKind::Energy => "energy",
            PolicyKind::MaxProb => "max_prob",
            PolicyKind::Random => "random",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// Each cheap tier answers when its confidence reaches its threshold.
    #[default]
    Confidence,
    /// Online cascade learning: a learned deferral model per cheap tier.
    Ocl,
    /// E-LANG: a cheap tier defers when the energy of its logits is high, the threshold held
    /// online so that `target_top_share` of items reach the top tier.
    Energy,
    /// The confidence shunt with its threshold held online to `target_top_share` (as `energy`,
    /// but over the top class probability): the shunt at a chosen share of top-tier calls.
    MaxProb,
    /// Baseline: `target_top_share` of the items, drawn at random, go to the top tier; the most
    /// capable cheap tier answers the rest.
    Random,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    pub max_top_calls: Option<u64>,
    pub max_usd: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlong {
    Truncate,
    Reject,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    #[serde(default = "default_max_chars")]
    pub max_chars: usize,
    #[serde(default = "default_overlong")]
    pub overlong: Overlong,
}

fn default_max_chars() -> usize {
    2000
}

fn default_overlong() -> Overlong {
    Overlong::Truncate
}

impl Default for InputConfig {
    fn default() -> Self {
        InputConfig {
            max_chars: default_max_chars(),
            overlong: default_overlong(),
        }
    }
}

impl RunConfig {
    pub fn load(path: &Path) -> Result<Self, RunError> {
        let text = std::fs::read_to_string(path).map_err(|e| RunError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, RunError> {
        let err = |message: String| RunError::Config {
            path: path.to_path_buf(),
            message,
        };
        let cfg: RunConfig =
            toml::from_str(text).map_err(|e| err(e.to_string().trim_end().to_string()))?;
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if self.labels.len() < 2 {
            return Err(format!(
                "`labels`: need at least two labels, got {:?}",
                self.labels
            ));
        }
        if self.tiers.len() < 2 {
            return Err(format!(
                "`tier`: a cascade needs at least two tiers, got {}",
                self.tiers.len()
            ));
        }
        let top = self.tiers.len() - 1;
        for (i, t) in self.tiers.iter().enumerate() {
            let at = format!("tier `{}`", t.name);
            if self.tiers[..i].iter().any(|o| o.name == t.name) {
                return Err(format!("{at}: the name is used twice"));
            }
            if let Some(p) = &t.price {
                Price::parse(p).map_err(|e| format!("{at}: `price` {p:?}: {e}"))?;
            }
            let not_for = |field: &str, set: bool, kind: &str| -> Result<(), String> {
                if set {
                    Err(format!("{at}: `{field}` does not apply to kind {kind}"))
                } else {
                    Ok(())
                }
            };
            match t.kind {
                TierKind::Hashed => {
                    for (f, set) in [
                        ("asset", t.asset.is_some()),
                        ("path", t.path.is_some()),
                        ("instruction", t.instruction.is_some()),
                        ("verbalizers", t.verbalizers.is_some()),
                        ("recording", t.recording.is_some()),
                        ("batch", t.batch.is_some()),
                        ("max_tokens", t.max_tokens.is_some()),
                        ("k", t.k.is_some()),
                        ("memory", t.memory.is_some()),
                    ] {
                        not_for(f, set, "hashed")?;
                    }
                    if let Some(b) = t.bits {
                        if !(10..=26).contains(&b) {
                            return Err(format!("{at}: `bits` {b}: must be between 10 and 26"));
                        }
                    }
                }
                TierKind::Minilm => {
                    for (f, set) in [
                        ("asset", t.asset.is_some()),
                        ("path", t.path.is_some()),
                        ("instruction", t.instruction.is_some()),
                        ("verbalizers", t.verbalizers.is_some()),
                        ("recording", t.recording.is_some()),
                        ("bits", t.bits.is_some()),
                        ("k", t.k.is_some()),
                        ("memory", t.memory.is_some()),
                    ] {
                        not_for(f, set, "minilm")?;
                    }
                    if t.max_tokens.is_some_and(|m| !(8..=512).contains(&m)) {
                        return Err(format!("{at}: `max_tokens`: must be between 8 and 512"));
                    }
                }
                TierKind::Knn => {
                    for (f, set) in [
                        ("asset", t.asset.is_some()),
                        ("path", t.path.is_some()),
                        ("instruction", t.instruction.is_some()),
                        ("verbalizers", t.verbalizers.is_some()),
                        ("recording", t.recording.is_some()),
                        ("bits", t.bits.is_some()),
                        ("learning_rate", t.learning_rate.is_some()),
                    ] {
                        not_for(f, set, "knn")?;
                    }
                    if t.max_tokens.is_some_and(|m| !(8..=512).contains(&m)) {
                        return Err(format!("{at}: `max_tokens`: must be between 8 and 512"));
                    }
                    let (k, memory) = (t.knn_k(), t.knn_memory());
                    if !(1..=1024).contains(&k) {
                        return Err(format!("{at}: `k` {k}: must be between 1 and 1024"));
                    }
                    if !(k..=1 << 20).contains(&memory) {
                        return Err(format!(
                            "{at}: `memory` {memory}: must be at least `k` ({k}) and at most 1048576"
                        ));
                    }
                }
                TierKind::Gguf => {
                    for (f, set) in [
                        ("bits", t.bits.is_some()),
                        ("learning_rate", t.learning_rate.is_some()),
                        ("batch", t.batch.is_some()),
                        ("max_tokens", t.max_tokens.is_some()),
                        ("k", t.k.is_some()),
                        ("memory", t.memory.is_some()),
                    ] {
                        not_for(f, set, "gguf")?;
                    }
                    if t.asset.is_some() == t.path.is_some() {
                        return Err(format!("{at}: give exactly one of `asset` (an installed asset id) or `path` (a GGUF file)"));
                    }
                    let instr = t.instruction.as_deref().unwrap_or("");
                    if !instr.contains("{text}") {
                        return Err(format!(
                            "{at}: `instruction` must contain {{text}} where the input goes"
                        ));
                    }
                    match &t.verbalizers {
                        Some(v) if v.len() != self.labels.len() => {
                            return Err(format!(
                                "{at}: `verbalizers` has {} entries for {} labels",
                                v.len(),
                                self.labels.len()
                            ))
                        }
                        Some(v) if v.iter().any(|s| s.is_empty()) => {
                            return Err(format!("{at}: an empty verbaliser"))
                        }
                        _ => {}
                    }
                }
            }
            if i == top {
                if t.threshold.is_some() || t.warmup.is_some() {
                    return Err(format!(
                        "{at}: `threshold` and `warmup` apply to cheap tiers, not the top tier"
                    ));
                }
                if t.kind != TierKind::Gguf {
                    // A learner on top would only ever learn from itself.
                    return Err(format!("{at}: the top tier must be a model that does not learn from the cascade (kind gguf)"));
                }
            } else if t.threshold.is_some_and(|x| !(0.0..=1.0).contains(&x)) {
                return Err(format!("{at}: `threshold` must be between 0 and 1"));
            }
        }
        let p = &self.policy;
        use PolicyKind as K;
        for (f, set, kinds) in [
            ("mu", p.mu.is_some(), &[K::Ocl][..]),
            ("explore", p.explore.is_some(), &[K::Ocl]),
            ("text_features", p.text_features.is_some(), &[K::Ocl]),
            ("validate", p.validate.is_some(), &[K::Ocl]),
            (
                "target_top_share",
                p.target_top_share.is_some(),
                &[K::Ocl, K::Energy, K::MaxProb, K::Random],
            ),
            ("temperature", p.temperature.is_some(), &[K::Ocl, K::Energy]),
        ] {
            if set && !kinds.contains(&p.kind) {
                let names: Vec<&str> = kinds.iter().map(|k| k.name()).collect();
                return Err(format!(
                    "[policy] `{f}` applies to kind {}, not {:?}",
                    names.join("/"),
                    p.kind.name()
                ));
            }
        }
        if p.s4l_prune.is_some() && p.s4l != S4l::Hard {
            return Err("[policy] `s4l_prune` applies to s4l = \"hard\"".into());
        }
        if p.s4l_prune.is_some_and(|x| !(x > 0.0 && x < 1.0)) {
            return Err("[policy] `s4l_prune` must be between 0 and 1".into());
        }
        if p.l4s_imitate_first.is_some() && p.l4s != L4s::Weighted {
            return Err("[policy] `l4s_imitate_first` applies to l4s = \"weighted\"".into());
        }
        if p.temperature.is_some_and(|t| !(t > 0.0 && t.is_finite())) {
            return Err("[policy] `temperature` must be positive".into());
        }
        if p.mu.is_some_and(|m| !(m > 0.0 && m.is_finite())) {
            return Err("[policy] `mu` must be positive".into());
        }
        if p.target_top_share
            .is_some_and(|t| !(0.0..=1.0).contains(&t))
        {
            return Err("[policy] `target_top_share` must be between 0 and 1".into());
        }
        if p.explore.is_some_and(|t| !(0.0..=1.0).contains(&t)) {
            return Err("[policy] `explore` must be between 0 and 1".into());
        }
        let limits = self.budget.limits().map_err(|e| format!("[budget]: {e}"))?;
        limits.validate().map_err(|e| format!("[budget]: {e}"))?;
        if self.input.max_chars < 16 {
            return Err(format!(
                "[input] `max_chars` {}: must be at least 16",
                self.input.max_chars
            ));
        }
        Ok(())
    }

    pub fn label_index(&self, label: &str) -> Option<usize> {
        self.labels.iter().position(|l| l == label)
    }
}

impl BudgetConfig {
    pub fn limits(&self) -> Result<BudgetLimits, String> {
        let max_micros = match self.max_usd {
            None => None,
            Some(x) => Some(
                usd_to_micros(x)
                    .ok_or_else(|| format!("`max_usd` {x}: must be a non-negative amount"))?,
            ),
        };
        Ok(BudgetLimits {
            max_calls: self.max_top_calls,
            max_micros,
        })
    }
}

impl TierConfig {
    pub fn price(&self) -> Price {
        self.price
            .as_deref()
            .and_then(|p| Price::parse(p).ok())
            .unwrap_or(Price::Call { micros: 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
labels = ["negative", "positive"]
[[tier]]
name = "hashed"
kind = "hashed"
threshold = 0.9
[[tier]]
name = "llm"
kind = "gguf"
asset = "smollm2-135m"
instruction = "Sentiment? {text}"
price = "call:0.001"
[budget]
max_top_calls = 10
"#;

    fn err(text: &str) -> String {
        RunConfig::parse(Path::new("c.toml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn parses_and_validates() {
        let c = RunConfig::parse(Path::new("c.toml"), GOOD).unwrap();
        assert_eq!(c.tiers.len(), 2);
        assert_eq!(c.tiers[1].price(), Price::Call { micros: 1000 });
        assert_eq!(c.budget.limits().unwrap().max_calls, Some(10));
    }

    #[test]
    fn rejects_unknown_and_misplaced_keys() {
        assert!(err(&GOOD.replace("threshold = 0.9", "treshold = 0.9"))
            .contains("unknown field `treshold`"));
        assert!(
            err(&GOOD.replace("threshold = 0.9", "instruction = \"x {text}\""))
                .contains("`instruction` does not apply to kind hashed")
        );
        assert!(
            err(&GOOD.replace("max_top_calls = 10", "max_top_calls = 0"))
                .contains("a cap of zero calls")
        );
        assert!(
            err(&GOOD.replace("Sentiment? {text}", "Sentiment?")).contains("must contain {text}")
        );
        assert!(err(&GOOD.replace("call:0.001", "call:-1")).contains("`price`"));
        assert!(
            err(&GOOD.replace("asset = \"smollm2-135m\"", "")).contains("exactly one of `asset`")
        );
        assert!(
            err("labels = [\"a\"]\n").contains("need at least two labels")
                || err("labels = [\"a\"]\n").contains("missing field")
        );
        assert!(err(&GOOD.replace(
            "price = \"call:0.001\"",
            "price = \"call:0.001\"\nthreshold = 0.5"
        ))
        .contains("not the top tier"));
        assert!(err("not toml [").starts_with("c.toml: "));
    }

    #[test]
    fn a_knn_tier_takes_its_settings_and_refuses_others() {
        let knn = |extra: &str| {
            GOOD.replace(
                "kind = \"hashed\"\nthreshold = 0.9",
                &format!("kind = \"knn\"\nthreshold = 0.9\n{extra}"),
            )
        };
        let c = RunConfig::parse(Path::new("c.toml"), &knn("k = 8\nmemory = 500")).unwrap();
        assert_eq!((c.tiers[0].knn_k(), c.tiers[0].knn_memory()), (8, 500));
        let c = RunConfig::parse(Path::new("c.toml"), &knn("")).unwrap();
        assert_eq!((c.tiers[0].knn_k(), c.tiers[0].knn_memory()), (16, 20_000));
        for (extra, says) in [
            ("k = 0", "`k` 0: must be between 1 and 1024"),
            ("k = 5000", "`k` 5000"),
            (
                "k = 32\nmemory = 10",
                "`memory` 10: must be at least `k` (32)",
            ),
            ("bits = 18", "`bits` does not apply to kind knn"),
            (
                "learning_rate = 0.1",
                "`learning_rate` does not apply to kind knn",
            ),
            ("max_tokens = 4", "`max_tokens`: must be between 8 and 512"),
        ] {
            let e = err(&knn(extra));
            assert!(e.contains(says), "{extra}: {e}");
        }
        // `k` and `memory` belong to knn tiers only.
        assert!(
            err(&GOOD.replace("threshold = 0.9", "threshold = 0.9\nk = 4"))
                .contains("`k` does not apply to kind hashed")
        );
    }
}
