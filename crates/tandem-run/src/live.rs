//! The live cascade: item by item, cheap tiers first; a cheap tier answers when it has learned
//! enough and is confident; otherwise the next tier is asked, up to the top tier, whose answer every
//! cheap tier then learns from. The top tier's calls go through the hard budget; when it refuses,
//! the most capable cheap tier that ran answers instead.

use crate::config::{L4s, PolicyConfig, S4l};
use crate::error::{io, RunError};
use crate::stream::Stream;
use crate::tiers::{TierModel, TierSetup};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use tandem_core::calibrate::ShareController;
use tandem_core::money::micros_to_usd;
use tandem_core::policy::deferral::{Context, OclDeferral};
use tandem_core::policy::signals::{energy, Signals};
use tandem_core::tier::estimate_tokens;
use tandem_core::{Budget, BudgetLimits, Usage};

/// How a cheap tier decides to answer or defer.
pub enum Policy {
    /// Answer when the top class probability reaches the tier's threshold.
    Confidence,
    /// OCL's learned deferral.
    Ocl {
        deferral: Box<OclDeferral>,
        temperature: f32,
    },
    /// A score held to a share per cheap tier: E-LANG's energy, or the shunt's max probability.
    Gates(Box<ShareGates>),
    /// Baseline: a random `share` of items to the top tier, the last cheap tier answers the rest.
    Random(Box<RandomDeferral>),
}

pub struct RandomDeferral {
    pub share: f64,
    pub seed: u64,
    rng: ChaCha8Rng,
}

/// A cheap tier's signals and what the tier below it said (agrees?, its confidence).
type TierSignals = (Signals, Option<(bool, f32)>);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GateScore {
    /// E(x) = −T·logsumexp(f(x)/T): high when the logits are all small (out of its depth).
    Energy,
    /// 1 − max probability: the confidence shunt.
    MaxProb,
}

/// One threshold for every cheap tier over a score where higher means "send it up", held so
/// that `target` of the items reach the top tier: an item goes up when every cheap tier's score
/// is above it, so the controller watches the lowest score along each item's path. (Splitting
/// the share per tier instead lets a weak first tier answer a fixed share whatever it knows.)
#[derive(Serialize, Deserialize)]
pub struct ShareGates {
    pub score: GateScore,
    pub gate: ShareController,
    pub temperature: f32,
    pub rng_seed: u64,
    pub rng_pos: u128,
    #[serde(skip, default = "new_rng")]
    rng: ChaCha8Rng,
}

/// S4L and L4S, DS+'s two ways for the tiers to teach each other.
#[derive(Debug, Clone, Copy)]
pub struct Teaching {
    pub s4l: S4l,
    pub s4l_prune: f32,
    pub l4s: L4s,
    pub l4s_imitate_first: u64,
}

impl Teaching {
    pub fn from_config(p: &PolicyConfig) -> Self {
        Teaching {
            s4l: p.s4l,
            s4l_prune: p.s4l_prune.unwrap_or(0.1),
            l4s: p.l4s,
            l4s_imitate_first: p.l4s_imitate_first.unwrap_or(500),
        }
    }

    /// The weight of a top-tier label for the cheap tiers: 1 while imitating; then the top
    /// tier's margin over a uniform guess, so an unsure answer teaches little.
    pub fn l4s_weight(&self, updates_so_far: u64, top_confidence: f32, classes: usize) -> f32 {
        match self.l4s {
            L4s::Imitate => 1.0,
            L4s::Weighted if updates_so_far < self.l4s_imitate_first => 1.0,
            L4s::Weighted => {
                let uniform = 1.0 / classes.max(2) as f32;
                ((top_confidence - uniform) / (1.0 - uniform)).clamp(0.0, 1.0)
            }
        }
    }
}

/// Hard S4L: the top tier's probabilities with the classes the cheap tier rules out (below
/// `prune`) removed and the rest renormalised; unchanged when nothing, or everything, is ruled out.
/// Says whether a class was removed.
pub fn prune_classes(top: &mut [f32], cheap: &[f32], prune: f32) -> bool {
    let kept: f32 = top
        .iter()
        .zip(cheap)
        .filter(|(_, &c)| c >= prune)
        .map(|(t, _)| *t)
        .sum();
    if kept <= 0.0 || top.len() != cheap.len() || cheap.iter().all(|&c| c >= prune) {
        return false;
    }
    for (t, &c) in top.iter_mut().zip(cheap) {
        *t = if c >= prune { *t / kept } else { 0.0 };
    }
    true
}

fn new_rng() -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(0)
}

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

#[allow(clippy::too_many_arguments)]
pub fn run(
    stream: &Stream,
    labels: &[String],
    tiers: &mut [TierSetup],
    policy: &mut Policy,
    teaching: Teaching,
    budget_limits: BudgetLimits,
    config_digest: &str,
    opts: &RunOptions,
    progress: &mut dyn FnMut(&Progress),
) -> Result<RunState, RunError> {
    let top = tiers.len() - 1;
    let mut state = RunState {
        tiers: tiers
            .iter()
            .map(|t| TierStats {
                name: t.name.clone(),
                ..Default::default()
            })
            .collect(),
        config_digest: config_digest.to_string(),
        ..Default::default()
    };
    if opts.resume {
        let dir = opts
            .state_dir
            .as_deref()
            .ok_or_else(|| RunError::Invalid("--resume needs --state DIR".into()))?;
        state = load_state(dir, tiers, config_digest, stream)?;
        match policy {
            Policy::Ocl { deferral, .. } => {
                let p = dir.join("deferral.bin");
                let f = std::fs::File::open(&p).map_err(io(&p))?;
                deferral.load(&mut std::io::BufReader::new(f))?;
            }
            Policy::Gates(g) => {
                let p = dir.join("gates.json");
                let text = std::fs::read(&p).map_err(io(&p))?;
                let mut back: ShareGates = serde_json::from_slice(&text)
                    .map_err(|e| RunError::Invalid(format!("{}: {e}", p.display())))?;
                if back.score != g.score {
                    return Err(RunError::Invalid(format!(
                        "{}: holds {:?} gates, the policy wants {:?}",
                        p.display(),
                        back.score,
                        g.score
                    )));
                }
                back.rng = ChaCha8Rng::seed_from_u64(back.rng_seed);
                back.rng.set_word_pos(back.rng_pos);
                **g = back;
            }
            Policy::Random(r) => {
                // The draws continue where the checkpoint left them: one per item done.
                r.rng = ChaCha8Rng::seed_from_u64(r.seed);
                for _ in 0..state.items_done {
                    let _: f64 = r.rng.gen();
                }
            }
            Policy::Confidence => {}
        }
    }
    // The budget continues from what was spent before a resume.
    let budget = Budget::with_spent(budget_limits, state.top_calls, state.top_spent_micros)?;
    let mut out = match &opts.output {
        Some(p) => Some((
            p.clone(),
            open_output(p, opts.resume.then_some(state.output_bytes))?,
        )),
        None => None,
    };
    let total = stream.items.len() as u64;
    let start = state.items_done as usize;
    let mut since_checkpoint = 0u64;
    for (pos, item) in stream.items.iter().enumerate().skip(start) {
        if pos % opts.lookahead.max(1) == 0 || pos == start {
            let ahead: Vec<&str> = stream.items
                [pos..(pos + opts.lookahead.max(1)).min(stream.items.len())]
                .iter()
                .map(|i| i.text.as_str())
                .collect();
            for t in tiers[..top].iter_mut() {
                t.model.classifier().prepare(&ahead)?;
            }
        }
        let usage = Usage {
            input_tokens: estimate_tokens(item.text.chars().count()),
            output_tokens: 1,
        };
        let mut answer: Option<(usize, usize, f32)> = None; // (tier, label, confidence)
        let mut fallback: Option<(usize, usize, f32)> = None;
        // The last cheap tier's probabilities, when it was past its warm-up (for S4L).
        let mut warm_cheap: Option<Vec<f32>> = None;
        let mut s4l_used = false;
        // Share gates: one tie-break draw per item, and the lowest score along its path.
        let mut gate_draw: Option<f64> = None;
        let mut gate_min: Option<f32> = None;
        let send_up = match policy {
            Policy::Random(r) => {
                let draw: f64 = r.rng.gen();
                draw < r.share
            }
            _ => false,
        };
        let mut preds: Vec<Option<usize>> = vec![None; tiers.len()];
        let mut signals: Vec<Option<TierSignals>> = vec![None; tiers.len()];
        // The previous cheap tier's label and confidence, for the next one's deferral model.
        let mut prev: Option<(usize, f32)> = None;
        // OCL: what deferring from each tier pays: the next tier's price, relative to the top one's.
        let top_cost = tiers[top].price.cost(usage);
        let is_ocl = matches!(policy, Policy::Ocl { .. });
        let next_cost: Vec<f64> = (0..top)
            .filter(|_| is_ocl)
            .map(|i| {
                if top_cost == 0 {
                    1.0
                } else {
                    tiers[i + 1].price.cost(usage) as f64 / top_cost as f64
                }
            })
            .collect();
        if let Policy::Ocl { deferral, .. } = policy {
            deferral.begin_item();
        }
        let mut any_warm = false;
        let mut item_cost = 0u64;
        for (i, t) in tiers.iter_mut().enumerate() {
            let is_top = i == top;
            let reservation = if is_top {
                match budget.try_reserve(t.price.cost(usage)) {
                    Some(r) => Some(r),
                    None => {
                        state.budget_refused += 1;
                        break;
                    }
                }
            } else {
                None
            };
            let hint = match (&fallback, &warm_cheap) {
                (Some(f), Some(_)) if teaching.s4l == S4l::Soft => Some(hint_text(f, labels)),
                _ => None,
            };
            let mut p = match (&mut t.model, hint) {
                (TierModel::Llm(llm), Some(hint)) if is_top => {
                    s4l_used = true;
                    llm.predict_with_hint(&item.text, &hint)?
                }
                (m, _) => m.classifier().predict(&item.text)?,
            };
            if let (true, S4l::Hard, Some(cheap)) = (is_top, teaching.s4l, &warm_cheap) {
                s4l_used = prune_classes(&mut p.probs, cheap, teaching.s4l_prune);
            }
            let cost = t.price.cost(usage);
            item_cost += cost;
            if let Some(r) = reservation {
                budget.settle(r, cost);
                state.top_calls += 1;
                state.top_spent_micros += cost;
            }
            let s = &mut state.tiers[i];
            s.predicted += 1;
            s.compute_us += p.compute.as_micros() as u64;
            s.cost_micros += cost;
            if let Some(g) = item.gold {
                s.with_gold += 1;
                s.correct += u64::from(p.label() == g);
            }
            preds[i] = Some(p.label());
            let warm = t.model.classifier().updates() >= t.warmup;
            any_warm |= warm && !is_top;
            let confident = match policy {
                Policy::Confidence => warm && p.confidence() >= t.threshold,
                Policy::Ocl {
                    deferral,
                    temperature,
                } if !is_top => {
                    let sig = Signals::of(&p.probs, &p.logits, *temperature);
                    let below = prev.map(|(l, c)| (l == p.label(), c));
                    signals[i] = Some((sig, below));
                    let ctx = Context {
                        signals: sig,
                        text: &item.text,
                        below,
                    };
                    // Warm-up sends everything up: not a decision to make or count.
                    warm && !deferral.decide(i, &ctx, next_cost[i]).defer
                }
                Policy::Gates(g) if !is_top => {
                    let score = match g.score {
                        GateScore::Energy => energy(&p.logits, g.temperature),
                        GateScore::MaxProb => 1.0 - p.confidence(),
                    };
                    // Warm-up sends everything up whatever the score: not a decision to count.
                    if warm {
                        let draw = *gate_draw.get_or_insert_with(|| g.rng.gen::<f64>());
                        let d = g.gate.decide(score, g.gate.target(), draw);
                        gate_min = Some(gate_min.map_or(score, |m: f32| m.min(score)));
                        !d.escalate
                    } else {
                        false
                    }
                }
                Policy::Random(_) if !is_top => warm && !send_up && i + 1 == top,
                Policy::Ocl { .. } | Policy::Gates(_) | Policy::Random(_) => false,
            };
            if is_top || confident {
                answer = Some((i, p.label(), p.confidence()));
                break;
            }
            fallback = Some((i, p.label(), p.confidence()));
            prev = Some((p.label(), p.confidence()));
            // Kept only for S4L, which reads it at the top tier.
            warm_cheap = (warm && teaching.s4l != S4l::Off).then(|| p.probs.clone());
        }
        let (tier, label, confidence) = match answer.or(fallback) {
            Some(a) => a,
            None => return Err(RunError::Invalid("no tier answered".into())),
        };
        if tier == top {
            // The top tier's label teaches every cheap tier (and measures their agreement).
            let top_label_weight =
                |updates: u64| teaching.l4s_weight(updates, confidence, labels.len());
            for i in 0..top {
                if let Some(p) = preds[i] {
                    state.tiers[i].with_top += 1;
                    state.tiers[i].agree_top += u64::from(p == label);
                    if let (Policy::Ocl { deferral, .. }, Some((sig, below))) =
                        (&mut *policy, signals[i])
                    {
                        let ctx = Context {
                            signals: sig,
                            text: &item.text,
                            below,
                        };
                        deferral.learn(i, &ctx, p == label);
                    }
                }
                let c = tiers[i].model.classifier();
                let w = top_label_weight(c.updates());
                c.learn(&item.text, label, w)?;
            }
        } else {
            for t in tiers[..top].iter_mut() {
                t.model.classifier().forget(&item.text);
            }
        }
        if let (Policy::Gates(g), Some(m)) = (&mut *policy, gate_min) {
            g.gate.record(m, tier == top);
        }
        if let Policy::Ocl { deferral, .. } = policy {
            // The share is steered only where a cheap tier could have answered: during warm-up
            // everything goes to the top tier whatever μ is.
            if any_warm {
                deferral.end_item(tier == top);
            }
        }
        state.tiers[tier].answered += 1;
        let right = item.gold.map(|g| g == label);
        if let Some(r) = right {
            state.with_gold += 1;
            state.correct += u64::from(r);
        }
        state.history.push((tier as u8, right.map_or(-1, i8::from)));
        state.items_done += 1;
        state.last_id = Some(item.id.clone());
        if let Some((path, w)) = &mut out {
            let line = AnswerLine {
                id: &item.id,
                answer: labels.get(label).map_or("", String::as_str),
                tier: &tiers[tier].name,
                confidence,
                cost_usd: micros_to_usd(item_cost),
                gold: item.gold.and_then(|g| labels.get(g)).map(String::as_str),
            };
            let mut s = serde_json::to_string(&line).unwrap_or_default();
            s.push('\n');
            w.write_all(s.as_bytes()).map_err(io(path))?;
            state.output_bytes += s.len() as u64;
        }
        progress(&Progress {
            done: state.items_done,
            total,
            state: &state,
            last: Outcome {
                tier,
                label,
                s4l: s4l_used,
            },
        });
        since_checkpoint += 1;
        if since_checkpoint >= opts.checkpoint_every {
            checkpoint(&mut state, tiers, policy, &mut out, opts)?;
            since_checkpoint = 0;
        }
    }
    checkpoint(&mut state, tiers, policy, &mut out, opts)?;
    Ok(state)
}

fn open_output(path: &Path, resume_at: Option<u64>) -> Result<BufWriter<std::fs::File>, RunError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let f = match resume_at {
        Some(bytes) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io(path))?;
            // Lines written after the last checkpoint are dropped: those items run again.
            f.set_len(bytes).map_err(io(path))?;
            let mut f = f;
            use std::io::Seek;
            f.seek(std::io::SeekFrom::End(0)).map_err(io(path))?;
            f
        }
        None => std::fs::File::create(path).map_err(io(path))?,
    };
    Ok(BufWriter::new(f))
}

fn tier_file(dir: &Path, name: &str) -> PathBuf {
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("tier-{safe}.bin"))
}

/// Flushes the answers, saves every learner, then the state (atomically, last), so a state file
/// never points past what is on disk.
fn checkpoint(
    state: &mut RunState,
    tiers: &mut [TierSetup],
    policy: &Policy,
    out: &mut Option<(PathBuf, BufWriter<std::fs::File>)>,
    opts: &RunOptions,
) -> Result<(), RunError> {
    if let Some((path, w)) = out {
        w.flush().map_err(io(path))?;
        w.get_ref().sync_data().map_err(io(path))?;
    }
    for t in tiers.iter_mut() {
        if let TierModel::Llm(l) = &mut t.model {
            l.flush()?;
        }
    }
    let Some(dir) = &opts.state_dir else {
        return Ok(());
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    for t in tiers.iter() {
        if let TierModel::Learner(c) = &t.model {
            c.save(&tier_file(dir, &t.name))?;
        }
    }
    if let Policy::Gates(g) = policy {
        let snapshot = ShareGates {
            score: g.score,
            gate: g.gate.clone(),
            temperature: g.temperature,
            rng_seed: g.rng_seed,
            rng_pos: g.rng.get_word_pos(),
            rng: new_rng(),
        };
        let p = dir.join("gates.json");
        let tmp = dir.join("gates.json.tmp");
        let text = serde_json::to_vec(&snapshot).map_err(|e| RunError::Invalid(e.to_string()))?;
        std::fs::write(&tmp, text).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &p).map_err(io(&p))?;
    }
    if let Policy::Ocl { deferral, .. } = policy {
        let p = dir.join("deferral.bin");
        let tmp = dir.join("deferral.bin.tmp");
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io(&tmp))?);
        deferral.save(&mut f).map_err(io(&tmp))?;
        f.flush().map_err(io(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, &p).map_err(io(&p))?;
    }
    let path = dir.join("state.json");
    let tmp = dir.join("state.json.tmp");
    let text = serde_json::to_vec(state).map_err(|e| RunError::Invalid(e.to_string()))?;
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&text).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

fn load_state(
    dir: &Path,
    tiers: &mut [TierSetup],
    digest: &str,
    stream: &Stream,
) -> Result<RunState, RunError> {
    let path = dir.join("state.json");
    let text = std::fs::read(&path).map_err(io(&path))?;
    let state: RunState = serde_json::from_slice(&text).map_err(|e| {
        RunError::Invalid(format!("{}: not a tandem run state: {e}", path.display()))
    })?;
    if state.config_digest != digest {
        return Err(RunError::Invalid(format!(
            "{}: was written by a run with another configuration; start a new run (without --resume) or use the same config",
            path.display()
        )));
    }
    let done = state.items_done as usize;
    if done > stream.items.len() {
        return Err(RunError::Invalid(format!(
            "{}: {} items done, but the stream has only {}",
            path.display(),
            done,
            stream.items.len()
        )));
    }
    if done > 0 && stream.items.get(done - 1).map(|i| &i.id) != state.last_id.as_ref() {
        return Err(RunError::Invalid(format!(
            "{}: the stream differs from the one this run was started on (item {} is not {:?}); resume with the same input and --seed",
            path.display(),
            done,
            state.last_id
        )));
    }
    for t in tiers.iter_mut() {
        if let TierModel::Learner(c) = &mut t.model {
            c.load(&tier_file(dir, &t.name))?;
        }
    }
    Ok(state)
}

/// S4L's soft prior: the last cheap tier's answer and confidence (to 10%, so that recorded hinted
/// answers are reused across runs), appended to the top tier's prompt.
fn hint_text(last_cheap: &(usize, usize, f32), labels: &[String]) -> String {
    let (_, label, conf) = *last_cheap;
    format!(
        "\n\nA smaller model says: {} (confidence {:.0}%).",
        labels.get(label).map_or("?", String::as_str),
        10.0 * (10.0 * conf).round()
    )
}

/// The policy a configuration asks for.
pub fn policy_from(cfg: &crate::config::RunConfig, seed: u64) -> Result<Policy, RunError> {
    use crate::config::PolicyKind;
    use tandem_core::policy::deferral::DeferralConfig;
    let p = &cfg.policy;
    Ok(match p.kind {
        PolicyKind::Confidence => Policy::Confidence,
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
            Policy::Ocl {
                deferral: Box::new(OclDeferral::new(cfg.tiers.len() - 1, dc)?),
                temperature: p.temperature.unwrap_or(1.0),
            }
        }
        PolicyKind::Random => Policy::Random(Box::new(RandomDeferral {
            share: p.target_top_share.unwrap_or(0.3),
            seed: seed ^ 0x7a4d,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x7a4d),
        })),
        PolicyKind::Energy | PolicyKind::MaxProb => {
            let target = p.target_top_share.unwrap_or(0.3);
            let gate = ShareController::new(target, 1000)?;
            Policy::Gates(Box::new(ShareGates {
                score: if p.kind == PolicyKind::Energy {
                    GateScore::Energy
                } else {
                    GateScore::MaxProb
                },
                gate,
                temperature: p.temperature.unwrap_or(1.0),
                rng_seed: seed ^ 0xe1a6,
                rng_pos: 0,
                rng: ChaCha8Rng::seed_from_u64(seed ^ 0xe1a6),
            }))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s4l_hint_names_the_cheap_answer_and_its_confidence() {
        let labels = vec!["negative".to_string(), "positive".to_string()];
        let h = hint_text(&(1, 0, 0.734), &labels);
        assert_eq!(h, "\n\nA smaller model says: negative (confidence 70%).");
        assert!(hint_text(&(1, 1, 0.96), &labels).ends_with("positive (confidence 100%)."));
    }

    #[test]
    fn hard_s4l_prunes_only_what_the_cheap_tier_rules_out() {
        let mut top = vec![0.5, 0.3, 0.2];
        assert!(prune_classes(&mut top, &[0.05, 0.5, 0.45], 0.1));
        assert_eq!(top, vec![0.0, 0.6, 0.4]);
        // Nothing left to choose from: the top tier's answer stands.
        let mut top = vec![0.0, 1.0];
        assert!(!prune_classes(&mut top, &[0.99, 0.01], 0.1));
        assert_eq!(top, vec![0.0, 1.0]);
        assert!(!prune_classes(&mut top, &[0.5, 0.5], 0.1));
    }

    #[test]
    fn weighted_l4s_imitates_first_then_weights_by_the_top_margin() {
        let t = Teaching {
            s4l: S4l::Off,
            s4l_prune: 0.1,
            l4s: L4s::Weighted,
            l4s_imitate_first: 10,
        };
        assert_eq!(t.l4s_weight(9, 0.55, 2), 1.0);
        assert!((t.l4s_weight(10, 0.55, 2) - 0.1).abs() < 1e-6);
        assert!((t.l4s_weight(10, 1.0, 2) - 1.0).abs() < 1e-6);
        assert_eq!(t.l4s_weight(10, 0.3, 2), 0.0);
        let imitate = Teaching {
            l4s: L4s::Imitate,
            ..t
        };
        assert_eq!(imitate.l4s_weight(1000, 0.55, 2), 1.0);
    }
}
