//! Policies that choose one of the admissible actions: the large one (a GGUF LLM scoring each
//! action) and the small one (a hashed n-gram scorer trained online on the large one's choices).

mod expert;
mod llm;
mod ngram;

pub use expert::Expert;
pub use llm::{LlmActor, LlmCost, RecordKey};
pub use ngram::NgramActor;

/// The large policy of a switching bench: a GGUF model ([`LlmActor`]) or the environment's own
/// expert ([`Expert`]).
pub trait LargePolicy {
    /// Its choice among `ctx.admissible`.
    fn choose(&mut self, ctx: &Context) -> Result<Choice, crate::AgentError>;
    /// Compute seconds of the last step asked (as recorded, for a replayed one).
    fn last_seconds(&self) -> f64;
    /// What it has cost so far.
    fn cost(&self) -> LlmCost;
}

impl LargePolicy for LlmActor {
    fn choose(&mut self, ctx: &Context) -> Result<Choice, crate::AgentError> {
        LlmActor::choose(self, ctx)
    }
    fn last_seconds(&self) -> f64 {
        LlmActor::last_seconds(self)
    }
    fn cost(&self) -> LlmCost {
        LlmActor::cost(self)
    }
}

/// What a policy sees at a step.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The episode's stable name ([`crate::env::Environment::name`]).
    pub episode: &'a str,
    pub objective: &'a str,
    /// The game's reply to the last action.
    pub observation: &'a str,
    pub description: &'a str,
    pub inventory: &'a str,
    /// Actions taken so far in the episode, oldest first.
    pub history: &'a [String],
    pub admissible: &'a [String],
    /// The environment's expert's action here, when it has one (BabyAI's bot). Only
    /// [`Expert`] reads it: the small policy must learn without it.
    pub expert: Option<&'a str>,
}

/// A policy's distribution over the admissible actions.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub index: usize,
    pub probs: Vec<f32>,
}

impl Choice {
    /// Argmax of scores (first on ties), with a softmax of them.
    pub fn from_scores(scores: &[f32]) -> Choice {
        let mut index = 0;
        for (i, s) in scores.iter().enumerate() {
            if *s > scores[index] {
                index = i;
            }
        }
        let mut probs = scores.to_vec();
        tandem_core::learner::softmax_in_place(&mut probs);
        Choice { index, probs }
    }

    pub fn confidence(&self) -> f32 {
        self.probs.get(self.index).copied().unwrap_or(0.0)
    }

    /// Entropy of the distribution over its maximum (the log of the number of actions): 0 when
    /// sure, 1 when uniform; 0 with fewer than two actions.
    pub fn entropy(&self) -> f32 {
        let n = self.probs.len();
        if n < 2 {
            return 0.0;
        }
        let h: f32 = self
            .probs
            .iter()
            .filter(|p| **p > 0.0)
            .map(|p| -p * p.ln())
            .sum();
        (h / (n as f32).ln()).clamp(0.0, 1.0)
    }

    /// Probability of the choice minus that of the runner-up.
    pub fn margin(&self) -> f32 {
        let top = self.confidence();
        let second = self
            .probs
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != self.index)
            .map(|(_, p)| *p)
            .fold(0.0f32, f32::max);
        top - second
    }
}

/// Indices of at most `k` admissible actions worth showing the large policy when there are too
/// many to score them all (ScienceWorld's run to 256). A function of the state alone, not of the
/// small policy, so that the large policy's candidates (and its recorded scores) are the same
/// whichever method called it. Ranked by how many of the action's words after the verb appear in
/// the goal (twice) and in the last reply and the room (once each), plus a prior for the verbs
/// that move the agent or act on the task ("go", "open", "focus", "pick", "move", "look around");
/// ties in text order. In the admissible order.
pub fn shortlist(ctx: &Context, k: usize) -> Vec<usize> {
    let n = ctx.admissible.len();
    if k == 0 || n <= k {
        return (0..n).collect();
    }
    let set = |t: &str| words(t).collect::<std::collections::HashSet<String>>();
    let goal = set(ctx.objective);
    let seen = set(&format!("{}\n{}", ctx.observation, ctx.description));
    let prior = |verb: &str| match verb {
        "go" | "open" => 1.5,
        "focus" | "pick" => 1.0,
        "move" | "look" => 0.5,
        _ => 0.0,
    };
    let mut ranked: Vec<(f32, usize)> = ctx
        .admissible
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let ws: Vec<String> = words(a).collect();
            let verb = ws.first().map(String::as_str).unwrap_or("");
            let rest: Vec<&String> = ws
                .iter()
                .skip(1)
                .filter(|w| !STOP.contains(&w.as_str()))
                .collect();
            let g = rest.iter().filter(|w| goal.contains(w.as_str())).count() as f32;
            let o = rest.iter().filter(|w| seen.contains(w.as_str())).count() as f32;
            let look_around = if a == "look around" { 1.0 } else { 0.0 };
            (2.0 * g + o.min(2.0) + prior(verb) + look_around, i)
        })
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut keep: Vec<usize> = ranked.into_iter().take(k).map(|(_, i)| i).collect();
    keep.sort_unstable();
    keep
}

/// Words that say nothing about which object an action is about.
pub(crate) const STOP: &[&str] = &[
    "the", "a", "an", "to", "from", "into", "on", "in", "with", "of", "at", "up",
];

/// Lower-cased words of a text, punctuation dropped.
pub(crate) fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric() && c != '-')
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}
