//! Policies that choose one of the admissible actions: the large one (a GGUF LLM scoring each
//! action) and the small one (a hashed n-gram scorer trained online on the large one's choices).

mod llm;
mod ngram;

pub use llm::{LlmActor, LlmCost};
pub use ngram::NgramActor;

/// What a policy sees at a step.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    pub objective: &'a str,
    /// The game's reply to the last action.
    pub observation: &'a str,
    pub description: &'a str,
    pub inventory: &'a str,
    /// Actions taken so far in the episode, oldest first.
    pub history: &'a [String],
    pub admissible: &'a [String],
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

/// Lower-cased words of a text, punctuation dropped.
pub(crate) fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric() && c != '-')
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}
