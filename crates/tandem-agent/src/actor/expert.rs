//! The environment's own expert as the large policy: on BabyAI, the bot minigrid ships
//! (`minigrid.utils.baby_ai_bot`, from the BabyAI paper, Chevalier-Boisvert et al. 2019), which
//! plans on the full grid and solves the BabyAI-Text levels. Not a language model: it stands in
//! for a large model that knows what to do, so that a switching controller can be measured on
//! states where the large policy's call matters (the question LONDI asks) apart from how well a
//! local GGUF model plays.

use super::{Choice, Context, LargePolicy, LlmCost};
use crate::error::AgentError;
use std::time::Instant;

/// Picks the action the environment's expert names at the step ([`Context::expert`]), with
/// probability 1. Where the expert is silent (it has failed to plan, or says "done") it falls
/// back to the first admissible action, uniformly unsure, and counts the step in
/// [`LlmCost::unanswered`].
#[derive(Debug, Default)]
pub struct Expert {
    cost: LlmCost,
    last_seconds: f64,
}

impl Expert {
    pub fn new() -> Self {
        Expert::default()
    }
}

impl LargePolicy for Expert {
    fn choose(&mut self, ctx: &Context) -> Result<Choice, AgentError> {
        let started = Instant::now();
        let n = ctx.admissible.len();
        if n == 0 {
            return Err(AgentError::Env(
                "no admissible action to choose from".into(),
            ));
        }
        self.cost.calls += 1;
        let found = ctx
            .expert
            .and_then(|e| ctx.admissible.iter().position(|a| a == e));
        let choice = match found {
            Some(index) => {
                let mut probs = vec![0.0; n];
                probs[index] = 1.0;
                Choice { index, probs }
            }
            None => {
                self.cost.unanswered += 1;
                Choice {
                    index: 0,
                    probs: vec![1.0 / n as f32; n],
                }
            }
        };
        // The bot's planning ran in the environment's step; this is only the lookup.
        self.last_seconds = started.elapsed().as_secs_f64();
        self.cost.seconds += self.last_seconds;
        Ok(choice)
    }

    fn last_seconds(&self) -> f64 {
        self.last_seconds
    }

    fn cost(&self) -> LlmCost {
        self.cost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx<'a>(admissible: &'a [String], expert: Option<&'a str>) -> Context<'a> {
        Context {
            episode: "e",
            objective: "go to the red ball",
            observation: "",
            description: "",
            inventory: "",
            history: &[],
            admissible,
            expert,
        }
    }

    #[test]
    fn follows_the_expert_and_counts_where_it_is_silent() {
        let acts: Vec<String> = ["turn left", "turn right", "go forward"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mut e = Expert::new();
        for (expert, want, sure) in [
            (Some("go forward"), 2, 1.0),
            (Some("turn right"), 1, 1.0),
            (None, 0, 1.0 / 3.0),
            (Some("fly away"), 0, 1.0 / 3.0),
        ] {
            let c = e.choose(&ctx(&acts, expert)).unwrap();
            assert_eq!(c.index, want, "{expert:?}");
            assert!((c.confidence() - sure).abs() < 1e-6, "{expert:?}");
        }
        assert_eq!(e.cost().calls, 4);
        assert_eq!(e.cost().unanswered, 2);
        assert!(e.choose(&ctx(&[], Some("go forward"))).is_err());
    }
}
