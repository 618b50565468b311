//! The cascade engine: N ≥ 2 tiers ordered by price, each item asked of the cheapest tier first.
//! At each cheap tier a [`Deferral`] policy reads the signals the tier exposes (its class
//! probabilities and logits, the input, the tier below's answer, the next tier's relative price)
//! and decides: answer here, or go up. A tier still in its warm-up always goes up. Every step up
//! into a metered tier reserves its price against the hard [`Budget`] first; when the budget
//! refuses, the deepest tier that ran answers. When the top tier answers, the teaching step runs:
//! its label trains every tier below (DS+'s L4S, weighted or not) and the policy learns from how
//! the tiers below agreed with it; DS+'s S4L passes the last cheap answer up to the top tier.
//!
//! Front ends (`tandem run` over local classifiers, replayed tiers, the gateway) implement
//! [`Tiers`] — how to call, teach and price each tier — and feed items; what is decided, paid and
//! learned is decided here.

use crate::budget::Budget;
use crate::error::CoreError;
use crate::money::Micros;
use crate::policy::teaching::{prune_classes, S4l, Teaching};
use crate::policy::{Deferral, Finished, ItemState, Step};
use crate::query::Query;
use crate::Usage;
use std::time::{Duration, Instant};

/// S4L's soft prior for the top tier: the last cheap tier's answer and confidence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hint {
    pub label: usize,
    pub confidence: f32,
}

/// A tier's answer to one item.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// A classifier's class probabilities and logits (empty for a generated answer).
    pub probs: Vec<f32>,
    pub logits: Vec<f32>,
    /// A generator's answer text.
    pub text: Option<String>,
    /// A generator's per-token log-probabilities (nats) and energies, when its tier gives them.
    pub token_logprobs: Option<Vec<f32>>,
    pub token_energies: Option<Vec<f32>>,
    /// The answer can be served (a generator's may be empty, a refusal or an invalid tool
    /// call): one that cannot goes up without asking the policy, and never answers an item.
    pub usable: bool,
    pub usage: Usage,
    /// What the call cost.
    pub cost: Micros,
    pub compute: Duration,
    /// The tier used the hint it was given.
    pub hinted: bool,
}

impl Reply {
    /// A classifier's answer: its class probabilities and logits.
    pub fn classes(probs: Vec<f32>, logits: Vec<f32>) -> Reply {
        Reply {
            probs,
            logits,
            text: None,
            token_logprobs: None,
            token_energies: None,
            usable: true,
            usage: Usage::default(),
            cost: 0,
            compute: Duration::ZERO,
            hinted: false,
        }
    }

    /// A generator's answer: its text and, when given, its tokens' log-probabilities.
    pub fn generated(text: String, token_logprobs: Option<Vec<f32>>) -> Reply {
        Reply {
            text: Some(text),
            token_logprobs,
            ..Reply::classes(Vec::new(), Vec::new())
        }
    }

    /// Its label and confidence: a classifier's most probable class and its probability; a
    /// generator's label 0 and the geometric mean of its tokens' probabilities (0 without them).
    fn judged(&self) -> (usize, f32) {
        if !self.probs.is_empty() {
            return (argmax(&self.probs), max_prob(&self.probs));
        }
        let conf = mean(self.token_logprobs.as_deref()).map_or(0.0, f32::exp);
        (0, conf)
    }
}

fn mean(v: Option<&[f32]>) -> Option<f32> {
    v.filter(|v| !v.is_empty())
        .map(|v| v.iter().sum::<f32>() / v.len() as f32)
}

/// The tiers of a cascade, cheapest first, as a front end provides them.
pub trait Tiers {
    type Error: From<CoreError>;
    fn count(&self) -> usize;
    /// What calling `tier` on `query` will most likely cost (reserved against the budget before a
    /// metered call; the reply's cost settles it).
    fn estimate(&mut self, tier: usize, query: &Query) -> Micros;
    /// Past its warm-up: it has learned enough to be asked to decide.
    fn warm(&mut self, tier: usize) -> bool;
    /// Labels it has learned from so far.
    fn updates(&mut self, tier: usize) -> u64;
    /// Answers `query`; the top tier may be given S4L's hint.
    fn answer(
        &mut self,
        tier: usize,
        query: &Query,
        hint: Option<Hint>,
    ) -> Result<Reply, Self::Error>;
    /// Learns `label` for `input` with `weight`.
    fn learn(
        &mut self,
        tier: usize,
        input: &str,
        label: usize,
        weight: f32,
    ) -> Result<(), Self::Error>;
    /// Drops what was prepared for `input`: the item was answered without the tier learning.
    fn forget(&mut self, _tier: usize, _input: &str) {}
}

/// One tier's call on an item.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Call {
    pub tier: usize,
    pub label: usize,
    pub confidence: f32,
    pub compute: Duration,
    pub usage: Usage,
    pub cost: Micros,
    /// Paid through the budget.
    pub metered: bool,
    /// Its answer could be served.
    pub usable: bool,
}

/// How one item was served.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    /// The tier that answered, its label and confidence.
    pub tier: usize,
    pub label: usize,
    pub confidence: f32,
    /// Every tier that ran, cheapest first.
    pub calls: Vec<Call>,
    /// What every call cost.
    pub cost: Micros,
    /// The top tier answered with S4L's help (a soft hint, or classes pruned).
    pub s4l: bool,
    /// A step up was refused by the budget.
    pub refused: bool,
    /// Tiers that could not answer (their calls failed): the item went on without them.
    pub failed: u32,
    /// Time the policy took to decide (route-before and each tier's decision).
    pub decision: Duration,
    /// The policy explored: it called a tier above the one it would have picked.
    pub explored: bool,
}

impl Served {
    /// Calls paid through the budget, and what they cost.
    pub fn metered(&self) -> (u64, Micros) {
        self.calls
            .iter()
            .filter(|c| c.metered)
            .fold((0, 0), |(n, m), c| (n + 1, m + c.cost))
    }
}

/// What the engine asks its front end for next on an item.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next {
    /// Call `tier` (reserving `estimate` against the budget first when `metered`: a refusal is
    /// reported with [`Cascade::refused`]), with S4L's hint for the top tier; report the reply
    /// with [`Cascade::answered`], or a call that could not answer with [`Cascade::failed`].
    Call {
        tier: usize,
        metered: bool,
        estimate: Micros,
        hint: Option<Hint>,
        /// Nothing will be asked after this call: its answer is the item's (a front end may
        /// stream it, with no judging). The top tier; or the entry tier a policy settled on
        /// before any call (route-before's cheap pick), whose answer goes up only if it cannot
        /// serve at all.
        last: bool,
    },
    /// The item has its answer: [`Cascade::finish`] it.
    Done,
}

/// L4S: what the top tier's label teaches one tier below it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lesson {
    pub tier: usize,
    pub label: usize,
    pub weight: f32,
}

/// One item's walk up a cascade's tiers: the replies so far, where it stands and what its policy
/// remembers of it. A front end drives it — synchronously ([`Cascade::serve`]) or across awaits
/// (the gateway's upstream calls) — while the decisions stay the engine's; the cascade itself
/// is borrowed only for each decision, so one cascade serves many items at once.
#[derive(Debug, Clone)]
pub struct Walk {
    costs: Vec<Micros>,
    metered: Vec<bool>,
    s4l_mode: S4l,
    at: Option<usize>,
    replies: Vec<Reply>,
    calls: Vec<Call>,
    answered: Option<usize>,
    /// The last cheap tier was warm (its answer may inform the top tier: S4L).
    last_warm: bool,
    s4l: bool,
    refused: bool,
    failed: u32,
    /// The tiers whose calls failed on this item (bit i: tier i), each tried once.
    failed_tiers: u64,
    decision: Duration,
    item: ItemState,
    /// The tier that answered, once finished.
    finished: Option<usize>,
    /// The policy may learn from how the item ends (the top tier's answer).
    learning: bool,
    /// The item's known answer (a gold label, a user's correction), when it has one.
    truth: Option<usize>,
}

impl Walk {
    /// What to do next.
    pub fn next(&self) -> Next {
        let Some(i) = self.at else {
            return Next::Done;
        };
        let top = self.costs.len() - 1;
        let hint = match (i == top, self.s4l_mode, self.calls.last()) {
            (true, S4l::Soft, Some(c)) if self.last_warm => Some(Hint {
                label: c.label,
                confidence: c.confidence,
            }),
            _ => None,
        };
        Next::Call {
            tier: i,
            metered: self.metered[i],
            estimate: self.costs[i],
            hint,
            // The top; the cheapest after a refusal above it; or the entry the policy settled.
            last: i == top
                || (self.refused && self.calls.is_empty())
                || (self.item.settled && self.calls.is_empty() && self.failed_tiers == 0),
        }
    }

    /// Every reply so far, cheapest first (one per entry of [`Walk::calls`]).
    pub fn replies(&self) -> &[Reply] {
        &self.replies
    }

    pub fn calls(&self) -> &[Call] {
        &self.calls
    }

    /// The policy's memory of the item.
    pub fn item(&self) -> &ItemState {
        &self.item
    }

    /// Whether the policy learns from the top tier's answer when the item ends (a client that
    /// asked not to be learned from; an answer streamed past the decision). The share it
    /// holds counts the item either way.
    pub fn set_learning(&mut self, learning: bool) {
        self.learning = learning;
    }

    /// The item's known answer (a gold label or a correction the caller holds): when set, it
    /// teaches every cheap tier whichever tier answered (DS+ trains its small model on labelled
    /// data), and the policy learns the cheap tiers' answers against it rather than against the
    /// top tier's.
    pub fn set_truth(&mut self, label: Option<usize>) {
        self.truth = label;
    }

    /// The tier that answered, once [`Cascade::finish`]ed.
    pub fn finished(&self) -> Option<usize> {
        self.finished
    }

    /// Some tier's answer can serve the item (if nothing more runs, the deepest one does).
    pub fn has_answer(&self) -> bool {
        self.answered.is_some() || self.calls.iter().any(|c| c.usable)
    }

    /// The call that answers: the one the policy kept, else the deepest usable one.
    fn answer_index(&self) -> Option<usize> {
        self.answered
            .or_else(|| self.calls.iter().rposition(|c| c.usable))
    }

    /// The cheap tiers' answers as steps, cheapest first.
    fn cheap_steps<'a>(&'a self, query: &'a Query) -> Vec<Step<'a>> {
        let top = self.costs.len() - 1;
        self.replies
            .iter()
            .zip(&self.calls)
            .enumerate()
            .filter(|(_, (_, c))| c.tier < top)
            .map(|(k, (r, c))| {
                let below = k
                    .checked_sub(1)
                    .map(|b| (self.calls[b].label, self.calls[b].confidence));
                step(&self.costs, query, r, c, below)
            })
            .collect()
    }
}

/// A cheap tier's answer as its policy sees it.
fn step<'a>(
    costs: &[Micros],
    query: &'a Query,
    r: &'a Reply,
    c: &Call,
    below: Option<(usize, f32)>,
) -> Step<'a> {
    Step {
        tier: c.tier,
        top: costs.len() - 1,
        query,
        probs: &r.probs,
        logits: &r.logits,
        text: r.text.as_deref(),
        label: c.label,
        confidence: c.confidence,
        below,
        next_cost: next_cost(costs, c.tier),
        token_energy: mean(r.token_energies.as_deref()),
        mean_logprob: mean(r.token_logprobs.as_deref()),
        token_logprobs: r.token_logprobs.as_deref(),
    }
}

/// What going up from tier `i` pays: the next tier's price, relative to the top one's (1 when
/// the top is free).
fn next_cost(costs: &[Micros], i: usize) -> f64 {
    let top = costs.len() - 1;
    match costs[top] {
        0 => 1.0,
        t => costs.get(i + 1).copied().unwrap_or(t) as f64 / t as f64,
    }
}

/// An N-tier cascade: its deferral policy, its teaching step and which tiers the budget meters.
pub struct Cascade {
    tiers: usize,
    policy: Box<dyn Deferral>,
    teaching: Teaching,
    metered: Vec<bool>,
}

impl Cascade {
    /// A cascade of `tiers` tiers whose top tier alone is metered by the budget.
    pub fn new(
        tiers: usize,
        policy: Box<dyn Deferral>,
        teaching: Teaching,
    ) -> Result<Self, CoreError> {
        if tiers < 2 {
            return Err(CoreError::config(
                "tiers",
                tiers,
                "a cascade needs at least two tiers",
            ));
        }
        let mut metered = vec![false; tiers];
        metered[tiers - 1] = true;
        Ok(Cascade {
            tiers,
            policy,
            teaching,
            metered,
        })
    }

    /// Which tiers the budget meters (every call into them reserves its price first). The
    /// cheapest tier cannot be: an item must always have an answer.
    pub fn with_metered(mut self, metered: Vec<bool>) -> Result<Self, CoreError> {
        if metered.len() != self.tiers {
            return Err(CoreError::config(
                "metered",
                metered.len(),
                "needs one entry per tier",
            ));
        }
        if metered[0] {
            return Err(CoreError::config(
                "metered",
                "tier 0",
                "the cheapest tier answers when the budget refuses; it cannot be metered",
            ));
        }
        self.metered = metered;
        Ok(self)
    }

    pub fn tiers(&self) -> usize {
        self.tiers
    }

    pub fn top(&self) -> usize {
        self.tiers - 1
    }

    pub fn policy(&self) -> &dyn Deferral {
        self.policy.as_ref()
    }

    pub fn policy_mut(&mut self) -> &mut dyn Deferral {
        self.policy.as_mut()
    }

    pub fn teaching(&self) -> Teaching {
        self.teaching
    }

    /// Starts an item whose tiers are expected to cost `costs` (micro-dollars, one per tier,
    /// cheapest first): the policy picks the entry tier (the cheapest, unless it routes before
    /// any call). Errors when `costs` does not have one entry per tier.
    pub fn begin(&mut self, query: &Query, costs: Vec<Micros>) -> Result<Walk, CoreError> {
        if costs.len() != self.tiers {
            return Err(CoreError::config(
                "tiers",
                costs.len(),
                "the cascade was built for another number of tiers",
            ));
        }
        let top = self.top();
        let mut item = ItemState::default();
        let t0 = Instant::now();
        self.policy.begin_item(&mut item);
        let entry = self.policy.entry(&mut item, query, top).min(top);
        Ok(Walk {
            costs,
            metered: self.metered.clone(),
            s4l_mode: self.teaching.s4l,
            at: Some(entry),
            replies: Vec::with_capacity(self.tiers),
            calls: Vec::with_capacity(self.tiers),
            answered: None,
            last_warm: false,
            s4l: false,
            refused: false,
            failed: 0,
            failed_tiers: 0,
            decision: t0.elapsed(),
            item,
            finished: None,
            learning: true,
            truth: None,
        })
    }

    /// The budget refused the metered call [`Walk::next`] asked for: refused before any tier
    /// answered (the policy entered above the cheapest), the cheapest answers unless it already
    /// failed; else the deepest tier that ran does (none: the walk ends without an answer).
    pub fn refused(&self, walk: &mut Walk) {
        walk.refused = true;
        // The cheapest only if it has not failed already: a tier is called once per item, so a
        // failed cheapest tier and a refused one above it end the walk (with no answer).
        let cheapest_open = walk.failed_tiers & 1 == 0;
        walk.at = match walk.at {
            Some(i) if walk.calls.is_empty() && i > 0 && cheapest_open => Some(0),
            _ => None,
        };
    }

    /// The call [`Walk::next`] asked for could not answer (its upstreams failed): the item goes
    /// on up (or, when nothing ran yet above the cheapest, to the cheapest); at the top, the
    /// deepest usable answer below serves ([`Walk::has_answer`] says whether there is one).
    pub fn failed(&self, walk: &mut Walk) {
        walk.failed += 1;
        let top = self.top();
        let Some(i) = walk.at else {
            return;
        };
        walk.failed_tiers |= 1 << i.min(63);
        let untried = |t: &usize| walk.failed_tiers & (1 << (*t).min(63)) == 0;
        walk.at = (i + 1..=top).find(untried).or_else(|| {
            // Nothing answered yet (the policy entered above the cheapest): the cheapest, once.
            (walk.calls.is_empty() && untried(&0)).then_some(0)
        });
    }

    /// The tier [`Walk::next`] asked for answered with `reply`; `warm`: it is past its warm-up
    /// (a tier still learning goes up without asking the policy). The policy decides whether
    /// the item stops here.
    pub fn answered(&mut self, walk: &mut Walk, query: &Query, mut reply: Reply, warm: bool) {
        let Some(i) = walk.at else {
            return;
        };
        let top = self.top();
        let is_top = i == top;
        if is_top {
            walk.s4l = reply.hinted;
            if let (S4l::Hard, true, Some(cheap)) =
                (self.teaching.s4l, walk.last_warm, walk.replies.last())
            {
                walk.s4l = prune_classes(&mut reply.probs, &cheap.probs, self.teaching.s4l_prune);
            }
        }
        let (label, confidence) = reply.judged();
        let below = walk.calls.last().map(|c| (c.label, c.confidence));
        let call = Call {
            tier: i,
            label,
            confidence,
            compute: reply.compute,
            usage: reply.usage,
            cost: reply.cost,
            metered: walk.metered[i],
            usable: reply.usable,
        };
        // After a refusal the cheapest tier answers without asking.
        let keep = is_top || (walk.refused && walk.calls.is_empty()) || {
            let t = Instant::now();
            let keep = warm
                && reply.usable
                && !self.policy.defer(
                    &mut walk.item,
                    &step(&walk.costs, query, &reply, &call, below),
                );
            walk.decision += t.elapsed();
            walk.last_warm = warm && reply.usable && self.teaching.s4l != S4l::Off;
            keep
        };
        walk.calls.push(call);
        walk.replies.push(reply);
        if keep {
            walk.answered = Some(walk.calls.len() - 1);
            walk.at = None;
        } else {
            // Up to the next tier not already failed on this item (none: the deepest usable
            // answer stands).
            walk.at = (i + 1..=top).find(|&t| walk.failed_tiers & (1 << t.min(63)) == 0);
        }
    }

    /// Ends the item: the policy learns how it ended, and — when the top tier answered — L4S's
    /// lessons for the tiers below are returned (`updates(tier)`: the labels a tier has learned
    /// from so far, which weighted L4S reads). Errors when no tier answered.
    pub fn finish(
        &mut self,
        walk: &mut Walk,
        query: &Query,
        mut updates: impl FnMut(usize) -> u64,
    ) -> Result<(Served, Vec<Lesson>), CoreError> {
        let Some(k) = walk.answer_index() else {
            return Err(CoreError::BudgetExhausted("no tier answered".into()));
        };
        walk.at = None;
        let top = self.top();
        let (tier, label, confidence) = (
            walk.calls[k].tier,
            walk.calls[k].label,
            walk.calls[k].confidence,
        );
        walk.finished = Some(tier);
        let mut lessons = Vec::new();
        let truth = walk.truth.filter(|_| walk.learning);
        if let Some(gold) = truth {
            for i in 0..top {
                lessons.push(Lesson {
                    tier: i,
                    label: gold,
                    weight: 1.0,
                });
            }
        } else if tier == top {
            // L4S: the top tier's label teaches every tier below it.
            let classes = walk.replies[k].probs.len();
            for i in 0..top {
                let weight = self.teaching.l4s_weight(updates(i), confidence, classes);
                lessons.push(Lesson {
                    tier: i,
                    label,
                    weight,
                });
            }
        }
        let cheap = walk.cheap_steps(query);
        let teaches = tier == top && walk.learning;
        let finished = Finished {
            query,
            answered: tier,
            top,
            top_label: truth.or(teaches.then_some(label)),
            top_text: if teaches && truth.is_none() {
                walk.replies[k].text.as_deref()
            } else {
                None
            },
            cheap: &cheap,
        };
        self.policy.end_item(&walk.item, &finished);
        let cost = walk.calls.iter().map(|c| c.cost).sum();
        Ok((
            Served {
                tier,
                label,
                confidence,
                calls: walk.calls.clone(),
                cost,
                s4l: walk.s4l,
                refused: walk.refused,
                failed: walk.failed,
                decision: walk.decision,
                explored: walk.item.explored,
            },
            lessons,
        ))
    }

    /// Serves one item, calling `tiers` in turn: from the tier the policy enters at (the
    /// cheapest, unless it routes before any call) up the tiers until one answers, then the
    /// teaching step.
    pub fn serve<T: Tiers + ?Sized>(
        &mut self,
        tiers: &mut T,
        budget: &Budget,
        query: &Query,
    ) -> Result<Served, T::Error> {
        self.serve_walk(tiers, budget, query).map(|(s, _)| s)
    }

    /// [`Cascade::serve`], also returning the item's walk (for [`Cascade::learn_outcomes`]).
    pub fn serve_walk<T: Tiers + ?Sized>(
        &mut self,
        tiers: &mut T,
        budget: &Budget,
        query: &Query,
    ) -> Result<(Served, Walk), T::Error> {
        self.serve_labelled(tiers, budget, query, None)
    }

    /// [`Cascade::serve_walk`] for an item whose answer is known (`truth`: a gold label or a
    /// correction; see [`Walk::set_truth`]).
    pub fn serve_labelled<T: Tiers + ?Sized>(
        &mut self,
        tiers: &mut T,
        budget: &Budget,
        query: &Query,
        truth: Option<usize>,
    ) -> Result<(Served, Walk), T::Error> {
        if tiers.count() != self.tiers {
            return Err(CoreError::config(
                "tiers",
                tiers.count(),
                "the cascade was built for another number of tiers",
            )
            .into());
        }
        let costs: Vec<Micros> = (0..self.tiers).map(|i| tiers.estimate(i, query)).collect();
        let mut walk = self.begin(query, costs)?;
        walk.set_truth(truth);
        while let Next::Call {
            tier,
            metered,
            estimate,
            hint,
            ..
        } = walk.next()
        {
            let reservation = if metered {
                match budget.try_reserve(estimate) {
                    Some(r) => Some(r),
                    None => {
                        self.refused(&mut walk);
                        continue;
                    }
                }
            } else {
                None
            };
            let reply = match tiers.answer(tier, query, hint) {
                Ok(r) => r,
                Err(e) => {
                    if let Some(r) = reservation {
                        budget.release(r);
                    }
                    return Err(e);
                }
            };
            if let Some(r) = reservation {
                budget.settle(r, reply.cost);
            }
            // The top tier and a tier answering after a refusal are not asked: no warm-up check.
            let asks = tier != self.top() && !(walk.refused && walk.calls.is_empty());
            let warm = asks && tiers.warm(tier);
            self.answered(&mut walk, query, reply, warm);
        }
        let (served, lessons) = self.finish(&mut walk, query, |i| tiers.updates(i))?;
        if served.tier == self.top() || !lessons.is_empty() {
            let input = query.routing_text();
            for l in lessons {
                tiers.learn(l.tier, input, l.label, l.weight)?;
            }
        } else {
            let input = query.routing_text();
            for i in 0..self.top() {
                tiers.forget(i, input);
            }
        }
        Ok((served, walk))
    }

    /// Outcomes revealed after an item was served (per tier: the quality of its answer in
    /// [0, 1], None when not revealed), for the policy to learn from; `walk` is the item's, as
    /// [`Cascade::serve_walk`] returned it or a front end finished it.
    pub fn learn_outcomes(&mut self, walk: &Walk, query: &Query, observed: &[Option<f32>]) {
        let Some(k) = walk.answer_index() else {
            return;
        };
        let top = self.top();
        let tier = walk.finished.unwrap_or(walk.calls[k].tier);
        let cheap = walk.cheap_steps(query);
        let finished = Finished {
            query,
            answered: tier,
            top,
            top_label: (tier == top).then_some(walk.calls[k].label),
            top_text: if tier == top {
                walk.replies[k].text.as_deref()
            } else {
                None
            },
            cheap: &cheap,
        };
        self.policy.learn_outcomes(&walk.item, &finished, observed);
    }
}

/// The first most probable class.
pub fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |b, (i, &x)| if x > b.1 { (i, x) } else { b },
        )
        .0
}

fn max_prob(v: &[f32]) -> f32 {
    v.iter().copied().fold(0.0, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::BudgetLimits;
    use crate::policy::teaching::L4s;

    /// Tiers answering fixed logits per tier; they record what they were taught and hinted.
    struct Scripted {
        logits: Vec<Vec<f32>>,
        prices: Vec<Micros>,
        warm: Vec<bool>,
        learned: Vec<(usize, usize, f32)>,
        forgotten: usize,
        hints: Vec<Hint>,
    }

    impl Scripted {
        fn new(logits: Vec<Vec<f32>>, micros: &[u64]) -> Self {
            let n = logits.len();
            Scripted {
                logits,
                prices: micros.to_vec(),
                warm: vec![true; n],
                learned: Vec::new(),
                forgotten: 0,
                hints: Vec::new(),
            }
        }
    }

    impl Tiers for Scripted {
        type Error = CoreError;
        fn count(&self) -> usize {
            self.logits.len()
        }
        fn estimate(&mut self, tier: usize, _: &Query) -> Micros {
            self.prices[tier]
        }
        fn warm(&mut self, tier: usize) -> bool {
            self.warm[tier]
        }
        fn updates(&mut self, _tier: usize) -> u64 {
            1000
        }
        fn answer(
            &mut self,
            tier: usize,
            _: &Query,
            hint: Option<Hint>,
        ) -> Result<Reply, CoreError> {
            let logits = self.logits[tier].clone();
            let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = logits.iter().map(|l| (l - m).exp()).collect();
            let z: f32 = e.iter().sum();
            self.hints.extend(hint);
            Ok(Reply {
                cost: self.prices[tier],
                hinted: hint.is_some(),
                ..Reply::classes(e.iter().map(|x| x / z).collect(), logits)
            })
        }
        fn learn(&mut self, tier: usize, _: &str, label: usize, w: f32) -> Result<(), CoreError> {
            self.learned.push((tier, label, w));
            Ok(())
        }
        fn forget(&mut self, _: usize, _: &str) {
            self.forgotten += 1;
        }
    }

    /// Per item: the tier that answered, the label the policy learns against, cheap steps.
    type FixedEnded = std::sync::Arc<std::sync::Mutex<Vec<(usize, Option<usize>, usize)>>>;

    /// Defers always (or never); counts what it was asked and told.
    #[derive(Default)]
    struct Fixed {
        keep: bool,
        asked: Vec<usize>,
        /// Shared, so a test reads it while the cascade owns the policy.
        ended: FixedEnded,
    }

    impl Deferral for Fixed {
        fn name(&self) -> &'static str {
            "fixed"
        }
        fn defer(&mut self, _: &mut ItemState, step: &Step) -> bool {
            self.asked.push(step.tier);
            !self.keep
        }
        fn end_item(&mut self, _: &ItemState, f: &Finished) {
            self.ended
                .lock()
                .unwrap()
                .push((f.answered, f.top_label, f.cheap.len()));
        }
    }

    fn q() -> Query {
        Query::text("1", "x")
    }

    fn three() -> Scripted {
        Scripted::new(
            vec![vec![0.0, 1.0], vec![0.0, 2.0], vec![3.0, 0.0]],
            &[0, 10, 100],
        )
    }

    #[test]
    fn the_budget_is_checked_at_every_metered_step_up() {
        let mut c = Cascade::new(3, Box::<Fixed>::default(), Teaching::default())
            .unwrap()
            .with_metered(vec![false, true, true])
            .unwrap();
        let budget = Budget::new(BudgetLimits {
            max_calls: Some(3),
            max_micros: None,
        })
        .unwrap();
        let mut t = three();
        let served: Vec<Served> = (0..3)
            .map(|_| c.serve(&mut t, &budget, &q()).unwrap())
            .collect();
        // Item 1 reaches the top (two metered calls); item 2 gets the middle tier only; item 3
        // the cheapest.
        assert_eq!(served.iter().map(|s| s.tier).collect::<Vec<_>>(), [2, 1, 0]);
        assert_eq!(served[0].metered(), (2, 110));
        assert_eq!(served[0].cost, 110);
        assert!(!served[0].refused && served[1].refused && served[2].refused);
        assert_eq!(budget.calls(), 3);
        assert_eq!(budget.spent_micros(), 120);
        assert!(
            Cascade::new(3, Box::<Fixed>::default(), Teaching::default())
                .unwrap()
                .with_metered(vec![true, false, true])
                .is_err()
        );
    }

    #[test]
    fn tiers_in_warm_up_go_up_without_asking_and_the_top_teaches_the_tiers_below() {
        let mut c = Cascade::new(3, Box::new(Fixed::default()), Teaching::default()).unwrap();
        let mut t = three();
        t.warm[0] = false;
        let s = c.serve(&mut t, &Budget::unlimited(), &q()).unwrap();
        assert_eq!((s.tier, s.label), (2, 0));
        // Both tiers below learn the top's label at full weight (plain L4S).
        assert_eq!(t.learned, [(0, 0, 1.0), (1, 0, 1.0)]);
        let mut keep = Cascade::new(
            3,
            Box::new(Fixed {
                keep: true,
                ..Default::default()
            }),
            Teaching::default(),
        )
        .unwrap();
        let s = keep.serve(&mut t, &Budget::unlimited(), &q()).unwrap();
        // The warming tier was not asked; the middle one kept the item: nothing is learned.
        assert_eq!((s.tier, s.label, s.cost), (1, 1, 10));
        assert_eq!(t.learned.len(), 2);
        assert_eq!(t.forgotten, 2);
    }

    /// Records what it is told at the end of each item.
    type Ended = Vec<(usize, Option<usize>, Vec<usize>)>;
    struct Told(std::sync::Arc<std::sync::Mutex<Ended>>);

    impl Deferral for Told {
        fn name(&self) -> &'static str {
            "told"
        }
        fn defer(&mut self, _: &mut ItemState, _: &Step) -> bool {
            true
        }
        fn end_item(&mut self, _: &ItemState, f: &Finished) {
            let below: Vec<usize> = f.cheap.iter().map(|s| s.tier).collect();
            if let Ok(mut v) = self.0.lock() {
                v.push((f.answered, f.top_label, below));
            }
        }
    }

    #[test]
    fn the_policy_is_told_how_each_item_ended() {
        let told = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut c = Cascade::new(3, Box::new(Told(told.clone())), Teaching::default()).unwrap();
        let mut t = three();
        let budget = Budget::new(BudgetLimits {
            max_calls: Some(1),
            max_micros: None,
        })
        .unwrap();
        c.serve(&mut t, &budget, &q()).unwrap();
        c.serve(&mut t, &budget, &q()).unwrap();
        let told = told.lock().unwrap().clone();
        // The top answered the first item (label 0) after both cheap tiers ran; the second was
        // refused at the top and the middle tier answered, with no label to learn from.
        assert_eq!(told, [(2, Some(0), vec![0, 1]), (1, None, vec![0, 1])]);
    }

    /// Enters at the top tier before any call (route-before), or explores from the cheapest.
    struct Enter {
        at: usize,
        explore: bool,
    }

    impl Deferral for Enter {
        fn name(&self) -> &'static str {
            "enter"
        }
        fn entry(&mut self, item: &mut ItemState, _: &Query, _: usize) -> usize {
            item.explored = self.explore;
            self.at
        }
        fn defer(&mut self, _: &mut ItemState, _: &Step) -> bool {
            self.explore
        }
    }

    #[test]
    fn route_before_skips_the_tiers_below_and_a_refusal_falls_back_to_the_cheapest() {
        let mut c = Cascade::new(
            3,
            Box::new(Enter {
                at: 2,
                explore: false,
            }),
            Teaching::default(),
        )
        .unwrap();
        let budget = Budget::new(BudgetLimits {
            max_calls: Some(1),
            max_micros: None,
        })
        .unwrap();
        let mut t = three();
        let s = c.serve(&mut t, &budget, &q()).unwrap();
        assert_eq!(s.calls.iter().map(|c| c.tier).collect::<Vec<_>>(), [2]);
        assert_eq!((s.tier, s.cost, s.refused), (2, 100, false));
        // The budget is spent: the cheapest tier answers, without being asked.
        let s = c.serve(&mut t, &budget, &q()).unwrap();
        assert_eq!(s.calls.iter().map(|c| c.tier).collect::<Vec<_>>(), [0]);
        assert_eq!((s.tier, s.refused), (0, true));
        // Exploring from the cheapest calls every tier and says so.
        let mut e = Cascade::new(
            3,
            Box::new(Enter {
                at: 0,
                explore: true,
            }),
            Teaching::default(),
        )
        .unwrap();
        let s = e.serve(&mut t, &Budget::unlimited(), &q()).unwrap();
        assert_eq!((s.calls.len(), s.tier, s.explored), (3, 2, true));
    }

    #[test]
    fn s4l_reaches_the_top_only_from_a_warm_cheap_tier() {
        let soft = Teaching {
            s4l: S4l::Soft,
            ..Teaching::default()
        };
        let mut c = Cascade::new(2, Box::new(Fixed::default()), soft).unwrap();
        let mut t = Scripted::new(vec![vec![0.0, 1.0], vec![3.0, 0.0]], &[0, 1]);
        let s = c.serve(&mut t, &Budget::unlimited(), &q()).unwrap();
        assert!(s.s4l);
        assert_eq!(t.hints.len(), 1);
        assert_eq!(t.hints[0].label, 1);
        t.warm[0] = false;
        let s = c.serve(&mut t, &Budget::unlimited(), &q()).unwrap();
        assert!(!s.s4l && t.hints.len() == 1);
        // Hard S4L: the class the cheap tier rules out is removed from the top's choice.
        let hard = Teaching {
            s4l: S4l::Hard,
            s4l_prune: 0.1,
            ..Teaching::default()
        };
        let mut c = Cascade::new(2, Box::new(Fixed::default()), hard).unwrap();
        let mut t = Scripted::new(vec![vec![0.0, 5.0], vec![1.0, 0.0]], &[0, 1]);
        let s = c.serve(&mut t, &Budget::unlimited(), &q()).unwrap();
        assert!(s.s4l);
        assert_eq!((s.tier, s.label, s.confidence), (1, 1, 1.0));
    }

    #[test]
    fn weighted_l4s_weights_the_top_label_by_its_margin() {
        let weighted = Teaching {
            l4s: L4s::Weighted,
            l4s_imitate_first: 10,
            ..Teaching::default()
        };
        let mut c = Cascade::new(2, Box::new(Fixed::default()), weighted).unwrap();
        let mut t = Scripted::new(vec![vec![0.0, 1.0], vec![0.0, 0.0]], &[0, 1]);
        c.serve(&mut t, &Budget::unlimited(), &q()).unwrap();
        // The top is split 50/50: its label teaches nothing.
        assert_eq!(t.learned, [(0, 0, 0.0)]);
    }

    /// Drives a walk by hand: `fails[t]` says tier t's call fails. Returns the tiers called, in
    /// order, and the tier that answered (None: no answer).
    fn drive(c: &mut Cascade, fails: &[bool]) -> (Vec<usize>, Option<usize>) {
        drive_refusing(c, fails, &[false; 3])
    }

    /// As [`drive`], the budget refusing the tiers `refused` marks (every time they are asked).
    fn drive_refusing(
        c: &mut Cascade,
        fails: &[bool],
        refused: &[bool],
    ) -> (Vec<usize>, Option<usize>) {
        let mut t = three();
        let q = q();
        let mut walk = c.begin(&q, vec![0, 10, 100]).unwrap();
        let mut called = Vec::new();
        let mut asked = 0;
        while let Next::Call { tier, .. } = walk.next() {
            asked += 1;
            assert!(asked <= 8, "the walk loops: {called:?}");
            if refused[tier] {
                c.refused(&mut walk);
                continue;
            }
            called.push(tier);
            assert!(called.len() <= 6, "the walk loops: {called:?}");
            if fails[tier] {
                c.failed(&mut walk);
            } else {
                let r = t.answer(tier, &q, None).unwrap();
                c.answered(&mut walk, &q, r, true);
            }
        }
        let answered = walk
            .has_answer()
            .then(|| c.finish(&mut walk, &q, |_| 0).unwrap().0.tier);
        (called, answered)
    }

    /// Three tiers whose fixed policy defers from every cheap tier.
    fn deferring() -> Cascade {
        Cascade::new(3, Box::<Fixed>::default(), Teaching::default()).unwrap()
    }

    /// Three tiers whose policy enters at the top (route-before's large pick).
    fn entering_at_top() -> Cascade {
        Cascade::new(
            3,
            Box::new(Enter {
                at: 2,
                explore: false,
            }),
            Teaching::default(),
        )
        .unwrap()
    }

    #[test]
    fn failed_tiers_are_passed_over_once_and_the_walk_ends() {
        let (defer, top_first) = (deferring, entering_at_top);
        for (mut c, fails, called, answered) in [
            // Every tier down: each is tried once, and nothing answers.
            (defer(), [true, true, true], vec![0, 1, 2], None),
            (top_first(), [true, true, true], vec![2, 0, 1], None),
            // The top down: the deepest answer below stands.
            (defer(), [false, false, true], vec![0, 1, 2], Some(1)),
            // The middle down: the item goes on to the top.
            (defer(), [false, true, false], vec![0, 1, 2], Some(2)),
            // Route-before's top down: the cheapest answers, and going up skips the top.
            (top_first(), [false, false, true], vec![2, 0], Some(0)),
        ] {
            assert_eq!(drive(&mut c, &fails), (called, answered), "{fails:?}");
        }
    }

    /// A failed cheapest tier under a budget that refuses the tiers above: the walk ends with
    /// no answer, instead of going back to the failed tier again and again (a gateway route
    /// whose budget was closed looped here once, logging without end).
    #[test]
    fn a_failed_cheapest_tier_and_a_refused_one_above_end_the_walk() {
        let (defer, top_first) = (deferring, entering_at_top);
        let none_up = [false, true, true];
        for (mut c, fails, refused, called, answered) in [
            (defer(), [true, false, false], none_up, vec![0], None),
            (top_first(), [true, false, false], none_up, vec![0], None),
            // The cheapest answers after the top was refused: it stands.
            (
                top_first(),
                [false, false, false],
                none_up,
                vec![0],
                Some(0),
            ),
            // Only the top refused: the middle one still gets its turn.
            (
                defer(),
                [true, false, false],
                [false, false, true],
                vec![0, 1],
                Some(1),
            ),
        ] {
            assert_eq!(
                drive_refusing(&mut c, &fails, &refused),
                (called, answered),
                "fails {fails:?}, refused {refused:?}"
            );
        }
    }

    /// A known answer (gold label, correction) teaches every cheap tier whichever tier
    /// answered, and the policy learns against it; without one, only a top answer teaches.
    #[test]
    fn a_known_answer_teaches_the_cheap_tiers_whoever_answered() {
        for (keep, truth, learned, told) in [
            // The cheapest keeps its answer (label 1): the truth 0 teaches both cheap tiers.
            (true, Some(0), vec![(0, 0, 1.0), (1, 0, 1.0)], (0, Some(0))),
            // No truth: a cheap answer teaches nobody.
            (true, None, vec![], (0, None)),
            // Up to the top (label 0), truth 1: the truth teaches, not the top.
            (false, Some(1), vec![(0, 1, 1.0), (1, 1, 1.0)], (2, Some(1))),
            (false, None, vec![(0, 0, 1.0), (1, 0, 1.0)], (2, Some(0))),
        ] {
            let ended = std::sync::Arc::default();
            let mut c = Cascade::new(
                3,
                Box::new(Fixed {
                    keep,
                    ended: std::sync::Arc::clone(&ended),
                    ..Fixed::default()
                }),
                Teaching::default(),
            )
            .unwrap();
            let mut t = three();
            let (s, walk) = c
                .serve_labelled(&mut t, &Budget::unlimited(), &q(), truth)
                .unwrap();
            assert_eq!(t.learned, learned, "keep {keep}, truth {truth:?}");
            assert_eq!(walk.finished(), Some(s.tier));
            // What the policy was told at the end: who answered, the label it learns against.
            let (answered, top_label, _) = ended.lock().unwrap()[0];
            assert_eq!((answered, top_label), told);
        }
    }

    #[test]
    fn a_cascade_needs_two_tiers_and_the_tiers_it_was_built_for() {
        assert!(Cascade::new(1, Box::new(Fixed::default()), Teaching::default()).is_err());
        let mut c = Cascade::new(2, Box::new(Fixed::default()), Teaching::default()).unwrap();
        assert!(c.serve(&mut three(), &Budget::unlimited(), &q()).is_err());
    }
}
