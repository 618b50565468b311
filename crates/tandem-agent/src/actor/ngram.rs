//! The small policy: a linear scorer over hashed features of (state, action) pairs — the action's
//! words, its verb crossed with whether its words appear in the goal, the room, the inventory, the
//! last reply and the recent commands — with a softmax over the admissible actions. It learns only
//! by imitation of the large policy, each time that one is called (L4S).

use super::{words, Choice, Context, STOP};
use crate::error::AgentError;
use std::collections::HashSet;
use tandem_core::features::{ns, FeatureVec, Featurizer};

#[derive(Clone)]
pub struct NgramActor {
    featurizer: Featurizer,
    w: Vec<f32>,
    learning_rate: f32,
    updates: u64,
    rows: Vec<FeatureVec>,
    goal_line: bool,
}

impl NgramActor {
    pub fn new(bits: u32, learning_rate: f32) -> Result<Self, AgentError> {
        Ok(NgramActor {
            featurizer: Featurizer::new(bits)?,
            w: vec![0.0; 1usize << bits],
            learning_rate,
            updates: 0,
            rows: Vec::new(),
            goal_line: false,
        })
    }

    /// Also crosses each action with the words of the reply's line that names the goal's object
    /// ("You see a grey ball 2 steps left" for "go to the grey ball"), so that where the goal lies
    /// can decide the action. BabyAI's actions never name an object: without this its small
    /// policy could only learn a fixed preference over the six.
    pub fn with_goal_line(mut self, yes: bool) -> Self {
        self.goal_line = yes;
        self
    }

    pub fn updates(&self) -> u64 {
        self.updates
    }

    fn featurize(&mut self, ctx: &Context) {
        let set = |t: &str| words(t).collect::<HashSet<String>>();
        let goal = set(ctx.objective);
        let room = set(ctx.description);
        let inv = set(ctx.inventory);
        let obs = set(ctx.observation);
        let last = ctx.history.last();
        // The reply's line sharing most content words with the goal (none without a match).
        let goal_line: Vec<String> = if self.goal_line {
            let content = |t: &str| -> Vec<String> {
                words(t)
                    .filter(|w| !STOP.contains(&w.as_str()) && !goal_verbs().contains(&w.as_str()))
                    .collect()
            };
            let goal_words = content(ctx.objective);
            ctx.observation
                .lines()
                .map(|l| {
                    let ws: Vec<String> = words(l).collect();
                    let hits = ws.iter().filter(|w| goal_words.contains(w)).count();
                    (hits, ws)
                })
                .filter(|(hits, _)| *hits > 0)
                .max_by_key(|(hits, _)| *hits)
                .map(|(_, ws)| {
                    ws.into_iter()
                        .filter(|w| !goal_words.contains(w) && !STOP.contains(&w.as_str()))
                        .collect()
                })
                .unwrap_or_else(|| vec!["<none>".to_string()])
        } else {
            Vec::new()
        };
        self.rows
            .resize_with(ctx.admissible.len(), FeatureVec::default);
        for (row, action) in self.rows.iter_mut().zip(ctx.admissible) {
            row.clear();
            let f = &self.featurizer;
            let ws: Vec<String> = words(action).collect();
            let verb = ws.first().map(String::as_str).unwrap_or("");
            let content: Vec<&String> = ws
                .iter()
                .skip(1)
                .filter(|w| !STOP.contains(&w.as_str()))
                .collect();
            f.add_token(ns::RESPONSE, &format!("verb={verb}"), 1.0, row);
            for w in &ws {
                f.add_token(ns::RESPONSE, &format!("w={w}"), 0.5, row);
            }
            let mut cue = |name: &str, hits: usize| {
                if !content.is_empty() {
                    let frac = hits as f32 / content.len() as f32;
                    f.add_token(ns::META, &format!("{name}:{verb}"), frac, row);
                    f.add_token(ns::META, name, frac, row);
                }
            };
            let hits = |s: &HashSet<String>| content.iter().filter(|w| s.contains(**w)).count();
            cue("goal", hits(&goal));
            cue("room", hits(&room));
            cue("inv", hits(&inv));
            cue("obs", hits(&obs));
            // The goal's wording of this action: "go north" in "... travel north ...".
            if content.len() > 1 && hits(&goal) == content.len() {
                f.add_token(ns::META, &format!("goal_all:{verb}"), 1.0, row);
            }
            let times = ctx.history.iter().filter(|h| *h == action).count();
            if times > 0 {
                f.add_token(ns::META, &format!("repeat:{verb}"), 1.0, row);
                f.add_numeric("repeats", (times as f32).min(3.0), row);
            }
            if last == Some(action) {
                f.add_token(ns::META, &format!("last:{verb}"), 1.0, row);
            }
            for w in &goal_line {
                f.add_token(ns::META, &format!("goal_line:{action}:{w}"), 1.0, row);
            }
        }
    }

    pub fn choose(&mut self, ctx: &Context) -> Result<Choice, AgentError> {
        if ctx.admissible.is_empty() {
            return Err(AgentError::Env(
                "no admissible action to choose from".into(),
            ));
        }
        self.featurize(ctx);
        let scores: Vec<f32> = self.rows[..ctx.admissible.len()]
            .iter()
            .map(|r| {
                r.as_slice()
                    .iter()
                    .map(|f| self.w[f.index as usize] * f.value)
                    .sum()
            })
            .collect();
        Ok(Choice::from_scores(&scores))
    }

    /// One step of softmax cross-entropy towards `target` (the large policy's choice), scaled by
    /// `weight` (its confidence, so unsure teachers teach less).
    pub fn learn(&mut self, ctx: &Context, target: usize, weight: f32) -> Result<(), AgentError> {
        let choice = self.choose(ctx)?;
        if target >= choice.probs.len() {
            return Err(AgentError::Env(format!(
                "target action {target} out of {} admissible",
                choice.probs.len()
            )));
        }
        let lr = self.learning_rate * weight.clamp(0.0, 1.0);
        for (i, row) in self.rows[..choice.probs.len()].iter().enumerate() {
            let g = choice.probs[i] - if i == target { 1.0 } else { 0.0 };
            for f in row.as_slice() {
                self.w[f.index as usize] -= lr * g * f.value;
            }
        }
        self.updates += 1;
        Ok(())
    }
}

/// Words of a goal that say what to do, not to what ("go to the grey ball": "go").
fn goal_verbs() -> &'static [&'static str] {
    &["go", "pick", "put", "open", "you", "see", "next"]
}
