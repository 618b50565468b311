//! Policies decide which tier answers.
//!
//! In an N-tier cascade ([`crate::engine::Cascade`]) each cheap tier's answer is judged by a
//! [`Deferral`] policy: answer here, or go up. One file per seed's method, each with its paper:
//!
//! | file | policy | paper |
//! |---|---|---|
//! | [`shunt`] | confidence shunt (fixed thresholds, or one threshold held to a share) | DS+ |
//! | [`energy`] | E-LANG's energy score, held to a share | E-LANG |
//! | [`ocl`] | OCL's learned deferral with its cost-to-go | OCL |
//! | [`random`] | random deferral at a share (the baseline) | — |
//! | [`teaching`] | S4L and L4S: who learns from whom (the engine's teaching step) | DS+ |
//! | [`gated`] | a route-before router or a cascade-after scorer, then a share-holding gate | RouteLLM |
//! | [`switching`] | route-before per step of an episode: LONDI's switching controller, LONDI-B's budget | LONDI |
//!
//! [`held`] is what the share-holding gates have in common (one threshold over the lowest score
//! along an item's path, set online by the share controller).
//!
//! For two models there are also score-then-gate policies: a *route* policy scores a query before
//! any model runs (route-before-generation); a *cascade* policy scores the cheap tier's answer and
//! accepts it or escalates (cascade-after-generation). Scorers only score and learn; the
//! [`gate::Gate`] turns scores into decisions that hold a target share, explore and respect the
//! budget, so every policy gets calibration and hard caps from one place.

pub mod cascade;
pub mod cost;
pub mod energy;
pub mod gate;
pub mod gated;
pub mod held;
pub mod ocl;
pub mod random;
pub mod response;
pub mod router;
pub mod shunt;
pub mod signals;
pub mod switching;
pub mod teaching;

/// OCL's learner under its former name.
pub use self::ocl as deferral;

use crate::answer::Answer;
use crate::error::CoreError;
use crate::query::Query;
use serde::{Deserialize, Serialize};

/// What a policy is told after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeedbackMode {
    /// Both models' outcomes, whatever was called: the optimistic bound.
    Full,
    /// Only the outcome of what a deployment served (both when it explored).
    Partial,
    /// Nothing: fixed policies.
    None,
}

impl FeedbackMode {
    pub fn as_str(self) -> &'static str {
        match self {
            FeedbackMode::Full => "full",
            FeedbackMode::Partial => "partial",
            FeedbackMode::None => "none",
        }
    }
}

/// Outcomes revealed after a decision: the quality of each model's answer in [0, 1] (1 = correct),
/// or None when it was not revealed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Observation {
    pub weak: Option<f32>,
    pub strong: Option<f32>,
}

/// Scores a query before generation: the higher, the more the strong model is expected to gain.
pub trait RouteScorer: Send {
    fn score(&mut self, query: &Query) -> f32;
    fn learn(&mut self, query: &Query, observed: &Observation);
}

/// Scores the weak model's answer after generation: the higher, the more escalation is warranted.
pub trait CascadeScorer: Send {
    fn score(&mut self, query: &Query, weak: &Answer) -> f32;
    fn learn(&mut self, query: &Query, weak: &Answer, observed: &Observation);
}

/// One cheap tier's answer to one item, as a [`Deferral`] policy sees it: the signals the tier
/// exposes and what the tier below it said.
#[derive(Debug, Clone, Copy)]
pub struct Step<'a> {
    /// The tier (0 = the cheapest) and the top tier's index.
    pub tier: usize,
    pub top: usize,
    /// The item.
    pub query: &'a Query,
    /// The tier's class probabilities and logits.
    pub probs: &'a [f32],
    pub logits: &'a [f32],
    /// A generator's answer text.
    pub text: Option<&'a str>,
    /// Its answer (the most probable class) and that class's probability; for a generated
    /// answer, label 0 and the geometric mean of its tokens' probabilities (0 when its tier gave
    /// no log-probabilities: unknown confidence cannot vouch).
    pub label: usize,
    pub confidence: f32,
    /// The tier below: its label and confidence (None for the cheapest tier).
    pub below: Option<(usize, f32)>,
    /// The next tier's price for this item, relative to the top tier's (1 when the top is free).
    pub next_cost: f64,
    /// A generated answer's mean token energy (E-LANG's generation form), when its tier gave
    /// per-token logits.
    pub token_energy: Option<f32>,
    /// A generated answer's mean token log-probability, when its tier gave them (`confidence`
    /// is its exp; gates held on it read it exactly, not through exp and ln).
    pub mean_logprob: Option<f32>,
    /// A generated answer's token log-probabilities (nats each), when its tier gave them.
    pub token_logprobs: Option<&'a [f32]>,
}

impl<'a> Step<'a> {
    /// The item's input text.
    pub fn input(&self) -> &'a str {
        self.query.routing_text()
    }

    /// Whether the tier below gave the same label, and its confidence.
    pub fn agrees_below(&self) -> Option<(bool, f32)> {
        self.below.map(|(l, c)| (l == self.label, c))
    }
}

/// How an item ended, for the policy to learn from.
#[derive(Debug, Clone, Copy)]
pub struct Finished<'a> {
    /// The item.
    pub query: &'a Query,
    /// The tier that answered, and the top tier's index.
    pub answered: usize,
    pub top: usize,
    /// The top tier's label when it answered (what the tiers below learn from).
    pub top_label: Option<usize>,
    /// The top tier's answer text when it answered with one (a generator).
    pub top_text: Option<&'a str>,
    /// Every cheap tier that ran on the item, warm or not, cheapest first.
    pub cheap: &'a [Step<'a>],
}

impl Finished<'_> {
    /// Whether `step`'s answer agreed with the top tier's: the same text (by
    /// [`response::agreement`], at least one half) for generators, the same label for
    /// classifiers; None when the top tier did not answer.
    pub fn agreed(&self, step: &Step) -> Option<bool> {
        match (self.top_text, step.text) {
            (Some(top), Some(cheap)) => Some(response::agreement(cheap, top) >= 0.5),
            _ => self.top_label.map(|l| l == step.label),
        }
    }
}

/// What a policy remembers about one item while it walks up the tiers. The engine keeps it
/// (in its [`crate::engine::Walk`]), not the policy, so that one policy decides for many items
/// at once — the gateway's concurrent requests — without one item's draw or path reaching
/// another's.
#[derive(Debug, Clone, Default)]
pub struct ItemState {
    /// The item's one tie-break draw in [0, 1) for a share controller, drawn at its first
    /// decision and used at every tier.
    pub draw: Option<f64>,
    /// The lowest score along the item's path: what a share controller records.
    pub lowest: Option<f32>,
    /// Some cheap tier was asked to decide (not every one was warming up).
    pub decided: bool,
    /// The item goes to the top tier whatever the cheap tiers say (random deferral's draw).
    pub send_up: bool,
    /// The policy explored: it called a tier above the one it would have picked.
    pub explored: bool,
    /// A score-then-gate policy's score for the item and the route its gate wanted.
    pub score: f32,
    pub wanted: Option<gate::Route>,
    /// The cheapest tier's answer as a cascade scorer saw it (to learn from its outcome).
    pub weak: Option<Answer>,
    /// The policy settled the item at its entry: the entry tier's answer stands unless it cannot
    /// serve, so a front end may stream it without judging it (route-before's cheap pick).
    pub settled: bool,
}

impl ItemState {
    /// The item's tie-break draw: drawn from `rng` the first time, the same after.
    pub fn draw(&mut self, rng: &mut impl rand::Rng) -> f64 {
        *self.draw.get_or_insert_with(|| rng.gen::<f64>())
    }

    /// Adds `score` to the path's lowest score.
    pub fn record(&mut self, score: f32) {
        self.lowest = Some(self.lowest.map_or(score, |m| m.min(score)));
    }
}

/// A cascade's deferral policy: at each cheap tier past its warm-up, answer here or go up. The
/// engine calls [`Deferral::begin_item`] once per item, [`Deferral::defer`] for each warm cheap
/// tier in price order until one keeps the item, and [`Deferral::end_item`] once the item is
/// answered, each with the item's own [`ItemState`]. Tiers still warming up (or whose answer
/// cannot serve) go up without asking the policy; the hard budget is the engine's and is checked
/// at every metered step up, so nothing a policy says can pass it.
pub trait Deferral: Send {
    /// The policy's name, as configured.
    fn name(&self) -> &'static str;

    /// A new item: cheap tiers not yet asked. Draws made here are made once per item, in the
    /// order items begin.
    fn begin_item(&mut self, _item: &mut ItemState) {}

    /// Route-before: the tier to call first, chosen before any call (default: the cheapest).
    /// Tiers below it are skipped; if the budget refuses it, the cheapest tier answers.
    fn entry(&mut self, _item: &mut ItemState, _query: &Query, _top: usize) -> usize {
        0
    }

    /// Should `step.tier` (a cheap tier past its warm-up) go up (true) or answer (false)?
    fn defer(&mut self, item: &mut ItemState, step: &Step) -> bool;

    /// The item is answered.
    fn end_item(&mut self, _item: &ItemState, _finished: &Finished) {}

    /// Outcomes revealed after the item (per tier, the quality of its answer in [0, 1]; None
    /// when not revealed): feedback, for policies that learn from it as well as (or rather
    /// than) from the top tier.
    fn learn_outcomes(
        &mut self,
        _item: &ItemState,
        _finished: &Finished,
        _observed: &[Option<f32>],
    ) {
    }

    /// The file name its learned state is checkpointed under, if it has any.
    fn state_file(&self) -> Option<&'static str> {
        None
    }

    /// Its learned state, to checkpoint under [`Deferral::state_file`].
    fn save(&self) -> Result<Vec<u8>, CoreError> {
        Ok(Vec::new())
    }

    /// Continues a run after `items_done` items, from what [`Deferral::save`] wrote (None when
    /// the policy has no state file).
    fn restore(&mut self, _saved: Option<&[u8]>, _items_done: u64) -> Result<(), CoreError> {
        Ok(())
    }

    /// The score-then-gate gate it decides with, if it has one: a front end that checkpoints
    /// a gate's share controller on its own (the gateway's state file) reaches it here.
    fn gate_mut(&mut self) -> Option<&mut gate::Gate> {
        None
    }
}

/// An empty query for the policies' tests.
#[cfg(test)]
pub(crate) static TEST_QUERY: Query = Query {
    id: String::new(),
    input: crate::query::Input::Text(String::new()),
    metadata: std::collections::BTreeMap::new(),
};

/// A step at `tier` of `top + 1` tiers for the policies' tests: the tier's class probabilities
/// and logits, its label and confidence; no text, no tier below, the next tier at the top's
/// price.
#[cfg(test)]
pub(crate) fn test_step<'a>(
    tier: usize,
    top: usize,
    probs: &'a [f32],
    logits: &'a [f32],
    label: usize,
    confidence: f32,
) -> Step<'a> {
    Step {
        tier,
        top,
        query: &TEST_QUERY,
        text: None,
        probs,
        logits,
        label,
        confidence,
        below: None,
        next_cost: 1.0,
        token_energy: None,
        mean_logprob: None,
        token_logprobs: None,
    }
}

/// An item's end for the policies' tests: answered at tier `answered` of `top + 1`, with the top
/// tier's label when it answered (no text), after the cheap tiers' `cheap` steps.
#[cfg(test)]
pub(crate) fn test_finished<'a>(
    answered: usize,
    top: usize,
    top_label: Option<usize>,
    cheap: &'a [Step<'a>],
) -> Finished<'a> {
    Finished {
        query: &TEST_QUERY,
        top_text: None,
        answered,
        top,
        top_label,
        cheap,
    }
}
