//! The live cascade: item by item through the core's cascade engine
//! ([`tandem_core::engine::Cascade`]), cheapest tier first. What is decided, paid and learned is
//! the engine's (its policy, the hard budget at the top tier, the teaching step); this file feeds
//! the stream's items, writes the answers, counts, reports progress and checkpoints.

use crate::checkpoint;
use crate::config::{PolicyKind, RunConfig};
use crate::error::{io, RunError};
use crate::stream::{Item, Stream};
use crate::tiers::{TierModel, TierSetup};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::PathBuf;
use tandem_core::engine::{Cascade, Hint, Reply, Served, Tiers};
use tandem_core::money::micros_to_usd;
use tandem_core::policy::energy::energy_gate;
use tandem_core::policy::ocl::{DeferralConfig, Ocl};
use tandem_core::policy::random::RandomDeferral;
use tandem_core::policy::shunt::{max_prob_gate, ConfidenceShunt};
use tandem_core::policy::teaching::hint_text;
use tandem_core::policy::Deferral;
use tandem_core::tier::estimate_tokens;
use tandem_core::{Budget, BudgetLimits, Micros, Query, Usage};

pub use tandem_core::policy::teaching::Teaching;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TierStats {
    pub name: String,
    /// Items this tier answered.
    pub answered: u64,
    /// Items this tier predicted on (answered or deferred).
    pub predicted: u64,
    /// Of the predicted items with a gold label: how many, and how many right.
    pub with_gold: u64,
    pub correct: u64,
    /// Items on which the top tier also answered: how many, and how often this tier agreed.
    pub with_top: u64,
    pub agree_top: u64,
    pub compute_us: u64,
    pub cost_micros: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct RunState {
    pub items_done: u64,
    pub output_bytes: u64,
    pub last_id: Option<String>,
    pub with_gold: u64,
    pub correct: u64,
    /// Top-tier escalations the budget refused.
    pub budget_refused: u64,
    pub tiers: Vec<TierStats>,
    /// Per item: the tier that answered and whether it was right (-1 unknown).
    pub history: Vec<(u8, i8)>,
    /// Digest of the configuration, so a resume with another cascade is refused.
    pub config_digest: String,
    pub top_calls: u64,
    pub top_spent_micros: u64,
}

pub struct RunOptions {
    pub output: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub resume: bool,
    pub checkpoint_every: u64,
    pub lookahead: usize,
    /// Items carrying a gold label teach the cheap tiers that label (`teach = "gold"`).
    pub teach_gold: bool,
}

/// What the progress display shows after each item.
pub struct Progress<'a> {
    pub done: u64,
    pub total: u64,
    pub state: &'a RunState,
    /// The item just finished.
    pub last: Outcome,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outcome {
    pub tier: usize,
    pub label: usize,
    /// The top tier answered with S4L's help (a soft hint in its prompt, or classes pruned).
    pub s4l: bool,
}

#[derive(Serialize)]
struct AnswerLine<'a> {
    id: &'a str,
    answer: &'a str,
    tier: &'a str,
    confidence: f32,
    cost_usd: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    gold: Option<&'a str>,
}

/// Runs the stream through the cascade: each item served by the engine, its answer written and
/// counted, a checkpoint every `checkpoint_every` items and at the end.
#[allow(clippy::too_many_arguments)]
pub fn run(
    stream: &Stream,
    labels: &[String],
    tiers: &mut [TierSetup],
    cascade: &mut Cascade,
    budget_limits: BudgetLimits,
    config_digest: &str,
    opts: &RunOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<RunState, RunError> {
    // 1. Start afresh, or where the checkpoint left off.
    let mut state = RunState::new(tiers, config_digest);
    if opts.resume {
        let dir = opts
            .state_dir
            .as_deref()
            .ok_or_else(|| RunError::Invalid("--resume needs --state DIR".into()))?;
        state = checkpoint::load(dir, tiers, cascade.policy_mut(), config_digest, stream)?;
    }
    // The budget continues from what was spent before a resume.
    let budget = Budget::with_spent(budget_limits, state.top_calls, state.top_spent_micros)?;
    let mut out = match &opts.output {
        Some(p) => Some((
            p.clone(),
            checkpoint::open_output(p, opts.resume.then_some(state.output_bytes))?,
        )),
        None => None,
    };
    let start = state.items_done as usize;
    let mut since_checkpoint = 0u64;
    for (pos, item) in stream.items.iter().enumerate().skip(start) {
        // 2. Batched encoders work ahead on the next items.
        if pos % opts.lookahead.max(1) == 0 || pos == start {
            prepare_ahead(tiers, stream, pos, opts.lookahead.max(1))?;
        }
        // 3. The engine serves the item: up the tiers, the budget, the teaching step.
        let query = Query::text(item.id.as_str(), item.text.as_str());
        let truth = if opts.teach_gold { item.gold } else { None };
        let (served, _) =
            cascade.serve_labelled(&mut LiveTiers { tiers, labels }, &budget, &query, truth)?;
        // 4. Count it, write it, show it; checkpoint now and then.
        state.record(&served, item);
        if let Some((path, w)) = &mut out {
            let line = answer_line(item, &served, labels, tiers);
            w.write_all(line.as_bytes()).map_err(io(path))?;
            state.output_bytes += line.len() as u64;
        }
        progress(&Progress {
            done: state.items_done,
            total: stream.items.len() as u64,
            state: &state,
            last: Outcome {
                tier: served.tier,
                label: served.label,
                s4l: served.s4l,
            },
        });
        since_checkpoint += 1;
        if since_checkpoint >= opts.checkpoint_every {
            let dir = opts.state_dir.as_deref();
            checkpoint::save(&state, tiers, cascade.policy(), &mut out, dir)?;
            since_checkpoint = 0;
        }
    }
    checkpoint::save(
        &state,
        tiers,
        cascade.policy(),
        &mut out,
        opts.state_dir.as_deref(),
    )?;
    Ok(state)
}

impl RunState {
    fn new(tiers: &[TierSetup], config_digest: &str) -> Self {
        RunState {
            tiers: tiers
                .iter()
                .map(|t| TierStats {
                    name: t.name.clone(),
                    ..Default::default()
                })
                .collect(),
            config_digest: config_digest.to_string(),
            ..Default::default()
        }
    }

    /// Counts one served item.
    fn record(&mut self, served: &Served, item: &Item) {
        let top = self.tiers.len() - 1;
        for c in &served.calls {
            let Some(s) = self.tiers.get_mut(c.tier) else {
                continue;
            };
            s.predicted += 1;
            s.compute_us += c.compute.as_micros() as u64;
            s.cost_micros += c.cost;
            if let Some(g) = item.gold {
                s.with_gold += 1;
                s.correct += u64::from(c.label == g);
            }
            // The top tier's answer measures every cheap tier's agreement with it.
            if served.tier == top && c.tier < top {
                s.with_top += 1;
                s.agree_top += u64::from(c.label == served.label);
            }
        }
        let (calls, micros) = served.metered();
        self.top_calls += calls;
        self.top_spent_micros += micros;
        self.budget_refused += u64::from(served.refused);
        if let Some(s) = self.tiers.get_mut(served.tier) {
            s.answered += 1;
        }
        let right = item.gold.map(|g| g == served.label);
        if let Some(r) = right {
            self.with_gold += 1;
            self.correct += u64::from(r);
        }
        self.history
            .push((served.tier as u8, right.map_or(-1, i8::from)));
        self.items_done += 1;
        self.last_id = Some(item.id.clone());
    }
}

/// What [`pretrain`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pretrained {
    pub learned: u64,
    /// Items without a gold label, skipped.
    pub unlabelled: u64,
}

/// Warm start: every cheap tier learns each labelled item's gold label, in order, before the
/// stream starts (DS+ trains its small model on labelled data). The tiers' warm-up counts these
/// labels. `progress(k)`: items done.
pub fn pretrain(
    tiers: &mut [TierSetup],
    items: &[Item],
    progress: &mut dyn FnMut(usize),
) -> Result<Pretrained, RunError> {
    let top = tiers.len().saturating_sub(1);
    let mut out = Pretrained::default();
    const BATCH: usize = 64;
    for (b, chunk) in items.chunks(BATCH).enumerate() {
        let texts: Vec<&str> = chunk.iter().map(|i| i.text.as_str()).collect();
        for t in tiers[..top].iter_mut() {
            t.model.classifier().prepare(&texts)?;
        }
        for item in chunk {
            let Some(g) = item.gold else {
                out.unlabelled += 1;
                continue;
            };
            for t in tiers[..top].iter_mut() {
                let c = t.model.classifier();
                c.learn(&item.text, g, 1.0)?;
                c.forget(&item.text);
            }
            out.learned += 1;
        }
        progress((b * BATCH + chunk.len()).min(items.len()));
    }
    Ok(out)
}

/// The cheap tiers see the texts about to come (batched encoders embed them together).
fn prepare_ahead(
    tiers: &mut [TierSetup],
    stream: &Stream,
    pos: usize,
    lookahead: usize,
) -> Result<(), RunError> {
    let ahead: Vec<&str> = stream.items[pos..(pos + lookahead).min(stream.items.len())]
        .iter()
        .map(|i| i.text.as_str())
        .collect();
    let top = tiers.len() - 1;
    for t in tiers[..top].iter_mut() {
        t.model.classifier().prepare(&ahead)?;
    }
    Ok(())
}

fn answer_line(item: &Item, served: &Served, labels: &[String], tiers: &[TierSetup]) -> String {
    let line = AnswerLine {
        id: &item.id,
        answer: labels.get(served.label).map_or("", String::as_str),
        tier: tiers.get(served.tier).map_or("", |t| t.name.as_str()),
        confidence: served.confidence,
        cost_usd: micros_to_usd(served.cost),
        gold: item.gold.and_then(|g| labels.get(g)).map(String::as_str),
    };
    let mut s = serde_json::to_string(&line).unwrap_or_default();
    s.push('\n');
    s
}

/// What a classification costs: the input's estimated tokens and one output token.
fn usage(query: &Query) -> Usage {
    Usage {
        input_tokens: estimate_tokens(query.char_len()),
        output_tokens: 1,
    }
}

/// The configured tiers as the engine calls them.
struct LiveTiers<'a> {
    tiers: &'a mut [TierSetup],
    labels: &'a [String],
}

impl LiveTiers<'_> {
    fn tier(&mut self, i: usize) -> Result<&mut TierSetup, RunError> {
        self.tiers
            .get_mut(i)
            .ok_or_else(|| RunError::Invalid(format!("no tier {i}")))
    }
}

impl Tiers for LiveTiers<'_> {
    type Error = RunError;

    fn count(&self) -> usize {
        self.tiers.len()
    }

    fn estimate(&mut self, tier: usize, query: &Query) -> Micros {
        self.tiers
            .get(tier)
            .map_or(0, |t| t.price.cost(usage(query)))
    }

    fn warm(&mut self, tier: usize) -> bool {
        self.tiers
            .get_mut(tier)
            .is_some_and(|t| t.model.classifier().updates() >= t.warmup)
    }

    fn updates(&mut self, tier: usize) -> u64 {
        self.tiers
            .get_mut(tier)
            .map_or(0, |t| t.model.classifier().updates())
    }

    fn answer(
        &mut self,
        tier: usize,
        query: &Query,
        hint: Option<Hint>,
    ) -> Result<Reply, RunError> {
        let labels = self.labels;
        let input = query.routing_text();
        let t = self.tier(tier)?;
        let usage = usage(query);
        let cost = t.price.cost(usage);
        // S4L's soft prior goes into an LLM's prompt; a classifier cannot read it.
        let (p, hinted) = match (&mut t.model, hint) {
            (TierModel::Llm(llm), Some(h)) => {
                let label = labels.get(h.label).map_or("?", String::as_str);
                let hint = hint_text(label, h.confidence);
                (llm.predict_with_hint(input, &hint)?, true)
            }
            (m, _) => (m.classifier().predict(input)?, false),
        };
        Ok(Reply {
            usage,
            cost,
            compute: p.compute,
            hinted,
            ..Reply::classes(p.probs, p.logits)
        })
    }

    fn learn(
        &mut self,
        tier: usize,
        input: &str,
        label: usize,
        weight: f32,
    ) -> Result<(), RunError> {
        Ok(self
            .tier(tier)?
            .model
            .classifier()
            .learn(input, label, weight)?)
    }

    fn forget(&mut self, tier: usize, input: &str) {
        if let Some(t) = self.tiers.get_mut(tier) {
            t.model.classifier().forget(input);
        }
    }
}

/// The cascade a configuration asks for over `tiers`: its policy (the confidence shunt reads each
/// cheap tier's threshold), its teaching step, the top tier metered by the budget.
pub fn cascade_for(cfg: &RunConfig, tiers: &[TierSetup], seed: u64) -> Result<Cascade, RunError> {
    let p = &cfg.policy;
    let cheap = tiers.len().saturating_sub(1);
    let policy: Box<dyn Deferral> = match p.kind {
        PolicyKind::Confidence => Box::new(ConfidenceShunt::new(
            tiers[..cheap].iter().map(|t| t.threshold).collect(),
        )),
        PolicyKind::Ocl => {
            let d = DeferralConfig::default();
            let dc = DeferralConfig {
                mu: p.mu.unwrap_or(d.mu),
                target_top_share: p.target_top_share,
                explore: p.explore.unwrap_or(d.explore),
                text_features: p.text_features.unwrap_or(d.text_features),
                validate: p.validate.unwrap_or(d.validate),
                seed,
                ..d
            };
            Box::new(Ocl::new(cheap, dc, p.temperature.unwrap_or(1.0))?)
        }
        PolicyKind::Random => Box::new(RandomDeferral::new(
            p.target_top_share.unwrap_or(0.3),
            seed ^ 0x7a4d,
        )),
        PolicyKind::Energy => Box::new(energy_gate(
            p.target_top_share.unwrap_or(0.3),
            p.temperature.unwrap_or(1.0),
            seed ^ 0xe1a6,
        )?),
        PolicyKind::MaxProb => Box::new(max_prob_gate(
            p.target_top_share.unwrap_or(0.3),
            seed ^ 0xe1a6,
        )?),
    };
    Ok(Cascade::new(tiers.len(), policy, p.teaching())?)
}
